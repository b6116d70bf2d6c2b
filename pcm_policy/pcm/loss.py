"""Picard Consistency Training loss (PCM, arXiv 2503.19731): `alpha(k) * || Phi(X^k; theta_pcm) - X* ||^2`.

Phi is one full-window Picard map taken with the PCM (`pcm_policy.sampling.picard_step`) through the PCM's
unclipped step (`StepCoefficients.unclipped`, the map model switching uses for the PCM); X^k and X* are
data (detached), the gradient flows through the prefix sum into the one batched network call.
alpha(k) = 1 / sqrt(Var(k)) with Var(k) the mean squared distance of X^k to X* over the dataset
(`iterate_variances`) evens out the scale of early and late iterates.

Slot weights (`slot_weights`) reweight the window's slots: the Picard round count is decided by the slots that
converge last (after one PCM round of DDIM-10, slots 1 / 5 / 10 sit 0.008 / 0.012 / 0.034 RMS from X*), so
`linear` (weight proportional to the slot index) and `final` (the output slot alone) aim the loss at them.
"""

from __future__ import annotations

import torch

from ..sampling.picard import picard_step
from ..sampling.schedule import StepCoefficients

SLOT_WEIGHTINGS = ("uniform", "linear", "final")


def slot_weights(weighting: str, slots: int) -> torch.Tensor:
    """Per-slot loss weights over the window's S+1 slots (slot 0 is x_T, slot S the output), mean 1.

    Args:
        weighting: `uniform` (all 1), `linear` (proportional to the slot index s = 0..S), `final` (slot S alone).
        slots: S+1.

    Returns:
        A float32 tensor (S+1,) whose mean is 1 (so the loss scale, and the learning rate, stay comparable).

    Raises:
        ValueError: an unknown weighting (callers check the option first).
    """
    if weighting == "uniform":
        w = torch.ones(slots)
    elif weighting == "linear":
        w = torch.arange(slots, dtype=torch.float32)
    elif weighting == "final":
        w = torch.zeros(slots)
        w[-1] = 1.0
    else:
        raise ValueError(f"slot weighting {weighting!r} not in {SLOT_WEIGHTINGS}")
    return w * (slots / w.sum())


def pct_loss(pcm_denoiser, coeffs: StepCoefficients, iterates_k, k, fixed_point, noise_terms, cond=None, alpha=None,
             slot_weight=None):
    """The PCT loss: mean over elements of `alpha(k_b) * w_s * (Phi(X^k; pcm) - X*)^2`.

    Args:
        pcm_denoiser: the PCM being trained, `eps = pcm_denoiser(x, t, cond)`; gradients flow into it.
        coeffs: the schedule's step coefficients (the unclipped step is used, as at inference).
        iterates_k: X^k of each sample, (S+1, B, H, Da), normalized action units (detached).
        k: the iterate index, an int or a long tensor (B,) (one per sample).
        fixed_point: X*, (S+1, B, H, Da) (detached).
        noise_terms: sigma_j z_j, (S, B, H, Da) (`coeffs.noise_terms(noise)`).
        cond: the condition, (B, C) or None.
        alpha: the weight: None (1), a float, a callable k -> weight(s), or a tensor indexed by k (e.g.
            `1/sqrt(Var)`, see `iterate_variances`).
        slot_weight: w_s, (S+1,) per-slot weights (`slot_weights`), or None (all 1).

    Returns:
        The scalar loss (differentiable w.r.t. the PCM's parameters), in the iterates' dtype.
    """
    Xk = iterates_k.detach()
    target = fixed_point.detach()
    phi = picard_step(pcm_denoiser, coeffs.unclipped(), Xk, noise_terms.detach(), cond)
    sq = (phi - target).pow(2)  # (S+1, B, ...)
    if slot_weight is not None:
        sq = sq * slot_weight.to(device=sq.device, dtype=sq.dtype).reshape(-1, *([1] * (sq.ndim - 1)))
    B = sq.shape[1]
    per_sample = sq.transpose(0, 1).reshape(B, -1).mean(dim=1)  # (B,)
    if alpha is None:
        w = torch.ones((), dtype=sq.dtype, device=sq.device)
    elif callable(alpha):
        w = torch.as_tensor(alpha(k), dtype=sq.dtype, device=sq.device)
    elif isinstance(alpha, torch.Tensor) and alpha.ndim > 0:
        kk = torch.as_tensor(k, device=alpha.device, dtype=torch.long)
        w = alpha[kk].to(device=sq.device, dtype=sq.dtype)
    else:
        w = torch.as_tensor(alpha, dtype=sq.dtype, device=sq.device)
    return (w * per_sample).mean()


def iterate_variances(iterates_list, fixed_points, max_k: int | None = None) -> torch.Tensor:
    """Var(k) = mean squared distance of X^k to X* over a dataset of collected trajectories.

    Args:
        iterates_list: sequence of (K_n+1, S+1, B, ...) tensors, one per collected batch.
        fixed_points: the matching X*, (S+1, B, ...) each.
        max_k: the largest k (None: the longest trajectory's K).

    Returns:
        Var(0..max_k), a float64 CPU tensor (max_k+1,); a k beyond a trajectory's K uses its last iterate
        (= X*, distance 0).
    """
    if max_k is None:
        max_k = max(it.shape[0] for it in iterates_list) - 1
    tot = torch.zeros(max_k + 1, dtype=torch.float64)
    cnt = 0
    for it, xs in zip(iterates_list, fixed_points):
        kk = torch.arange(max_k + 1).clamp(max=it.shape[0] - 1)
        d = (it[kk].double().cpu() - xs.double().cpu()).pow(2)
        tot += d.reshape(max_k + 1, -1).mean(dim=1)
        cnt += 1
    return tot / max(cnt, 1)
