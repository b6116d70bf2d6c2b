"""Which inference backends exist, the `backend=` option's check, and the optional runtimes they import.

* `torch`: the network as it is (eager PyTorch; on CUDA the samplers' CUDA-graph path).
* `onnx`: the network written as an ONNX graph (`onnx_graph`) and run by onnxruntime's CPU execution provider
  (`onnx_denoiser`). onnxruntime here is the CPU wheel: on a GPU the torch backend (CUDA graphs) is the fast one.
* `auto`: both, and each call goes to the one measured faster for its number of rows on this machine (`auto`);
  on CUDA it is `torch`.

onnx and onnxruntime are imported only when a graph is written or run, so the torch paths (and the GPU machine,
which has neither) never load them.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import torch

from pcm_policy.errors import ConfigError
from pcm_policy.options import show

BACKENDS = ("torch", "onnx", "auto")
ONNXRUNTIME_PIN = "onnxruntime==1.31.1"
ONNX_PIN = "onnx==1.23.2"


def _import(name: str, pin: str, key: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{key}: {name} does not import here ({reason}); install it: pip install {pin}") from None


def import_onnxruntime(key: str = "backend=onnx") -> ModuleType:
    """The onnxruntime module.

    Raises:
        ConfigError: it does not import; one line naming `key` and the fix (`pip install onnxruntime==1.31.1`).
    """
    return _import("onnxruntime", ONNXRUNTIME_PIN, key)


def import_onnx(key: str = "backend=onnx") -> ModuleType:
    """The onnx module (graph writing).

    Raises:
        ConfigError: it does not import; one line naming `key` and the fix (`pip install onnx==1.23.2`).
    """
    return _import("onnx", ONNX_PIN, key)


def check_backend(value: Any, device: torch.device | str | None = None, key: str = "backend") -> str:
    """A `backend=` value checked before any work: its name, its runtime importable, its device supported.

    Args:
        value: the option's value.
        device: the device the policy runs on (None: not checked).
        key: the option's name, for messages.

    Returns:
        The backend name (one of `BACKENDS`).

    Raises:
        ConfigError: one line: not one of `BACKENDS`; `onnx`/`auto` where onnxruntime or onnx does not import (naming
            the pip command); `onnx` on a CUDA device (the GPU path is torch with CUDA graphs).
    """
    if not isinstance(value, str) or value not in BACKENDS:
        raise ConfigError(f"{key}={show(value)}: expected one of {', '.join(BACKENDS)}")
    on_cuda = device is not None and torch.device(device).type == "cuda"
    if value == "onnx" and on_cuda:
        raise ConfigError(f"{key}=onnx: runs on the CPU only (onnxruntime here is the CPU wheel); on device=cuda use "
                          f"{key}=torch (CUDA graphs) or {key}=auto")
    if value != "torch" and not on_cuda:
        import_onnxruntime(f"{key}={value}")
        import_onnx(f"{key}={value}")
    return value
