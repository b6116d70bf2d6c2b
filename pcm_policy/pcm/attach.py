"""Load a PCM checkpoint next to its base policy and expose it as the denoiser a sampler expects.

A PCM checkpoint records the fingerprint of the base weights it was trained from; attaching it to any other
base is refused, since switching would then hand over to a model the PCM never learned to approximate.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from pcm_policy import checkpoint as ckpt_io
from pcm_policy.checkpoint import Card
from pcm_policy.errors import CheckpointError, ConfigError
from pcm_policy.backends.torch_denoisers import pcm_network_denoiser
from pcm_policy.model.lora import add_lora, load_lora_state_dict
from pcm_policy.paths import resolve_path
from pcm_policy.sampler_config import SamplerConfig


def build_pcm_network(base_model: torch.nn.Module, mode: str, rank: int = 16, alpha: float | None = None):
    """A trainable PCM network initialised from the base: a full copy, or the frozen base plus a zero LoRA delta.

    Args:
        base_model: the base network (copied; the original is not modified).
        mode: "full" (every parameter trainable) or "lora" (`add_lora` on the copy).
        rank: LoRA rank (mode "lora").
        alpha: LoRA scale numerator (None = rank).

    Returns:
        The new network, on the base's device; it starts out computing exactly what the base computes.

    Raises:
        ConfigError: an unknown mode.
    """
    net = copy.deepcopy(base_model)
    if mode == "full":
        for p in net.parameters():
            p.requires_grad_(True)
        return net
    if mode == "lora":
        return add_lora(net, rank=rank, alpha=alpha)
    raise ConfigError(f"mode={mode!r}: expected lora or full")


def load_pcm(path: str | Path, policy, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a PCM checkpoint trained for `policy`'s base weights.

    Args:
        path: a PCM checkpoint directory, or a `pcm train-pcm` run directory (its latest checkpoint is used).
        policy: the base `DiffusionPolicy` (its weights' fingerprint must match the PCM's card).
        device: where the network goes.

    Returns:
        (network in eval mode, checkpoint card): a full copy or the base plus its LoRA delta; the card has
        `mode`, `scheduler`, `steps`, `start`, ...

    Raises:
        CheckpointError: no checkpoint at `path`, not a PCM checkpoint, a PCM for another base, or weights
            that do not fit the base network.
    """
    ckpt = ckpt_io.resolve_checkpoint(path)
    card = ckpt_io.read_card(ckpt)
    if card.get("kind") != "pcm":
        raise CheckpointError(f"{ckpt}: not a PCM checkpoint (kind={card.get('kind')!r})")
    fingerprint = ckpt_io.weights_fingerprint(*policy.trained_modules())
    if card.get("base_fingerprint") != fingerprint:
        raise CheckpointError(f"{ckpt}: PCM was trained for another base policy ({card.get('base')}); "
                              "train one for this checkpoint with `pcm train-pcm base=...`")
    net = build_pcm_network(policy.model, card["mode"], card.get("lora_rank", 16), card.get("lora_alpha"))
    weights = {k[len("model."):]: v.float() for k, v in ckpt_io.read_weights(ckpt / ckpt_io.POLICY_WEIGHTS).items()}
    try:
        if card["mode"] == "lora":
            load_lora_state_dict(net, weights)
        else:
            net.load_state_dict(weights, strict=True)
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{ckpt}: PCM weights do not fit the base network ({str(e).splitlines()[0][:160]})") from None
    return net.to(device).eval(), card


def pcm_denoiser(net: torch.nn.Module, sampler_name: str) -> Callable:
    """The PCM network as the torch denoiser a switching sampler expects
    (`pcm_policy.backends.torch_denoisers.pcm_network_denoiser`).

    Args:
        net: a PCM network from `load_pcm` or `build_pcm_network`.
        sampler_name: "pcm" (output-space switching) or "pcm_lora" (weight-space switching).

    Returns:
        For "pcm": `eps = denoiser(x, t, cond)` (a LoRA PCM at scale 1); for "pcm_lora":
        `denoiser(x, t, cond, scale)` (`scaled_denoiser`).

    Raises:
        ConfigError: "pcm_lora" with a full-copy PCM.
    """
    return pcm_network_denoiser(net, sampler_name)


def load_sampler(policy, sampler_cfg: Mapping[str, Any] | SamplerConfig, device=None, pcm_checkpoint: str | None = None,
                 backend: str = "torch"):
    """The policy's `ChunkSampler` for a `sampler=` config, its PCM loaded when the sampler needs one, its
    denoisers (the PCM's too) on `backend`.

    Args:
        policy: the base `DiffusionPolicy`.
        sampler_cfg: the `sampler=` config (mapping or `SamplerConfig`); a mapping may name `pcm_checkpoint`.
        device: where the PCM goes (None: the policy's device).
        pcm_checkpoint: overrides the config's `pcm_checkpoint` (a relative path is taken from the working
            directory, else from the repository root).
        backend: `torch`, `onnx` or `auto` (`DiffusionPolicy.sampler`).

    Returns:
        The cached `ChunkSampler` (see `DiffusionPolicy.sampler`).

    Raises:
        ConfigError: an invalid config or backend, a PCM sampler with no checkpoint named, a PCM trained from
            another start (`Card.check_pcm_start`), or a full PCM for `pcm_lora`.
        CheckpointError: the PCM checkpoint is missing, corrupt, not a PCM or does not fit the base.
    """
    sampler = SamplerConfig.from_mapping(sampler_cfg)
    if pcm_checkpoint is None and not isinstance(sampler_cfg, SamplerConfig):
        pcm_checkpoint = sampler_cfg.get("pcm_checkpoint")
    if not sampler.needs_pcm:
        return policy.sampler(sampler, backend=backend)
    Card.open_pcm(PCM_KEY, required_pcm(sampler, pcm_checkpoint)).check_pcm_start(sampler, "sampler.start")
    net, _ = load_pcm(resolve_path(pcm_checkpoint), policy, device or policy.device)
    return policy.sampler(sampler, pcm=net, backend=backend)


PCM_KEY = "sampler.pcm_checkpoint"


def required_pcm(sampler: SamplerConfig, pcm_checkpoint: str | None, key: str = PCM_KEY) -> str:
    """The PCM checkpoint a switching sampler needs.

    Raises:
        ConfigError: none given (the message names `key` and the schedule to train one for).
    """
    if not pcm_checkpoint:
        raise ConfigError(f"{key}: sampler={sampler.name} needs a PCM checkpoint trained for {sampler.schedule} "
                          "(train one with `pcm train-pcm base=<checkpoint>`)")
    return pcm_checkpoint


def check_sampler(group: Mapping[str, Any], key: str, num_train_timesteps: int | None, source=None,
                  pcm_key: str | None = None, pcm_path: str | None = None, check_pcm: bool = True) -> SamplerConfig:
    """A `sampler=` group checked against the policy it will run on, and its PCM against the sampler (no weights
    are read).

    Args:
        group: the sampler group.
        key: its config key (e.g. `sampler`).
        num_train_timesteps: the policy's T (None: unknown, not checked).
        source: the policy's checkpoint, for messages.
        pcm_key: the option naming the PCM, with `pcm_path` its value (default: the group's own
            `<key>.pcm_checkpoint`).
        pcm_path: the PCM checkpoint `pcm_key` names.
        check_pcm: check the PCM of a switching sampler.

    Returns:
        The sampler config.

    Raises:
        ConfigError: a bad sampler key, more steps than T, a switching sampler without a PCM, or a PCM trained
            for another schedule or start, or a full PCM for weight-space switching.
        CheckpointError: the PCM checkpoint is unreadable or not a PCM.
    """
    sampler = SamplerConfig.from_mapping(group, key)
    if num_train_timesteps is not None:
        sampler.check_steps(num_train_timesteps, key, source)
    if sampler.needs_pcm and check_pcm:
        if pcm_key is None:
            pcm_key, pcm_path = f"{key}.pcm_checkpoint", group.get("pcm_checkpoint")
        Card.open_pcm(pcm_key, required_pcm(sampler, pcm_path, pcm_key)).check_pcm_for(sampler, f"{key}.start")
    return sampler
