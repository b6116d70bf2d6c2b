"""Inference backends of the denoisers: `torch`, `onnx` (onnxruntime on the CPU) and `auto` (per call, the faster).

Modules:
    registry         the backend names, the `backend=` check, the optional onnx/onnxruntime imports
    torch_denoisers  the torch backend: networks as denoisers, a PCM adapted to its switching sampler
    onnx_graph       a loaded network written as an ONNX graph in memory (the fast batch-1 form)
    onnx_session     an onnxruntime CPU session with its settings
    onnx_denoiser    a denoiser callable over a session, IO-bound into preallocated buffers per row count
    auto             per-row-count routing between torch and onnx, calibrated on this machine
    scaled           a LoRA PCM's scale-0 calls sent to the base network's denoiser
    denoisers        a sampler's denoisers on a backend (what `DiffusionPolicy.sampler(..., backend=)` binds)
    onnx_encoder     an image policy's encoder as an ONNX graph (torch's exporter)
    exported         `pcm export --format onnx`: graphs + policy.json, self-checked; `load_exported`

The samplers (`pcm_policy.sampling`) do not know about backends: they take denoiser callables.
"""
from pcm_policy.backends.registry import BACKENDS, check_backend

__all__ = ["BACKENDS", "check_backend"]
