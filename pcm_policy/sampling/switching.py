"""Model switching: hand the Picard iteration from the PCM back to the base model (PCM, arXiv 2503.19731).

Schedule: `lambda(k) = clip(1 - s * k / K, 0, 1)` for iteration k = 0, 1, 2, ... (k = 0 is the first
iteration, lambda = 1: a pure PCM step).  K is the number of sampling steps S (Picard's worst-case
iteration count, the paper's horizon); the default stiffness `s = S` gives lambda = 1, 0, 0, ... for any S:
one pure PCM step from X^0, then base.  Measured on the PushT policy (DDIM-10, 32 held-out observations) a
PCM trained for that one step needs 4.9 iterations with it and 6.2 with s = S/2 (lambda = 1, 0.5, 0): the
half-mixed map lands further from the base fixed point than the PCM step alone.  Pass any stiffness to change it
(`switch_lambda` gives the exact values; `stats.lambdas` records them).

* Output space (`sample_switched`): the Picard maps are mixed, `Y <- lam Phi(Y; pcm) + (1-lam) Phi(Y; base)`,
  which (the map being affine in m) is implemented by mixing m-values, never eps (clip_sample makes m
  non-affine in eps).  While lambda > 0 both models are called (two calls per iteration, counted twice in
  `evaluations`/`network_calls`); at lambda = 0 only the base model.
* Weight space (`sample_lora_switched`): one call per iteration to `denoiser(x, t, cond, scale)` with
  the LoRA scale = lambda(k) (see `pcm_policy.model.lora`).

The PCM's m-values come from the step WITHOUT x0 clipping (`StepCoefficients.unclipped`: from X^0 the
one-step targets lie outside the clipped range); the base map keeps the scheduler's clipping, and only the
base map decides convergence.

Anderson acceleration (`anderson=`) applies to the base phase only; its history starts with that phase.

Both stop only when lambda = 0 AND the base-map convergence test passes, and the base phase restarts the
window anchor at y_0 = x_T (see `picard_loop`), so with tol -> 0 the output is the base model's sequential
sample whatever the PCM is.  Iterations are bounded by (number of lambda > 0 iterations) + S.
"""

from __future__ import annotations

from typing import Callable

import torch

from .anderson import AndersonConfig
from .picard import cond_rows_of, tile_cond, model_m, picard_loop, prepare
from .schedule import StepCoefficients


def switch_lambda(k: int, stiffness: float, horizon: int) -> float:
    """The switching weight of round k: lambda(k) = clip(1 - stiffness * k / horizon, 0, 1) (PCM's schedule).

    Args:
        k: the Picard round, 0-based.
        stiffness: s > 0; the samplers use s = S by default (lambda = 1, 0, 0, ...).
        horizon: K, the samplers' S.

    Returns:
        lambda(k) in [0, 1] as a Python float (1 = pure PCM, 0 = pure base).
    """
    return min(1.0, max(0.0, 1.0 - float(stiffness) * k / float(horizon)))


def _schedule(stiffness, S):
    s = float(S) if stiffness is None else float(stiffness)
    if s <= 0:
        raise ValueError("stiffness must be > 0 (otherwise lambda never reaches 0 and the base model never takes over)")
    return lambda k: switch_lambda(k, s, S)


def _switched(make_map, scheduler, x_T, noise, cond, stiffness, window, tol, max_iters, should_stop, fixed_shape,
              anderson, start, coeffs):
    """Shared body of both switching modes; `make_map(coeffs, cond_rep)` builds the per-iteration Picard map."""
    coeffs, nt, cond = prepare(scheduler, x_T, noise, cond, coeffs)
    S = coeffs.num_steps
    w = S if window is None else max(1, min(int(window), S))
    map_fn = make_map(coeffs, tile_cond(cond, w))
    Y, stats = picard_loop(
        map_fn, coeffs, x_T, nt, window=w, tol=tol, max_iters=max_iters, should_stop=should_stop,
        fixed_shape=fixed_shape, lambda_fn=_schedule(stiffness, S), anderson=anderson, start=start,
    )
    return Y[S].clone(), stats


@torch.no_grad()
def sample_switched(
    base,
    pcm,
    scheduler,
    x_T: torch.Tensor,
    noise: torch.Tensor,
    cond=None,
    stiffness: float | None = None,
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
    """Output-space switching: `Y <- lam Phi(Y; pcm) + (1 - lam) Phi(Y; base)`, then plain base Picard.

    Exact: with tol -> 0 it returns the base model's sequential x0 for the same noise, whatever the PCM.

    Args:
        base: the base denoiser `eps = base(x, t, cond)`, x (N, H, Da) float, t (N,) long, cond (N, C) or None.
        pcm: the PCM denoiser, same signature; its m-values use the unclipped step.
        scheduler: the diffusers DDPM/DDIM scheduler (`set_timesteps` done); may be None when `coeffs` is given.
        x_T: initial noise, shape (B, H, Da) float, normalized action units.
        noise: the standard-normal draws z_j, shape (S, B, H, Da).
        cond: the condition, (B, C) or None.
        stiffness: s of `switch_lambda` (> 0); None = S (one pure PCM round, then base).
        window, tol, max_iters, should_stop, fixed_shape: as in `picard_loop`.
        anderson: Anderson acceleration of the base phase only.
        start: X^0, the state the PCM step starts from (a mode of `START_MODES` or a tensor (S+1, B, H, Da)).
        coeffs: precomputed `StepCoefficients` of `scheduler` (see `sample_picard`).

    Returns:
        (x0 (B, H, Da) in normalized action units, `SamplerStats` with the lambdas used).

    Raises:
        ValueError: stiffness <= 0, and the cases of `sample_picard`.
    """

    def make_map(coeffs, cond_rep):
        pcm_coeffs = coeffs.unclipped()

        def map_fn(X, idx_rows, t, lam):
            c = cond_rows_of(cond_rep, idx_rows.shape[0])
            m_base = None if lam >= 1.0 else model_m(base, coeffs, X, idx_rows, t, c)
            if lam <= 0.0:
                return m_base, 1
            m_pcm = model_m(pcm, pcm_coeffs, X, idx_rows, t, c)
            if m_base is None:
                return m_pcm, 1
            return lam * m_pcm + (1.0 - lam) * m_base, 2

        return map_fn

    return _switched(make_map, scheduler, x_T, noise, cond, stiffness, window, tol, max_iters, should_stop, fixed_shape,
                     anderson, start, coeffs)


@torch.no_grad()
def sample_lora_switched(
    denoiser,
    scheduler,
    x_T: torch.Tensor,
    noise: torch.Tensor,
    cond=None,
    stiffness: float | None = None,
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
    """Weight-space switching: weights W0 + lambda(k) * DeltaW (LoRA scale = lambda(k)); one call per round.

    Exact like `sample_switched`: once lambda = 0 the map is the base model's.

    Args:
        denoiser: `eps = denoiser(x, t, cond, scale)`: the base network with the LoRA delta at `scale`
            (`pcm_policy.model.lora.scaled_denoiser`).
        scheduler, x_T, noise, cond, stiffness, window, tol, max_iters, should_stop, fixed_shape, anderson,
            start, coeffs: as in `sample_switched`.

    Returns:
        (x0 (B, H, Da) in normalized action units, `SamplerStats` with the lambdas used).

    Raises:
        ValueError: stiffness <= 0, and the cases of `sample_picard`.
    """

    def make_map(coeffs, cond_rep):
        pcm_coeffs = coeffs.unclipped()

        def map_fn(X, idx_rows, t, lam):
            c = cond_rows_of(cond_rep, idx_rows.shape[0])
            step = coeffs if lam <= 0.0 else pcm_coeffs  # W0 + lam * dW is (partly) the PCM: its map is unclipped
            return model_m(denoiser, step, X, idx_rows, t, c, float(lam)), 1

        return map_fn

    return _switched(make_map, scheduler, x_T, noise, cond, stiffness, window, tol, max_iters, should_stop, fixed_shape,
                     anderson, start, coeffs)
