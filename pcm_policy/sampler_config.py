"""Which sampler a policy uses to turn noise into an action chunk: the `sampler=` config group.

A `SamplerConfig` names an algorithm (`sequential`, `picard`, `pcm` for output-space switching, `pcm_lora`
for weight-space switching) over a base scheduler (`ddpm` with all training steps, or `ddim` with fewer).
The policy builds the scheduler and the denoisers; this module only dispatches to the pure samplers.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from pcm_policy.errors import ConfigError

ALGORITHMS = ("sequential", "picard", "pcm", "pcm_lora")
SCHEDULERS = ("ddpm", "ddim")


@dataclass(frozen=True)
class SamplerConfig:
    name: str = "sequential"  # sequential | picard | pcm | pcm_lora
    scheduler: str = "ddpm"  # ddpm | ddim
    steps: int = 100  # sampling steps S (ddpm uses every training step when steps == num_train_timesteps)
    window: int | None = None  # Picard window; None = all S steps
    tol: float = 0.1
    stiffness: float | None = None  # model switching; None = the sampler's default
    max_iters: int | None = None
    # Pad every Picard window to the same shape (needed to capture CUDA graphs). None = on CUDA only: on a CPU
    # a shrinking last window is cheaper.
    fixed_shape: bool | None = None

    def __post_init__(self):
        if self.name not in ALGORITHMS:
            raise ConfigError(f"sampler.name={self.name!r}: expected one of {', '.join(ALGORITHMS)}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"sampler.scheduler={self.scheduler!r}: expected one of {', '.join(SCHEDULERS)}")
        if self.steps < 1:
            raise ConfigError(f"sampler.steps={self.steps}: must be >= 1")
        if self.window is not None and self.window < 1:
            raise ConfigError(f"sampler.window={self.window}: must be >= 1 or null")
        if self.tol < 0:
            raise ConfigError(f"sampler.tol={self.tol}: must be >= 0")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | "SamplerConfig") -> "SamplerConfig":
        if isinstance(cfg, SamplerConfig):
            return cfg
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - known - {"pcm_checkpoint"})
        if unknown:
            raise ConfigError(f"sampler.{unknown[0]}: unknown sampler key (known: {', '.join(sorted(known))})")
        return cls(**{k: v for k, v in cfg.items() if k in known})

    @property
    def label(self) -> str:
        """Short name for tables, e.g. `picard/ddpm100` or `sequential/ddim10`."""
        return f"{self.name}/{self.scheduler}{self.steps}"

    @property
    def needs_pcm(self) -> bool:
        return self.name in ("pcm", "pcm_lora")


def build_scheduler(train_scheduler_config: Mapping[str, Any], kind: str, steps: int):
    """A fresh inference scheduler sharing the training noise schedule, with `set_timesteps(steps)` done."""
    cls = DDPMScheduler if kind == "ddpm" else DDIMScheduler
    config = dict(train_scheduler_config)
    if kind == "ddim":
        config.pop("variance_type", None)
        config.setdefault("set_alpha_to_one", True)
    scheduler = cls.from_config(config)
    scheduler.set_timesteps(steps)
    return scheduler


def run_sampler(
    cfg: SamplerConfig,
    scheduler,
    x_T: torch.Tensor,
    noise: torch.Tensor,
    cond: torch.Tensor | None,
    base: Callable,
    pcm: Callable | None = None,
    should_stop: Callable[[], bool] | None = None,
):
    """Run the configured sampler; returns (x0, SamplerStats).

    `base(x, t, cond)` is the base denoiser. For `pcm`, `pcm(x, t, cond)` is the consistency model; for
    `pcm_lora`, `pcm(x, t, cond, scale)` evaluates the base weights plus `scale` times the LoRA delta.
    """
    from pcm_policy import sampling

    if cfg.name == "sequential":
        S = len(scheduler.timesteps)
        x0 = sampling.sample_sequential(base, scheduler, x_T, noise, cond)
        return x0, sampling.SamplerStats(iterations=S, evaluations=S, converged=True, network_calls=S,
                                         network_rows=S * x_T.shape[0])
    fixed_shape = cfg.fixed_shape if cfg.fixed_shape is not None else x_T.is_cuda
    kwargs: dict[str, Any] = dict(cond=cond, window=cfg.window, tol=cfg.tol, max_iters=cfg.max_iters,
                                  should_stop=should_stop, fixed_shape=fixed_shape)
    if cfg.name == "picard":
        return sampling.sample_picard(base, scheduler, x_T, noise, **kwargs)
    if pcm is None:
        raise ConfigError(f"sampler.name={cfg.name}: this policy has no PCM attached (load one with sampler.pcm_checkpoint)")
    if cfg.stiffness is not None:
        kwargs["stiffness"] = cfg.stiffness
    if cfg.name == "pcm":
        return sampling.sample_switched(base, pcm, scheduler, x_T, noise, **kwargs)
    return sampling.sample_lora_switched(pcm, scheduler, x_T, noise, **kwargs)
