"""CUDA-graph replay of a denoiser for the fixed-shape Picard windows.

At batch 1 a GPU denoiser is launch-bound: a window of 16-100 rows costs about one forward, and most of that is
kernel-launch overhead. With `fixed_shape=True` every Picard iteration calls the network with the same input
shapes, so the forward can be captured once per shape and replayed. `GraphedDenoiser` keeps one graph per
(input shapes, dtype, extra arguments) key, with static input buffers that each call copies into.

With `capture=False` (the default without CUDA) it runs exactly the same buffer logic eagerly: that is how the
wrapper's correctness is tested on a CPU.
"""
from __future__ import annotations

from typing import Any, Callable

import torch


class GraphedDenoiser:
    """A denoiser wrapper that captures one CUDA graph per input signature and replays it.

    Called like the denoiser it wraps: `eps = graphed(x, t, cond, *extra)`, x (N, H, Da) float, t (N,) long,
    cond (N, C) or None; the output (N, H, Da) is a fresh tensor (when replaying, a clone of the graph's static
    output).
    A new (x shape, x dtype, x device, cond shape, extra) key captures a new graph (after `warmup` eager
    calls on a side stream); every call copies its inputs into that graph's static buffers first. Extra
    positional arguments (the LoRA scale of weight-space switching) are baked into the graph, so each
    distinct value gets its own. No gradients flow (`torch.no_grad`).

    Args:
        denoiser: the callable to wrap; to be captured it must be CUDA-graph safe (no host synchronisation).
        capture: capture graphs (only for CUDA inputs); None = when CUDA is available. With False, or CPU
            inputs, the same buffer logic runs eagerly.
        warmup: eager calls before a capture (allocator and cuDNN algorithm choices settle outside it).

    Attributes:
        denoiser, capture, warmup: the arguments.
    """

    def __init__(self, denoiser: Callable, capture: bool | None = None, warmup: int = 3):
        self.denoiser = denoiser
        self.capture = torch.cuda.is_available() if capture is None else capture
        self.warmup = warmup
        self._entries: dict[tuple, dict[str, Any]] = {}

    def _key(self, x, t, cond, extra) -> tuple:
        return (tuple(x.shape), x.dtype, x.device, None if cond is None else tuple(cond.shape), extra)

    def _build(self, x, t, cond, extra) -> dict[str, Any]:
        entry = {"x": x.clone(), "t": t.clone(), "cond": None if cond is None else cond.clone(), "graph": None}
        call = lambda: self.denoiser(entry["x"], entry["t"], entry["cond"], *extra)  # noqa: E731
        if self.capture and x.is_cuda:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.no_grad():
                for _ in range(self.warmup):  # warm up allocator and cuDNN choices outside the capture
                    call()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.no_grad():
                entry["out"] = call()
            entry["graph"] = graph
        return entry

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, *extra) -> torch.Tensor:
        # Extra positional arguments (the LoRA scale of weight-space switching) are baked into a graph: each
        # distinct value gets its own (lambda(k) takes only a few values).
        key = self._key(x, t, cond, tuple(extra))
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = self._build(x, t, cond, tuple(extra))
        entry["x"].copy_(x)
        entry["t"].copy_(t)
        if cond is not None:
            entry["cond"].copy_(cond)
        if entry["graph"] is not None:
            entry["graph"].replay()
            return entry["out"].clone()  # the next replay overwrites the static output
        return self.denoiser(entry["x"], entry["t"], entry["cond"], *extra)

    @property
    def graphs(self) -> int:
        """How many CUDA graphs have been captured (0 when running eagerly)."""
        return sum(e["graph"] is not None for e in self._entries.values())
