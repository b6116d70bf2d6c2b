"""`pcm import FORMAT PATH [output_dir=DIR] [dataset.path=FILE]`: another tool's trained diffusion policy as an
ordinary pcm-policy checkpoint directory (card, weights, normalizer, observation layout, noise schedule) that every
other command takes (`configs/import_policy.yaml`).

FORMAT is `diffusion-policy` (a Diffusion Policy workspace `.ckpt`; its EMA weights) or `lerobot` (a
`save_pretrained` directory with `config.json` and `model.safetensors`). The imported policy's chunks equal the
source's own for the same observations and noise (`pcm_policy.interop`). With `dataset.path`, a dataset in the
policy's own observation layout is recorded as the checkpoint's run config, so `pcm bench`, `pcm demo` and
`pcm train-pcm` draw observation histories from it; without one they take them from closed-loop rollouts or a
file (`observations=`).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pcm_policy.checkpoint import check_output_dir
from pcm_policy.config import compose
from pcm_policy.errors import CheckpointError, ConfigError
from pcm_policy.interop import ImportedPolicy, import_diffusion_policy, import_lerobot, write_imported_checkpoint
from pcm_policy.options import integer, lookup, number, output_dir, text
from pcm_policy.paths import resolve_path
from pcm_policy.tasks import TASKS, missing_dataset

IMPORTERS = {"diffusion-policy": import_diffusion_policy, "lerobot": import_lerobot}


@dataclass(frozen=True)
class Config:
    """A checked `pcm import` request.

    Attributes:
        format: `diffusion-policy` or `lerobot`.
        path: the source checkpoint (a `.ckpt` file or a lerobot directory).
        output_dir: the checkpoint directory to write.
        dataset: a dataset in the policy's observation layout (None: none recorded).
        val_ratio: the dataset's validation fraction.
        seed: the dataset's episode split.
    """

    format: str
    path: Path
    output_dir: Path
    dataset: Path | None
    val_ratio: float
    seed: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Config":
        """From the parsed command line (`add_parser`): the format, the path and Hydra overrides."""
        return cls.from_hydra(compose("import_policy", args.overrides), args.format, args.path)

    @classmethod
    def from_hydra(cls, cfg: Mapping[str, Any], format: str, path) -> "Config":
        """Check the request before any file is read.

        Raises:
            CheckpointError: the source does not exist.
            ConfigError: an output folder that is a file, unwritable, or a non-empty folder that is not a
                checkpoint; a bad dataset key.
            DatasetError: `dataset.path` does not exist.
        """
        source = resolve_path(path)
        if not source.exists():
            raise CheckpointError(f"{path}: not found (expected a {format} checkpoint)")
        out = output_dir(cfg)
        check_output_dir("output_dir", out, source)
        dataset = text(cfg, "dataset.path", null=True)
        if dataset is not None and not resolve_path(dataset).exists():
            raise missing_dataset(dataset)
        return cls(format, source, out, resolve_path(dataset) if dataset else None,
                   number(cfg, "dataset.val_ratio", 0, 1, high_open=True), integer(cfg, "seed", 0))


def add_parser(sub) -> None:
    """Register `pcm import` on the `pcm` subparsers."""
    p = sub.add_parser("import", help="import a Diffusion Policy .ckpt or a lerobot policy as a pcm-policy checkpoint",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("format", choices=sorted(IMPORTERS), help="the source's format")
    p.add_argument("path", help="the source checkpoint: a Diffusion Policy .ckpt, or a lerobot save_pretrained dir")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="Hydra overrides (configs/import_policy.yaml): output_dir=DIR, dataset.path=FILE, seed=N")
    p.set_defaults(command_config=Config.from_args, command_run=run)


def run_config(imported: ImportedPolicy, config: Config) -> dict[str, Any] | None:
    """The run config recording `config.dataset` for the imported policy (None without a dataset).

    Raises:
        ConfigError: the policy's task is unknown, or its observation is not the layout of the task's datasets.
    """
    if config.dataset is None:
        return None
    card = imported.card
    task = TASKS.get(card.get("task"))
    kind = (card.get("observation") or {}).get("kind")
    if task is None or (kind is not None and kind != task.observations[0].kind):
        raise ConfigError(f"dataset.path={config.dataset}: the policy's observation ({kind}) is not the layout of "
                          f"{'any task' if task is None else task.name} datasets here "
                          f"({task.observations[0].kind if task else 'none'}); sample observations with "
                          "observations=closed_loop or a file instead")
    layout = (card.get("observation") or {}).get("layout") or []
    dataset = {"kind": task.dataset_kind, "path": str(config.dataset), "val_ratio": config.val_ratio,
               "max_train_episodes": None, "obs_keys": None, "abs_action": bool(card.get("abs_action")),
               "filter_key": None, "normalizer": "limits"}
    if task.dataset_kind == "robomimic_hdf5":
        dataset["obs_keys"] = [p["name"] for p in layout] or None
    policy = imported.config
    return {"task": {"name": task.name}, "dataset": dataset, "seed": config.seed,
            "policy": {"horizon": policy.horizon, "n_obs_steps": policy.n_obs_steps,
                       "n_action_steps": policy.n_action_steps}}


def run(config: Config) -> Path:
    """Import, check, write the checkpoint; print what it is.

    Returns:
        The checkpoint directory.

    Raises:
        CheckpointError, ConfigError: a source the importer refuses (one line naming the file and the key), or a
            dataset that does not fit the policy; nothing is written then.
    """
    imported = IMPORTERS[config.format](config.path)
    path = write_imported_checkpoint(imported, config.output_dir, run_config(imported, config))
    c, card = imported.config, imported.card
    layout = ", ".join(f"{p['name']} {p['size']}" for p in (card.get("observation") or {}).get("layout", []))
    print(f"imported {config.format} {config.path} -> {path}")
    print(f"  task {card.get('task')}, observation {(card.get('observation') or {}).get('kind')} ({layout}), "
          f"action {c.action_dim}, To={c.n_obs_steps} H={c.horizon} Ta={c.n_action_steps}, "
          f"down_dims {list(c.down_dims)}, T={c.num_train_timesteps}")
    return path
