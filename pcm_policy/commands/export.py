"""`pcm export CHECKPOINT OUTPUT [--format pcm|lerobot|diffusion-policy] [--dtype float16]`.

`--format pcm` (the default): a compact copy of a checkpoint for shipping (weights cast to the dtype, the
normalizer kept float32, no optimizer state); train PCMs against the exported copy. `--format lerobot` /
`--format diffusion-policy`: the base policy in that tool's layout (a lerobot policy directory / a Diffusion
Policy `.ckpt`, float32), so it runs there; `pcm import` reads it back as the same policy
(`pcm_policy.interop.lerobot_export`, `pcm_policy.interop.diffusion_policy_export`)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from pcm_policy.checkpoint import EXPORT_DTYPES, export_checkpoint
from pcm_policy.errors import ConfigError
from pcm_policy.interop.diffusion_policy_export import export_diffusion_policy
from pcm_policy.interop.lerobot_export import export_lerobot

FORMATS = ("pcm", "lerobot", "diffusion-policy")


@dataclass(frozen=True)
class Config:
    """A `pcm export` request."""

    checkpoint: Path
    output: Path
    dtype: str
    format: str = "pcm"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Config":
        """From the parsed command line (`add_parser`).

        Raises:
            ConfigError: a dtype other than float32 for another tool's format (both load float32 weights).
        """
        dtype = args.dtype or ("float16" if args.format == "pcm" else "float32")
        if args.format != "pcm" and dtype != "float32":
            raise ConfigError(f"--dtype {dtype}: --format {args.format} writes float32 weights (the tool loads "
                              "them as float32); leave --dtype out")
        return cls(Path(args.checkpoint), Path(args.output), dtype, args.format)


def add_parser(sub) -> None:
    """Register `pcm export` on the `pcm` subparsers."""
    export = sub.add_parser("export", help="compact copy of a checkpoint (fp16), or a base policy in lerobot's or "
                                           "Diffusion Policy's layout",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("checkpoint", help="run directory or checkpoint directory")
    export.add_argument("output", help="output: checkpoint directory (pcm), policy directory (lerobot), .ckpt file "
                                       "(diffusion-policy)")
    export.add_argument("--format", default="pcm", choices=list(FORMATS))
    export.add_argument("--dtype", default=None, choices=list(EXPORT_DTYPES),
                        help="weights dtype (pcm: default float16; the other formats: float32 only)")
    export.set_defaults(command_config=Config.from_args, command_run=run)


def run(config: Config) -> Path:
    """Write the copy and print its size.

    Returns:
        The output checkpoint directory.

    Raises:
        CheckpointError: no readable checkpoint at the source (for lerobot/diffusion-policy: or a PCM).
        ConfigError: an output that would replace the source or other data; a policy the format cannot hold.
    """
    if config.format == "diffusion-policy":
        path = export_diffusion_policy(config.checkpoint, config.output)
        print(f"exported {config.checkpoint} -> {path} (Diffusion Policy workspace checkpoint, float32, "
              f"{path.stat().st_size / 1e6:.1f} MB; `pcm import diffusion-policy {path}` reads it back)")
        return path
    if config.format == "lerobot":
        report = export_lerobot(config.checkpoint, config.output)
        path = report["path"]
        features = ", ".join(f"{k} {v}" for k, v in report["features"].items())
        exact = ("normalizer bit for bit" if not report["inexact_dims"] else
                 f"{report['inexact_dims']} normalizer dims one float32 rounding away")
        print(f"exported {config.checkpoint} -> {path} (lerobot diffusion policy, inputs {features}, MIN_MAX, "
              f"{exact}; `pcm import lerobot {path}` reads it back)")
        return path
    path = export_checkpoint(config.checkpoint, config.output, config.dtype)
    size = sum(p.stat().st_size for p in path.iterdir()) / 1e6
    print(f"exported {config.checkpoint} -> {path} ({config.dtype}, {size:.1f} MB)")
    return path
