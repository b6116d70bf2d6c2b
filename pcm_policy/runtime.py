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
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from pcm_policy.errors import ConfigError
from pcm_policy.options import check_flag, check_int, show


def resolve_device(name: str | None) -> torch.device:
    """The torch device a `device=` option names.

    Args:
        name: `auto` (or None/empty: cuda when present, else cpu), `cpu`, `cuda` or `cuda:N`.

    Returns:
        The `torch.device`.

    Raises:
        ConfigError: not a valid torch device, a device type other than cpu/cuda, CUDA requested but absent,
            or `cuda:N` with N >= the number of CUDA devices.
    """
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
    """Seed Python's `random`, NumPy's global RNG (with `seed % 2**32`) and torch's RNGs (CPU and every CUDA device).

    Args:
        seed: any int.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count.

    Args:
        threads: the count; None or 0 leaves torch's default.

    Returns:
        The count in force afterwards.
    """
    if threads:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def set_deterministic(enabled) -> bool:
    """Switch on deterministic GPU kernels (see the module docstring); a false flag changes nothing.

    CPU results do not depend on it. Once on, an op without a deterministic CUDA implementation raises a
    RuntimeError naming it instead of silently varying.

    Args:
        enabled: a bool or None, or a string: "1"/"true"/"yes"/"on" (any case) mean on, any other string off.

    Returns:
        Whether this call switched determinism on (False leaves an earlier call's setting in force).
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


@dataclass(frozen=True)
class RuntimeOptions:
    """The process keys every training and sampling command shares: `seed`, `device`, `threads`, `deterministic`.

    Attributes:
        seed: the run's seed (None for commands without one).
        device: the resolved torch device.
        threads: torch intra-op threads (None: torch's default).
        deterministic: deterministic CUDA kernels (see the module docstring); also on with PCM_DETERMINISTIC=1.
    """

    seed: int | None
    device: torch.device
    threads: int | None
    deterministic: bool

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> "RuntimeOptions":
        """Read and check the runtime keys present in a command's config (absent ones: None / auto / false).

        Raises:
            ConfigError: a negative seed, threads < 1, a non-boolean `deterministic`, or a device that is not
                cpu/cuda/cuda:N/auto or is not present (naming the key).
        """
        seed = check_int("seed", cfg["seed"], 0) if "seed" in cfg else None
        threads = check_int("threads", cfg.get("threads"), 1, null=True)
        deterministic = check_flag("deterministic", cfg["deterministic"]) if "deterministic" in cfg else False
        device = cfg.get("device")
        if device is not None and not isinstance(device, str):
            raise ConfigError(f"device={show(device)}: expected auto, cpu, cuda or cuda:N")
        return cls(seed, resolve_device(device), threads, deterministic)

    def apply(self) -> None:
        """Set up the process: deterministic kernels (before any CUDA work), then the thread count."""
        set_deterministic(self.deterministic or os.environ.get("PCM_DETERMINISTIC"))
        set_threads(self.threads)

