"""The torch backend's denoisers: the networks themselves, and a PCM network adapted to its switching sampler."""
from __future__ import annotations

from typing import Callable

import torch

from pcm_policy.errors import ConfigError
from pcm_policy.model.lora import lora_modules, scaled_denoiser


def is_lora_network(net: torch.nn.Module) -> bool:
    """Whether `net` carries LoRA wrappers (a LoRA PCM) rather than being a full copy."""
    return bool(lora_modules(net))


def check_pcm_kind(net: torch.nn.Module, sampler_name: str) -> None:
    """Weight-space switching needs a LoRA PCM.

    Raises:
        ConfigError: `pcm_lora` with a full-copy PCM.
    """
    if sampler_name == "pcm_lora" and not is_lora_network(net):
        raise ConfigError("sampler=pcm_lora needs a LoRA PCM (mode=lora); this one is a full copy (use sampler=pcm)")


def pcm_network_denoiser(net: torch.nn.Module, sampler_name: str) -> Callable:
    """A PCM network as the denoiser its switching sampler expects (torch backend).

    Args:
        net: a PCM network (a full copy of the base, or the base with LoRA wrappers).
        sampler_name: `pcm` (output-space switching) or `pcm_lora` (weight-space switching).

    Returns:
        For `pcm`: `eps = denoiser(x, t, cond)` (a LoRA PCM at scale 1); for `pcm_lora`:
        `denoiser(x, t, cond, scale)` (`pcm_policy.model.lora.scaled_denoiser`).

    Raises:
        ConfigError: `pcm_lora` with a full-copy PCM.
    """
    check_pcm_kind(net, sampler_name)
    if sampler_name == "pcm_lora":
        return scaled_denoiser(net)
    if not is_lora_network(net):
        return net
    scaled = scaled_denoiser(net)
    return lambda x, t, cond: scaled(x, t, cond, 1.0)
