"""`pcm collect`: run a task's scripted demonstrator and record episodes in the task's real dataset format
(`configs/collect.yaml`). Crash-safe and resumable: re-running the same command after an interruption continues
at the next seed and writes the same dataset."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pcm_policy.atomic import atomic_write_text
from pcm_policy.errors import ConfigError
from pcm_policy.options import flag, integer, lookup, output_dir, text
from pcm_policy.tasks import Task, get_task, resolve_entry_point


@dataclass(frozen=True)
class Config:
    """A checked `pcm collect` config.

    Attributes:
        task: the registered task whose expert and collector run.
        max_steps: time limit per episode, in control steps.
        episodes: successful episodes to record (attempts, with `keep_failed`).
        seed: env reset seeds seed, seed + 1, ... (keep clear of the test seeds 100000+).
        keep_failed: record failed attempts too.
        images: also record camera images (PushT's `data/img`, robomimic's two cameras).
        overwrite: collect again over an existing complete output.
        path: the dataset file written (inside `output_dir`).
        output_dir: where the dataset and metrics.json go.
    """

    task: Task
    max_steps: int
    episodes: int
    seed: int
    keep_failed: bool
    images: bool
    overwrite: bool
    path: Path
    output_dir: Path

    @classmethod
    def from_hydra(cls, cfg: Mapping[str, Any]) -> "Config":
        """Check every option of a composed `collect` config before any env starts.

        Raises:
            ConfigError: a key of the wrong type or range, or an `output_name` that is a path rather than a file
                name.
        """
        out = output_dir(cfg)
        task = get_task(lookup(cfg, "task.name"))
        max_steps = integer(cfg, "task.max_steps", 1)
        episodes, seed = integer(cfg, "episodes", 1), integer(cfg, "seed", 0)
        keep_failed, overwrite, images = flag(cfg, "keep_failed"), flag(cfg, "overwrite"), flag(cfg, "images")
        images = images or bool(task.cameras)  # an image task's dataset always holds its camera frames
        name = text(cfg, "output_name", null=True)
        if name is not None and (Path(name).name != name or name in (".", "..")):
            raise ConfigError(f"output_name={name!r}: a file name inside output_dir, not a path")
        path = out / (name or Path(task.dataset_path).name)
        return cls(task, max_steps, episodes, seed, keep_failed, images, overwrite, path, out)


def run(config: Config) -> dict[str, Any]:
    """Collect (or resume, or find the output already complete) and write `metrics.json` beside the dataset.

    Returns:
        The collector's statistics (episodes, steps, attempts, success rate, wall time, ...).
    """
    collect = resolve_entry_point(config.task.collector)
    stats = collect(config.task, config.path, config.episodes, seed=config.seed, keep_failed=config.keep_failed,
                    max_steps=config.max_steps, overwrite=config.overwrite, images=config.images)
    metrics = config.output_dir / "metrics.json"
    if stats.get("already_complete"):
        print(f"{config.path}: already complete ({stats['episodes']} episodes, {stats['steps']} steps); "
              "nothing to do (overwrite=true collects it again)")
    if not stats.get("already_complete") or not metrics.exists():  # (killed before writing the metrics)
        atomic_write_text(metrics, json.dumps({"command": "collect", "task": config.task.name, "path": str(config.path),
                                               **stats}, indent=2, default=str))
    print(f"dataset: {config.path}")
    return stats
