"""`pcm data info PATH [--json]`: episodes, steps and array shapes of a PushT zarr replay buffer (directory or
.zarr.zip) or a robomimic low-dim hdf5 file, after checking that every array's stored data covers its shape."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pcm_policy.data.info import dataset_info


@dataclass(frozen=True)
class Config:
    """A `pcm data info` request: the dataset and the output form."""

    path: Path
    as_json: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Config":
        """From the parsed command line (`add_parser`)."""
        return cls(Path(args.path), bool(args.json))


def add_parser(sub) -> None:
    """Register `pcm data info` on the `pcm` subparsers."""
    data = sub.add_parser("data", help="inspect datasets", description="Inspect demonstration datasets.")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    info = data_sub.add_parser("info", help="summarise a PushT zarr or robomimic hdf5",
                               description="Print episodes, steps and array shapes of a PushT zarr replay buffer "
                                           "(directory or .zarr.zip) or a robomimic low-dim hdf5 file.")
    info.add_argument("path")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(command_config=Config.from_args, command_run=run)


def run(config: Config) -> dict[str, Any]:
    """Print the summary (one JSON object with `as_json`).

    Returns:
        `dataset_info`'s summary.

    Raises:
        DatasetError: a missing, corrupt or incomplete file, as one line naming it.
    """
    info = dataset_info(config.path)
    if config.as_json:
        print(json.dumps(info))
    else:
        print(f"{info['path']}: {info['format']}, {info['episodes']} episodes, {info['steps']} steps")
        for name, shape in info["arrays"].items():
            print(f"  {name}: {shape}")
    return info
