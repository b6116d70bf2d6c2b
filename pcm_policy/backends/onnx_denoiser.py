"""A denoiser callable over one onnxruntime session: `eps = denoiser(x, t, cond)` (or `(x, t, cond, scale)`).

The session is built once (per ChunkSampler, or shared by a policy's samplers). Each number of rows gets its own
IO binding into preallocated CPU tensors: a call copies x, t and cond into them (any strides, dtype cast), runs
the session with the binding (no numpy conversion, no output allocation by onnxruntime) and returns a copy of
the bound output - the next call overwrites the buffer, and samplers may keep an output across calls.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pcm_policy.backends.onnx_graph import INPUTS, OUTPUT, SCALE_INPUT
from pcm_policy.backends.onnx_session import make_session
from pcm_policy.errors import PcmError


@dataclass
class _Binding:
    """The preallocated tensors of one row count and the IO binding that points the session at them."""

    io: object
    x: torch.Tensor
    t: torch.Tensor
    cond: torch.Tensor
    scale: torch.Tensor | None
    out: torch.Tensor


class OnnxDenoiser:
    """`eps = denoiser(x, t, cond)` over an ONNX denoiser graph (`onnx_graph.denoiser_graph`).

    Args:
        model: the serialized graph: inputs `sample` (N, H, Da) float32, `timestep` (N,) int64, `global_cond` (N, C)
            float32 and, with `scale_input`, `scale` (1,) float32; output `model_output` (N, H, Da).
        sample_shape: (H, Da).
        cond_dim: C.
        threads: intra-op threads (None: torch's current count).
        scale_input: the graph takes the LoRA `scale`; then the call is `denoiser(x, t, cond, scale)`.

    Attributes:
        session: the onnxruntime session.

    Raises:
        ConfigError: onnxruntime does not import.
    """

    def __init__(self, model: bytes, sample_shape: tuple[int, int], cond_dim: int, threads: int | None = None,
                 scale_input: bool = False):
        self.session = make_session(model, threads)
        self.sample_shape = tuple(sample_shape)
        self.cond_dim = int(cond_dim)
        self.scale_input = scale_input
        self._bindings: dict[int, _Binding] = {}

    def _bind(self, rows: int) -> _Binding:
        H, Da = self.sample_shape
        tensors = dict(x=torch.empty(rows, H, Da), t=torch.empty(rows, dtype=torch.long),
                       cond=torch.empty(rows, self.cond_dim),
                       scale=torch.empty(1) if self.scale_input else None, out=torch.empty(rows, H, Da))
        io = self.session.io_binding()
        names = dict(zip(INPUTS, ("x", "t", "cond")), **({SCALE_INPUT: "scale"} if self.scale_input else {}))
        for name, key in names.items():
            tensor = tensors[key]
            io.bind_input(name, "cpu", 0, tensor.numpy().dtype, tuple(tensor.shape), tensor.data_ptr())
        out = tensors["out"]
        io.bind_output(OUTPUT, "cpu", 0, out.numpy().dtype, tuple(out.shape), out.data_ptr())
        return _Binding(io=io, **tensors)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, *scale) -> torch.Tensor:
        """Predict the network output for x (N, H, Da) at timesteps t (N,) long (or a scalar) in [0, T), cond (N, C).

        Args:
            x, t, cond: as the sampler passes them (CPU tensors, any strides and float dtype).
            *scale: the LoRA scale (one float) for a `scale_input` graph; nothing otherwise.

        Returns:
            (N, H, Da) in x's dtype, a fresh tensor.

        Raises:
            PcmError: no condition (the graph needs `global_cond`), or a scale given or missing against the graph.
        """
        if cond is None:
            raise PcmError("the onnx denoiser needs the global condition (cond=None given)")
        if len(scale) != int(self.scale_input):
            raise PcmError(f"the onnx denoiser takes {'a' if self.scale_input else 'no'} LoRA scale argument")
        rows = x.shape[0]
        b = self._bindings.get(rows)
        if b is None:
            b = self._bindings[rows] = self._bind(rows)
        b.x.copy_(x)
        b.t.copy_(t)
        b.cond.copy_(cond)
        if scale:
            b.scale.fill_(float(scale[0]))
        self.session.run_with_iobinding(b.io)
        return b.out.clone() if x.dtype == torch.float32 else b.out.to(x.dtype)
