"""`pcm train`: fit a Diffusion-Policy action head (DDPM) on a demonstration dataset (`configs/train.yaml`)."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from pcm_policy.checkpoint import Card
from pcm_policy.data.lowdim_dataset import DatasetConfig
from pcm_policy.errors import ConfigError
from pcm_policy.options import lookup, output_dir
from pcm_policy.policy import PolicyConfig, check_clip_range
from pcm_policy.runtime import RuntimeOptions
from pcm_policy.tasks import TaskOptions
from pcm_policy.training import TrainSettings, train


@dataclass(frozen=True)
class Config:
    """A checked `pcm train` config.

    Attributes:
        task: the task the policy is trained for.
        policy: the `policy` group (network shape and noise schedule), checked by `PolicyConfig`.
        dataset: the dataset.
        train: the optimisation settings.
        runtime: seed, device, threads, determinism.
        output_dir: the run directory (re-running the same command resumes from it).
    """

    task: TaskOptions
    policy: Mapping[str, Any]
    dataset: DatasetConfig
    train: TrainSettings
    runtime: RuntimeOptions
    output_dir: Path

    @classmethod
    def from_hydra(cls, cfg: Mapping[str, Any]) -> "Config":
        """Check every option of a composed `train` config, and `train.init_from`'s card, before any work.

        Raises:
            ConfigError: a key of the wrong type or range, a non-network policy, a low-dim policy for an image
                task, no `dataset.path`, a robomimic-only dataset key on a zarr dataset, a normalizer clip_sample
                would cap, or a batch size the processes do not divide.
            CheckpointError: `train.init_from` is unreadable, a PCM, for another task or of another shape.
        """
        runtime = RuntimeOptions.from_mapping(cfg)
        task = TaskOptions.from_mapping(lookup(cfg, "task"))
        out = output_dir(cfg)
        policy = lookup(cfg, "policy")
        if policy.get("name") in ("checkpoint", "expert"):
            raise ConfigError(f"policy={policy['name']}: training needs a network policy (e.g. policy=unet_small or "
                              "unet_dp)")
        shape = PolicyConfig.from_mapping(policy, obs_dim=1, action_dim=1)  # the sizes come from the data
        if task.spec.cameras and not shape.camera_keys:
            raise ConfigError(f"policy={policy.get('name')}: task={task.name} gives camera images "
                              f"({', '.join(task.spec.cameras)}) but the policy takes none; train an image policy "
                              f"(policy={task.spec.policy}) or use a low-dim task")
        dataset = DatasetConfig.from_mapping(lookup(cfg, "dataset"))
        check_clip_range(shape.noise_scheduler, dataset.normalizer)
        settings = TrainSettings.from_mapping(lookup(cfg, "train"))
        if settings.init_from:
            card = Card.open_base("train.init_from", settings.init_from, task=task.name)
            card.check_policy_shape(shape)
        return cls(task, policy, dataset, settings, runtime, out)

    def run_config(self) -> dict[str, Any]:
        """The run config saved with every checkpoint (`config.yaml`, the layout of `configs/train.yaml`): it
        tells later commands which dataset, window shape and seed the policy was trained with."""
        dataset = asdict(self.dataset)
        if dataset["obs_keys"] is not None:
            dataset["obs_keys"] = list(dataset["obs_keys"])
        train = asdict(self.train)
        train["betas"] = list(train["betas"])
        return {"task": asdict(self.task), "policy": dict(self.policy), "dataset": dataset, "train": train,
                "seed": self.runtime.seed, "device": str(self.runtime.device),
                "deterministic": self.runtime.deterministic, "threads": self.runtime.threads,
                "output_dir": str(self.output_dir)}


def run(config: Config) -> dict[str, Any]:
    """Train (resuming from `output_dir` when it holds a checkpoint) and print where the checkpoint went.

    Returns:
        The run's metrics (`pcm_policy.training.train`).
    """
    metrics = train(config.run_config(), config.train, config.dataset, config.policy, config.task.name,
                    config.task.env_id, config.runtime.seed, config.runtime.device, config.output_dir)
    if "checkpoint" in metrics:  # (a torchrun rank other than 0 returns only its rank: rank 0 reports)
        print(f"checkpoint: {metrics['checkpoint']}")
        print(f"metrics: {os.path.join(config.output_dir, 'metrics.json')}")
    return metrics
