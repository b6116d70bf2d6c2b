"""The Picard start X^0: the trajectory the iteration begins from (no network call).

Modes (`y_0 = x_T` always; `n_i = sigma_i z_i` the noise terms the Picard map adds explicitly):

* `"x_T"`: every slot = x_T (ParaDiGMS).
* `"noise_sum"`: `y_j = x_T + sum_{i<j} n_i`, the chunk's own noise carried along the trajectory.  For DDIM
  (sigma = 0) it equals `"x_T"`.  Why: the DDPM Picard map adds `n_i` explicitly and the fixed point keeps
  it, so a start without it is off by a noise sum that grows along the trajectory (measured: docs/anderson-and-starts.md).
* `"x0_chain"`: the scheduler chain run from an x0 guess of zeros with the chunk's noise,
  `y_{j+1} = m(y_j, tau_j; x0 = 0) + n_j`, i.e. the sequential sampler with a denoiser that always predicts
  x0 = 0 (one small matrix product, no network).

Measured (PushT base DDPM-100, tol 0.1, 32 observations): Picard needs 24.1 / 24.0 / 18.4 rounds from x_T /
noise_sum / x0_chain, triangular Anderson (m=2, beta=0.5) 13.0 / 12.3 / 8.6.  On DDIM-10 x0_chain does not help.

`start` may also be a tensor (S+1, B, H, Da) used as given (copied), e.g. a warm start.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .schedule import StepCoefficients

START_MODES = ("x_T", "noise_sum", "x0_chain")


def check_start(start) -> None:
    """Check a start mode before any work.

    Args:
        start: a mode of `START_MODES` or a trajectory tensor (its shape is checked by `initial_trajectory`).

    Raises:
        ValueError: `start` is neither a tensor nor one of `START_MODES`.
    """
    if not isinstance(start, torch.Tensor) and start not in START_MODES:
        raise ValueError(f"start={start!r}: expected one of {', '.join(START_MODES)} or a trajectory tensor")


def initial_trajectory(
    coeffs: StepCoefficients, x_T: torch.Tensor, noise_terms: torch.Tensor, start="x_T"
) -> torch.Tensor:
    """The Picard start X^0 (no network call).

    Args:
        coeffs: the schedule's `StepCoefficients` (S steps).
        x_T: initial noise, shape (B, H, Da) float, normalized action units.
        noise_terms: sigma_j z_j, shape (S, B, H, Da) (`coeffs.noise_terms(noise)`).
        start: a mode of `START_MODES` (see the module docstring) or a trajectory tensor (S+1, B, H, Da),
            copied, with its slot 0 replaced by x_T.

    Returns:
        X^0, shape (S+1, B, H, Da), on x_T's device and dtype; slot 0 is x_T.

    Raises:
        ValueError: an unknown mode, or a tensor of another shape.
    """
    check_start(start)
    S = coeffs.num_steps
    if isinstance(start, torch.Tensor):
        if start.shape != (S + 1, *x_T.shape):
            raise ValueError(f"start trajectory has shape {tuple(start.shape)}, expected {(S + 1, *x_T.shape)}")
        Y = start.to(device=x_T.device, dtype=x_T.dtype).clone()
        Y[0] = x_T  # slot 0 is the anchor of every Picard map: it must be x_T exactly
        return Y
    if start == "x_T":
        return x_T.unsqueeze(0).repeat(S + 1, *([1] * x_T.ndim))
    if start == "noise_sum":
        return torch.cat([x_T.unsqueeze(0), x_T.unsqueeze(0) + torch.cumsum(noise_terms, dim=0)], dim=0)
    # x0_chain.  "sample" prediction with model output x0 = 0 gives m(y, tau_j; x0 = 0) for every schedule (DDIM's
    # eps implied by (y, x0) included; 0 is inside any clip range).  That map is linear, m = c_j y, so the chain
    # is one matrix product: y_j = sum_i K[j, i] u_i, u = (x_T, n_0 .. n_{S-1}), K[j, i] = c_i c_{i+1} .. c_{j-1}.
    m_from_x0 = replace(coeffs, prediction_type="sample").step_no_noise
    ones = torch.ones(S, device=x_T.device, dtype=x_T.dtype)
    c = m_from_x0(ones, torch.zeros_like(ones), torch.arange(S, device=x_T.device))  # (S,)
    j = torch.arange(S + 1, device=x_T.device)
    later = j[:, None] > j[None, :]  # row r > column i: factor c_{r-1} enters K[j, i] for r = i+1 .. j
    C = torch.where(later[1:], c[:, None], torch.ones((), device=x_T.device, dtype=x_T.dtype))
    K = torch.cumprod(torch.cat([torch.ones_like(C[:1]), C]), dim=0).tril()  # (S+1, S+1)
    u = torch.cat([x_T.unsqueeze(0), noise_terms], dim=0)
    return (K @ u.reshape(S + 1, -1)).reshape(u.shape)
