"""What every importer produces (`ImportedPolicy`) and the pieces they share: UNet weight renaming with key and
shape checks, per-dimension affine normalizer fields, and writing the pcm-policy checkpoint.

Both source formats hold the same network as `pcm_policy.model.unet.ConditionalUnet1D` under other parameter
names; an importer describes its names with a function `source_name(our_name) -> their_name`, and
`convert_unet_weights` checks the source against the UNet the config implies: every expected key present, no
other key under the network's prefix, every shape equal.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from diffusers import DDPMScheduler

from pcm_policy.checkpoint import save_checkpoint
from pcm_policy.data.normalizer import Normalizer
from pcm_policy.errors import CheckpointError, ConfigError
from pcm_policy.policy import DiffusionPolicy, PolicyConfig


@dataclass
class ImportedPolicy:
    """A policy read from another tool's checkpoint, ready to be written as a pcm-policy checkpoint.

    Attributes:
        config: the network shape and training noise schedule.
        normalizer: fields "obs" (the flat per-step observation, Do dims) and "action" (Da dims), one affine map
            per dim, env units <-> the network's normalized units.
        weights: the network's state dict under `ConditionalUnet1D`'s names, float32 CPU tensors.
        card: the checkpoint card (`policy.yaml`) without its `policy` section (added on writing).
        encoder_weights: an image policy's encoder state dict under `VisionEncoder`'s names (None: low-dim).
    """

    config: PolicyConfig
    normalizer: Normalizer
    weights: dict[str, torch.Tensor]
    card: dict[str, Any]
    encoder_weights: dict[str, torch.Tensor] | None = None

    def build_policy(self):
        """The `DiffusionPolicy` these parts make, in eval mode on the CPU.

        Raises:
            PcmError: the weights do not fit the config (the importers check this first).
            ConfigError: sample clipping the normalized action range does not cover (see `DiffusionPolicy`).
        """
        policy = DiffusionPolicy(self.config, self.normalizer)
        state = {f"model.{k}": v for k, v in self.weights.items()}
        state.update({f"encoder.{k}": v for k, v in (self.encoder_weights or {}).items()})
        state.update(self.normalizer.state_dict())
        policy.load_weights(state, source=str(self.card.get("source", {}).get("path", "imported weights")))
        return policy.eval()


def write_imported_checkpoint(imported: ImportedPolicy, output_dir: str | Path,
                              run_config: Mapping[str, Any] | None = None) -> Path:
    """Write `imported` as an ordinary pcm-policy checkpoint directory (atomically: all of it or nothing).

    The policy is built (and so checked) before anything is written.

    Args:
        imported: what an importer returned.
        output_dir: the checkpoint directory to write; an existing one is replaced.
        run_config: a run config to save beside it (`config.yaml`: the dataset its observations come from, for
            the commands that draw observation histories from a checkpoint's dataset); None writes none.

    Returns:
        `output_dir` as a Path.

    Raises:
        PcmError / ConfigError: the parts do not make a policy (nothing is written).
        OSError: the directory cannot be written (nothing is left behind).
    """
    policy = imported.build_policy()
    card = dict(imported.card)
    card["policy"] = imported.config.to_dict()
    return save_checkpoint(output_dir, card, policy.weights(), config=run_config)


def unet_state_shapes(config: PolicyConfig) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the `ConditionalUnet1D` that `config` describes (built on the meta device, so
    no memory is spent on weights)."""
    with torch.device("meta"):
        net = config.build_network()
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def convert_unet_weights(state: Mapping[str, torch.Tensor], prefix: str, source_name: Callable[[str], str],
                         config: PolicyConfig, file: str | Path, config_keys: str) -> dict[str, torch.Tensor]:
    """The network weights of a source state dict under our names, checked against `config`.

    Args:
        state: the source's state dict (other entries, e.g. normalizer buffers, may sit beside the network's).
        prefix: the network's prefix in `state` (e.g. "model." or "diffusion.unet."); every key under it
            must be one the network needs.
        source_name: our parameter name -> the source's name (without the prefix).
        config: the network shape the source's config describes.
        file: the weights file, for error messages.
        config_keys: the source's config keys that set the shapes, for error messages.

    Returns:
        {our name: float32 CPU tensor}.

    Raises:
        CheckpointError: a key the network does not have, a missing key, or a shape that disagrees with the
            config (one line naming the file and the source's key).
    """
    expected = {source_name(k): (k, shape) for k, shape in unet_state_shapes(config).items()}
    ours = {}
    for key in sorted(state):
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name not in expected:
            raise CheckpointError(f"{file}: unexpected key {key!r} (not a parameter of the network its config "
                                  "describes)")
        our_name, shape = expected[name]
        value = state[key]
        if tuple(value.shape) != shape:
            raise CheckpointError(f"{file}: {key!r} has shape {tuple(value.shape)} but the config "
                                  f"({config_keys}) implies {shape}")
        if not value.is_floating_point():
            raise CheckpointError(f"{file}: {key!r} has dtype {value.dtype}, expected a float tensor")
        ours[our_name] = value.detach().to("cpu", torch.float32).clone()
    missing = sorted(prefix + src for src, (k, _) in expected.items() if k not in ours)
    if missing:
        raise CheckpointError(f"{file}: missing key {missing[0]!r}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return ours


def permute_condition(weights: Mapping[str, torch.Tensor], order: list[int], obs_dim: int, step_cond_dim: int,
                      n_obs_steps: int) -> dict[str, torch.Tensor]:
    """UNet weights for an observation whose per-step dims come in another order.

    Every FiLM layer's condition encoder (`*cond_encoder.1.weight`, input [diffusion step embedding, the global
    condition], the condition being To blocks of `step_cond_dim`, each starting with the Do observation dims)
    gets its observation columns reordered: new column j of each block = old column order[j]. A network given
    `obs[..., order]` then computes exactly what the original computes on `obs` (a permutation, no rounding).

    Args:
        weights: state dict (any names; only `*cond_encoder.1.weight` entries change).
        order: a permutation of range(obs_dim).
        obs_dim, step_cond_dim, n_obs_steps: Do, the per-step condition size (Do plus image features), To.

    Returns:
        A new dict (the unchanged entries shared).
    """
    if list(order) == list(range(obs_dim)):
        return dict(weights)
    index = torch.as_tensor(order, dtype=torch.long)
    out = dict(weights)
    for key, w in weights.items():
        if not key.endswith("cond_encoder.1.weight"):
            continue
        w = w.clone()
        start = w.shape[1] - n_obs_steps * step_cond_dim  # after the diffusion step embedding
        for step in range(n_obs_steps):
            block = start + step * step_cond_dim
            w[:, block:block + obs_dim] = weights[key][:, block + index]
        out[key] = w
    return out


def affine_field(scale, offset, **stats) -> dict[str, torch.Tensor]:
    """One normalizer field: y = x * scale + offset per dim, plus optional raw statistics (min/max/mean/std).

    Args:
        scale, offset: array-likes (D,), computed in float64 by the caller for accuracy.
        stats: any of min, max, mean, std, (D,) in env units.

    Returns:
        {"scale", "offset", ...}: float32 CPU tensors (D,).
    """
    field = {"scale": scale, "offset": offset, **{k: v for k, v in stats.items() if v is not None}}
    return {k: torch.as_tensor(np.asarray(v, dtype=np.float64), dtype=torch.float32).reshape(-1)
            for k, v in field.items()}


def normalizer_from_fields(obs: Mapping[str, torch.Tensor], action: Mapping[str, torch.Tensor]) -> Normalizer:
    """A `Normalizer` with the fields "obs" and "action" (each from `affine_field`)."""
    state = {f"normalizer.{name}.{k}": v for name, field in (("obs", obs), ("action", action)) for k, v in field.items()}
    return Normalizer.from_state_dict(state)


def concat_fields(fields: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-feature affine fields joined along the dim axis in the given order (a statistic is kept only when every
    feature has it)."""
    keys = set.intersection(*(set(f) for f in fields))
    return {k: torch.cat([f[k] for f in fields]) for k in ("scale", "offset", "min", "max", "mean", "std") if k in keys}


def to_numpy64(value, file: str | Path, key: str, size: int) -> np.ndarray:
    """A statistic as a float64 vector of `size` entries.

    Raises:
        CheckpointError: another number of entries, or a non-finite value (naming the file and key).
    """
    arr = np.asarray(torch.as_tensor(value).detach().cpu().double().numpy()).reshape(-1)
    if arr.shape[0] != size:
        raise CheckpointError(f"{file}: {key!r} has {arr.shape[0]} entries, the feature has {size}")
    if not np.all(np.isfinite(arr)):
        raise CheckpointError(f"{file}: {key!r} holds NaN/inf (statistics never set?)")
    return arr


def check_noise_schedule(kwargs: Mapping[str, Any], file: str | Path, key: str) -> None:
    """Refuse a training noise schedule diffusers cannot build (e.g. an unknown beta schedule).

    Args:
        kwargs: the `DDPMScheduler` keyword arguments the importer derived.
        file: the source config file, for the message.
        key: the source config key to name.

    Raises:
        ConfigError: diffusers refuses the schedule.
    """
    try:
        DDPMScheduler(**kwargs)
    except Exception as e:  # diffusers raises NotImplementedError/ValueError/TypeError
        raise ConfigError(f"{file}: {key}: diffusers cannot build this noise schedule "
                          f"({str(e).splitlines()[0][:100] if str(e) else type(e).__name__})") from None
