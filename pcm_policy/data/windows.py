"""Training windows as tensors, built from a run's dataset config, and the windows a checkpoint was trained on.

Used by `pcm train` (all windows), and by `pcm bench` and `pcm train-pcm` (the observation histories of the
dataset a checkpoint was trained on, to sample chunks from realistic observations).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from pcm_policy.data.lowdim_dataset import LowDimDataset
from pcm_policy.errors import ConfigError


@dataclass
class Windows:
    """All training windows as two tensors, so a batch is one index operation.

    Attributes:
        obs: observation histories (N, To, Do) float32, env units (unnormalized).
        action: action chunks (N, H, Da) float32, env units (unnormalized).
    """

    obs: torch.Tensor  # (N, To, Do) float32, unnormalized
    action: torch.Tensor  # (N, H, Da) float32, unnormalized

    @classmethod
    def from_dataset(cls, dataset) -> "Windows":
        """Stack every window of `dataset` (a LowDimDataset split, items {"obs", "action"}) in index order.

        Raises:
            RuntimeError: `dataset` is empty (nothing to stack).
        """
        items = [dataset[i] for i in range(len(dataset))]
        return cls(torch.stack([torch.as_tensor(it["obs"]) for it in items]).float(),
                   torch.stack([torch.as_tensor(it["action"]) for it in items]).float())

    def __len__(self) -> int:
        return self.obs.shape[0]


def build_dataset(cfg: Mapping[str, Any]) -> LowDimDataset:
    """The training split described by a run config's `dataset` and `policy` groups and `seed`
    (`LowDimDataset.from_config`).

    Raises:
        ConfigError: `dataset.path` is unset, an unknown `dataset.kind`, or a window shape the dataset refuses.
        DatasetError: a missing, corrupt or incomplete file (from the loaders).
    """
    ds, pol = cfg["dataset"], cfg["policy"]
    if not ds.get("path"):
        raise ConfigError("dataset.path: no dataset given (set dataset.path=<file>)")
    return LowDimDataset.from_config(
        kind=ds["kind"], path=ds["path"], horizon=pol["horizon"], n_obs_steps=pol["n_obs_steps"],
        n_action_steps=pol["n_action_steps"], val_ratio=ds.get("val_ratio", 0.02), seed=cfg["seed"],
        max_train_episodes=ds.get("max_train_episodes"), obs_keys=ds.get("obs_keys"),
        abs_action=ds.get("abs_action", False), filter_key=ds.get("filter_key"),
    )


def checkpoint_observations(ckpt: Path, dataset_path: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, validation) observation histories, each (N, To, Do) float32 in env units, of the dataset a
    checkpoint was trained on (read from its saved run config, same split and seed; `dataset_path` overrides
    the file).

    Raises:
        CheckpointError: the checkpoint has no readable run config (`config.yaml`).
        ConfigError, DatasetError: as `build_dataset`.

    An empty validation split (`dataset.val_ratio=0`, or too few episodes) gives an empty (0, To, Do) tensor.
    """
    from pcm_policy import checkpoint as ckpt_io
    from pcm_policy.config import resolve_path

    run_cfg = ckpt_io.read_run_config(ckpt)
    run_cfg["dataset"]["path"] = str(resolve_path(dataset_path or run_cfg["dataset"]["path"]))
    dataset = build_dataset(run_cfg)
    train_obs = Windows.from_dataset(dataset).obs
    validation = dataset.get_validation_dataset()
    return train_obs, (Windows.from_dataset(validation).obs if len(validation) else train_obs[:0])
