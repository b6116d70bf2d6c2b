"""One onnxruntime CPU session for a serialized graph, with the settings measured to pay here.

`graph_optimization_level=ORT_ENABLE_ALL` is what moves the UNet's 2-D convolutions into onnxruntime's blocked
NCHWc layout (see `onnx_graph`); the thread count is explicit (intra-op `threads`, one inter-op thread: the graph
is a chain). Other settings were measured and left at their defaults: memory patterns, the CPU arena, spinning
and flushing denormals changed batch-1 latency by less than the machine's noise.
"""
from __future__ import annotations

from typing import Any

import torch

from pcm_policy.backends.registry import import_onnxruntime


def make_session(model: bytes, threads: int | None = None) -> Any:
    """An `onnxruntime.InferenceSession` on the CPU execution provider.

    Args:
        model: the serialized ONNX model.
        threads: intra-op threads (None: torch's current count, i.e. the command's `threads=`).

    Returns:
        The session.

    Raises:
        ConfigError: onnxruntime does not import (one line naming the pip command).
    """
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: no per-session warnings on stderr
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
