"""Low-dim training windows for the diffusion policy, from a PushT zarr or a robomimic hdf5 file.

Every dataset is reduced to two per-step float32 arrays, obs (N, obs_dim) and action (N, action_dim), plus
episode ends; windows of `horizon` frames come from SequenceSampler with pad_before = n_obs_steps - 1 (the
first action can be learned with a padded history) and pad_after = n_action_steps - 1 (chunks may run past
the end of an episode). The episode split is seeded, so training and validation never share an episode.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from pcm_policy.data.normalizer import MODES, Normalizer
from pcm_policy.data.robomimic import DEFAULT_OBS_KEYS, RobomimicFile
from pcm_policy.data.sequence_sampler import SequenceSampler, check_window, split_episodes
from pcm_policy.errors import ConfigError, DatasetError
from pcm_policy.options import (check_choice, check_flag, check_int, check_list, check_number, check_text,
                                show)

KINDS = ("pusht_zarr", "robomimic_hdf5")


@dataclass(frozen=True)
class DatasetConfig:
    """The `dataset` group of a run config: which file, how to read and split it, how to normalize it.

    Attributes:
        kind: `pusht_zarr` or `robomimic_hdf5` (`KINDS`).
        path: the dataset file.
        val_ratio: fraction of episodes held out for validation, in [0, 1).
        max_train_episodes: a seeded subset of this many training episodes; None keeps all.
        obs_keys: robomimic obs keys, concatenated in this order; None = `DEFAULT_OBS_KEYS`.
        abs_action: robomimic: train absolute actions as 10-d [pos3, rot6d, gripper].
        filter_key: robomimic: read only the demos of `mask/<filter_key>`; None reads all.
        normalizer: a `Normalizer` mode (`limits`, `gaussian`, `identity`).

    Raises:
        ConfigError: a value of the wrong type or range, or a robomimic-only key on a zarr dataset, naming
            `dataset.<key>`.
    """

    kind: str
    path: str
    val_ratio: float = 0.02
    max_train_episodes: int | None = None
    obs_keys: tuple[str, ...] | None = None
    abs_action: bool = False
    filter_key: str | None = None
    normalizer: str = "limits"

    def __post_init__(self):
        key = "dataset"
        check_choice(f"{key}.kind", self.kind, KINDS)
        if not self.path:
            raise ConfigError(f"{key}.path: no dataset given (set {key}.path=<file>)")
        check_text(f"{key}.path", str(self.path))
        check_number(f"{key}.val_ratio", self.val_ratio, 0, 1, high_open=True)
        check_int(f"{key}.max_train_episodes", self.max_train_episodes, 1, null=True)
        check_choice(f"{key}.normalizer", self.normalizer, MODES)
        robomimic_only = {"obs_keys": None, "abs_action": False, "filter_key": None}
        for k, neutral in robomimic_only.items():
            value = getattr(self, k)
            if self.kind != "robomimic_hdf5" and value not in (neutral, None):
                raise ConfigError(f"{key}.{k}={show(list(value) if k == 'obs_keys' else value)}: applies to "
                                  f"robomimic_hdf5 datasets only ({key}.kind={self.kind})")
        if self.obs_keys is not None and not all(isinstance(k, str) and k for k in self.obs_keys):
            raise ConfigError(f"{key}.obs_keys={show(list(self.obs_keys))}: expected a non-empty list of obs key "
                              "names or null")
        check_flag(f"{key}.abs_action", self.abs_action)
        check_text(f"{key}.filter_key", self.filter_key, null=True)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any], key: str = "dataset") -> "DatasetConfig":
        """Build from a run config's `dataset` group (absent keys take their defaults).

        Raises:
            ConfigError: see the class.
        """
        obs_keys = cfg.get("obs_keys")
        if obs_keys is not None:
            obs_keys = tuple(check_list(f"{key}.obs_keys", obs_keys, "[object, robot0_eef_pos] or null"))
        fields = ("val_ratio", "max_train_episodes", "abs_action", "filter_key", "normalizer")
        return cls(kind=cfg.get("kind"), path=cfg.get("path"), obs_keys=obs_keys,
                   **{k: cfg[k] for k in fields if k in cfg})

    def load(self, horizon: int, n_obs_steps: int, n_action_steps: int, seed: int) -> "LowDimDataset":
        """The training split of this dataset for windows of H, To, Ta (`LowDimDataset.from_config`).

        Raises:
            DatasetError: a missing, corrupt or incomplete file (see `LowDimDataset.from_config`).
        """
        return LowDimDataset.from_config(
            kind=self.kind, path=self.path, horizon=horizon, n_obs_steps=n_obs_steps, n_action_steps=n_action_steps,
            val_ratio=self.val_ratio, seed=seed, max_train_episodes=self.max_train_episodes, obs_keys=self.obs_keys,
            abs_action=self.abs_action, filter_key=self.filter_key)


def check_finite(path, ends: np.ndarray, arr: np.ndarray, key: str) -> None:
    """Raise a DatasetError naming the first episode whose `arr` rows hold NaN/inf."""
    bad_rows = ~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)
    if bad_rows.any():
        ep = int(np.searchsorted(ends, np.argmax(bad_rows), side="right"))
        raise DatasetError(f"{path}: episode {ep} has NaN/inf in {key}")


def _load_pusht(path) -> dict:
    from pcm_policy.data.replay_buffer import ReplayBuffer  # zarr only where a PushT buffer is read

    rb = ReplayBuffer.open(path, keys=["keypoint", "state", "action"])
    ends = rb.episode_ends
    for key in ("keypoint", "state", "action"):
        check_finite(path, ends, rb[key], f"data/{key}")
    state, kp, action = rb["state"], rb["keypoint"], rb["action"]
    if state.ndim != 2 or state.shape[1] < 2:
        raise DatasetError(f"{path}: data/state must be (N, >=2), got shape {state.shape}")
    if action.ndim != 2:
        raise DatasetError(f"{path}: data/action must be (N, A), got shape {action.shape}")
    # Diffusion Policy's low-dim PushT obs: 9 flattened block keypoints + the agent position = 20 dims.
    obs = np.concatenate([kp.reshape(len(kp), -1), state[:, :2]], axis=1).astype(np.float32)
    return dict(obs=obs, action=action.astype(np.float32), ends=ends, names=None, env_args=None)


def load_robomimic(path, obs_keys: Sequence[str], abs_action: bool, filter_key: str | None) -> dict:
    """A robomimic file's demos as one per-step array each: {"obs" (N, Do) with `obs_keys` concatenated in order,
    "action" (N, Da) float32 (10-d rot6d with `abs_action`), "ends" (E,) exclusive cumulative ends, "names" (demo
    names in order), "env_args" (dict or None)}.

    Raises:
        DatasetError: no demos (in `mask/<filter_key>`), an empty demo, or NaN/inf in a key (naming the episode).
    """
    with RobomimicFile(path) as rf:
        names = rf.demo_names(filter_key)
        if not names:
            raise DatasetError(f"{path}: no demos" + (f" in mask/{filter_key}" if filter_key else ""))
        obs, actions, lengths = [], [], []
        for i, name in enumerate(names):
            demo = rf.load_demo(name, obs_keys, abs_action=abs_action)
            T = len(demo["actions"])
            if T == 0:
                raise DatasetError(f"{path}: episode {i} ({name}) has no steps")
            # check per key so the message names the key, not a column of the concatenation
            col, checks = 0, []
            for key, d in zip(obs_keys, rf.obs_dims(name, obs_keys)):
                checks.append((f"obs/{key}", demo["obs"][:, col:col + d]))
                col += d
            for key, arr in checks + [("actions", demo["actions"])]:
                if not np.isfinite(arr).all():
                    raise DatasetError(f"{path}: episode {i} ({name}) has NaN/inf in {key}")
            obs.append(demo["obs"])
            actions.append(demo["actions"].astype(np.float32))
            lengths.append(T)
        env_args = rf.env_args if rf.has_env_args else None  # training runs without it; eval needs it
    return dict(obs=np.concatenate(obs), action=np.concatenate(actions), ends=np.cumsum(lengths),
                names=names, env_args=env_args)


class LowDimDataset(Dataset):
    """Training windows of one split: item i is {"obs": (To, Do), "action": (H, Da)} float32 tensors, in env units.

    Windows come from `SequenceSampler` with pad_before = To - 1 and pad_after = Ta - 1 over the split's
    episodes. Usually built by `from_config`.

    Args:
        obs: per-step observations (N, Do) float32, in env units (PushT: 9 keypoints and the agent position in
            px, Do = 20; robomimic: the concatenated obs keys).
        action: per-step actions (N, Da) float32, in env units (PushT: target position in px, Da = 2;
            robomimic: 7-d, or 10-d with rot6d for abs actions).
        episode_ends: exclusive cumulative episode ends (E,) int.
        horizon: H, frames per window (the action chunk length).
        n_obs_steps: To, frames of observation history per window.
        n_action_steps: Ta, actions executed per chunk.
        train_mask: (E,) bool, the training episodes.
        val_mask: (E,) bool, the validation episodes.
        path: the source file, for messages.
        split: `train` or `val`: which mask the windows are drawn from.

    Attributes:
        path, obs, action, episode_ends, horizon, n_obs_steps, n_action_steps, train_mask, val_mask, split:
            the arguments (`episode_ends` as int64).
        sampler: the `SequenceSampler` of this split.
        env_args: robomimic `env_args` (dict), or None.
        demo_names: robomimic demo names in episode order, or None.
        abs_action: the actions are 10-d absolute ones.

    Raises:
        ConfigError: a window shape `check_window` refuses (not 1 <= To <= H, Ta < 1, or To - 1 + Ta > H).
        DatasetError: no training episode, or (train split) no window: every episode is too short.
    """

    def __init__(self, obs: np.ndarray, action: np.ndarray, episode_ends: np.ndarray, horizon: int,
                 n_obs_steps: int, n_action_steps: int, train_mask: np.ndarray, val_mask: np.ndarray,
                 path: str = "<memory>", split: str = "train"):
        check_window(horizon, n_obs_steps, n_action_steps)
        self.path = str(path)
        self.obs, self.action = obs, action
        self.episode_ends = np.asarray(episode_ends, dtype=np.int64)
        self.horizon, self.n_obs_steps, self.n_action_steps = horizon, n_obs_steps, n_action_steps
        self.train_mask, self.val_mask = train_mask, val_mask
        self.split = split
        self.env_args: dict | None = None
        self.demo_names: list[str] | None = None
        self.abs_action = False
        if not train_mask.any():
            raise DatasetError(f"{path}: no training episodes ({len(train_mask)} episodes in total)")
        mask = train_mask if split == "train" else val_mask
        self.sampler = SequenceSampler(self.episode_ends, horizon, pad_before=n_obs_steps - 1,
                                       pad_after=n_action_steps - 1, episode_mask=mask)
        if split == "train" and len(self.sampler) == 0:
            raise DatasetError(f"{path}: no training windows: every episode is too short for horizon {horizon}")

    @classmethod
    def from_config(cls, kind: str, path: str | os.PathLike, horizon: int, n_obs_steps: int,
                    n_action_steps: int, val_ratio: float = 0.02, seed: int = 42,
                    max_train_episodes: int | None = None, obs_keys: Sequence[str] | None = None,
                    abs_action: bool = False, filter_key: str | None = None) -> "LowDimDataset":
        """Load a dataset file and split its episodes (seeded) into training and validation; the training split.

        Args:
            kind: `pusht_zarr` (obs = 9 block keypoints flattened + agent xy = 20, action = data/action) or
                `robomimic_hdf5`.
            path: the dataset file.
            horizon, n_obs_steps, n_action_steps: H, To, Ta (see the class).
            val_ratio: fraction of episodes held out for validation, in [0, 1) (`split_episodes`).
            seed: seed of the episode split.
            max_train_episodes: keep a seeded subset of this many training episodes; None keeps all.
            obs_keys: robomimic obs keys, concatenated in this order; None = `DEFAULT_OBS_KEYS`.
            abs_action: robomimic: convert stored [pos3, axisangle3, gripper] actions to 10-d [pos3, rot6d,
                gripper].
            filter_key: robomimic: read only the demos of `mask/<filter_key>`; None reads all.

        Returns:
            The training split; `get_validation_dataset` gives the other.

        Raises:
            ConfigError: an unknown `kind`, or a window shape the class refuses.
            DatasetError: a missing, corrupt or incomplete file, a wrong array shape, NaN/inf in an
                episode (naming it), an empty demo, no demos, an unknown filter key, or no training window.
            ValueError: `val_ratio` outside [0, 1) or `max_train_episodes` < 1.
        """
        if kind == "pusht_zarr":
            src = _load_pusht(path)
        elif kind == "robomimic_hdf5":
            src = load_robomimic(path, list(obs_keys or DEFAULT_OBS_KEYS), abs_action, filter_key)
        else:
            raise ConfigError(f"dataset kind {kind!r} is unknown; expected one of {', '.join(KINDS)}")
        n = len(src["ends"])
        train_mask, val_mask = split_episodes(n, val_ratio, seed, max_train_episodes)
        ds = cls(src["obs"], src["action"], src["ends"], horizon, n_obs_steps, n_action_steps,
                 train_mask, val_mask, path=str(path))
        ds.env_args, ds.demo_names, ds.abs_action = src["env_args"], src["names"], abs_action
        return ds

    def get_validation_dataset(self) -> "LowDimDataset":
        """The validation split: a shallow copy sharing the arrays, drawing windows from `val_mask` (may be empty)."""
        val = copy.copy(self)
        val.split = "val"
        val.sampler = SequenceSampler(self.episode_ends, self.horizon, pad_before=self.n_obs_steps - 1,
                                      pad_after=self.n_action_steps - 1, episode_mask=self.val_mask)
        return val

    def get_normalizer(self, mode: str = "limits") -> Normalizer:
        """Fit obs and action on the training episodes' steps (never on validation data).

        Args:
            mode: a `Normalizer` mode: `limits` (to [-1, 1]), `gaussian` or `identity`.

        Raises:
            ValueError: an unknown mode.
        """
        lengths = np.diff(self.episode_ends, prepend=0)
        rows = np.repeat(self.train_mask, lengths)
        return Normalizer.fit({"obs": self.obs[rows], "action": self.action[rows]}, mode=mode)

    @property
    def obs_dim(self) -> int:
        """Do, the width of one observation frame."""
        return self.obs.shape[1]

    @property
    def action_dim(self) -> int:
        """Da, the width of one action."""
        return self.action.shape[1]

    @property
    def n_episodes(self) -> int:
        """Episodes this split draws windows from."""
        return int(self.sampler.episode_mask.sum())

    @property
    def n_total_episodes(self) -> int:
        """Episodes loaded (both splits and those `max_train_episodes` left out; robomimic: those of the filter)."""
        return len(self.episode_ends)

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        w = self.sampler.sample({"obs": self.obs, "action": self.action}, idx)
        # copy: unpadded windows are views of the whole dataset, which callers must not be able to modify
        return {"obs": torch.tensor(w["obs"][:self.n_obs_steps]), "action": torch.tensor(w["action"])}
