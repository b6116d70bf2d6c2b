"""Vectorised, noise-free scheduler step `m(y, tau)` with per-step coefficients precomputed once.

Why not `DDPMParallelScheduler.batch_step_no_noise`: it assumes evenly spaced "leading" timesteps
(`prev_t = t - T // S`), DDIM's batched path forces `alpha_prev = 1` at the last step whatever
`set_alpha_to_one` says, and it moves tensors between devices on every call.  Instead
`StepCoefficients` reads the scheduler's `alphas_cumprod`/`timesteps`/config once and
reproduces diffusers' sequential `step` exactly:

* every coefficient is computed with the same float32 scalar arithmetic as `step` does, then cast
  to the sample dtype (this is what torch's type promotion does inside `step` too), so a float64
  trajectory matches diffusers to the last few ulps;
* DDPM uses `scheduler.previous_timestep` semantics (next entry of `timesteps`, -1 after the
  last) and adds noise only where `t > 0` with std `sqrt(_get_variance(t))` (fixed_small);
* DDIM uses `prev_t = t - T // S` and `final_alpha_cumprod`, eta = 0 (no noise).

Supported: prediction_type epsilon / sample / v_prediction, clip_sample (any range), DDPM
variance_type fixed_small. Refused with `ValueError`: thresholding, other variance types,
other scheduler classes.

Convergence scale `conv_var[j]` (used by the Picard test `||dy||^2 / D <= tol^2 conv_var[j]`):
the DDPM posterior variance of step j computed from `alphas_cumprod` at (t_j, prev_t_j) (for DDIM
too, as ParaDiGMS does).  Steps where it is 0 (the last step, where alpha_prev = 1) use the smallest
positive variance of the schedule instead, so the final slot is held to the same (tightest) standard
as the last noisy step rather than being exempt or impossible.

The PCM's map: `StepCoefficients.unclipped` (the same step without `clip_sample`).  A PCM has to
move every slot of X^0 = (x_T, ..., x_T) onto the fixed point in one step, e.g. `m(x_T, tau_last) =
x_T + (y*_S - y*_{S-1})`, which lies outside the clipped range wherever |x_T| > 1: through a clipped step
that target is unreachable whatever the network outputs.  Only the base map (which decides convergence and
the result) keeps the scheduler's clipping.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from diffusers import DDIMParallelScheduler, DDIMScheduler, DDPMParallelScheduler, DDPMScheduler

_DDPM = (DDPMScheduler, DDPMParallelScheduler)
_DDIM = (DDIMScheduler, DDIMParallelScheduler)


def _view(c: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a per-row coefficient (N,) to broadcast against an (N, ...) tensor of `ndim` dims."""
    return c.reshape(c.shape + (1,) * (ndim - c.ndim))


@dataclass
class StepCoefficients:
    """Per-step tensors describing the noise-free step `m` and the noise of one schedule.

    Every tensor field has shape (S,) and lives on one device; `timesteps` is long, the others float (the
    sampling dtype). The fields are described beside their declarations; build them with `from_scheduler`.
    Sources: DDPM posterior mean (Ho et al. 2020, arXiv 2006.11239, eq. 6-7), DDIM with eta = 0 (Song et al.
    2021, arXiv 2010.02502, eq. 12), as diffusers' `DDPMScheduler.step` / `DDIMScheduler.step` compute them.
    """

    family: str  # "ddpm" or "ddim"
    prediction_type: str
    clip_range: float | None  # None: no clipping of the predicted x0
    timesteps: torch.Tensor  # long
    sqrt_abar: torch.Tensor  # alpha_prod_t ** 0.5
    sqrt_1m_abar: torch.Tensor  # beta_prod_t ** 0.5
    coef_x0: torch.Tensor  # DDPM: pred_original_sample_coeff; DDIM: alpha_prod_t_prev ** 0.5
    coef_y: torch.Tensor  # DDPM: current_sample_coeff; DDIM: unused (zeros)
    coef_eps: torch.Tensor  # DDIM: sqrt(1 - alpha_prev - std^2); DDPM: unused (zeros)
    noise_std: torch.Tensor  # sigma_j; 0 where diffusers adds no noise
    conv_var: torch.Tensor  # convergence scale per step (see module doc)

    @property
    def num_steps(self) -> int:
        """S, the number of sampling steps."""
        return int(self.timesteps.shape[0])

    @classmethod
    def from_scheduler(cls, scheduler, device=None, dtype=torch.float32) -> "StepCoefficients":
        """Read a diffusers scheduler once (a Python loop over its S steps) and precompute every coefficient.

        Args:
            scheduler: a diffusers `DDPMScheduler`/`DDPMParallelScheduler` (variance_type fixed_small) or
                `DDIMScheduler`/`DDIMParallelScheduler`, with `set_timesteps(S)` already called.
            device: where the tensors go (None: the CPU).
            dtype: float dtype of the coefficients (timesteps stay long).

        Returns:
            The coefficients; `conv_var` as described in the module docstring.

        Raises:
            ValueError: `set_timesteps` was not called, thresholding is on, the prediction type is not
                epsilon/sample/v_prediction, a DDPM variance type other than fixed_small, or another scheduler
                class.
        """
        cfg = scheduler.config
        if getattr(scheduler, "num_inference_steps", None) is None:
            raise ValueError("call scheduler.set_timesteps(S) before sampling")
        if cfg.get("thresholding", False):
            raise ValueError("dynamic thresholding (config.thresholding=True) is not supported by the Picard samplers")
        pred = cfg.prediction_type
        if pred not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {pred!r}")
        if isinstance(scheduler, _DDPM):
            family = "ddpm"
            if cfg.variance_type != "fixed_small":
                raise ValueError(
                    f"unsupported DDPM variance_type {cfg.variance_type!r}: only 'fixed_small' is supported"
                )
        elif isinstance(scheduler, _DDIM):
            family = "ddim"
        else:
            raise ValueError(f"unsupported scheduler {type(scheduler).__name__}: use DDPM/DDIM (Parallel) schedulers")

        ts = scheduler.timesteps.detach().cpu().to(torch.long)
        S = int(ts.shape[0])
        ac = scheduler.alphas_cumprod.detach().cpu()
        ratio = cfg.num_train_timesteps // scheduler.num_inference_steps
        rows = {k: [] for k in ("sa", "sb", "cx0", "cy", "ceps", "std", "var")}
        for j in range(S):
            t = int(ts[j])
            if family == "ddpm":
                prev_t = int(ts[j + 1]) if j + 1 < S else -1
                a_t = ac[t]
                a_prev = ac[prev_t] if prev_t >= 0 else torch.tensor(1.0)
                beta_prod_t, beta_prod_prev = 1 - a_t, 1 - a_prev
                cur_alpha = a_t / a_prev
                cur_beta = 1 - cur_alpha
                cx0 = (a_prev ** (0.5) * cur_beta) / beta_prod_t
                cy = cur_alpha ** (0.5) * beta_prod_prev / beta_prod_t
                ceps = torch.zeros(())
                std = scheduler._get_variance(t) ** 0.5 if t > 0 else torch.zeros(())
                var = beta_prod_prev / beta_prod_t * cur_beta
            else:
                prev_t = t - ratio
                a_t = ac[t]
                a_prev = ac[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
                beta_prod_t = 1 - a_t
                var = scheduler._get_variance(t, prev_t)
                std_dev = 0.0 * var ** (0.5)  # eta = 0, same arithmetic as DDIMScheduler.step
                cx0 = a_prev ** (0.5)
                cy = torch.zeros(())
                ceps = (1 - a_prev - std_dev**2) ** (0.5)
                std = torch.zeros(())
            rows["sa"].append(a_t ** (0.5))
            rows["sb"].append(beta_prod_t ** (0.5))
            rows["cx0"].append(cx0)
            rows["cy"].append(cy)
            rows["ceps"].append(ceps)
            rows["std"].append(std)
            rows["var"].append(var)

        def stack(key):
            return torch.stack([torch.as_tensor(v).reshape(()).float() for v in rows[key]]).to(device=device, dtype=dtype)

        var = torch.stack([torch.as_tensor(v).reshape(()).double() for v in rows["var"]])
        pos = var[var > 0]
        floor = pos.min() if pos.numel() else torch.tensor(1.0, dtype=torch.float64)
        var = torch.where(var > 0, var, floor)
        clip = float(cfg.clip_sample_range) if cfg.get("clip_sample", False) else None
        return cls(
            family=family,
            prediction_type=pred,
            clip_range=clip,
            timesteps=ts.to(device),
            sqrt_abar=stack("sa"),
            sqrt_1m_abar=stack("sb"),
            coef_x0=stack("cx0"),
            coef_y=stack("cy"),
            coef_eps=stack("ceps"),
            noise_std=stack("std"),
            conv_var=var.to(device=device, dtype=dtype),
        )

    def to(self, device=None, dtype=None) -> "StepCoefficients":
        """The same coefficients on another device and/or float dtype (timesteps stay long).

        Args:
            device: target device (None: keep).
            dtype: target float dtype (None: keep).

        Returns:
            `self` when nothing changes, else a moved copy.
        """
        ref = self.sqrt_abar
        if (device is None or torch.device(device) == ref.device) and (dtype is None or dtype == ref.dtype):
            return self
        moved = {f: getattr(self, f).to(device=device, dtype=dtype) for f in (
            "sqrt_abar", "sqrt_1m_abar", "coef_x0", "coef_y", "coef_eps", "noise_std", "conv_var")}
        return replace(self, timesteps=self.timesteps.to(device), **moved)

    def unclipped(self) -> "StepCoefficients":
        """The same step without x0 clipping: the PCM's map (see the module doc)."""
        return self if self.clip_range is None else replace(self, clip_range=None)

    def noise_terms(self, noise: torch.Tensor) -> torch.Tensor:
        """The noise terms `sigma_j * z_j` the sampler adds after step j.

        Args:
            noise: standard-normal draws z, shape (S, B, ...), on the coefficients' device.

        Returns:
            sigma_j * z_j, shape (S, B, ...); zero where the step adds no noise (DDIM; DDPM at t = 0).

        Raises:
            ValueError: `noise` does not have S steps.
        """
        if noise.shape[0] != self.num_steps:
            raise ValueError(f"noise has {noise.shape[0]} steps, the schedule has {self.num_steps}")
        return _view(self.noise_std, noise.ndim) * noise

    def step_no_noise(self, y: torch.Tensor, model_output: torch.Tensor, idx) -> torch.Tensor:
        """The noise-free scheduler step `m(y, tau_idx)` (x0 clipped if the schedule clips).

        Args:
            y: states, shape (N, ...) (e.g. (N, H, Da) normalized actions).
            model_output: the network's prediction for `y` (eps, x0 or v, per `prediction_type`), same shape.
            idx: step index j in [0, S): an int for all rows, or a long tensor (N,) with one index per row.

        Returns:
            The previous-timestep sample without noise, same shape and dtype as `y`.
        """
        if isinstance(idx, int):
            g = lambda c: c[idx]  # noqa: E731  (0-dim: broadcasts)
        else:
            g = lambda c: _view(c[idx], y.ndim)  # noqa: E731
        sa, sb = g(self.sqrt_abar), g(self.sqrt_1m_abar)
        pred = self.prediction_type
        if pred == "epsilon":
            x0 = (y - sb * model_output) / sa
            eps = model_output
        elif pred == "sample":
            x0 = model_output
            eps = (y - sa * x0) / sb if self.family == "ddim" else None
        else:  # v_prediction
            x0 = sa * y - sb * model_output
            eps = sa * model_output + sb * y if self.family == "ddim" else None
        if self.clip_range is not None:
            x0 = x0.clamp(-self.clip_range, self.clip_range)
        if self.family == "ddpm":
            return g(self.coef_x0) * x0 + g(self.coef_y) * y
        return g(self.coef_x0) * x0 + g(self.coef_eps) * eps
