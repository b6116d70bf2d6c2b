"""`pcm export CHECKPOINT OUTPUT [--format pcm|lerobot|diffusion-policy|onnx] [--dtype float16] [pcm=DIR]`.

`--format pcm` (the default): a compact copy of a checkpoint for shipping (weights cast to the dtype, the
normalizer kept float32, no optimizer state); train PCMs against the exported copy. `--link-head` (an image policy
from `pcm train-encoder`): the encoder only, with a link to the low-dim head whose action network it shares. `--format lerobot` /
`--format diffusion-policy`: the base policy in that tool's layout (a lerobot policy directory / a Diffusion
Policy `.ckpt`, float32), so it runs there; `pcm import` reads it back as the same policy
(`pcm_policy.interop.lerobot_export`, `pcm_policy.interop.diffusion_policy_export`). `--format onnx`: a directory of
ONNX graphs (denoiser, an image policy's encoder, with `pcm=DIR` the PCM's) and policy.json, enough to sample with
onnxruntime and diffusers alone (docs/onnx.md; `pcm_policy.backends.exported`); checked against torch before it is
written."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from pcm_policy.backends.exported import POLICY_JSON, export_onnx
from pcm_policy.checkpoint import EXPORT_DTYPES, Card, export_checkpoint, load_policy
from pcm_policy.errors import ConfigError
from pcm_policy.interop.diffusion_policy_export import export_diffusion_policy
from pcm_policy.interop.lerobot_export import export_lerobot
from pcm_policy.options import writable_dir
from pcm_policy.pcm.attach import load_pcm

FORMATS = ("pcm", "lerobot", "diffusion-policy", "onnx")
OPTIONS = ("pcm",)  # key=value options after OUTPUT


@dataclass(frozen=True)
class Config:
    """A `pcm export` request."""

    checkpoint: Path
    output: Path
    dtype: str
    format: str = "pcm"
    pcm: Path | None = None  # --format onnx: a PCM checkpoint of this base, exported beside it
    link_head: bool = False  # --format pcm: store an assembled image policy's encoder + a link to its head

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Config":
        """From the parsed command line (`add_parser`).

        Raises:
            ConfigError: a dtype other than float32 for another tool's format (both load float32 weights); an
                option other than `pcm=DIR`, or `pcm=` with a format other than onnx.
        """
        dtype = args.dtype or ("float16" if args.format == "pcm" else "float32")
        if args.format != "pcm" and dtype != "float32":
            raise ConfigError(f"--dtype {dtype}: --format {args.format} writes float32 weights (the tool loads "
                              "them as float32); leave --dtype out")
        options = {}
        for option in getattr(args, "options", None) or []:
            key, sep, value = option.partition("=")
            if not sep or key not in OPTIONS or not value:
                raise ConfigError(f"{option}: unknown option (expected pcm=<PCM checkpoint dir>)")
            options[key] = value
        if "pcm" in options and args.format != "onnx":
            raise ConfigError(f"pcm={options['pcm']}: only --format onnx exports a PCM")
        pcm = Path(options["pcm"]) if "pcm" in options else None
        link_head = bool(getattr(args, "link_head", False))
        if link_head and args.format != "pcm":
            raise ConfigError(f"--link-head: only --format pcm links an image policy to its head (--format "
                              f"{args.format} writes whole networks)")
        return cls(Path(args.checkpoint), Path(args.output), dtype, args.format, pcm, link_head)


def add_parser(sub) -> None:
    """Register `pcm export` on the `pcm` subparsers."""
    export = sub.add_parser("export", help="compact copy of a checkpoint (fp16), or a base policy in lerobot's or "
                                           "Diffusion Policy's layout",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("checkpoint", help="run directory or checkpoint directory")
    export.add_argument("output", help="output: checkpoint directory (pcm), policy directory (lerobot), .ckpt file "
                                       "(diffusion-policy)")
    export.add_argument("options", nargs="*", metavar="pcm=DIR",
                        help="--format onnx: a PCM checkpoint of this base, exported as pcm_lora.onnx (LoRA) or pcm.onnx")
    export.add_argument("--format", default="pcm", choices=list(FORMATS))
    export.add_argument("--dtype", default=None, choices=list(EXPORT_DTYPES),
                        help="weights dtype (pcm: default float16; the other formats: float32 only)")
    export.add_argument("--link-head", action="store_true",
                        help="an image policy from `pcm train-encoder`: write its encoder only, linked to the low-dim "
                             "head it shares the action network with")
    export.set_defaults(command_config=Config.from_args, command_run=run, trailing_options="options")


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
    if config.format == "onnx":
        spec = _export_onnx(config)
        graphs = ", ".join(f"{f} (max |onnxruntime - torch| {g['self_check_max_abs_diff']:.1e})"
                           for f, g in spec["graphs"].items())
        print(f"exported {config.checkpoint} -> {config.output} (ONNX: {graphs}; policy.json; docs/onnx.md samples "
              "it with onnxruntime and diffusers)")
        return config.output
    if config.format == "lerobot":
        report = export_lerobot(config.checkpoint, config.output)
        path = report["path"]
        features = ", ".join(f"{k} {v}" for k, v in report["features"].items())
        exact = ("normalizer bit for bit" if not report["inexact_dims"] else
                 f"{report['inexact_dims']} normalizer dims one float32 rounding away")
        print(f"exported {config.checkpoint} -> {path} (lerobot diffusion policy, inputs {features}, MIN_MAX, "
              f"{exact}; `pcm import lerobot {path}` reads it back)")
        return path
    path = export_checkpoint(config.checkpoint, config.output, config.dtype, link_head=config.link_head)
    size = sum(p.stat().st_size for p in path.iterdir()) / 1e6
    print(f"exported {config.checkpoint} -> {path} ({config.dtype}, {size:.1f} MB"
          + (", linked to its head" if config.link_head else "") + ")")
    return path


def _export_onnx(config: Config) -> dict:
    """`--format onnx`: load the base (and PCM) on the CPU, check the output, export (`export_onnx`).

    Raises:
        CheckpointError: no readable base checkpoint (or a PCM given as the base), or a PCM for another base.
        ConfigError: an output that is the source or inside it, or an existing directory that is not an ONNX export.
        PcmError: the self-check failed (nothing written).
    """
    card = Card.open_base("checkpoint", str(config.checkpoint))
    out = config.output
    writable_dir("output", out)
    target = out.resolve()
    for source in {config.checkpoint.resolve(), card.path.resolve()}:
        if target == source or source in target.parents or target in source.parents:
            raise ConfigError(f"output={out}: would overlap the checkpoint being exported ({config.checkpoint}); "
                              "choose a new directory")
    if out.is_dir() and any(out.iterdir()) and not (out / POLICY_JSON).is_file():
        raise ConfigError(f"output={out}: exists and is not an ONNX export (refusing to replace it)")
    policy, _ = load_policy(card.path, "cpu")
    pcm = pcm_card = None
    if config.pcm is not None:
        pcm, pcm_card = load_pcm(Card.open_pcm("pcm", str(config.pcm)).path, policy, "cpu")
    return export_onnx(policy, out, card.data, str(config.checkpoint), pcm, pcm_card)
