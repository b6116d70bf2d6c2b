"""What both exporters share: the base policy to export, read and checked once, and the output checks.

An export writes a base policy in another tool's layout so that it runs there; importing the export gives back
the same policy (network weights and normalizer bit for bit, the same chunks). Only base policies export: a PCM
is a fine-tuned copy that only this project's samplers use.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from pcm_policy.checkpoint import load_policy, read_card, resolve_checkpoint
from pcm_policy.errors import CheckpointError, ConfigError
from pcm_policy.policy import PolicyConfig

# Both tools build the UNet's final conv block with GroupNorm's default 8 groups.
SOURCE_FINAL_N_GROUPS = 8
# diffusers' DDPMScheduler defaults, written out so the other tool's config states the whole schedule.
SCHEDULER_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                      "prediction_type": "epsilon", "clip_sample": True, "clip_sample_range": 1.0,
                      "variance_type": "fixed_small"}


@dataclass(frozen=True)
class ExportSource:
    """A base policy ready to be written in another layout.

    Attributes:
        checkpoint: the checkpoint directory it was read from.
        config: its shape and training noise schedule.
        network: the UNet's weights under our names, float32 CPU tensors.
        normalizer: field ("obs", "action") -> stat ("scale", "offset", maybe "min"/"max"/"mean"/"std"),
            float32 CPU tensors (D,).
        card: its card.
        noise_scheduler: the full `DDPMScheduler` keyword arguments (diffusers' defaults filled in).
        encoder: an image policy's `VisionEncoder` (eval mode, float32), None for a low-dim policy.
    """

    checkpoint: Path
    config: PolicyConfig
    network: dict[str, torch.Tensor]
    normalizer: dict[str, dict[str, torch.Tensor]]
    card: dict[str, Any]
    noise_scheduler: dict[str, Any]
    encoder: Any = None

    @classmethod
    def read(cls, path: str | Path, fmt: str, images: bool = False) -> "ExportSource":
        """Read the base policy at `path` (checkpoint or run directory) for export to `fmt`.

        Raises:
            CheckpointError: no readable checkpoint, or a PCM checkpoint.
            ConfigError: a policy the format cannot hold (an image policy, its final block's GroupNorm groups, an
                unknown noise-schedule key).
        """
        ckpt = resolve_checkpoint(path)
        card = read_card(ckpt)
        if card.get("kind") != "base":
            raise CheckpointError(f"{ckpt}: kind={card.get('kind')!r}: only base policies export (a PCM runs only "
                                  "with this project's samplers; export its base)")
        vision = (card.get("policy") or {}).get("vision")
        if vision is not None and not images:
            raise ConfigError(f"{ckpt}: policy.vision: an image policy; the {fmt} export writes low-dim policies "
                              "only for now (`--format lerobot` writes ResNet-18 image policies)")
        if vision is not None and vision.get("kind") != "resnet18":
            raise ConfigError(f"{ckpt}: policy.vision.kind={vision.get('kind')!r}: {fmt} has ResNet-18 image "
                              "encoders only; this encoder cannot be written there")
        if vision is not None and vision.get("feature_activation", "relu") != "relu":
            raise ConfigError(f"{ckpt}: policy.vision.feature_activation={vision.get('feature_activation')!r}: "
                              f"{fmt}'s encoder ends in a ReLU; this encoder cannot be written there")
        if vision is not None and vision.get("feature_dim") != 2 * vision.get("num_keypoints", 0):
            raise ConfigError(f"{ckpt}: policy.vision.feature_dim={vision.get('feature_dim')}: {fmt}'s encoder "
                              f"projects to 2 x num_keypoints = {2 * vision.get('num_keypoints', 0)} features")
        policy, card = load_policy(ckpt)
        config = policy.config
        final_groups = config.final_n_groups or config.n_groups
        if final_groups != SOURCE_FINAL_N_GROUPS:
            raise ConfigError(f"{ckpt}: policy.final_n_groups={final_groups}: {fmt} builds the UNet's final block "
                              f"with GroupNorm {SOURCE_FINAL_N_GROUPS}; this policy cannot be written there")
        unknown = sorted(set(config.noise_scheduler) - set(SCHEDULER_DEFAULTS))
        if unknown:
            raise ConfigError(f"{ckpt}: policy.noise_scheduler.{unknown[0]} has no place in {fmt}'s config")
        weights = policy.weights()
        network = {k[len("model."):]: v.float() for k, v in weights.items() if k.startswith("model.")}
        normalizer: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in weights.items():
            if key.startswith("normalizer."):
                _, field, stat = key.split(".")
                normalizer.setdefault(field, {})[stat] = value.float()
        return cls(ckpt, config, network, normalizer, card, {**SCHEDULER_DEFAULTS, **config.noise_scheduler},
                   policy.encoder)

    def renamed(self, prefix: str, source_name: Callable[[str], str]) -> dict[str, torch.Tensor]:
        """The network weights under the other tool's names (`source_name(our name)`), with `prefix`."""
        return {prefix + source_name(k): v.contiguous() for k, v in self.network.items()}


def check_export_target(key: str, target: Path, source: Path, is_own_output: Callable[[Path], bool],
                        own_output: str) -> None:
    """An export may replace only pcm's own earlier export of the same kind, never its source or anyone's data.

    Args:
        key: the option naming the target, for messages.
        target: the file or directory to write.
        source: the checkpoint being exported.
        is_own_output: whether an existing `target` carries this tool's export mark (`export_marker`); it must
            not raise, and reads no more than it needs.
        own_output: what such an earlier export is, for messages.

    Raises:
        ConfigError: naming `key` and the path, and why; nothing is created or changed. There is no option to
            replace a file pcm did not write: the user moves or deletes it.
    """
    resolved = target.resolve()
    src = source.resolve()
    if resolved == src or src in resolved.parents or resolved in src.parents:
        raise ConfigError(f"{key}={target}: would overwrite the checkpoint being exported ({source})")
    if target.is_symlink() or (target.exists() and not is_own_output(target)):
        raise ConfigError(f"{key}={target}: exists and is not an earlier pcm export ({own_output}); refusing to "
                          "replace it: move it or choose another path")
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{key}={target}: {parent} is a file, not a directory")
