"""Every training window of a dataset split stacked into two tensors, so a batch is one index operation.

Used by `pcm train` (all windows) and by the observation sources (`pcm_policy.observations`: the observation
histories of the dataset a checkpoint was trained on). An image dataset's frames are not stacked (they do not fit
in memory at scale): a batch reads its windows' frames from the dataset's lazy image reader.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from pcm_policy.data.image_dataset import ImageDataset
from pcm_policy.data.lowdim_dataset import DatasetConfig, LowDimDataset


@dataclass
class Windows:
    """All training windows as two tensors (and, for an image dataset, the reader of their frames).

    Attributes:
        obs: observation histories (N, To, Do) float32, env units (unnormalized).
        action: action chunks (N, H, Da) float32, env units (unnormalized).
        images: the image dataset the windows came from (its frames are read per batch), or None.
    """

    obs: torch.Tensor  # (N, To, Do) float32, unnormalized
    action: torch.Tensor  # (N, H, Da) float32, unnormalized
    images: ImageDataset | None = None

    @classmethod
    def from_dataset(cls, dataset: LowDimDataset | ImageDataset) -> "Windows":
        """Stack every window of `dataset` (a split; items {"obs", "action"}) in index order.

        Raises:
            RuntimeError: `dataset` is empty (nothing to stack).
        """
        lowdim = dataset.lowdim if isinstance(dataset, ImageDataset) else dataset
        items = [lowdim[i] for i in range(len(lowdim))]
        return cls(torch.stack([torch.as_tensor(it["obs"]) for it in items]).float(),
                   torch.stack([torch.as_tensor(it["action"]) for it in items]).float(),
                   dataset if isinstance(dataset, ImageDataset) else None)

    def __len__(self) -> int:
        return self.obs.shape[0]

    def observations(self, idx: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """The observation histories of windows `idx` (a 1-d index tensor): (n, To, Do), or for an image dataset
        {"obs": that, "image": (n, To, cameras, 3, H, W) uint8}."""
        obs = self.obs[idx]
        if self.images is None:
            return obs
        return {"obs": obs, "image": self.images.window_images(idx.tolist())}

    def batch(self, idx: torch.Tensor, device=None) -> dict[str, torch.Tensor]:
        """A training batch of windows `idx`: {"obs", "action"} (and "image" for an image dataset) on `device`."""
        out = {"obs": self.obs[idx], "action": self.action[idx]}
        if self.images is not None:
            out["image"] = self.images.window_images(idx.tolist())
        return {k: v.to(device) for k, v in out.items()}


def load_dataset(dataset: DatasetConfig, policy: Mapping[str, Any], seed: int) -> LowDimDataset | ImageDataset:
    """The training split of `dataset` for a policy's windows (its `horizon`, `n_obs_steps`, `n_action_steps`); an
    image policy's (one with `vision`) as an `ImageDataset` of its `camera_keys` at its encoder's image size.

    Raises:
        ConfigError: an invalid window shape, or a camera layout the file kind cannot hold.
        DatasetError: a missing, corrupt or incomplete file, a missing camera key, images of another size.
    """
    H, To, Ta = policy["horizon"], policy["n_obs_steps"], policy["n_action_steps"]
    vision = policy.get("vision")
    if vision is None:
        return dataset.load(H, To, Ta, seed)
    shape = vision.get("image_shape", (96, 96))  # None: the file's (`pcm train-encoder` sizes its encoder to it)
    image_shape = tuple(shape) if shape is not None else None
    return ImageDataset.from_config(
        dataset.kind, dataset.path, H, To, Ta, val_ratio=dataset.val_ratio, seed=seed,
        max_train_episodes=dataset.max_train_episodes, camera_keys=list(policy.get("camera_keys") or []) or None,
        obs_keys=dataset.obs_keys, abs_action=dataset.abs_action, filter_key=dataset.filter_key,
        image_shape=image_shape)


def build_dataset(run_config: Mapping[str, Any]) -> LowDimDataset | ImageDataset:
    """The training split a run config describes: its `dataset` group, the window shape of its `policy` group and
    its `seed` (the episode split), as `pcm train` built it.

    Raises:
        ConfigError: an invalid `dataset` group (e.g. no `dataset.path`).
        DatasetError: a missing, corrupt or incomplete file (from the loaders).
    """
    return load_dataset(DatasetConfig.from_mapping(run_config["dataset"]), run_config["policy"], run_config["seed"])
