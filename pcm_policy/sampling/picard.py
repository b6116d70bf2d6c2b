"""Parallel Picard iteration over the denoising trajectory (ParaDiGMS, Shih et al. 2023, arXiv 2305.16317).

Trajectory Y = (y_0 .. y_S), shape (S+1, B, H, Da), y_0 = x_T.  One iteration over the window of steps
[a, a+w) makes ONE batched network call over those w steps and updates, by a prefix sum,

    y_{j+1} <- y_a + sum_{i=a..j} ( m(y_i, tau_i) - y_i + sigma_i z_i ),   j in [a, a+w).

Conventions of this implementation:

* Initialisation X^0: `start="x_T"` every slot = x_T (as ParaDiGMS); `"noise_sum"` / `"x0_chain"` carry the
  chunk's own DDPM noise (see `pcm_policy.sampling.start`).
* Anderson acceleration (`anderson=AndersonConfig(...)`, base phase only): slots up to the new anchor take the
  Picard values as above, the slots after it inside the window the Anderson step of
  `pcm_policy.sampling.anderson`; convergence, the anchor rule and the S-iteration bound are unchanged.
* Convergence: output slot j+1 passes when `max_b ||y_{j+1}^{new} - y_{j+1}^{old}||^2 / D <= tol^2 * var_j`
  (`var_j = StepCoefficients.conv_var[j]`; at a zero-variance step the smallest positive variance of the
  schedule is used).  The anchor moves to the first failed slot (always >= a+1: that slot was computed from
  the exact anchor); if none failed the window moves by its full size.  The window keeps its size; slots the
  window has not reached yet always hold the latest value of the window's last slot ("new slots start from
  the last state"), so `Y[S]` is the anytime estimate returned on `should_stop`/`max_iters`.
  Done when the anchor reaches S: at most S iterations.
* Fixed shapes: with `fixed_shape=True` (default) every network call has exactly `w * B` rows; when the
  window runs past step S-1 the tail is padded by repeating the last step's row and the padded results are
  discarded.  `fixed_shape=False` shrinks the call instead (cheaper on CPU, not CUDA-graph friendly).
* Counting (`SamplerStats`): `iterations` = batched rounds (sequential network latency);
  `evaluations` = useful step evaluations per trajectory, i.e. real window slots summed over iterations and
  models, padding excluded and independent of the batch size B (sequential sampling = S);
  `network_rows` = rows actually passed to networks, padding and batch included (the compute cost).
* Host syncs: one `.item()` per iteration (the slide/convergence decision), none when it is not needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .anderson import AndersonConfig, AndersonMixer
from .schedule import StepCoefficients
from .start import initial_trajectory


@dataclass
class SamplerStats:
    """What one sampled chunk cost (see "Counting" in the module docstring).

    Attributes:
        iterations: batched rounds, i.e. network calls in sequence (sequential sampling: S).
        evaluations: useful step evaluations per trajectory, window padding excluded, independent of B.
        converged: the base-map convergence test passed on every slot (False when stopped early).
        network_calls: calls to a network (two per round while output-space switching mixes two models).
        network_rows: rows passed to networks, padding and batch included (the compute cost).
        lambdas: the switching weight lambda(k) of every round (switching samplers only; else empty).
    """

    iterations: int = 0
    evaluations: int = 0
    converged: bool = False
    network_calls: int = 0
    network_rows: int = 0
    lambdas: list[float] = field(default_factory=list)


def prefix_sum(delta: torch.Tensor) -> torch.Tensor:
    """Cumulative sum over dim 0 (the Picard update's sum over slots), differentiable.

    Under `deterministic=true` torch.cumsum refuses floating-point CUDA tensors (its kernel is not deterministic),
    so there the same sum is one product with a lower-triangular matrix of ones, which cuBLAS computes
    deterministically (CUBLAS_WORKSPACE_CONFIG is set with the flag); it agrees with cumsum to float rounding.
    """
    if delta.is_cuda and torch.are_deterministic_algorithms_enabled():
        return _prefix_sum_matmul(delta)
    return torch.cumsum(delta, dim=0)


def _prefix_sum_matmul(delta: torch.Tensor) -> torch.Tensor:
    n = delta.shape[0]
    ones = torch.ones(n, n, device=delta.device, dtype=delta.dtype).tril_()
    return (ones @ delta.reshape(n, -1)).reshape(delta.shape)


def tile_cond(cond, reps: int):
    """`cond` (B, C) repeated `reps` times along dim 0 -> (reps*B, C), slot-major like the network rows; None
    stays None."""
    return None if cond is None else cond.repeat(reps, *([1] * (cond.ndim - 1)))


def picard_loop(
    map_fn: Callable,
    coeffs: StepCoefficients,
    x_T: torch.Tensor,
    noise_terms: torch.Tensor,
    *,
    window: int | None = None,
    tol: float = 0.1,
    max_iters: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    fixed_shape: bool = True,
    lambda_fn: Callable[[int], float] | None = None,
    callback: Callable[[torch.Tensor], None] | None = None,
    anderson: AndersonConfig | None = None,
    start="x_T",
):
    """Generic windowed Picard loop shared by all samplers (ParaDiGMS, arXiv 2305.16317, Algorithm 1).

    The conventions (update, convergence test, sliding, padding, counting) are in the module docstring.

    Args:
        map_fn: `map_fn(X, idx_rows, t, lam) -> (M, models)`: X the window states (n, B, H, Da), idx_rows and
            t the step index and timestep (long) of every network row (n*B,), lam the mixing weight; M the
            m-values (n, B, H, Da) and `models` the model evaluations each slot cost (1 for a single model,
            2 for output-space mixing).
        coeffs: the schedule's `StepCoefficients` on x_T's device and dtype.
        x_T: initial noise, shape (B, H, Da) float, normalized action units.
        noise_terms: sigma_j z_j, shape (S, B, H, Da).
        window: window size w in steps, clamped to [1, S]; None = S (full window).
        tol: convergence tolerance (>= 0) in units of each step's noise std (module docstring); 0 gives the
            sequential result exactly, still within S base rounds.
        max_iters: cap on rounds (anytime output); None = no cap.
        should_stop: checked before every round after the first; True stops with the current estimate.
        fixed_shape: pad every network call to w*B rows (CUDA-graph friendly) instead of shrinking the last.
        lambda_fn: model switching: the mixing weight of round k (0-based). While it is > 0 the map is not
            the base map: the window may slide by the same rule (clamped inside the trajectory) but nothing is
            declared converged; at the first round with lambda = 0 the anchor returns to 0, so the result is
            exactly base-model Picard. None = base map throughout.
        callback: `callback(Y)` sees the trajectory after initialisation and after every round.
        anderson: accelerate the base phase (lambda = 0) with (triangular) Anderson mixing of the slots after
            the new anchor (`pcm_policy.sampling.anderson`); its history starts with the base phase.
        start: X^0, a mode of `pcm_policy.sampling.start.START_MODES` or a trajectory tensor (S+1, B, H, Da).

    Returns:
        (Y, stats): the final trajectory (S+1, B, H, Da), Y[S] the chunk (anytime estimate if stopped early),
        and its `SamplerStats`.

    Raises:
        ValueError: an unknown start or a start tensor of another shape, or `anderson` not an `AndersonConfig`.
    """
    S = coeffs.num_steps
    B = x_T.shape[0]
    w = S if window is None else max(1, min(int(window), S))
    dev = x_T.device
    if anderson is not None and not isinstance(anderson, AndersonConfig):
        raise ValueError(f"anderson={anderson!r}: expected an AndersonConfig or None")
    mixer = None if anderson is None else AndersonMixer(anderson)
    Y = initial_trajectory(coeffs, x_T, noise_terms, start)
    ar = torch.arange(w, device=dev)
    D = x_T[0].numel()
    tol2 = float(tol) ** 2
    thr_all = tol2 * coeffs.conv_var  # (S,)
    stats = SamplerStats()
    if callback is not None:
        callback(Y)
    a = 0
    k = 0
    base_phase = lambda_fn is None
    while True:
        if max_iters is not None and k >= max_iters:
            break
        if k >= 1 and should_stop is not None and should_stop():
            break
        lam = 0.0 if lambda_fn is None else float(lambda_fn(k))
        if lambda_fn is not None:
            stats.lambdas.append(lam)
            if lam <= 0.0 and not base_phase:
                base_phase = True
                a = 0  # restart from the exact anchor: from here on it is plain base-model Picard
                if mixer is not None:
                    mixer.reset()  # Anderson history covers base-map iterations only
        n_valid = min(w, S - a)
        if fixed_shape:
            idx = (ar + a).clamp_(max=S - 1)
            n_rows = w
        else:
            idx = ar[:n_valid] + a
            n_rows = n_valid
        X = Y[idx]  # (n_rows, B, ...)
        idx_rows = idx.repeat_interleave(B)
        M, models = map_fn(X, idx_rows, coeffs.timesteps[idx_rows], lam)
        delta = M - X + noise_terms[idx]
        new = Y[a] + prefix_sum(delta)  # outputs for slots a+1 .. a+n_rows
        new = new[:n_valid]
        old = Y[a + 1 : a + 1 + n_valid]
        need_decision = base_phase or w < S
        if need_decision:
            err = (new - old).pow(2).reshape(n_valid, B, D).mean(dim=2).amax(dim=1)
            fail = err > thr_all[a : a + n_valid]
            fail = torch.cat([fail, fail.new_ones(1)])
            ind = int(torch.argmax(fail.to(torch.int32)).item())  # the one host sync per iteration
            new_a = a + min(1 + ind, n_valid)
        end = a + n_valid
        if mixer is not None and base_phase:
            mixer.record(a + 1, old, new)
            if new_a < end:  # slots a+1..new_a are exact Picard values; mix only the unconverged ones after
                new[new_a - a :] = mixer.mix(new_a + 1, end, new[new_a - a :])
        Y[a + 1 : a + 1 + n_valid] = new
        if end < S:
            Y[end + 1 :] = Y[end]
        k += 1
        stats.iterations = k
        stats.evaluations += n_valid * models
        stats.network_calls += models
        stats.network_rows += n_rows * B * models
        if callback is not None:
            callback(Y)
        if need_decision:
            if base_phase:
                a = new_a
                if a >= S:
                    stats.converged = True
                    break
            else:
                a = min(new_a, S - w)
    return Y, stats


def _rows(X: torch.Tensor) -> torch.Tensor:
    """(n, B, ...) -> (n*B, ...): slot-major rows, as the network sees them."""
    return X.reshape(X.shape[0] * X.shape[1], *X.shape[2:])


def cond_rows_of(cond_rep, n_rows: int):
    """The first `n_rows` rows of a tiled condition: `tile_cond(cond, w)` holds w blocks of B rows, so its first
    n*B rows are `tile_cond(cond, n)`. None stays None."""
    return None if cond_rep is None else cond_rep[:n_rows]


def model_m(denoiser, coeffs: StepCoefficients, X, idx_rows, t, cond_rows, *extra):
    """m-values of one batched network call over the window states.

    Args:
        denoiser: `eps = denoiser(x, t, cond, *extra)`, called once on all n*B rows.
        coeffs: the step coefficients (the PCM's map passes `coeffs.unclipped()`).
        X: window states, shape (n, B, H, Da).
        idx_rows: step index of every row, long (n*B,), slot-major.
        t: timestep of every row, long (n*B,).
        cond_rows: the condition of every row, (n*B, C) or None.
        *extra: passed on to the denoiser (the LoRA scale in weight-space switching).

    Returns:
        m(X, tau), the same shape and dtype as X.
    """
    flat = _rows(X)
    eps = denoiser(flat, t, cond_rows, *extra)
    return coeffs.step_no_noise(flat, eps, idx_rows).reshape(X.shape)


def single_model_map(denoiser, coeffs: StepCoefficients, cond_rep):
    """The Picard map of one model, as `picard_loop` expects it: `map_fn(X, idx_rows, t, lam)` -> (m-values of X
    (n, B, H, Da), 1 evaluation per slot), from one batched call of `denoiser`; `cond_rep` = `tile_cond(cond, w)`
    for the window size w, or None. ParaDiGMS (arXiv 2305.16317), Algorithm 1, the batched drift evaluation."""

    def map_fn(X, idx_rows, t, lam):
        return model_m(denoiser, coeffs, X, idx_rows, t, cond_rows_of(cond_rep, idx_rows.shape[0])), 1

    return map_fn


def prepare(scheduler, x_T, noise, cond, coeffs: StepCoefficients | None = None):
    """Coefficients on x_T's device/dtype and the noise terms sigma_j z_j.

    Args:
        scheduler: a diffusers DDPM/DDIM scheduler; not read (may be None) when `coeffs` is given. Building the
            coefficients from it is a Python loop over all S steps, worth doing once per sampler.
        x_T: initial noise (B, H, Da); sets the device and dtype.
        noise: standard-normal draws z, shape (S, B, H, Da).
        cond: the condition (B, C) or None; moved to x_T's device.
        coeffs: precomputed `StepCoefficients` of the schedule.

    Returns:
        (coeffs, noise_terms (S, B, H, Da), cond), all on x_T's device.

    Raises:
        ValueError: `noise` has another number of steps than the schedule, or the scheduler is unsupported.
    """
    if coeffs is None:
        coeffs = StepCoefficients.from_scheduler(scheduler, x_T.device, x_T.dtype)
    else:
        coeffs = coeffs.to(x_T.device, x_T.dtype)
    nt = coeffs.noise_terms(noise.to(device=x_T.device, dtype=x_T.dtype))
    if cond is not None:
        cond = cond.to(x_T.device)
    return coeffs, nt, cond


@torch.no_grad()
def sample_picard(
    denoiser,
    scheduler,
    x_T: torch.Tensor,
    noise: torch.Tensor,
    cond=None,
    window: int | None = None,
    tol: float = 0.1,
    max_iters: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    *,
    fixed_shape: bool = True,
    anderson: AndersonConfig | None = None,
    start="x_T",
    coeffs: StepCoefficients | None = None,
):
    """Picard-iteration sampler (ParaDiGMS, arXiv 2305.16317).

    As tol -> 0 its x0 equals `sample_sequential`'s (same noise) to float precision.

    Args:
        denoiser: `eps = denoiser(x, t, cond)`, x (N, H, Da) float, t (N,) long, cond (N, C) or None.
        scheduler: the diffusers DDPM/DDIM scheduler (`set_timesteps` done); may be None when `coeffs` is given.
        x_T: initial noise, shape (B, H, Da) float, normalized action units.
        noise: the standard-normal draws z_j, shape (S, B, H, Da).
        cond: the condition, (B, C) or None.
        window, tol, max_iters, should_stop, fixed_shape, anderson, start: as in `picard_loop` (window None =
            all S steps; anderson keeps the result exact).
        coeffs: precomputed `StepCoefficients` of `scheduler` (moved to x_T's device/dtype if needed).

    Returns:
        (x0 (B, H, Da) in normalized action units, `SamplerStats`).

    Raises:
        ValueError: see `prepare` and `picard_loop`.
    """
    coeffs, nt, cond = prepare(scheduler, x_T, noise, cond, coeffs)
    S = coeffs.num_steps
    w = S if window is None else max(1, min(int(window), S))
    map_fn = single_model_map(denoiser, coeffs, tile_cond(cond, w))
    Y, stats = picard_loop(
        map_fn, coeffs, x_T, nt, window=w, tol=tol, max_iters=max_iters, should_stop=should_stop,
        fixed_shape=fixed_shape, anderson=anderson, start=start,
    )
    return Y[S].clone(), stats


def picard_step(denoiser, coeffs: StepCoefficients, Y: torch.Tensor, noise_terms: torch.Tensor, cond=None):
    """One differentiable full-window Picard map Phi(Y) (no `no_grad`: gradients reach the network).

    `Phi(Y)[j+1] = Y[0] + sum_{i<=j} (m(Y[i], tau_i) - Y[i] + sigma_i z_i)`, from ONE network call over the S
    slots (ParaDiGMS's Picard update over the full window; the step PCT trains, arXiv 2503.19731).

    Args:
        denoiser: `eps = denoiser(x, t, cond)` on S*B rows.
        coeffs: the step coefficients (PCT passes `coeffs.unclipped()`).
        Y: trajectory, shape (S+1, B, H, Da), Y[0] = x_T.
        noise_terms: sigma_j z_j, shape (S, B, H, Da) (`coeffs.noise_terms(noise)`).
        cond: the condition, (B, C) or None.

    Returns:
        Phi(Y), shape (S+1, B, H, Da), with Phi(Y)[0] = Y[0].
    """
    S = coeffs.num_steps
    X = Y[:S]
    B = X.shape[1]
    idx_rows = torch.arange(S, device=Y.device).repeat_interleave(B)
    M = model_m(denoiser, coeffs, X, idx_rows, coeffs.timesteps[idx_rows], tile_cond(cond, S))
    delta = M - X + noise_terms
    return torch.cat([Y[:1], Y[:1] + prefix_sum(delta)], dim=0)
