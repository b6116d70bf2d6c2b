"""A sampler's denoisers on a backend: what `DiffusionPolicy.sampler(config, pcm, backend)` binds its ChunkSampler to.

The onnx graphs hold a copy of the weights taken when they are built (in memory, `onnx_graph`); their sessions and
`auto`'s routers are built once per policy and shared by all its samplers (`BackendCache`), keyed by the network,
the PCM's role and the thread count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from pcm_policy.backends.auto import BackendRouter, Calibration, rows_per_call
from pcm_policy.backends.onnx_denoiser import OnnxDenoiser
from pcm_policy.backends.onnx_graph import denoiser_graph
from pcm_policy.backends.registry import check_backend
from pcm_policy.backends.scaled import BaseAtScaleZero
from pcm_policy.backends.torch_denoisers import check_pcm_kind, pcm_network_denoiser
from pcm_policy.errors import ConfigError
from pcm_policy.sampler_config import SamplerConfig


@dataclass(frozen=True)
class NetworkShape:
    """What the backends need to know of a policy's network.

    Attributes:
        sample_shape: (H, Da) of one chunk.
        cond_dim: C, the global condition's size.
        num_train_timesteps: T (the timesteps a call may take are 0..T-1).
    """

    sample_shape: tuple[int, int]
    cond_dim: int
    num_train_timesteps: int

    def example(self, rows: int, extra: tuple = ()) -> tuple:
        """Random arguments of a call with `rows` rows (calibration and self-checks): x, t, cond, *extra."""
        generator = torch.Generator().manual_seed(rows)
        return (torch.randn(rows, *self.sample_shape, generator=generator),
                torch.randint(0, self.num_train_timesteps, (rows,), generator=generator),
                torch.randn(rows, self.cond_dim, generator=generator), *extra)


class BackendCache:
    """A policy's onnx denoisers and `auto` routers, built once and shared by its samplers."""

    def __init__(self):
        self._entries: dict[tuple, tuple[Any, Any]] = {}

    def get(self, key: tuple, owner: Any, build: Callable[[], Any]) -> Any:
        """The entry for `key`, built by `build()` the first time; `owner` (the network it was built from) must be
        the same object, or it is rebuilt (an id can be reused by a new network)."""
        entry = self._entries.get(key)
        if entry is None or entry[0] is not owner:
            entry = self._entries[key] = (owner, build())
        return entry[1]


@dataclass
class Denoisers:
    """A sampler's denoisers on one backend.

    Attributes:
        base: `eps = base(x, t, cond)`.
        pcm: the PCM denoiser of a switching sampler (`pcm_lora`: `pcm(x, t, cond, scale)`), else None.
        backend: the backend's name.
        calibration: `auto`'s measurements (None for torch and onnx).
    """

    base: Callable
    pcm: Callable | None
    backend: str
    calibration: Calibration | None = None


def _onnx_denoisers(model: nn.Module, pcm: nn.Module | None, name: str, shape: NetworkShape, cache: BackendCache,
                    threads: int) -> tuple[Callable, Callable | None]:
    """The onnx base denoiser and, for a switching sampler, its PCM denoiser (cached)."""
    H, T = shape.sample_shape[0], shape.num_train_timesteps

    def session(net, scale):
        return OnnxDenoiser(denoiser_graph(net, H, T, scale=scale), shape.sample_shape, shape.cond_dim, threads,
                            scale_input=scale is None)

    base = cache.get(("onnx", "base", id(model), threads), model, lambda: session(model, 0.0))
    if pcm is None:
        return base, None
    if name == "pcm_lora":
        scaled = cache.get(("onnx", "pcm_lora", id(pcm), threads), pcm, lambda: session(pcm, None))
        return base, BaseAtScaleZero(scaled, base)
    return base, cache.get(("onnx", "pcm", id(pcm), threads), pcm, lambda: session(pcm, 1.0))


def _auto_denoisers(torch_base: Callable, model: nn.Module, pcm: nn.Module | None, config: SamplerConfig,
                    shape: NetworkShape, cache: BackendCache, threads: int, fixed_shape: bool
                    ) -> tuple[Callable, Callable | None, Calibration]:
    """Routers between the torch and onnx denoisers, calibrated for the sampler's row counts at batch 1."""
    onnx_base, onnx_pcm = _onnx_denoisers(model, pcm, config.name, shape, cache, threads)
    rows = rows_per_call(config, fixed_shape)
    base = cache.get(("auto", "base", id(model), threads), model,
                     lambda: BackendRouter(torch_base, onnx_base, shape.example))
    base.calibrate(rows)
    routers = {"base": base}
    if pcm is None:
        return base, None, Calibration(routers, threads)
    torch_pcm = pcm_network_denoiser(pcm, config.name)
    if config.name == "pcm_lora":
        scaled = cache.get(("auto", "pcm_lora", id(pcm), threads), pcm,
                           lambda: BackendRouter(torch_pcm, onnx_pcm.scaled, lambda r: shape.example(r, (1.0,))))
        scaled.calibrate(rows)
        routers["pcm"] = scaled
        return base, BaseAtScaleZero(scaled, base), Calibration(routers, threads)
    router = cache.get(("auto", "pcm", id(pcm), threads), pcm, lambda: BackendRouter(torch_pcm, onnx_pcm, shape.example))
    router.calibrate(rows)
    routers["pcm"] = router
    return base, router, Calibration(routers, threads)


def build_denoisers(torch_base: Callable, model: nn.Module, pcm: Callable | nn.Module | None, config: SamplerConfig,
                    backend: str, shape: NetworkShape, device: torch.device, cache: BackendCache,
                    fixed_shape: bool | None = None) -> Denoisers:
    """A sampler's denoisers on `backend`.

    Args:
        torch_base: the base network as a torch denoiser (`DiffusionPolicy.denoiser`).
        model: the base network (`ConditionalUnet1D`), written as a graph for onnx/auto.
        pcm: for a switching sampler, the PCM network (any backend), or a torch denoiser callable (the torch
            backend only); ignored by the other samplers.
        config: the sampler config.
        backend: one of `registry.BACKENDS`.
        shape: the network's sample shape, condition size and T.
        device: the policy's device (`auto` on CUDA is torch).
        cache: the policy's `BackendCache`.
        fixed_shape: the sampler pads its Picard windows (None: the config's setting, else on CUDA only).

    Returns:
        The `Denoisers`; onnx sessions use torch's current intra-op thread count.

    Raises:
        ConfigError: an unknown backend, onnx on CUDA, onnxruntime/onnx missing (`check_backend`), a PCM given as
            a plain callable to onnx/auto, or a full PCM for `pcm_lora`.
    """
    backend = check_backend(backend, device)
    pcm = pcm if config.needs_pcm else None
    is_network = isinstance(pcm, nn.Module)
    if pcm is not None and is_network:
        check_pcm_kind(pcm, config.name)
    if backend == "torch" or (backend == "auto" and torch.device(device).type == "cuda"):
        torch_pcm = pcm_network_denoiser(pcm, config.name) if is_network else pcm
        calibration = (Calibration(note="device cuda: the torch backend (CUDA graphs); onnxruntime here is the CPU "
                                        "wheel") if backend == "auto" else None)
        return Denoisers(torch_base, torch_pcm, backend, calibration)
    if pcm is not None and not is_network:
        raise ConfigError(f"backend={backend}: the PCM must be given as its network (e.g. from "
                          "pcm_policy.pcm.attach.load_pcm), not as a torch denoiser callable")
    threads = torch.get_num_threads()
    if backend == "onnx":
        return Denoisers(*_onnx_denoisers(model, pcm, config.name, shape, cache, threads), backend)
    if fixed_shape is None:
        fixed_shape = bool(config.fixed_shape)
    base, pcm_fn, calibration = _auto_denoisers(torch_base, model, pcm, config, shape, cache, threads, fixed_shape)
    return Denoisers(base, pcm_fn, backend, calibration)
