"""Collect PCT training data: every full-window base-model Picard iterate X^0..X^K and the fixed point X*."""

from __future__ import annotations

import torch

from ..sampling.picard import _single_model_map, _tile_cond, picard_loop, prepare


@torch.no_grad()
def collect_picard_trajectory(denoiser, scheduler, x_T, noise, cond=None, tol: float = 1e-3, max_iters=None):
    """Run full-window base Picard from X^0 (every slot = x_T) and record all iterates.

    Returns ``(iterates, fixed_point)``: iterates (K+1, S+1, B, H, Da) = X^0..X^K (X^K the final state) and
    fixed_point (S+1, B, H, Da) = X^K, which with a small ``tol`` is the sequential trajectory (slot S = the
    sequential sample).  The default tol is tighter than sampling's 0.1 because X* is a training target.
    """
    coeffs, nt, cond = prepare(scheduler, x_T, noise, cond)
    S = coeffs.num_steps
    out = []
    map_fn = _single_model_map(denoiser, coeffs, _tile_cond(cond, S))
    Y, _ = picard_loop(map_fn, coeffs, x_T, nt, window=S, tol=tol, max_iters=max_iters,
                       callback=lambda Y: out.append(Y.clone()))
    iterates = torch.stack(out)
    return iterates, iterates[-1].clone()
