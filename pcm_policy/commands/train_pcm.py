"""`pcm train-pcm`: Picard Consistency Training of a PCM (LoRA or full) for a trained base policy
(`configs/train_pcm.yaml`); re-running the same command resumes."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pcm_policy.checkpoint import Card
from pcm_policy.observations import ClosedLoopSettings, ObservationSource
from pcm_policy.options import lookup, output_dir
from pcm_policy.pcm.training import PctSettings, train_pcm
from pcm_policy.runtime import RuntimeOptions
from pcm_policy.sampler_config import check_steps


@dataclass(frozen=True)
class Config:
    """A checked `pcm train-pcm` config.

    Attributes:
        base: the base policy's card.
        settings: what the PCM is trained for and how.
        observations: where the training and held-out observation histories come from.
        runtime: seed, device, threads, determinism.
        output_dir: the run directory (trajectories, checkpoints, metrics).
    """

    base: Card
    settings: PctSettings
    observations: ObservationSource
    runtime: RuntimeOptions
    output_dir: Path

    @classmethod
    def from_hydra(cls, cfg: Mapping[str, Any]) -> "Config":
        """Check every option of a composed `train_pcm` config against the base's card, before any work.

        Raises:
            ConfigError: a key of the wrong type or range, `steps` > the base's T, a missing `dataset_path`,
                closed-loop observations for a base without an env, or a rollout sampler that needs a PCM.
            CheckpointError: `base` is unreadable or a PCM.
            DatasetError: the base's dataset is missing (naming the command that regenerates it).
        """
        runtime = RuntimeOptions.from_mapping(cfg)
        out = output_dir(cfg)
        settings = PctSettings.from_mapping(cfg)
        base = Card.open_base("base", lookup(cfg, "base", None))
        check_steps(f"steps={settings.steps}", settings.steps, base.num_train_timesteps, base.path)
        source = ObservationSource(kind=lookup(cfg, "observations", "dataset"), trajectories=cfg.get("trajectories"),
                                   held_out=cfg.get("eval_observations"), dataset_path=cfg.get("dataset_path"),
                                   closed_loop=ClosedLoopSettings.from_mapping(cfg.get("closed_loop")))
        source.check(base.path, base.env_id)
        if source.kind == "closed_loop":
            source.closed_loop.sampler.check_steps(base.num_train_timesteps, "closed_loop.sampler", base.path)
        return cls(base, settings, source, runtime, out)


def run(config: Config) -> dict[str, Any]:
    """Collect, train and evaluate the PCM; print the held-out rounds before and after.

    Returns:
        The run's metrics (`pcm_policy.pcm.training.train_pcm`).
    """
    m = train_pcm(config.settings, config.base.path, config.observations, config.output_dir, config.runtime.seed,
                  config.runtime.device, env_id=config.base.env_id)
    if "checkpoint" not in m:  # a torchrun rank other than 0: rank 0 reports
        return m
    for name in ("picard", "pcm", "pcm_lora"):
        if name in m["after"]:
            b, a = m["before"][name], m["after"][name]
            print(f"{name:9s} iterations {b['iterations_mean']:.2f} -> {a['iterations_mean']:.2f}  "
                  f"max |err| vs sequential {a['max_abs_err_vs_sequential']:.2e}")
    print(f"checkpoint: {m['checkpoint']}")
    print(f"metrics: {os.path.join(config.output_dir, 'metrics.json')}")
    return m
