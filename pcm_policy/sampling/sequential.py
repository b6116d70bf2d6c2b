"""Reference sequential sampler: `y_{j+1} = m(y_j, tau_j) + sigma_j z_j` for j = 0..S-1."""

from __future__ import annotations

import torch

from .schedule import StepCoefficients


@torch.no_grad()
def sample_sequential(denoiser, scheduler, x_T: torch.Tensor, noise: torch.Tensor, cond=None, *,
                      coeffs: StepCoefficients | None = None) -> torch.Tensor:
    """Run the S scheduler steps one network call at a time (the reference every other sampler must match).

    Equals diffusers' `scheduler.step` loop with the same noise (DDPM: Ho et al. 2020 eq. 6-7; DDIM eta=0:
    Song et al. 2021 eq. 12).

    Args:
        denoiser: `eps = denoiser(x, t, cond)`, x (B, H, Da) float, t (B,) long, cond (B, C) or None.
        scheduler: the diffusers DDPM/DDIM scheduler (`set_timesteps` done); not read when `coeffs` is given.
        x_T: initial noise, shape (B, H, Da) float, in normalized action units.
        noise: the standard-normal draws z_j, shape (S, B, H, Da) (ignored where sigma_j = 0, e.g. DDIM).
        cond: the condition passed to the denoiser, (B, C) or None.
        coeffs: the schedule's `StepCoefficients` already on x_T's device and dtype (built from `scheduler`
            when None).

    Returns:
        x0, shape (B, H, Da), x_T's dtype, in normalized action units.

    Raises:
        ValueError: `noise` has another number of steps than the schedule, or the scheduler is unsupported
            (see `StepCoefficients.from_scheduler`).
    """
    if coeffs is None:
        coeffs = StepCoefficients.from_scheduler(scheduler, x_T.device, x_T.dtype)
    nt = coeffs.noise_terms(noise.to(device=x_T.device, dtype=x_T.dtype))
    B = x_T.shape[0]
    y = x_T
    ts = coeffs.timesteps.view(-1, 1).expand(-1, B)  # (S, B): one row per step, no per-step allocation
    for j in range(coeffs.num_steps):
        t = ts[j]
        eps = denoiser(y, t, cond)
        y = coeffs.step_no_noise(y, eps, j) + nt[j]
    return y
