"""Process-level set-up shared by every command: device choice, seeding, thread count, deterministic kernels.

Determinism: on a CPU the same seed and config give identical training losses. On CUDA, cuDNN/cuBLAS kernels
that use atomics (and cuDNN autotuning) make results reproducible only to a tolerance, unless
`set_deterministic(True)` (`deterministic=true`, or PCM_DETERMINISTIC=1) is in force: it sets
CUBLAS_WORKSPACE_CONFIG=:4096:8, torch.use_deterministic_algorithms(True) and disables cuDNN benchmarking,
at some cost in speed. It must run before the first CUDA operation of the process (the CLI does it first).
"""
from __future__ import annotations

import os
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



def set_deterministic(enabled) -> bool:
    """Deterministic GPU kernels when `enabled` (a bool, or a string such as "1"/"true"); returns the flag in force.

    CPU results do not depend on it. An op without a deterministic CUDA implementation then raises a
    RuntimeError naming it instead of silently varying.
    """
    if isinstance(enabled, str):
        enabled = enabled.strip().lower() in ("1", "true", "yes", "on")
    if not enabled:
        return False
    # cuBLAS reads this when its handle is created (the first CUDA matmul): set before any CUDA work.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    return True
