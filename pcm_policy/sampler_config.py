"""Which sampler a policy uses to turn noise into an action chunk: the `sampler=` config group.

A `SamplerConfig` names an algorithm (`sequential`, `picard`, `pcm` for output-space switching, `pcm_lora`
for weight-space switching) over a base scheduler (`ddpm` with all training steps, or `ddim` with fewer), how the
Picard rounds are accelerated (`accel`: `none`, or `anderson` = (triangular) Anderson acceleration of the base
phase, ParaTAA) and where the trajectory starts (`start`: `x_T` in every slot, `noise_sum` =
x_T + sum_{i<j} sigma_i z_i, or `x0_chain` = the scheduler chain from an x0 guess of 0; the last two carry the
chunk's own DDPM noise, see `pcm_policy.sampling.start`). `pcm_policy.chunk_sampler.ChunkSampler`
binds a config to a policy's denoisers once and runs it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from diffusers import DDIMScheduler, DDPMScheduler

from pcm_policy.errors import ConfigError

ALGORITHMS = ("sequential", "picard", "pcm", "pcm_lora")
SCHEDULERS = ("ddpm", "ddim")
ACCELERATIONS = ("none", "anderson")
STARTS = ("x_T", "noise_sum", "x0_chain")


@dataclass(frozen=True)
class SamplerConfig:
    """One `sampler=` config, validated on construction; hashable (a cache key for `ChunkSampler`s).

    The fields are described beside their declarations (defaults: sequential DDPM-100). `tol` is in units of
    each step's noise std (see `pcm_policy.sampling.picard`); `stiffness` is s in lambda(k) =
    clip(1 - s k / S, 0, 1) (`pcm_policy.sampling.switching`); memory/damping/triangular configure
    `accel=anderson` (`pcm_policy.sampling.anderson`).

    Raises:
        ConfigError: a field out of range or not one of its choices, naming the `sampler.<key>`.
    """

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
    accel: str = "none"  # none | anderson: Anderson acceleration of the base-model Picard rounds
    memory: int = 2  # Anderson history length m (differences of iterates kept)
    damping: float = 0.5  # Anderson mixing beta in (0, 1] (measured best: 0.5 for DDPM-100, 1.0 for DDIM)
    triangular: bool = True  # one set of mixing coefficients per slot (ParaTAA) instead of one for the suffix
    start: str = "x_T"  # x_T | noise_sum | x0_chain: the Picard trajectory's initial state X^0

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
        if self.accel not in ACCELERATIONS:
            raise ConfigError(f"sampler.accel={self.accel!r}: expected one of {', '.join(ACCELERATIONS)}")
        if self.start not in STARTS:
            raise ConfigError(f"sampler.start={self.start!r}: expected one of {', '.join(STARTS)}")
        if not 1 <= self.memory <= 10:
            raise ConfigError(f"sampler.memory={self.memory}: must be in 1..10")
        if not 0.0 < self.damping <= 1.0:
            raise ConfigError(f"sampler.damping={self.damping}: must be in (0, 1]")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | "SamplerConfig") -> "SamplerConfig":
        """Build from a `sampler=` mapping (e.g. the Hydra group), or return a `SamplerConfig` as it is.

        Args:
            cfg: the config's keys; `pcm_checkpoint` is accepted and ignored (it is read by
                `pcm_policy.pcm.attach.load_sampler`), missing keys take their defaults.

        Returns:
            The validated config.

        Raises:
            ConfigError: an unknown key, or a value out of range.
        """
        if isinstance(cfg, SamplerConfig):
            return cfg
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - known - {"pcm_checkpoint"})
        if unknown:
            raise ConfigError(f"sampler.{unknown[0]}: unknown sampler key (known: {', '.join(sorted(known))})")
        return cls(**{k: v for k, v in cfg.items() if k in known})

    @property
    def label(self) -> str:
        """Short name for tables, e.g. `picard/ddpm100`, `pcm_lora+aa/ddim10` or `picard+aa+ns/ddpm100`."""
        return f"{self.variant}/{self.scheduler}{self.steps}"

    @property
    def variant(self) -> str:
        """The algorithm with its acceleration and start: `picard`, `picard+aa`, `picard+aa+ns`, ..."""
        if self.name == "sequential":
            return self.name
        starts = {"x_T": "", "noise_sum": "+ns", "x0_chain": "+x0c"}
        return self.name + ("+aa" if self.accel == "anderson" else "") + starts[self.start]

    def anderson_config(self):
        """The `pcm_policy.sampling.AndersonConfig` of `accel=anderson`, None otherwise.

        Raises:
            ValueError: `memory` is not an integer (the ranges are already checked on construction).
        """
        if self.accel != "anderson":
            return None
        from pcm_policy.sampling.anderson import AndersonConfig

        return AndersonConfig(memory=self.memory, damping=self.damping, triangular=self.triangular)

    @property
    def needs_pcm(self) -> bool:
        """True for the switching samplers (`pcm`, `pcm_lora`), which need a PCM checkpoint."""
        return self.name in ("pcm", "pcm_lora")


def build_scheduler(train_scheduler_config: Mapping[str, Any], kind: str, steps: int):
    """A fresh inference scheduler sharing the training noise schedule, with `set_timesteps(steps)` done.

    Args:
        train_scheduler_config: the policy's training `DDPMScheduler` config (betas, prediction type, clipping).
        kind: "ddpm" (a `DDPMScheduler`) or anything else for a `DDIMScheduler` (`set_alpha_to_one` defaults
            to True, `variance_type` dropped).
        steps: S, the number of sampling steps (<= the training timesteps).

    Returns:
        The diffusers scheduler.

    Raises:
        ValueError: steps exceeds the training timesteps (diffusers' `set_timesteps`).
    """
    cls = DDPMScheduler if kind == "ddpm" else DDIMScheduler
    config = dict(train_scheduler_config)
    if kind == "ddim":
        config.pop("variance_type", None)
        config.setdefault("set_alpha_to_one", True)
    scheduler = cls.from_config(config)
    scheduler.set_timesteps(steps)
    return scheduler
