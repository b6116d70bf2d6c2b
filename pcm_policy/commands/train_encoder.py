"""`pcm train-encoder`: an image policy from a low-dim policy of the same env - a camera encoder regressed onto the
state the low-dim policy sees, assembled exactly with its action network (`configs/train_encoder.yaml`,
`pcm_policy.state_encoder`)."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from pcm_policy import checkpoint as ckpt_io
from pcm_policy.atomic import atomic_path
from pcm_policy.checkpoint import Card
from pcm_policy.data.lowdim_dataset import DatasetConfig
from pcm_policy.data.stacked_windows import load_dataset
from pcm_policy.errors import CheckpointError, ConfigError, DatasetError
from pcm_policy.model.vision import VisionEncoderConfig, build_vision_encoder
from pcm_policy.options import check_list, lookup, output_dir
from pcm_policy.runtime import RuntimeOptions, seed_everything
from pcm_policy.state_encoder import (EncoderSettings, assemble_image_policy, camera_weights, error_in_env_units,
                                      shared_columns, state_targets, train_state_encoder)
from pcm_policy.tasks import TaskOptions, get_task, missing_dataset


@dataclass(frozen=True)
class Config:
    """A checked `pcm train-encoder` config.

    Attributes:
        task: the image task the policy is for.
        dataset: its image dataset (the frames, and the state recorded beside them).
        head: the low-dim policy's card.
        head_dataset: how the head reads an observation from the same file (its dataset kind and keys).
        cameras: the cameras the image policy sees.
        vision: the encoder's keys (without feature_dim / feature_activation).
        settings: the regression's optimisation.
        runtime: seed, device, threads.
        output_dir: where the image policy's checkpoint and metrics go.
    """

    task: TaskOptions
    dataset: DatasetConfig
    head: Card
    head_dataset: DatasetConfig
    cameras: tuple[str, ...]
    vision: dict[str, Any]
    settings: EncoderSettings
    runtime: RuntimeOptions
    output_dir: Path

    @classmethod
    def from_hydra(cls, cfg: Mapping[str, Any]) -> "Config":
        """Check every option before any work.

        Raises:
            ConfigError: a key of the wrong type or range, a task without cameras, a device other than the CPU.
            CheckpointError: `head` unreadable, a PCM, an image policy, or for a task whose data has no state to
                read from this task's file.
            DatasetError: the task's dataset is missing (naming the command that regenerates it).
        """
        runtime = RuntimeOptions.from_mapping(cfg)
        if runtime.device.type != "cpu":
            raise ConfigError(f"device={cfg.get('device')}: train-encoder runs on the CPU (minutes at 96x96)")
        task = TaskOptions.from_mapping(lookup(cfg, "task"))
        if not task.spec.cameras:
            raise ConfigError(f"task={task.name}: a low-dim task; train-encoder makes an image policy (e.g. "
                              "task=pusht_image)")
        out = output_dir(cfg)
        dataset = DatasetConfig.from_mapping(lookup(cfg, "dataset"))
        if not Path(dataset.path).exists():
            raise missing_dataset(dataset.path)
        head = Card.open_base("head", lookup(cfg, "head", None))
        policy = head.data.get("policy") or {}
        if policy.get("vision") is not None:
            raise CheckpointError(f"head={head.given}: an image policy; give a low-dim policy of the same env (it "
                                  "sees the state the encoder learns to read)")
        head_task = get_task(str(head.task), key=f"head={head.given}: its task")
        run = ckpt_io.read_run_config(head.path) if (head.path / ckpt_io.RUN_CONFIG).exists() else {}
        obs_keys = (run.get("dataset") or {}).get("obs_keys")
        head_dataset = DatasetConfig(kind=head_task.dataset_kind, path=dataset.path,
                                     obs_keys=tuple(obs_keys) if obs_keys else None)
        if head_dataset.kind != dataset.kind:
            raise CheckpointError(f"head={head.given}: trained on {head_dataset.kind} data, task={task.name} has "
                                  f"{dataset.kind}: the head's state cannot be read from {dataset.path}")
        cameras = tuple(check_list("camera_keys", cfg.get("camera_keys"), "[img]", null=True) or task.spec.cameras)
        vision = dict(lookup(cfg, "vision"))
        for key in ("feature_dim", "feature_activation"):
            if key in vision:
                raise ConfigError(f"vision.{key}: set by the head (one feature per state column, no activation)")
        VisionEncoderConfig.from_mapping({**vision, "image_shape": vision.get("image_shape") or (96, 96)})
        return cls(task, dataset, head, head_dataset, cameras, vision, EncoderSettings.from_mapping(cfg), runtime, out)

    def run_config(self, policy: Mapping[str, Any]) -> dict[str, Any]:
        """The run config saved with the checkpoint (`config.yaml`, `configs/train.yaml`'s layout for what later
        commands read: the dataset, the window shape and the seed of the episode split - `pcm train-pcm` and
        `pcm bench` draw observation histories from it)."""
        dataset = asdict(self.dataset)
        if dataset["obs_keys"] is not None:
            dataset["obs_keys"] = list(dataset["obs_keys"])
        return {"task": asdict(self.task), "policy": dict(policy), "dataset": dataset,
                "train_encoder": {**asdict(self.settings), "head": self.head.given, "vision": dict(self.vision)},
                "seed": self.runtime.seed, "threads": self.runtime.threads, "output_dir": str(self.output_dir)}


def _episode_rows(ends: np.ndarray) -> list[np.ndarray]:
    """The buffer rows of each episode (exclusive cumulative `ends`)."""
    return [np.arange(s, e) for s, e in zip(np.concatenate([[0], ends[:-1]]), ends)]


def _frames(images, episode_ends: np.ndarray) -> torch.Tensor:
    """Every frame of the dataset, read an episode at a time (a robomimic read stays within one demo),
    (N, cameras, 3, H, W) uint8 (PushT 200 episodes: 0.8 GB; Lift 100 demos, two 84x84 cameras: 0.2 GB)."""
    parts = [images.read(rows) for rows in _episode_rows(episode_ends)]
    return torch.from_numpy(np.concatenate(parts)).permute(0, 1, 4, 2, 3).contiguous()


def _rows_of(episode_ends: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The buffer rows of the episodes `mask` selects."""
    rows = [r for r, m in zip(_episode_rows(episode_ends), mask) if m]
    return np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)


def run(config: Config) -> dict[str, Any]:
    """Read the frames and the head's state, regress the encoder, assemble and save the image policy.

    Returns:
        The metrics written to `output_dir/metrics.json`.

    Raises:
        DatasetError: the image policy's own observation is not part of the head's, or the action sizes differ.
    """
    seed_everything(config.runtime.seed)
    head, head_card = ckpt_io.load_policy(config.head.path)
    c = head.config
    vision = dict(config.vision)
    policy_options = {"horizon": c.horizon, "n_obs_steps": c.n_obs_steps, "n_action_steps": c.n_action_steps,
                      "vision": {"image_shape": vision.get("image_shape")}, "camera_keys": list(config.cameras)}
    images = load_dataset(config.dataset, policy_options, config.runtime.seed)
    state = config.head_dataset.load(c.horizon, c.n_obs_steps, c.n_action_steps, config.runtime.seed)
    where = str(config.dataset.path)
    if state.obs.shape[1] != c.obs_dim or images.action_dim != c.action_dim:
        raise DatasetError(f"{where}: the head ({config.head.given}) takes a {c.obs_dim}-d observation and "
                           f"{c.action_dim}-d actions; this file gives {state.obs.shape[1]} and {images.action_dim}")
    own = shared_columns(images.lowdim.obs, state.obs, where)
    targets = state_targets(head, state.obs, own)
    t0 = time.perf_counter()
    frames = _frames(images.images, images.episode_ends)
    encoder = build_vision_encoder({**vision, "image_shape": images.image_shape, "feature_dim": targets.shape[1]})
    train_rows = _rows_of(images.episode_ends, images.lowdim.train_mask)
    val_rows = _rows_of(images.episode_ends, images.lowdim.val_mask)
    print(f"encoder: {sum(p.numel() for p in encoder.parameters()):,} parameters, predicting {targets.shape[1]} "
          f"state columns of {config.head.given} from {len(config.cameras)} camera(s); own observation = head "
          f"columns {own}; {len(train_rows):,} training frames, {len(val_rows):,} held out")
    metrics = train_state_encoder(encoder, frames, targets, train_rows, val_rows, config.settings,
                                  config.runtime.seed)
    weights = (camera_weights(torch.tensor(metrics["val_mse_per_camera"])) if metrics["val_mse_per_camera"]
               else None)
    policy = assemble_image_policy(head, encoder, own, config.cameras, weights)
    card = {"kind": "base", "task": config.task.name, "env_id": config.task.env_id, "dataset": where,
            "abs_action": bool(head_card.get("abs_action", False)), "policy": policy.config.to_dict(),
            # where the action network came from (`pcm export --link-head` ships the encoder with this link only)
            "head": {"checkpoint": config.head.given, "fingerprint": ckpt_io.weights_fingerprint(head.model),
                     "own_columns": own, "camera_weights": None if weights is None else weights.tolist()}}
    metrics.update({"head": config.head.given, "own_columns": own, "wall_s": time.perf_counter() - t0,
                    "steps": config.settings.steps})
    if metrics["val_mae"] is not None:
        metrics["val_mae_env_units"] = error_in_env_units(head, metrics["val_mae"], own)
    out = config.output_dir
    out.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt_io.save_checkpoint(ckpt_io.step_dir(out, config.settings.steps), card, policy.weights(),
                                   config=config.run_config(policy.config.to_dict()))
    metrics["checkpoint"] = str(ckpt)
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=1))
    if metrics["val_mae"] is not None:
        print(f"held-out mean |error|: {np.mean(metrics['val_mae']):.4f} normalized, "
              f"{np.mean(metrics['val_mae_env_units']):.2f} in the head's observation units")
    print(f"checkpoint: {ckpt}")
    print(f"metrics: {os.path.join(out, 'metrics.json')}")
    return metrics

