"""Every training window of a dataset split stacked into two tensors, so a batch is one index operation.

Used by `pcm train` (all windows) and by the observation sources (`pcm_policy.observations`: the observation
histories of the dataset a checkpoint was trained on).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from pcm_policy.data.lowdim_dataset import DatasetConfig, LowDimDataset


@dataclass
class Windows:
    """All training windows as two tensors.

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


def build_dataset(run_config: Mapping[str, Any]) -> LowDimDataset:
    """The training split a run config describes: its `dataset` group, the window shape of its `policy` group and
    its `seed` (the episode split), as `pcm train` built it.

    Raises:
        ConfigError: an invalid `dataset` group (e.g. no `dataset.path`).
        DatasetError: a missing, corrupt or incomplete file (from the loaders).
    """
    pol = run_config["policy"]
    return DatasetConfig.from_mapping(run_config["dataset"]).load(
        pol["horizon"], pol["n_obs_steps"], pol["n_action_steps"], seed=run_config["seed"])
