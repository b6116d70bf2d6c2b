"""Process-level set-up shared by every command: device choice, seeding, thread count."""
from __future__ import annotations

import random

import numpy as np
import torch

from pcm_policy.errors import ConfigError


def resolve_device(name: str | None) -> torch.device:
    """`auto` -> cuda when present else cpu; an explicit device that is not present is a config error."""
    name = (name or "auto").strip()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r}: not a valid torch device (use cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r}: CUDA is not available on this machine (use device=cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={name!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise ConfigError(f"device={name!r}: unsupported device type (use cpu, cuda, cuda:N or auto)")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count (None/0 = leave torch's default); returns the count in force."""
    if threads:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()

