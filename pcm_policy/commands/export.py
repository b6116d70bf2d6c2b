"""`pcm export CHECKPOINT OUTPUT [--dtype float16]`: a compact copy of a checkpoint for shipping (weights cast to
the dtype, the normalizer kept float32, no optimizer state). Train PCMs against the exported copy."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from pcm_policy.checkpoint import EXPORT_DTYPES, export_checkpoint


@dataclass(frozen=True)
class Config:
    """A `pcm export` request."""

    checkpoint: Path
    output: Path
    dtype: str

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Config":
        """From the parsed command line (`add_parser`)."""
        return cls(Path(args.checkpoint), Path(args.output), args.dtype)


def add_parser(sub) -> None:
    """Register `pcm export` on the `pcm` subparsers."""
    export = sub.add_parser("export", help="compact copy of a checkpoint for shipping (fp16, no train state)",
                            description="Write a compact copy of a checkpoint: weights cast to --dtype (the normalizer "
                                        "stays float32), no optimizer state. Train PCMs against the exported copy.")
    export.add_argument("checkpoint", help="run directory or checkpoint directory")
    export.add_argument("output", help="output checkpoint directory")
    export.add_argument("--dtype", default="float16", choices=list(EXPORT_DTYPES))
    export.set_defaults(command_config=Config.from_args, command_run=run)


def run(config: Config) -> Path:
    """Write the copy and print its size.

    Returns:
        The output checkpoint directory.

    Raises:
        CheckpointError: no readable checkpoint at the source.
        ConfigError: an output that would replace the source or other data.
    """
    path = export_checkpoint(config.checkpoint, config.output, config.dtype)
    size = sum(p.stat().st_size for p in path.iterdir()) / 1e6
    print(f"exported {config.checkpoint} -> {path} ({config.dtype}, {size:.1f} MB)")
    return path
