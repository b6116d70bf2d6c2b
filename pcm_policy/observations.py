"""Where observation histories come from when no env asks for them: the bench's and PCT's observation sources.

- `dataset_observations`: the windows of the dataset a checkpoint was trained on (same split and seed as its
  training run, read from its saved run config), training and validation histories;
- `sample_observations`: n of them, shuffled with a seed and cycled (the bench's default source);
- `load_observations`: histories saved to a safetensors file (`save_observations`), e.g. for a machine that cannot
  read the dataset (the GPU check carries them);
- `ObservationSource`: PCT's training and held-out histories, from the dataset or from closed-loop rollouts of
  the base policy (`pcm_policy.rollout.visited`).

A set of histories is a tensor (n, To, Do) for a low-dim policy and, for an image policy, a mapping {"obs":
(n, To, Do), "image": (n, To, cameras, 3, H, W) uint8} (`pcm_policy.policy.select_observations` indexes both).
Image frames are read only for the histories drawn.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pcm_policy.atomic import atomic_path
from pcm_policy.checkpoint import RUN_CONFIG, read_run_config
from pcm_policy.data.stacked_windows import Windows, build_dataset
from pcm_policy.errors import CheckpointError, ConfigError
from pcm_policy.options import check_choice, check_int, check_mapping, check_text, unknown_keys
from pcm_policy.paths import resolve_path
from pcm_policy.policy import concat_observations, observation_count, select_observations
from pcm_policy.sampler_config import SamplerConfig
from pcm_policy.tasks import missing_dataset

OBSERVATIONS_KEY = "observations"  # the tensor name in an observation file


def dataset_path(ckpt: Path, override: str | None = None) -> Path:
    """The dataset a checkpoint was trained on (its run config's `dataset.path`), or `override`.

    Raises:
        CheckpointError: the checkpoint has no readable run config.
    """
    return resolve_path(override or read_run_config(ckpt)["dataset"]["path"])


def check_dataset(ckpt: Path, override: str | None = None, instead: str = "") -> None:
    """The dataset `dataset_observations` would read must exist (checked before any work).

    Args:
        ckpt: the checkpoint directory.
        override: another dataset file than the checkpoint's.
        instead: the command's other observation sources, for the message of a checkpoint that records no
            dataset (an imported policy), e.g. "observations=closed_loop".

    Raises:
        CheckpointError: the checkpoint records no dataset (no run config) or an unreadable one.
        DatasetError: the dataset does not exist (naming the file and, for a scripted-expert dataset, the command
            that regenerates it).
    """
    if not (Path(ckpt) / RUN_CONFIG).is_file():
        raise CheckpointError(f"{ckpt}: records no dataset to draw observations from (no {RUN_CONFIG}: an imported "
                              f"policy?); use {instead + ', or ' if instead else ''}import it with "
                              "dataset.path=<a dataset in its observation layout>")
    path = dataset_path(ckpt, override)
    if not path.exists():
        raise missing_dataset(path)


def dataset_windows(ckpt: Path, override: str | None = None) -> tuple[Windows, Windows | None]:
    """(training, validation or None when empty) windows of the dataset a checkpoint was trained on (read from its
    saved run config, same split and seed; `override` replaces the file); an image policy's frames stay unread.

    Raises:
        CheckpointError: the checkpoint has no readable run config (`config.yaml`).
        ConfigError, DatasetError: as `pcm_policy.data.stacked_windows.build_dataset`.
    """
    run_cfg = read_run_config(ckpt)
    run_cfg["dataset"]["path"] = str(dataset_path(ckpt, override))
    dataset = build_dataset(run_cfg)
    validation = dataset.get_validation_dataset()
    return Windows.from_dataset(dataset), (Windows.from_dataset(validation) if len(validation) else None)


def windows_observations(parts: list[Windows | None], idx: torch.Tensor):
    """The observation histories at `idx` (1-d long) of the windows `parts` taken one after the other (None parts
    skipped), in `idx` order; an image dataset's frames are read for those windows only."""
    parts = [p for p in parts if p is not None]
    sizes = torch.tensor([len(p) for p in parts])
    starts = torch.cumsum(sizes, 0) - sizes
    owner = torch.bucketize(idx, torch.cumsum(sizes, 0), right=True)
    pieces, positions = [], []
    for j, part in enumerate(parts):
        at = torch.nonzero(owner == j).flatten()
        if len(at):
            pieces.append(part.observations(idx[at] - starts[j]))
            positions.append(at)
    order = torch.argsort(torch.cat(positions))
    return select_observations(concat_observations(pieces), order)


def dataset_observations(ckpt: Path, override: str | None = None):
    """(training, validation) observation histories of the dataset a checkpoint was trained on (`dataset_windows`),
    each (N, To, Do) float32 in env units (an image policy's: with every window's frames, see the module).

    An empty validation split (`dataset.val_ratio=0`, or too few episodes) gives an empty set.

    Raises:
        CheckpointError: the checkpoint has no readable run config (`config.yaml`).
        ConfigError, DatasetError: as `pcm_policy.data.stacked_windows.build_dataset`.
    """
    train, val = dataset_windows(ckpt, override)
    train_obs = train.observations(torch.arange(len(train)))
    return train_obs, (val.observations(torch.arange(len(val))) if val is not None
                       else select_observations(train_obs, slice(0, 0)))


def sample_observations(ckpt: Path, n: int, seed: int):
    """n observation histories from a checkpoint's dataset (validation first, then training), shuffled with
    `seed` and cycled to n.

    Returns:
        (n, To, Do) float32 in env units (an image policy's: with their frames, see the module).

    Raises:
        CheckpointError: no run config at `ckpt`.
        DatasetError: the checkpoint's dataset is missing or unreadable.
    """
    train, val = dataset_windows(ckpt)
    total = len(train) + (len(val) if val is not None else 0)
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    return windows_observations([val, train], order[torch.arange(n) % total])


def rollout_observations(policy, env_id: str, max_steps: int, n: int, seed: int, seed_start: int = 200000,
                         n_envs: int = 8) -> torch.Tensor:
    """n observation histories the policy itself met in closed-loop rollouts (sequential DDIM with up to 10 steps;
    reset seeds from `seed_start`, default 200000+, disjoint from the test seeds), shuffled with `seed`: for a
    checkpoint that records no dataset (an imported policy).

    Args:
        policy: the base policy.
        env_id: the env giving its observation (`Card.env_id`).
        max_steps: time limit per episode (control steps).
        n: histories wanted; enough episodes are rolled out for about 1.5 n.
        seed: the shuffle seed.
        seed_start: the first reset seed.
        n_envs: vectorised envs.

    Returns:
        (n, To, Do) float32 in env units (cycled if the rollouts gave fewer).
    """
    from pcm_policy.rollout.visited import visited_observations  # gymnasium only for closed-loop observations

    per_episode = max(1, max_steps // policy.config.n_action_steps)
    episodes = -(-3 * n // (2 * per_episode))
    steps = min(10, policy.config.num_train_timesteps)
    sampler = SamplerConfig(name="sequential", scheduler="ddim", steps=steps)
    obs = visited_observations(policy, env_id, max_steps, episodes, seed_start, sampler, n_envs)
    count = observation_count(obs)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return select_observations(obs, order[torch.arange(n) % count])


def save_observations(path: str | Path, observations: torch.Tensor) -> Path:
    """Write observation histories (n, To, Do) to a safetensors file atomically (`load_observations` reads it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({OBSERVATIONS_KEY: observations.float().contiguous()}, str(tmp))
    return path


def load_observations(path: str | Path, key: str = "observations") -> torch.Tensor:
    """The observation histories (n, To, Do) float32 saved by `save_observations`.

    Args:
        path: the safetensors file.
        key: the option naming it, for messages.

    Raises:
        ConfigError: the file is missing, unreadable, or holds no (n, To, Do) `observations` tensor.
    """
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError, ValueError) as e:
        raise ConfigError(f"{key}={path}: unreadable observation file ({str(e).splitlines()[0][:120]})") from None
    obs = tensors.get(OBSERVATIONS_KEY)
    if obs is None or obs.ndim != 3 or len(obs) == 0:
        raise ConfigError(f"{key}={path}: expected a non-empty (n, To, Do) tensor named {OBSERVATIONS_KEY!r}")
    return obs.float()


@dataclass(frozen=True)
class ClosedLoopSettings:
    """Rollouts of the base policy in its env that PCT takes observation histories from (`closed_loop.*`).

    Attributes:
        episodes: rollout episodes for the training observations (reset seeds seed_start, ...).
        eval_episodes: further episodes for the held-out observations.
        seed_start: the first reset seed (default 200000+, disjoint from the test seeds 100000..100049).
        max_steps: time limit per episode, in control steps.
        n_envs: vectorised envs.
        sampler: the base-only sampler the rollouts use.

    Raises:
        ConfigError: a count out of range, or a sampler that needs a PCM.
    """

    episodes: int = 64
    eval_episodes: int = 8
    seed_start: int = 200000
    max_steps: int = 300
    n_envs: int = 8
    sampler: SamplerConfig = SamplerConfig(name="sequential", scheduler="ddim", steps=10)

    def __post_init__(self):
        for k, low in (("episodes", 1), ("eval_episodes", 1), ("seed_start", 0), ("max_steps", 1), ("n_envs", 1)):
            check_int(f"closed_loop.{k}", getattr(self, k), low)
        if self.sampler.needs_pcm:
            raise ConfigError(f"closed_loop.sampler.name={self.sampler.name}: the rollouts use the base policy alone "
                              "(sequential or picard)")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> "ClosedLoopSettings":
        """Read the `closed_loop` group (absent keys take their defaults).

        Raises:
            ConfigError: see the class; an unknown key.
        """
        cfg = check_mapping("closed_loop", cfg, "{episodes: 64, sampler: {name: sequential}}")
        unknown_keys("closed_loop", cfg, list(cls.__dataclass_fields__))
        values = dict(cfg)
        if "sampler" in values:
            values["sampler"] = SamplerConfig.from_mapping(values["sampler"], "closed_loop.sampler")
        return cls(**values)


@dataclass(frozen=True)
class ObservationSource:
    """Where PCT's training and held-out observation histories come from.

    `kind="dataset"`: windows of the base policy's dataset (`dataset_path` overrides the file; held out: its
    validation episodes). `kind="closed_loop"`: histories the base policy planned from in its own closed-loop
    rollouts (`closed_loop`; held out: histories from further episodes), recorded once in a cache file.

    Attributes:
        kind: `dataset` or `closed_loop`.
        trajectories: training observations to draw.
        held_out: held-out observations to draw.
        dataset_path: another file than the base's dataset (None: the base's own).
        closed_loop: the rollout settings.

    Raises:
        ConfigError: an unknown kind, a count < 1, or a `dataset_path` that does not exist.
    """

    kind: str = "dataset"
    trajectories: int = 8192
    held_out: int = 32
    dataset_path: str | None = None
    closed_loop: ClosedLoopSettings = ClosedLoopSettings()

    def __post_init__(self):
        check_choice("observations", self.kind, ("dataset", "closed_loop"))
        check_int("trajectories", self.trajectories, 1)
        check_int("eval_observations", self.held_out, 1)
        check_text("dataset_path", self.dataset_path, null=True)
        if self.dataset_path is not None and not resolve_path(self.dataset_path).exists():
            raise ConfigError(f"dataset_path={self.dataset_path}: no such file or directory")

    def check(self, base: Path, env_id: str | None) -> None:
        """Before any work: the dataset exists (`dataset`), or the base names an env to roll out in (`closed_loop`).

        Raises:
            ConfigError: closed_loop for a base without an env.
            CheckpointError, DatasetError: see `check_dataset`.
        """
        if self.kind == "closed_loop":
            if not env_id:
                raise ConfigError(f"observations=closed_loop: the base checkpoint {base} names no env to roll out in")
        else:
            check_dataset(base, self.dataset_path, instead="observations=closed_loop")

    def sets(self, base_ckpt: Path, seed: int, policy=None, env_id: str | None = None, cache: Path | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(training observations (<= trajectories, To, Do), held-out observations (<= held_out, To, Do)),
        float32 in env units, drawn with `seed`.

        Args:
            base_ckpt: the base checkpoint directory.
            seed: the draw's seed.
            policy: the base policy (`closed_loop` only).
            env_id: the env to roll out in (`closed_loop` only).
            cache: the file the rollout histories are kept in (`closed_loop` only).

        Raises:
            CheckpointError: the base checkpoint has no run config (which dataset it was trained on).
            DatasetError: the dataset is missing, corrupt or inconsistent.
            ConfigError: closed_loop without an env to roll out in.
        """
        g = torch.Generator().manual_seed(seed)
        if self.kind == "closed_loop":
            train_obs, held = _closed_loop_observations(policy, env_id, self.closed_loop, cache)
            pick = torch.randperm(observation_count(train_obs), generator=g)[:self.trajectories]
            pick_held = torch.randperm(observation_count(held), generator=g)[:self.held_out]
            return select_observations(train_obs, pick), select_observations(held, pick_held)
        train, val = dataset_windows(base_ckpt, self.dataset_path)
        n_held = len(val) if val is not None else min(self.held_out, len(train))  # else: the last training windows
        pick = torch.randperm(len(train), generator=g)[:self.trajectories]
        pick_held = torch.randperm(n_held, generator=g)[:self.held_out]
        held = val.observations(pick_held) if val is not None else train.observations(len(train) - n_held + pick_held)
        return train.observations(pick), held


def _flatten(sets: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Named observation sets as safetensors entries: `<name>` (a tensor) or `<name>.obs` / `<name>.image`."""
    out = {}
    for name, value in sets.items():
        items = value.items() if isinstance(value, Mapping) else [(None, value)]
        out.update({name if k is None else f"{name}.{k}": v.contiguous() for k, v in items})
    return out


def _unflatten(tensors: Mapping[str, torch.Tensor], name: str):
    """The observation set `name` saved by `_flatten`."""
    if name in tensors:
        return tensors[name]
    return {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(name + ".")}


def _closed_loop_observations(policy, env_id, loop: ClosedLoopSettings, cache: Path):
    if cache.is_file():
        saved = load_file(str(cache))
        return _unflatten(saved, "train"), _unflatten(saved, "held_out")
    # gymnasium and the simulators load only when rollouts are asked for (not on the dataset path)
    from pcm_policy.rollout.visited import visited_observations

    def roll(episodes, seed):
        return visited_observations(policy, env_id, loop.max_steps, episodes, seed, loop.sampler, loop.n_envs)

    train_obs = roll(loop.episodes, loop.seed_start)
    held = roll(loop.eval_episodes, loop.seed_start + loop.episodes)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as tmp:
        save_file(_flatten({"train": train_obs, "held_out": held}), str(tmp))
    return train_obs, held
