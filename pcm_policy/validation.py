"""Every command's options checked against their types, ranges, each other and the checkpoint, before any work.

`validate(command, cfg)` raises a one-line ConfigError (or CheckpointError) naming the key and its limit. The
CLI calls it right after composing the config, so a refused command starts no env, loads no dataset and
creates no output directory. Checks that need a checkpoint read only its card (policy.yaml), never weights.
"""
from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from pcm_policy.errors import CheckpointError, ConfigError

_MISSING = object()

# The DDPM noise-schedule keys the samplers reproduce exactly (pcm_policy.sampling.schedule): "sigmoid" betas
# exist for DDPM only (DDIM rejects them), and only fixed_small DDPM variance is implemented.
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "sample")  # what DiffusionPolicy.compute_loss trains
NOISE_SCHEDULER_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
                        "clip_sample", "clip_sample_range", "variance_type")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
EXPERT_TASKS = ("pusht", "lift", "can")


# ---- primitives: each reads one dotted key and raises a ConfigError naming it -------------------------------
def lookup(cfg: Mapping[str, Any], key: str, default: Any = _MISSING) -> Any:
    """`cfg["a"]["b"]` for key `a.b` (a digit part indexes a list).

    Args:
        cfg: the composed config (nested mappings and lists).
        key: the dotted key.
        default: returned when the key is absent; without it an absent key is an error.

    Raises:
        ConfigError: the key is absent and no `default` was given.
    """
    node: Any = cfg
    for part in key.split("."):
        if isinstance(node, Sequence) and not isinstance(node, str) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, Mapping) and part in node:
            node = node[part]
        elif default is _MISSING:
            raise ConfigError(f"{key}: missing from the config")
        else:
            return default
    return node


def _show(value: Any) -> str:
    """A value as the user typed it: strings quoted, YAML's true/false/null."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return repr(value) if isinstance(value, str) else str(value)


def integer(cfg, key: str, low: int | None = None, high: int | None = None, null: bool = False,
            why: str = "") -> int | None:
    """cfg's `key` as an integer in [low, high] (bools and floats refused); None allowed when `null`.

    Raises:
        ConfigError: absent (unless `null`), not an integer, or out of range; `why` ends the range message.
    """
    return check_int(key, lookup(cfg, key, None if null else _MISSING), low, high, null, why)


def check_int(key: str, value: Any, low: int | None = None, high: int | None = None, null: bool = False,
              why: str = "") -> int | None:
    """`value` (option `key`) as an integer in [low, high] (None = unbounded side); None allowed when `null`.

    Raises:
        ConfigError: `value` is a bool or not an integer, or out of range; `why` is appended to the
            out-of-range message.
    """
    if value is None and null:
        return None
    limits = " and ".join(s for s in (f">= {low}" if low is not None else "", f"<= {high}" if high is not None else "")
                          if s)
    what = f"an integer{' ' + limits if limits else ''}{' or null' if null else ''}"
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ConfigError(f"{key}={_show(value)}: expected {what}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"{key}={value}: expected {what}{why}")
    return int(value)


def number(cfg, key: str, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False, null: bool = False) -> float | None:
    """cfg's `key` as a finite real number (float) in the interval given by low/high (open ends when `*_open`);
    None allowed when `null`.

    Raises:
        ConfigError: absent (unless `null`), a bool, not a number, NaN/inf, or outside the interval.
    """
    value = lookup(cfg, key, None if null else _MISSING)
    if value is None and null:
        return None
    lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
    what = "a number" + (f" {lo}" if lo else "") + (" and" if lo and hi else "") + (f" {hi}" if hi else "") + \
        (" or null" if null else "")
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{key}={_show(value)}: expected {what}")
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(f"{key}={value}: expected {what}")
    if high is not None and (value >= high if high_open else value > high):
        raise ConfigError(f"{key}={value}: expected {what}")
    return float(value)


def choice(cfg, key: str, options: Sequence[str], null: bool = False) -> str | None:
    """cfg's `key`, which must be one of `options`; None allowed when `null`.

    Raises:
        ConfigError: absent (unless `null`) or not one of `options` (the message lists them).
    """
    value = lookup(cfg, key, None if null else _MISSING)
    if value is None and null:
        return None
    if value not in options:
        raise ConfigError(f"{key}={_show(value)}: expected one of {', '.join(options)}{' or null' if null else ''}")
    return value


def flag(cfg, key: str) -> bool:
    """cfg's `key` as a YAML boolean (true/false; 0/1 and strings refused).

    Raises:
        ConfigError: absent or not a bool.
    """
    value = lookup(cfg, key)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={_show(value)}: expected true or false")
    return value


def text(cfg, key: str, null: bool = False) -> str | None:
    """cfg's `key` as a non-empty string; None allowed when `null`.

    Raises:
        ConfigError: absent (unless `null`), not a string, or empty.
    """
    value = lookup(cfg, key, None if null else _MISSING)
    if value is None and null:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}={_show(value)}: expected a non-empty string{' or null' if null else ''}")
    return value


def output_dir(cfg, key: str = "output_dir") -> Path:
    """cfg's `key` as a directory that exists or can be created (nothing is created here).

    Returns:
        The path, `~` expanded.

    Raises:
        ConfigError: not a non-empty string, an existing non-directory, a dangling symbolic link on the way,
            or its nearest existing ancestor is a file or not writable.
    """
    path = Path(text(cfg, key)).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}={path}: exists and is not a directory")
    ancestor = path
    while not ancestor.exists():
        if ancestor.is_symlink():  # a dangling link: mkdir would fail on it
            raise ConfigError(f"{key}={path}: {ancestor} is a dangling symbolic link")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{key}={path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path}: {ancestor} is not writable")
    return path


# ---- shared groups --------------------------------------------------------------------------------------
def _runtime(cfg) -> None:
    """seed, threads, device, deterministic: the keys training and sampling commands share (where present)."""
    from pcm_policy.runtime import resolve_device

    if "seed" in cfg:
        integer(cfg, "seed", 0)
    integer(cfg, "threads", 1, null=True)
    if "deterministic" in cfg:
        flag(cfg, "deterministic")
    if "device" in cfg:
        value = cfg["device"]
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"device={_show(value)}: expected auto, cpu, cuda or cuda:N")
        resolve_device(value)


def _task(cfg, env: bool) -> None:
    """task.*; with `env` the env id must be registered (commands that step an env)."""
    text(cfg, "task.name")
    number(cfg, "task.control_hz", 0, low_open=True)
    integer(cfg, "task.max_steps", 1)
    if env:
        import gymnasium as gym

        import envs  # noqa: F401  (registers the pcm/* ids)

        env_id = text(cfg, "task.env_id")
        if env_id not in gym.registry:
            raise ConfigError(f"task.env_id={env_id!r}: not a registered gymnasium env "
                              f"(pcm ids: {', '.join(k for k in gym.registry if k.startswith('pcm/'))})")


def check_policy_options(pol: Mapping[str, Any], prefix: str = "policy") -> None:
    """The network shape and noise schedule a policy is built from (`configs/policy/unet_*.yaml`).

    Args:
        pol: the `policy` group.
        prefix: the group's key, for messages.

    Raises:
        ConfigError: a non-network policy (`checkpoint`/`expert`), a key of the wrong type or range, or shapes
            the UNet cannot take: n_obs_steps - 1 + n_action_steps > horizon, n_groups not dividing every
            down_dims entry, horizon not divisible by 2^(len(down_dims) - 1), an odd step-embedding size, an
            even kernel size, or a noise-scheduler key or value the samplers do not reproduce.
    """
    def key(k):
        return f"{prefix}.{k}"

    name = pol.get("name")
    if name in ("checkpoint", "expert"):
        raise ConfigError(f"{prefix}={name}: training needs a network policy (e.g. {prefix}=unet_small or unet_dp)")
    cfg = {prefix: pol}
    horizon = integer(cfg, key("horizon"), 1)
    n_obs = integer(cfg, key("n_obs_steps"), 1, horizon)
    integer(cfg, key("n_action_steps"), 1, horizon - n_obs + 1,
            why=f" (n_obs_steps - 1 + n_action_steps must fit in horizon={horizon})")
    dims = lookup(cfg, key("down_dims"))
    if not isinstance(dims, Sequence) or isinstance(dims, str) or not dims:
        raise ConfigError(f"{key('down_dims')}={_show(dims)}: expected a non-empty list of channel counts")
    groups = integer(cfg, key("n_groups"), 1)
    for d in dims:
        if not isinstance(d, numbers.Integral) or isinstance(d, bool) or d < 1:
            raise ConfigError(f"{key('down_dims')}={list(dims)}: entries must be positive integers")
        if d % groups:
            raise ConfigError(f"{key('n_groups')}={groups}: must divide every entry of {key('down_dims')}={list(dims)} "
                              "(GroupNorm)")
    levels = 2 ** (len(dims) - 1)
    if horizon % levels:
        raise ConfigError(f"{key('horizon')}={horizon}: must be divisible by {levels} (2^(len(down_dims)-1): the "
                          "UNet halves the horizon at each level)")
    embed = integer(cfg, key("diffusion_step_embed_dim"), 4)
    if embed % 2:
        raise ConfigError(f"{key('diffusion_step_embed_dim')}={embed}: must be even (sin/cos halves)")
    kernel = integer(cfg, key("kernel_size"), 1)
    if kernel % 2 == 0:
        raise ConfigError(f"{key('kernel_size')}={kernel}: must be odd (same-length convolutions)")
    sched = lookup(cfg, key("noise_scheduler"), {})
    if not isinstance(sched, Mapping):
        raise ConfigError(f"{key('noise_scheduler')}: expected a mapping")
    unknown = sorted(set(sched) - set(NOISE_SCHEDULER_KEYS))
    if unknown:
        raise ConfigError(f"{key('noise_scheduler')}.{unknown[0]}: not supported by the samplers "
                          f"(supported: {', '.join(NOISE_SCHEDULER_KEYS)})")
    ns = key("noise_scheduler")
    if "num_train_timesteps" in sched:
        integer(cfg, f"{ns}.num_train_timesteps", 1)
    if "beta_schedule" in sched:
        choice(cfg, f"{ns}.beta_schedule", BETA_SCHEDULES)
    start = number(cfg, f"{ns}.beta_start", 0, 1, low_open=True, high_open=True) if "beta_start" in sched else None
    end = number(cfg, f"{ns}.beta_end", 0, 1, low_open=True, high_open=True) if "beta_end" in sched else None
    if start is not None and end is not None and end < start:
        raise ConfigError(f"{ns}.beta_end={end}: must be >= {ns}.beta_start={start}")
    if "prediction_type" in sched:
        choice(cfg, f"{ns}.prediction_type", PREDICTION_TYPES)
    if "clip_sample" in sched:
        flag(cfg, f"{ns}.clip_sample")
    if "clip_sample_range" in sched:
        number(cfg, f"{ns}.clip_sample_range", 0, low_open=True)
    if "variance_type" in sched:
        choice(cfg, f"{ns}.variance_type", ("fixed_small",))


def num_train_timesteps(card: Mapping[str, Any]) -> int:
    """Training timesteps T of the policy a card (`policy.yaml` as a dict) describes (100, PolicyConfig's default,
    when absent)."""
    return int((card.get("policy") or {}).get("noise_scheduler", {}).get("num_train_timesteps", 100))


def read_checkpoint_card(key: str, path) -> tuple[Path, dict[str, Any]]:
    """(checkpoint dir, card) of the checkpoint option `key` names (a run or checkpoint directory).

    Raises:
        ConfigError: no path given.
        CheckpointError: no checkpoint or an unreadable card there; the message starts with `key`.
    """
    from pcm_policy.checkpoint import read_card, resolve_checkpoint
    from pcm_policy.config import resolve_path

    if not path:
        raise ConfigError(f"{key}: no checkpoint given ({key}=<run or checkpoint dir>)")
    try:
        ckpt = resolve_checkpoint(resolve_path(path))
        return ckpt, read_card(ckpt)
    except CheckpointError as e:
        raise CheckpointError(f"{key}: {e}") from None


def read_base_card(key: str, path) -> tuple[Path, dict[str, Any]]:
    """(checkpoint dir, card) of a base policy named by option `key` (`read_checkpoint_card`).

    Raises:
        ConfigError: no path given.
        CheckpointError: no readable checkpoint there, or it is a PCM checkpoint.
    """
    ckpt, card = read_checkpoint_card(key, path)
    if card.get("kind") == "pcm":
        raise CheckpointError(f"{key}={path}: is a PCM checkpoint; give the base policy it was trained for "
                              f"({card.get('base')})")
    return ckpt, card


def _expect_task(key: str, ckpt: Path, card: Mapping[str, Any], task: str) -> None:
    if card.get("task") != task:
        raise CheckpointError(f"{key}={ckpt}: checkpoint is for task {card.get('task')!r}, not task={task!r}")


def steps_for(label: str, steps: int, T: int, ckpt=None) -> None:
    """A sampler cannot take more steps than the policy's training timesteps (diffusers' `set_timesteps`).

    Args:
        label: the option as the message names it, e.g. `sampler.steps=200`.
        steps: the sampler's S.
        T: the policy's training timesteps.
        ckpt: the checkpoint the policy comes from, for the message (None: not named).

    Raises:
        ConfigError: `steps` > `T`.
    """
    if steps > T:
        policy = "the policy" if ckpt is None else f"the policy in {ckpt}"
        raise ConfigError(f"{label}: {steps} sampling steps exceed the {T} diffusion timesteps {policy} "
                          f"was trained with (policy.noise_scheduler.num_train_timesteps); use at most {T}")


def check_sampler(cfg, T: int | None, ckpt=None, key: str = "sampler", pcm_key: str | None = None,
                  check_pcm: bool = True) -> None:
    """A `sampler` group (`configs/sampler/*.yaml`) against the policy's T training timesteps (None: unknown).

    `pcm_key` names where the PCM checkpoint comes from (default `<key>.pcm_checkpoint`); with `check_pcm` its
    card must be a PCM trained for this sampler's schedule (and a LoRA one for pcm_lora).

    Raises:
        ConfigError: a missing group, a key of the wrong type or range (steps > T, window > steps, ...), an
            unknown key, a PCM sampler without a PCM checkpoint, or a PCM for another schedule.
        CheckpointError: the PCM checkpoint is unreadable or not a PCM.
    """
    from pcm_policy.sampler_config import ALGORITHMS, SCHEDULERS, SamplerConfig

    group = lookup(cfg, key)
    if not isinstance(group, Mapping):
        raise ConfigError(f"{key}: expected a sampler group (e.g. {key}=ddim)")
    name = choice(cfg, f"{key}.name", ALGORITHMS)
    scheduler = choice(cfg, f"{key}.scheduler", SCHEDULERS)
    steps = integer(cfg, f"{key}.steps", 1)
    if T is not None:
        steps_for(f"{key}.steps={steps}", steps, T, ckpt)
    integer(cfg, f"{key}.window", 1, steps, null=True, why=f" ({key}.steps={steps}; null = all steps)")
    number(cfg, f"{key}.tol", 0)
    number(cfg, f"{key}.stiffness", 0, low_open=True, null=True)
    integer(cfg, f"{key}.max_iters", 1, null=True)
    if lookup(cfg, f"{key}.fixed_shape", None) is not None:
        flag(cfg, f"{key}.fixed_shape")
    _acceleration(cfg, key)
    SamplerConfig.from_mapping(group)  # unknown keys, and the dataclass's own checks
    if name in ("pcm", "pcm_lora") and check_pcm:
        pcm_key = pcm_key or f"{key}.pcm_checkpoint"
        path = lookup(cfg, pcm_key, None)
        if not path:
            raise ConfigError(f"{pcm_key}: {key}={name} needs a PCM checkpoint trained for {scheduler}{steps} "
                              "(train one with `pcm train-pcm base=<checkpoint>`)")
        check_pcm_card(pcm_key, path, scheduler, steps, lora=name == "pcm_lora",
                       start=(f"{key}.start", lookup(cfg, f"{key}.start", "x_T")))


def _acceleration(cfg, key: str) -> None:
    """The acceleration and start keys of a sampler-like group at `key` (each optional)."""
    from pcm_policy.sampler_config import ACCELERATIONS, STARTS

    if lookup(cfg, f"{key}.accel", None) is not None:
        choice(cfg, f"{key}.accel", ACCELERATIONS)
    if lookup(cfg, f"{key}.start", None) is not None:
        choice(cfg, f"{key}.start", STARTS)
    if lookup(cfg, f"{key}.memory", None) is not None:
        integer(cfg, f"{key}.memory", 1, 10)
    if lookup(cfg, f"{key}.damping", None) is not None:
        number(cfg, f"{key}.damping", 0, 1, low_open=True)
    if lookup(cfg, f"{key}.triangular", None) is not None:
        flag(cfg, f"{key}.triangular")


def check_pcm_card(key: str, path, scheduler: str, steps: int, lora: bool,
                   start: tuple[str, str] | None = None) -> None:
    """The PCM at `path` (option `key`) was trained for this schedule (and is a LoRA one when `lora`).

    Args:
        key: the option naming the PCM checkpoint.
        path: a run or checkpoint directory.
        scheduler: `ddpm` or `ddim`.
        steps: the sampler's S.
        lora: weight-space switching needs a LoRA PCM.
        start: (option, value) of the sampler's start, which must be the one the PCM was trained from.

    Raises:
        ConfigError: no path, or a PCM trained for another (scheduler, steps) or start, or a full PCM when `lora`.
        CheckpointError: an unreadable checkpoint, or not a PCM.
    """
    _, card = read_checkpoint_card(key, path)
    if card.get("kind") != "pcm":
        raise CheckpointError(f"{key}={path}: not a PCM checkpoint (kind={card.get('kind')!r})")
    if (card.get("scheduler"), card.get("steps")) != (scheduler, steps):
        raise ConfigError(f"{key}={path}: this PCM was trained for {card.get('scheduler')}{card.get('steps')}, "
                          f"the sampler runs {scheduler}{steps}")
    if lora and card.get("mode") != "lora":
        raise ConfigError(f"{key}={path}: a full PCM; weight-space switching (pcm_lora) needs a LoRA one (use pcm)")
    if start is not None and start[1] != card.get("start", "x_T"):
        raise ConfigError(f"{start[0]}={start[1]}: the PCM {path} was trained from start={card.get('start', 'x_T')} "
                          f"(set {start[0]}={card.get('start', 'x_T')})")


def _bases(cfg, key: str, T: int | None, ckpt) -> list[str]:
    """A non-empty list of distinct schedule names (ddpm100, ddim10, ...) within the policy's T."""
    from pcm_policy.bench import parse_base

    bases = lookup(cfg, key)
    if not isinstance(bases, Sequence) or isinstance(bases, str) or not bases:
        raise ConfigError(f"{key}={_show(bases)}: expected a non-empty list such as [ddpm100,ddim10]")
    for b in bases:
        _, steps = parse_base(b)
        if T is not None:
            steps_for(f"{key}: {b}", steps, T, ckpt)
    if len(set(bases)) != len(bases):
        raise ConfigError(f"{key}={list(bases)}: lists a schedule twice")
    return list(bases)


def _pcm_map(cfg, key: str, bases: Sequence[str]) -> dict[str, str]:
    """A mapping schedule name -> PCM checkpoint or null (bench/demo `pcm`, `pcm_lora`); those of `bases` exist.

    Whether each PCM suits its row (schedule, LoRA) is bench's call: it skips a row with the reason.
    """
    value = lookup(cfg, key, None) or {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a mapping such as {key}.ddim10=<PCM checkpoint>")
    for k, v in value.items():
        if v is not None and not isinstance(v, str):
            raise ConfigError(f"{key}.{k}={_show(v)}: expected a checkpoint path or null")
        if v and k in bases:
            _, card = read_checkpoint_card(f"{key}.{k}", v)
            if card.get("kind") != "pcm":
                raise CheckpointError(f"{key}.{k}={v}: not a PCM checkpoint (kind={card.get('kind')!r})")
    return {k: v for k, v in value.items() if v}


# ---- per command ----------------------------------------------------------------------------------------
def validate_train(cfg) -> None:
    """The options of `pcm train` (`configs/train.yaml`): runtime, task, output dir, policy, dataset, optimiser.

    Raises:
        ConfigError: a key of the wrong type or range, no `dataset.path`, a robomimic-only dataset key on a
            zarr dataset, a non-`limits` normalizer with `clip_sample` on, or a batch size the processes do not
            divide.
    """
    from pcm_policy import distributed
    from pcm_policy.data.lowdim_dataset import KINDS
    from pcm_policy.data.normalizer import MODES

    _runtime(cfg)
    _task(cfg, env=False)
    output_dir(cfg)
    check_policy_options(lookup(cfg, "policy"))
    kind = choice(cfg, "dataset.kind", KINDS)
    text(cfg, "dataset.path", null=True)
    if not lookup(cfg, "dataset.path", None):
        raise ConfigError("dataset.path: no dataset given (set dataset.path=<file>)")
    number(cfg, "dataset.val_ratio", 0, 1, high_open=True)
    integer(cfg, "dataset.max_train_episodes", 1, null=True)
    normalizer = choice(cfg, "dataset.normalizer", MODES)
    sched = lookup(cfg, "policy.noise_scheduler", {})
    if normalizer != "limits" and sched.get("clip_sample", True) and "clip_sample_range" not in sched:
        # DiffusionPolicy refuses it too, from the fitted statistics; here it is caught before loading data.
        capped = "mean +- 1 std" if normalizer == "gaussian" else "[-1, 1] in raw action units"
        raise ConfigError(f"dataset.normalizer={normalizer} with policy.noise_scheduler.clip_sample=true would cap "
                          f"sampled actions at {capped}; set policy.noise_scheduler.clip_sample=false or "
                          "dataset.normalizer=limits")
    robomimic_only = {"obs_keys": None, "abs_action": False, "filter_key": None}
    for k, neutral in robomimic_only.items():
        value = lookup(cfg, f"dataset.{k}", neutral)
        if kind != "robomimic_hdf5" and value not in (neutral, None):
            raise ConfigError(f"dataset.{k}={_show(value)}: applies to robomimic_hdf5 datasets only "
                              f"(dataset.kind={kind})")
    if kind == "robomimic_hdf5":
        keys = lookup(cfg, "dataset.obs_keys", None)
        if keys is not None and (isinstance(keys, str) or not isinstance(keys, Sequence) or not keys
                                 or not all(isinstance(k, str) and k for k in keys)):
            raise ConfigError(f"dataset.obs_keys={_show(keys)}: expected a non-empty list of obs key names or null")
        flag(cfg, "dataset.abs_action")
        text(cfg, "dataset.filter_key", null=True)
    integer(cfg, "train.steps", 1)
    distributed.require_divisible(integer(cfg, "train.batch_size", 1), "train.batch_size")
    number(cfg, "train.lr", 0, low_open=True)
    betas = lookup(cfg, "train.betas")
    if not isinstance(betas, Sequence) or isinstance(betas, str) or len(betas) != 2:
        raise ConfigError(f"train.betas={_show(betas)}: expected two numbers in [0, 1)")
    for i in range(2):
        number(cfg, f"train.betas.{i}", 0, 1, high_open=True)
    number(cfg, "train.weight_decay", 0)
    choice(cfg, "train.lr_scheduler", LR_SCHEDULERS)
    integer(cfg, "train.warmup_steps", 0)
    number(cfg, "train.ema_power", 0, low_open=True)
    number(cfg, "train.ema_max_decay", 0, 1)
    integer(cfg, "train.log_every", 1)
    integer(cfg, "train.checkpoint_every", 1)
    integer(cfg, "train.keep_checkpoints", 1)
    init = text(cfg, "train.init_from", null=True)
    if init:
        from pcm_policy.policy import PolicyConfig

        ckpt, card = read_base_card("train.init_from", init)
        _expect_task("train.init_from", ckpt, card, lookup(cfg, "task.name"))
        ours = PolicyConfig.from_mapping(lookup(cfg, "policy"), obs_dim=1, action_dim=1).to_dict()
        theirs = dict(card.get("policy", {}))
        diff = sorted(k for k in ours if k not in ("obs_dim", "action_dim") and theirs.get(k) != ours[k])
        if diff:
            raise CheckpointError(f"train.init_from={init}: checkpoint {ckpt} has another policy shape "
                                  f"({', '.join(f'{k}={theirs.get(k)!r}' for k in diff)}; this run: "
                                  f"{', '.join(f'{k}={ours[k]!r}' for k in diff)})")


def validate_eval(cfg) -> None:
    """The options of `pcm eval`: runtime, a registered env, episodes, the policy and, for a checkpoint policy,
    its card (task) and the sampler against it.

    Raises:
        ConfigError: a key of the wrong type or range, an unregistered env, an expert for a task without one,
            or a sampler the checkpoint cannot run.
        CheckpointError: an unreadable or PCM checkpoint, or one trained for another task.
    """
    _runtime(cfg)
    _task(cfg, env=True)
    output_dir(cfg)
    integer(cfg, "episodes", 1)
    integer(cfg, "n_envs", 1)
    choice(cfg, "vector", ("sync", "async"))
    integer(cfg, "seed_start", 0)
    integer(cfg, "videos", 0)
    policy = choice(cfg, "policy.name", ("checkpoint", "expert"))
    if policy == "expert":
        choice(cfg, "task.name", EXPERT_TASKS)
        return
    ckpt, card = read_base_card("checkpoint", lookup(cfg, "checkpoint", None))
    _expect_task("checkpoint", ckpt, card, cfg["task"]["name"])
    check_sampler(cfg, num_train_timesteps(card), ckpt)


def validate_train_pcm(cfg) -> None:
    """The options of `pcm train-pcm`: runtime, LoRA/full mode, the schedule against the base's card, the
    observation source (dataset or closed-loop rollouts), training and evaluation keys.

    Raises:
        ConfigError: a key of the wrong type or range, `steps` > the base's T, a missing `dataset_path`,
            closed-loop observations for a base without an env, or a rollout sampler that needs a PCM.
        CheckpointError: `base` is unreadable or a PCM.
    """
    from pcm_policy.config import resolve_path

    from pcm_policy import distributed

    _runtime(cfg)
    output_dir(cfg)
    choice(cfg, "mode", ("lora", "full"))
    integer(cfg, "lora_rank", 1)
    number(cfg, "lora_alpha", 0, low_open=True, null=True)
    choice(cfg, "scheduler", ("ddpm", "ddim"))
    steps = integer(cfg, "steps", 1)
    distributed.require_divisible(integer(cfg, "batch_size", 1), "batch_size")  # each process: an equal share
    ckpt, card = read_base_card("base", lookup(cfg, "base", None))
    steps_for(f"steps={steps}", steps, num_train_timesteps(card), ckpt)
    data = text(cfg, "dataset_path", null=True)
    if data is not None and not resolve_path(data).exists():
        raise ConfigError(f"dataset_path={data}: no such file or directory")
    if data is None and lookup(cfg, "observations", "dataset") == "dataset":
        observations_dataset(ckpt)
    integer(cfg, "trajectories", 1)
    integer(cfg, "collect_batch", 1)
    number(cfg, "collect_tol", 0)
    integer(cfg, "collect_max_iters", 1, null=True)
    integer(cfg, "max_k", 1, null=True)
    integer(cfg, "epochs", 1)
    number(cfg, "lr", 0, low_open=True)
    number(cfg, "ema_decay", 0, 1)
    integer(cfg, "checkpoint_every", 1)
    integer(cfg, "eval_observations", 1)
    number(cfg, "eval_tol", 0)
    integer(cfg, "eval_window", 1, steps, null=True, why=f" (steps={steps}; null = all steps)")
    number(cfg, "stiffness", 0, low_open=True, null=True)
    from pcm_policy.sampler_config import STARTS

    choice(cfg, "start", STARTS)
    if lookup(cfg, "eval_accel", None) is not None:
        _acceleration(cfg, "eval_accel")
    if choice(cfg, "observations", ("dataset", "closed_loop")) == "closed_loop":
        if not card.get("env_id"):
            raise ConfigError(f"observations=closed_loop: the base checkpoint {ckpt} names no env to roll out in")
        for k, low in (("episodes", 1), ("eval_episodes", 1), ("seed_start", 0), ("max_steps", 1), ("n_envs", 1)):
            integer(cfg, f"closed_loop.{k}", low)
        from pcm_policy.sampler_config import SamplerConfig

        group = lookup(cfg, "closed_loop.sampler")
        if not isinstance(group, Mapping):
            raise ConfigError("closed_loop.sampler: expected sampler keys, e.g. {name: sequential, scheduler: ddim, "
                              "steps: 10}")
        rollout = SamplerConfig.from_mapping(group)
        if rollout.needs_pcm:
            raise ConfigError(f"closed_loop.sampler.name={rollout.name}: the rollouts use the base policy alone "
                              "(sequential or picard)")
        steps_for(f"closed_loop.sampler.steps={rollout.steps}", rollout.steps, num_train_timesteps(card), ckpt)


def validate_bench(cfg) -> None:
    """The options of `pcm bench`: runtime, the env when episodes run, the checkpoint, the schedules (`bases`),
    chunk counts, the sampler settings, the PCM maps and the `accelerated` settings.

    Raises:
        ConfigError: a key of the wrong type or range, a schedule beyond the policy's T or listed twice, or an
            unknown `accelerated` key.
        CheckpointError: an unreadable checkpoint, a PCM as the base, a base for another task, or a non-PCM in
            a PCM map.
    """
    _runtime(cfg)
    episodes = integer(cfg, "episodes", 0)
    early_stop = flag(cfg, "early_stop")
    early_episodes = integer(cfg, "early_stop_episodes", 0)
    _task(cfg, env=episodes > 0 or (early_stop and early_episodes > 0))
    output_dir(cfg)
    ckpt, card = read_base_card("checkpoint", lookup(cfg, "checkpoint", None))
    _expect_task("checkpoint", ckpt, card, cfg["task"]["name"])
    observations_dataset(ckpt)
    bases = _bases(cfg, "bases", num_train_timesteps(card), ckpt)
    integer(cfg, "chunks", 1)
    by_base = lookup(cfg, "chunks_by_base", None) or {}
    if not isinstance(by_base, Mapping):
        raise ConfigError("chunks_by_base: expected a mapping such as chunks_by_base.ddpm100=200")
    for b in by_base:
        integer(cfg, f"chunks_by_base.{b}", 1, null=True)
    integer(cfg, "warmup", 0)
    number(cfg, "tol", 0)
    integer(cfg, "window", 1, null=True)
    number(cfg, "stiffness", 0, low_open=True, null=True)
    number(cfg, "control_hz", 0, low_open=True)
    number(cfg, "budget_ms", 0, low_open=True, null=True)
    chosen = lookup(cfg, "episodes_bases", None)
    if chosen is not None:
        if isinstance(chosen, str) or not isinstance(chosen, Sequence) or not set(chosen) <= set(bases):
            raise ConfigError(f"episodes_bases={_show(chosen)}: expected a list drawn from bases={bases} or null")
    integer(cfg, "seed_start", 0)
    integer(cfg, "early_stop_chunks", 1)
    for group in ("pcm", "pcm_lora"):
        _pcm_map(cfg, group, bases)
    accelerated = lookup(cfg, "accelerated", None) or {}
    if not isinstance(accelerated, Mapping):
        raise ConfigError("accelerated: expected a mapping of base -> settings, e.g. accelerated.ddim10.memory=3")
    for b, settings in accelerated.items():
        if settings is None:
            continue
        if not isinstance(settings, Mapping):
            raise ConfigError(f"accelerated.{b}: expected settings such as {{accel: anderson, memory: 3}} or null")
        unknown = sorted(set(settings) - {"accel", "memory", "damping", "triangular", "start"})
        if unknown:
            raise ConfigError(f"accelerated.{b}.{unknown[0]}: unknown key (accel, memory, damping, triangular, start)")
        _acceleration(cfg, f"accelerated.{b}")


def validate_demo(cfg) -> None:
    """The options of `pcm demo`; the shipped base may be absent (demo then trains a stand-in), otherwise the
    checkpoint, its PCM maps and the sampler's PCM are checked as for `pcm bench`.

    Raises:
        ConfigError: a key of the wrong type or range, no checkpoint given, or a sampler the checkpoint cannot run.
        CheckpointError: an unreadable checkpoint, a PCM as the base, or a base for another task.
    """
    from pcm_policy.config import resolve_path

    _runtime(cfg)
    _task(cfg, env=True)
    output_dir(cfg)
    for key, low in (("episodes", 1), ("chunks", 1), ("ddpm100_chunks", 1), ("seed_start", 0)):
        integer(cfg, key, low)
    path = lookup(cfg, "checkpoint", None)
    T = ckpt = None
    if not path:
        raise ConfigError("checkpoint: no base checkpoint given (checkpoint=<run or checkpoint dir>)")
    resolved = resolve_path(path)
    if resolved.exists() or not _is_shipped_base(path):  # else: demo trains a quick stand-in (T from the config)
        ckpt, card = read_base_card("checkpoint", resolved)
        _expect_task("checkpoint", ckpt, card, cfg["task"]["name"])
        T = num_train_timesteps(card)
        observations_dataset(ckpt)  # the latency comparison draws its observations from it
    bases = _bases(cfg, "bases", T, ckpt)
    if ckpt is not None:
        for group in ("pcm", "pcm_lora"):
            _pcm_map(cfg, group, bases)
    sampler = lookup(cfg, "sampler")
    if not isinstance(sampler, Mapping):
        raise ConfigError("sampler: expected a sampler group (e.g. sampler=pcm_lora)")
    # demo attaches the LoRA PCM of the sampler's schedule (pcm_lora.<schedule>) whatever the switching space;
    # the stand-in base (no shipped checkpoint) gets stand-in PCMs, so only the sampler's own keys are checked.
    check_sampler(cfg, T, ckpt, pcm_key=f"pcm_lora.{sampler.get('scheduler')}{sampler.get('steps')}",
                  check_pcm=ckpt is not None)


def observations_dataset(ckpt: Path) -> None:
    """The dataset a base was trained on (its run config's `dataset.path`, which `checkpoint_observations`
    reads), from which `pcm bench`, `pcm demo` and `pcm train-pcm` draw observations, must exist.

    Args:
        ckpt: the base checkpoint directory.

    Raises:
        CheckpointError: the checkpoint has no readable run config.
        DatasetError: the dataset does not exist (naming the file and, for a scripted-expert dataset, the
            command that regenerates it).
    """
    from pcm_policy.checkpoint import read_run_config
    from pcm_policy.config import resolve_path
    from pcm_policy.errors import missing_dataset

    path = read_run_config(ckpt)["dataset"].get("path")
    if path and not resolve_path(path).exists():
        raise missing_dataset(path)


def _is_shipped_base(path) -> bool:
    from pcm_policy.demo import SHIPPED_BASE

    return Path(path) == Path(SHIPPED_BASE)


def validate_collect(cfg) -> None:
    """The options of `pcm collect`: output dir, an expert task, episodes, seed, flags, the output file name.

    Raises:
        ConfigError: a key of the wrong type or range, `images=true` for a robomimic task, or an `output_name`
            that is a path rather than a file name.
    """
    output_dir(cfg)
    task = choice(cfg, "task.name", EXPERT_TASKS)
    integer(cfg, "task.max_steps", 1)
    integer(cfg, "episodes", 1)
    integer(cfg, "seed", 0)
    flag(cfg, "keep_failed")
    flag(cfg, "overwrite")
    if flag(cfg, "images") and task != "pusht":
        raise ConfigError(f"images=true: only the pusht collector records images (task={task})")
    name = text(cfg, "output_name", null=True)
    if name is not None and (Path(name).name != name or name in (".", "..")):
        raise ConfigError(f"output_name={name!r}: a file name inside output_dir, not a path")


VALIDATORS: dict[str, Callable[[Mapping[str, Any]], None]] = {
    "train": validate_train, "eval": validate_eval, "train_pcm": validate_train_pcm, "bench": validate_bench,
    "demo": validate_demo, "collect": validate_collect,
}


def validate(command: str, cfg: Mapping[str, Any]) -> None:
    """Check every option of `command` before any work starts (the CLI calls it right after composing).

    Args:
        command: a key of `VALIDATORS` (a `configs/<command>.yaml` name: train, eval, train_pcm, bench, demo,
            collect).
        cfg: the composed config.

    Raises:
        ConfigError: an option of the wrong type, range or combination, as one line naming the key.
        CheckpointError: a checkpoint the options name is missing, unreadable or of the wrong kind/task.
        KeyError: `command` has no validator (a programming error, not a user one).
    """
    VALIDATORS[command](cfg)
