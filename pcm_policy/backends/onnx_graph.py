"""The action head as an ONNX graph, written node by node from a loaded network's weights (in memory, no files).

Why not torch's exporter: its graph of the UNet has ~610 nodes (Shape/Gather/Concat chains for the dynamic batch,
the sinusoidal embedding and its MLP, one FiLM Linear per block) and at batch 1 onnxruntime spends most of its
time walking them. This graph computes the same function with 233 nodes (the shipped PushT UNet):

* the timestep path is a lookup table over the training timesteps: `Mish(embed_mlp(t))` times the timestep
  columns of every block's FiLM Linear (plus its bias), computed once in torch for t = 0..T-1, and gathered by
  `timestep`; the global condition's columns of all FiLM Linears are ONE MatMul on `Mish(global_cond)`
  (`Linear(Mish(cat(a, b))) = W_a Mish(a) + W_b Mish(b) + bias`);
* every reshape has a constant target (`[0, G, -1]`: batch copied, only N is dynamic): no Shape nodes;
* GroupNorm is Reshape -> InstanceNormalization -> Reshape -> Mul -> Add, Mish one `Mish` node (opset 18);
* the temporal convolutions are written as 2-D ones over (N, C, 1, L) with (1, k) kernels: onnxruntime's CPU
  optimizer then runs them in its blocked NCHWc layout (MLAS's AVX2/AVX-512 direct convolutions), which it does
  for 2-D convolutions only - 1.4x faster at batch 1 and 1.9x at 100 rows than the same graph in 1-D
  (docs/latency-benchmark.md#backends).

The math is unchanged; only float rounding differs (the tests hold it to torch within 1e-5 typical, 1e-4 max).

A LoRA network (`pcm_policy.model.lora`) is written either at a fixed scale (the delta merged into the weights:
the output-space PCM at scale 1) or with a `scale` input (weight-space switching): then every wrapped layer
adds `scale * B(A(x))` (alpha / rank folded into B), and the timestep MLP runs in the graph (its LoRA makes
the embedding depend on `scale`), from a table of the sinusoidal embeddings.

Graph interface (`INPUTS`, `OUTPUT`): `sample` (N, H, Da) float32, `timestep` (N,) int64 in [0, T),
`global_cond` (N, C) float32, and for a `scale` graph `scale` (1,) float32; output `model_output` (N, H, Da).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pcm_policy.backends.registry import import_onnx
from pcm_policy.errors import PcmError
from pcm_policy.model.lora import LoRAConv1d, LoRALinear, lora_modules, lora_scale
from pcm_policy.model.unet import ConditionalResidualBlock1D, ConditionalUnet1D

if TYPE_CHECKING:  # imported when a graph is written (`import_onnx`): the torch paths never load it
    import onnx

OPSET = 18  # Mish is an operator from opset 18
IR_VERSION = 10  # what onnxruntime 1.31 and most other runtimes read
INPUTS = ("sample", "timestep", "global_cond")
SCALE_INPUT = "scale"
OUTPUT = "model_output"


class GraphWriter:
    """Collects nodes and constant tensors of one ONNX graph under unique names.

    Raises:
        ConfigError: the onnx package does not import (one line naming the pip command).
    """

    def __init__(self):
        self.onnx = import_onnx()
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def _name(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def const(self, value, stem: str = "c") -> str:
        """A constant tensor (numpy array or torch tensor; float tensors stored float32); returns its name."""
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            value = value.float().numpy() if value.is_floating_point() else value.numpy()
        array = np.ascontiguousarray(value)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        name = self._name(stem)
        self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs):
        """Append one node; returns its output name (a list of names when `outputs` > 1)."""
        names = [self._name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto], name: str,
              opset: int = OPSET) -> onnx.ModelProto:
        """The model of the collected graph (checked by `onnx.checker`)."""
        helper = self.onnx.helper
        graph = helper.make_graph(self.nodes, name, inputs, outputs, initializer=self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                  producer_name="pcm-policy")
        model.ir_version = IR_VERSION
        self.onnx.checker.check_model(model)
        return model

    def tensor(self, name: str, dtype: str, shape: list) -> onnx.ValueInfoProto:
        """A graph input/output description: `dtype` float32 or int64, `shape` ints and symbolic names."""
        element = {"float32": self.onnx.TensorProto.FLOAT, "int64": self.onnx.TensorProto.INT64}[dtype]
        return self.onnx.helper.make_tensor_value_info(name, element, shape)


@dataclass
class _Layer:
    """A Linear/Conv1d's weights for the graph: `weight`, `bias` (or None), and a LoRA delta kept separate
    (`lora_a`, `lora_b` with alpha / rank folded in) when the graph takes `scale` as an input."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None


def _layer(module: nn.Module, scale: float | None) -> _Layer:
    """A plain or LoRA Linear/Conv1d: merged at a fixed `scale`, or with its delta apart for `scale=None`."""
    if not isinstance(module, (LoRALinear, LoRAConv1d)):
        return _Layer(module.weight.detach().float(), None if module.bias is None else module.bias.detach().float())
    base = _layer(module.base, 0.0)
    coef = module.alpha / module.rank
    a, b = module.lora_A.weight.detach().float(), module.lora_B.weight.detach().float() * coef
    if scale is None:
        return _Layer(base.weight, base.bias, a, b)
    if scale == 0.0:
        return base
    if isinstance(module, LoRALinear):
        delta = b @ a
    else:  # B is a 1x1 conv (out, r, 1) after A (r, in, k): the product is a conv of A's kernel
        delta = torch.einsum("or,rik->oik", b[:, :, 0], a)
    return _Layer(base.weight + scale * delta, base.bias)


class _UnetWriter:
    """Writes `ConditionalUnet1D.forward` for one network (see the module docstring)."""

    def __init__(self, net: ConditionalUnet1D, num_train_timesteps: int, scale: float | None):
        self.net, self.T, self.scale = net, num_train_timesteps, scale
        self.g = GraphWriter()
        self.scale_input = SCALE_INPUT if scale is None else None
        self.blocks = [m for m in net.modules() if isinstance(m, ConditionalResidualBlock1D)]

    # ---- generic layers -------------------------------------------------------------------------------------
    def _lora(self, x: str, out: str, layer: _Layer, conv: dict | None) -> str:
        """`out + scale * B(A(x))` for a layer with a separate delta, else `out` (`conv`: A's conv attributes)."""
        if layer.lora_a is None:
            return out
        g = self.g
        if conv is None:
            low = g.op("MatMul", x, g.const(layer.lora_a.T, "lora_a"))
            delta = g.op("MatMul", low, g.const(layer.lora_b.T, "lora_b"))
        else:
            low = g.op("Conv", x, g.const(layer.lora_a[:, :, None], "lora_a"), **conv)
            delta = g.op("Conv", low, g.const(layer.lora_b[:, :, None], "lora_b"))
        return g.op("Add", out, g.op("Mul", delta, self.scale_input))

    def linear(self, x: str, module: nn.Module) -> str:
        """x (N, in) -> (N, out)."""
        layer, g = _layer(module, self.scale), self.g
        out = g.op("MatMul", x, g.const(layer.weight.T, "w"))
        if layer.bias is not None:
            out = g.op("Add", out, g.const(layer.bias, "b"))
        return self._lora(x, out, layer, None)

    def conv(self, x: str, module: nn.Module) -> str:
        """Conv1d (or its LoRA wrapper) on (N, C, 1, L), as a 2-D convolution with a (1, k) kernel."""
        base = module.base if isinstance(module, LoRAConv1d) else module
        if base.groups != 1 or base.padding_mode != "zeros":
            raise PcmError(f"ONNX export: Conv1d with groups={base.groups}, padding_mode={base.padding_mode!r} "
                           "is not supported")
        pad = base.padding[0]
        attrs = dict(kernel_shape=[1, base.kernel_size[0]], strides=[1, base.stride[0]], pads=[0, pad, 0, pad],
                     dilations=[1, base.dilation[0]])
        layer, g = _layer(module, self.scale), self.g
        inputs = [x, g.const(layer.weight[:, :, None], "w")] + ([g.const(layer.bias, "b")] if layer.bias is not None else [])
        return self._lora(x, g.op("Conv", *inputs, **attrs), layer, attrs)

    def conv_transpose(self, x: str, module: nn.ConvTranspose1d) -> str:
        """ConvTranspose1d on (N, C, 1, L), as a 2-D one with a (1, k) kernel."""
        g = self.g
        if module.groups != 1 or module.output_padding[0] != 0:
            raise PcmError("ONNX export: ConvTranspose1d with groups or output_padding is not supported")
        pad = module.padding[0]
        inputs = [x, g.const(module.weight[:, :, None], "w")] + ([g.const(module.bias, "b")] if module.bias is not None else [])
        return g.op("ConvTranspose", *inputs, kernel_shape=[1, module.kernel_size[0]], strides=[1, module.stride[0]],
                    pads=[0, pad, 0, pad], dilations=[1, module.dilation[0]])

    def group_norm(self, x: str, module: nn.GroupNorm) -> str:
        """GroupNorm on (N, C, 1, L): InstanceNormalization over (N, G, C/G * L), then the per-channel affine map."""
        g, G, C = self.g, module.num_groups, module.num_channels
        grouped = g.op("Reshape", x, g.const(np.array([0, G, -1], np.int64), "shape"))
        normed = g.op("InstanceNormalization", grouped, g.const(np.ones(G, np.float32), "ones"),
                      g.const(np.zeros(G, np.float32), "zeros"), epsilon=float(module.eps))
        out = g.op("Reshape", normed, g.const(np.array([0, C, 1, -1], np.int64), "shape"))
        if module.affine:
            out = g.op("Add", g.op("Mul", out, g.const(module.weight.view(C, 1, 1), "gamma")),
                       g.const(module.bias.view(C, 1, 1), "beta"))
        return out

    def conv_block(self, x: str, block: nn.Sequential) -> str:
        """`Conv1dBlock`: Conv1d -> GroupNorm -> Mish."""
        conv, norm, _ = block
        return self.g.op("Mish", self.group_norm(self.conv(x, conv), norm))

    # ---- the conditioning -----------------------------------------------------------------------------------
    def _film_layers(self) -> list[_Layer]:
        return [_layer(b.cond_encoder[1], self.scale) for b in self.blocks]

    def film(self, timestep: str, global_cond: str) -> list[list[str]]:
        """Every block's FiLM terms, [scale, bias] or [bias], each (N, out, 1, 1), from one MatMul and one Split
        (module docstring)."""
        g, net = self.g, self.net
        dsed = net.diffusion_step_encoder[0].dim
        layers = self._film_layers()
        parts = [2 if b.film_scale else 1 for b in self.blocks]
        sizes = [b.out_channels for b, n in zip(self.blocks, parts) for _ in range(n)]
        weight = torch.cat([layer.weight for layer in layers])  # (total, dsed + C)
        bias = torch.cat([layer.bias for layer in layers])
        mish_cond = g.op("Mish", global_cond)
        if self.scale_input is None:
            with torch.no_grad():
                t = torch.arange(self.T)
                with lora_scale(net, self.scale):
                    time_features = F.mish(net.diffusion_step_encoder(t))
                table = time_features @ weight[:, :dsed].T + bias  # (T, total)
            film = g.op("Add", g.op("Gather", g.const(table, "film_table"), timestep, axis=0),
                        g.op("MatMul", mish_cond, g.const(weight[:, dsed:].T, "film_w")))
        else:
            embed = net.diffusion_step_encoder[0](torch.arange(self.T))
            h = g.op("Gather", g.const(embed, "sinusoid_table"), timestep, axis=0)
            _, lin1, _, lin2 = net.diffusion_step_encoder
            h = self.linear(g.op("Mish", self.linear(h, lin1)), lin2)
            cond = g.op("Concat", g.op("Mish", h), mish_cond, axis=1)
            film = g.op("Add", g.op("MatMul", cond, g.const(weight.T, "film_w")), g.const(bias, "film_b"))
            if any(layer.lora_a is not None for layer in layers):
                delta = torch.cat([layer.lora_b @ layer.lora_a for layer in layers])  # dense (total, dsed + C)
                film = g.op("Add", film, g.op("Mul", g.op("MatMul", cond, g.const(delta.T, "film_lora")),
                                              self.scale_input))
        film = g.op("Unsqueeze", film, g.const(np.array([2, 3], np.int64), "axes"))
        terms = iter(g.op("Split", film, g.const(np.array(sizes, np.int64), "sizes"), axis=1, outputs=len(sizes)))
        return [[next(terms) for _ in range(n)] for n in parts]

    # ---- the network ------------------------------------------------------------------------------------------
    def residual_block(self, x: str, block: ConditionalResidualBlock1D, film: list[str]) -> str:
        """`ConditionalResidualBlock1D.forward` with its FiLM terms ([scale, bias] or [bias], `film`)."""
        g = self.g
        out = self.conv_block(x, block.conv1)
        if block.film_scale:
            scale, bias = film
            out = g.op("Mul", out, scale)
        out = g.op("Add", out, film[-1])
        out = self.conv_block(out, block.conv2)
        shortcut = x if isinstance(block.residual, nn.Identity) else self.conv(x, block.residual)
        return g.op("Add", out, shortcut)

    def write(self, horizon: int, action_dim: int, cond_dim: int) -> onnx.ModelProto:
        g, net = self.g, self.net
        films = iter(self.film("timestep", "global_cond"))
        block = {b: f for b, f in zip(self.blocks, films)}
        # (N, H, Da) -> (N, Da, 1, H): the 2-D layout of the convolutions (module docstring)
        x = g.op("Transpose", g.op("Unsqueeze", "sample", g.const(np.array([1], np.int64), "axes")), perm=[0, 3, 1, 2])
        skips = []
        for res1, res2, down in net.down_modules:
            x = self.residual_block(self.residual_block(x, res1, block[res1]), res2, block[res2])
            skips.append(x)
            if not isinstance(down, nn.Identity):
                x = self.conv(x, down)
        for res in net.mid_modules:
            x = self.residual_block(x, res, block[res])
        for res1, res2, up in net.up_modules:
            x = g.op("Concat", x, skips.pop(), axis=1)
            x = self.residual_block(self.residual_block(x, res1, block[res1]), res2, block[res2])
            x = self.conv_transpose(x, up)
        final_block, final_conv = net.final_conv
        x = self.conv(self.conv_block(x, final_block), final_conv)
        # (N, Da, 1, H) -> (N, H, Da); a channels-last Transpose folds into onnxruntime's NCHWc reorder
        g.op("Squeeze", g.op("Transpose", x, perm=[0, 2, 3, 1]), g.const(np.array([1], np.int64), "axes"))
        g.nodes[-1].output[0] = OUTPUT
        inputs = [g.tensor("sample", "float32", ["N", horizon, action_dim]), g.tensor("timestep", "int64", ["N"]),
                  g.tensor("global_cond", "float32", ["N", cond_dim])]
        if self.scale_input:
            inputs.append(g.tensor(SCALE_INPUT, "float32", [1]))
        outputs = [g.tensor(OUTPUT, "float32", ["N", horizon, action_dim])]
        return g.model(inputs, outputs, "pcm_policy_denoiser")


def denoiser_graph(net: ConditionalUnet1D, horizon: int, num_train_timesteps: int, scale: float | None = 0.0
                   ) -> bytes:
    """The serialized ONNX model of `net` as a denoiser (the interface in the module docstring).

    Args:
        net: the action head (`ConditionalUnet1D`), possibly with LoRA wrappers; its weights are read, it is not
            modified.
        horizon: H of the chunks it denoises (a static axis of the graph).
        num_train_timesteps: T, the training timesteps (the tables cover t = 0..T-1).
        scale: the LoRA scale baked into the weights (0: the base layers; ignored without LoRA), or None for a
            graph with a `scale` input (a LoRA network only).

    Returns:
        The model's bytes (opset `OPSET`), ready for `onnxruntime.InferenceSession`.

    Raises:
        PcmError: a network without a global condition, `scale=None` for a network without LoRA, or a layer the
            writer does not support (grouped convolution, circular padding).
    """
    dsed = net.diffusion_step_encoder[0].dim
    cond_dim = net.down_modules[0][0].cond_encoder[1]
    cond_dim = (cond_dim.base if isinstance(cond_dim, LoRALinear) else cond_dim).in_features - dsed
    if cond_dim <= 0:
        raise PcmError("ONNX export: the network takes no global condition (global_cond_dim=0)")
    if scale is None and not lora_modules(net):
        raise PcmError("ONNX export: a scale input needs a LoRA network")
    action_dim = net.final_conv[1].out_channels if not isinstance(net.final_conv[1], LoRAConv1d) else \
        net.final_conv[1].base.out_channels
    with torch.no_grad():
        model = _UnetWriter(net, num_train_timesteps, scale).write(horizon, action_dim, cond_dim)
    return model.SerializeToString()
