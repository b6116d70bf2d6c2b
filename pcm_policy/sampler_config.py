"""Which sampler a policy uses to turn noise into an action chunk: the `sampler=` config group, and schedules.

A `SamplerConfig` names an algorithm (`sequential`, `picard`, `pcm` for output-space switching, `pcm_lora`
for weight-space switching) over a sampling schedule (`ddpm` with all training steps, or `ddim` with fewer), how
the Picard rounds are accelerated (`accel`: `none`, or `anderson` = (triangular) Anderson acceleration of the base
phase, ParaTAA) and where the trajectory starts (`start`: `x_T` in every slot, `noise_sum` =
x_T + sum_{i<j} sigma_i z_i, or `x0_chain` = the scheduler chain from an x0 guess of 0; the last two carry the
chunk's own DDPM noise, see `pcm_policy.sampling.start`). `pcm_policy.chunk_sampler.ChunkSampler` binds a
config to a policy's denoisers once and runs it.

A *schedule* is a (scheduler, steps) pair, written `ddpm100` or `ddim10` in configs and tables
(`parse_schedule`, `schedule_name`). Every rule about sampler options lives here, once.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Mapping

from diffusers import DDIMScheduler, DDPMScheduler

from pcm_policy.errors import ConfigError
from pcm_policy.options import (check_choice, check_flag, check_int, check_mapping, check_number, show,
                                unknown_keys)
from pcm_policy.sampling.anderson import AndersonConfig

ALGORITHMS = ("sequential", "picard", "pcm", "pcm_lora")
SCHEDULERS = ("ddpm", "ddim")
ACCELERATIONS = ("none", "anderson")
STARTS = ("x_T", "noise_sum", "x0_chain")
# The keys of a sampler-like group that only tune the iteration (bench `accelerated.<schedule>`, train-pcm
# `eval_accel`): applied on top of a row's own sampler.
ACCELERATION_KEYS = ("accel", "memory", "damping", "triangular", "start")


def parse_schedule(name: Any, key: str = "schedules") -> tuple[str, int]:
    """Split a schedule name: `ddpm100` -> ("ddpm", 100), `ddim10` -> ("ddim", 10).

    Raises:
        ConfigError: not `ddpm<S>` / `ddim<S>` with S >= 1 (the message names `key`).
    """
    m = re.fullmatch(r"(ddpm|ddim)(\d+)", str(name))
    if not m or int(m.group(2)) < 1:
        raise ConfigError(f"{key}: {name!r} is not a schedule name like ddpm100 or ddim10")
    return m.group(1), int(m.group(2))


def schedule_name(scheduler: str, steps: int) -> str:
    """`ddim`, 10 -> `ddim10` (the inverse of `parse_schedule`)."""
    return f"{scheduler}{steps}"


def check_steps(label: str, steps: int, num_train_timesteps: int, source=None) -> None:
    """A sampler cannot take more steps than the policy's training timesteps T (diffusers' `set_timesteps`).

    Args:
        label: the option as the message names it, e.g. `sampler.steps=200`.
        steps: the sampler's S.
        num_train_timesteps: the policy's T.
        source: the checkpoint the policy comes from, for the message (None: not named).

    Raises:
        ConfigError: `steps` > T.
    """
    if steps > num_train_timesteps:
        T = num_train_timesteps
        policy = "the policy" if source is None else f"the policy in {source}"
        raise ConfigError(f"{label}: {steps} sampling steps exceed the {T} diffusion timesteps {policy} "
                          f"was trained with (policy.noise_scheduler.num_train_timesteps); use at most {T}")


def check_schedules(key: str, value: Any, num_train_timesteps: int | None = None, source=None) -> list[str]:
    """A non-empty list of distinct schedule names (`ddpm100`, `ddim10`, ...) within the policy's T (None: unknown).

    Raises:
        ConfigError: not a non-empty list, a name that is not a schedule, one beyond T, or one listed twice.
    """
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{key}={show(value)}: expected a non-empty list such as [ddpm100,ddim10]")
    for name in value:
        _, steps = parse_schedule(name, key)
        if num_train_timesteps is not None:
            check_steps(f"{key}: {name}", steps, num_train_timesteps, source)
    if len(set(value)) != len(value):
        raise ConfigError(f"{key}={list(value)}: lists a schedule twice")
    return list(value)


@dataclass(frozen=True)
class SamplerConfig:
    """One `sampler=` config, validated on construction; hashable (a cache key for `ChunkSampler`s).

    The fields are described beside their declarations (defaults: sequential DDPM-100). `tol` is in units of
    each step's noise std (see `pcm_policy.sampling.picard`); `stiffness` is s in lambda(k) =
    clip(1 - s k / S, 0, 1) (`pcm_policy.sampling.switching`); memory/damping/triangular configure
    `accel=anderson` (`pcm_policy.sampling.anderson`).

    Raises:
        ConfigError: a field of the wrong type, out of range or not one of its choices, naming `sampler.<key>`.
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
        _check_fields(dataclasses.asdict(self), "sampler")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | "SamplerConfig", key: str = "sampler") -> "SamplerConfig":
        """Build from a `sampler=` mapping (e.g. the Hydra group), or return a `SamplerConfig` as it is.

        Args:
            cfg: the config's keys; `pcm_checkpoint` is accepted and ignored (it is read by
                `pcm_policy.pcm.attach.load_sampler`), missing keys take their defaults.
            key: the group's config key, for messages (e.g. `closed_loop.sampler`).

        Returns:
            The validated config.

        Raises:
            ConfigError: not a mapping, an unknown key, or a value of the wrong type or range (naming
                `<key>.<field>`).
        """
        if isinstance(cfg, SamplerConfig):
            return cfg
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"{key}: expected a sampler group (e.g. {key}=ddim)")
        if cfg.get("name") == "auto":  # chosen by timing, not a config: pcm_policy.auto_sampler
            raise ConfigError(f"{key}=auto: not available here (pcm eval, pcm demo and the controller they run "
                              "accept it; in code, pcm_policy.auto_sampler.choose_sampler returns the sampler)")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown_keys(key, {k: v for k, v in cfg.items() if k != "pcm_checkpoint"}, known)
        values = {k: v for k, v in cfg.items() if k in known}
        _check_fields({**{f.name: f.default for f in dataclasses.fields(cls)}, **values}, key)
        return cls(**values)

    def with_acceleration(self, settings: Mapping[str, Any] | None, key: str) -> "SamplerConfig":
        """This config with acceleration settings (`ACCELERATION_KEYS`) applied on top.

        Args:
            settings: e.g. {accel: anderson, memory: 2, damping: 0.5}; None or {} returns self.
            key: the settings' config key, for messages (e.g. `accelerated.ddim10`).

        Raises:
            ConfigError: not a mapping, a key outside `ACCELERATION_KEYS`, or a bad value.
        """
        settings = check_mapping(key, settings, "{accel: anderson, memory: 3}")
        unknown_keys(key, settings, ACCELERATION_KEYS)
        return SamplerConfig.from_mapping({**dataclasses.asdict(self), **settings}, key)

    def check_steps(self, num_train_timesteps: int, key: str = "sampler", source=None) -> None:
        """Refuse more sampling steps than the policy's T training timesteps (`check_steps`)."""
        check_steps(f"{key}.steps={self.steps}", self.steps, num_train_timesteps, source)

    @property
    def schedule(self) -> str:
        """The schedule name, e.g. `ddim10`."""
        return schedule_name(self.scheduler, self.steps)

    @property
    def label(self) -> str:
        """Short name for tables, e.g. `picard/ddpm100`, `pcm_lora+aa/ddim10` or `picard+aa+ns/ddpm100`."""
        return f"{self.variant}/{self.schedule}"

    @property
    def variant(self) -> str:
        """The algorithm with its acceleration and start: `picard`, `picard+aa`, `picard+aa+ns`, ..."""
        if self.name == "sequential":
            return self.name
        starts = {"x_T": "", "noise_sum": "+ns", "x0_chain": "+x0c"}
        return self.name + ("+aa" if self.accel == "anderson" else "") + starts[self.start]

    def anderson_config(self):
        """The `pcm_policy.sampling.AndersonConfig` of `accel=anderson`, None otherwise."""
        if self.accel != "anderson":
            return None
        return AndersonConfig(memory=self.memory, damping=self.damping, triangular=self.triangular)

    @property
    def needs_pcm(self) -> bool:
        """True for the switching samplers (`pcm`, `pcm_lora`), which need a PCM checkpoint."""
        return self.name in ("pcm", "pcm_lora")


def _check_fields(values: Mapping[str, Any], key: str) -> None:
    """Every field of a sampler config (all present in `values`), named `<key>.<field>` in messages."""
    check_choice(f"{key}.name", values["name"], ALGORITHMS)
    check_choice(f"{key}.scheduler", values["scheduler"], SCHEDULERS)
    steps = check_int(f"{key}.steps", values["steps"], 1)
    check_int(f"{key}.window", values["window"], 1, steps, null=True, why=f" ({key}.steps={steps}; null = all steps)")
    check_number(f"{key}.tol", values["tol"], 0)
    check_number(f"{key}.stiffness", values["stiffness"], 0, low_open=True, null=True)
    check_int(f"{key}.max_iters", values["max_iters"], 1, null=True)
    if values["fixed_shape"] is not None:
        check_flag(f"{key}.fixed_shape", values["fixed_shape"])
    check_choice(f"{key}.accel", values["accel"], ACCELERATIONS)
    check_int(f"{key}.memory", values["memory"], 1, 10)
    check_number(f"{key}.damping", values["damping"], 0, 1, low_open=True)
    check_flag(f"{key}.triangular", values["triangular"])
    check_choice(f"{key}.start", values["start"], STARTS)


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
