"""Collect PCT training data: every full-window base-model Picard iterate X^0..X^K and the fixed point X*."""

from __future__ import annotations

import torch

from ..sampling.picard import single_model_map, tile_cond, picard_loop, prepare
from ..sampling.schedule import StepCoefficients


@torch.no_grad()
def collect_picard_trajectory(denoiser, scheduler, x_T, noise, cond=None, tol: float = 1e-3, max_iters=None, *,
                              start="x_T", coeffs: StepCoefficients | None = None):
    """Run full-window base Picard from X^0 and record all iterates: the PCT data (PCM, arXiv 2503.19731).

    Args:
        denoiser: the base model, `eps = denoiser(x, t, cond)`.
        scheduler: the diffusers DDPM/DDIM scheduler (`set_timesteps` done); may be None when `coeffs` is given.
        x_T: initial noise, (B, H, Da) float, normalized action units.
        noise: the standard-normal draws z_j, (S, B, H, Da).
        cond: the condition, (B, C) or None.
        tol: convergence tolerance (see `picard_loop`); tighter than sampling's 0.1 by default because X* is a
            training target.
        max_iters: cap on rounds (None: until converged, at most S).
        start: X^0 (`"x_T"`: every slot = x_T; `"noise_sum"` / `"x0_chain"`: the chunk's DDPM noise carried
            along, see `pcm_policy.sampling.start`); a PCM trained on these iterates learns its step from that
            start, so sample with the same one.
        coeffs: precomputed `StepCoefficients` of `scheduler`.

    Returns:
        (iterates, fixed_point): iterates (K+1, S+1, B, H, Da) = X^0..X^K (X^K the final state), fixed_point
        (S+1, B, H, Da) = X^K, which with a small `tol` is the sequential trajectory (slot S = the sequential
        sample); x_T's dtype and device.

    Raises:
        ValueError: see `sample_picard`.
    """
    coeffs, nt, cond = prepare(scheduler, x_T, noise, cond, coeffs)
    S = coeffs.num_steps
    out = []
    map_fn = single_model_map(denoiser, coeffs, tile_cond(cond, S))
    Y, _ = picard_loop(map_fn, coeffs, x_T, nt, window=S, tol=tol, max_iters=max_iters, start=start,
                       callback=lambda Y: out.append(Y.clone()))
    iterates = torch.stack(out)
    return iterates, iterates[-1].clone()
