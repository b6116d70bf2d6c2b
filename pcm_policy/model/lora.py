"""Generic LoRA for any nn.Module: frozen base layers plus a trainable low-rank delta with a settable scale.

`y = base(x) + scale * (alpha / rank) * B(A(x))`, B zero-initialised so a fresh LoRA changes nothing.
`scale` is the weight-space switching knob (W0 + lambda * DeltaW); `scale == 0` skips the delta
entirely, so the output is bit-identical to the base layer.  Evaluation never merges weights.

Conv1d: A is a conv with the base layer's kernel/stride/padding/dilation (in -> rank channels, no bias),
B a 1x1 conv (rank -> out).  Grouped convolutions are left untouched.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn


class _LoRABase(nn.Module):
    base: nn.Module

    def _init_lora(self, rank: int, alpha: float | None):
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = 1.0
        for p in self.base.parameters():
            p.requires_grad_(False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        y = self.base(x)
        if self.scale == 0.0:
            return y
        return y + (self.scale * self.alpha / self.rank) * self.lora_B(self.lora_A(x))


class LoRALinear(_LoRABase):
    """A frozen `nn.Linear` plus a low-rank delta: `y = base(x) + scale * (alpha / rank) * B(A(x))`.

    LoRA: Hu et al. 2021, arXiv 2106.09685, eq. 3 and the alpha / r scaling of section 4.1.

    Args:
        base: the layer to wrap; its parameters are frozen.
        rank: r, the delta's rank.
        alpha: the delta's scale numerator (None = rank, i.e. alpha / rank = 1).
    """

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float | None = None):
        super().__init__()
        self.base = base
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **kw)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **kw)
        self._init_lora(rank, alpha)


class LoRAConv1d(_LoRABase):
    """A frozen `nn.Conv1d` plus a low-rank delta, as `LoRALinear`.

    A is a conv with the base's kernel, stride, padding and dilation to `rank` channels; B a 1x1 conv back.

    Args:
        base: the layer to wrap (groups == 1); its parameters are frozen.
        rank: r, the delta's rank (channels of A's output).
        alpha: the delta's scale numerator (None = rank).
    """

    def __init__(self, base: nn.Conv1d, rank: int = 8, alpha: float | None = None):
        super().__init__()
        self.base = base
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Conv1d(
            base.in_channels, rank, base.kernel_size, stride=base.stride, padding=base.padding,
            dilation=base.dilation, padding_mode=base.padding_mode, bias=False, **kw,
        )
        self.lora_B = nn.Conv1d(rank, base.out_channels, 1, bias=False, **kw)
        self._init_lora(rank, alpha)


_WRAPPERS = {nn.Linear: LoRALinear, nn.Conv1d: LoRAConv1d}


def add_lora(module: nn.Module, rank: int = 8, alpha: float | None = None, targets=(nn.Conv1d, nn.Linear)) -> nn.Module:
    """Replace every targeted layer inside `module` (in place) by its LoRA wrapper.

    All other parameters of `module` are frozen too, so `lora_parameters` are the only trainable ones.
    Grouped convolutions and layers already wrapped are left as they are.

    Args:
        module: the network (e.g. a copy of the base UNet).
        rank: r of every wrapper.
        alpha: the wrappers' scale numerator (None = rank).
        targets: the layer classes to wrap (`nn.Conv1d` and/or `nn.Linear`).

    Returns:
        `module` itself; when `module` is a targeted layer (it cannot be replaced in place) its new wrapper.
    """
    targets = tuple(targets)

    def wrap(layer):
        for cls, wrapper in _WRAPPERS.items():
            if isinstance(layer, cls) and isinstance(layer, targets):
                if isinstance(layer, nn.Conv1d) and layer.groups != 1:
                    return None
                return wrapper(layer, rank=rank, alpha=alpha)
        return None

    if isinstance(module, _LoRABase):
        return module
    top = wrap(module)
    if top is not None:
        return top
    for p in module.parameters():
        p.requires_grad_(False)

    def recurse(parent):
        for name, child in list(parent.named_children()):
            if isinstance(child, _LoRABase):
                continue
            new = wrap(child)
            if new is not None:
                setattr(parent, name, new)
            else:
                recurse(child)

    recurse(module)
    return module


def lora_modules(module: nn.Module):
    """Every LoRA wrapper inside `module` (itself included), in `module.modules()` order."""
    return [m for m in module.modules() if isinstance(m, _LoRABase)]


def set_lora_scale(module: nn.Module, s: float) -> None:
    """Set the scale of every LoRA wrapper in `module` to `s` (0: the base layers exactly; 1: the full delta)."""
    for m in lora_modules(module):
        m.scale = float(s)


@contextlib.contextmanager
def lora_scale(module: nn.Module, s: float):
    """Temporarily set every LoRA scale in `module` to `s`; yields `module` and restores the previous scales."""
    mods = lora_modules(module)
    old = [m.scale for m in mods]
    try:
        for m in mods:
            m.scale = float(s)
        yield module
    finally:
        for m, o in zip(mods, old):
            m.scale = o


def lora_parameters(module: nn.Module):
    """The trainable low-rank parameters (A and B of every wrapper)."""
    out = []
    for m in lora_modules(module):
        out += list(m.lora_A.parameters()) + list(m.lora_B.parameters())
    return out


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors, keyed as in `module.state_dict()`."""
    return {k: v for k, v in module.state_dict().items() if ".lora_A." in f".{k}" or ".lora_B." in f".{k}"}


def load_lora_state_dict(module: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load LoRA tensors saved by `lora_state_dict` into a LoRA-injected module.

    Args:
        module: the network after `add_lora` with the same targets and rank.
        sd: {state-dict key: tensor}, exactly the module's LoRA keys.

    Raises:
        KeyError: missing or unexpected LoRA keys.
        RuntimeError: a tensor of another shape (e.g. another rank).
    """
    expected = set(lora_state_dict(module))
    got = set(sd)
    if expected != got:
        raise KeyError(
            f"LoRA state mismatch: missing {sorted(expected - got)[:5]}, unexpected {sorted(got - expected)[:5]}"
        )
    module.load_state_dict(sd, strict=False)


def scaled_denoiser(module: nn.Module):
    """Adapt a LoRA-injected `module(x, t, cond)` to the weight-space switching signature.

    The wrappers are looked up once; the scales are written only when `scale` changes.

    Args:
        module: a network after `add_lora`.

    Returns:
        `denoiser(x, t, cond, scale)` (as used by `sample_lora_switched`): `module(x, t, cond)` with every LoRA
        scale set to `scale` (weights W0 + scale * DeltaW).
    """

    mods = lora_modules(module)  # walked once, not on every call
    current = [None]

    def fn(x, t, cond, scale):
        scale = float(scale)
        if scale != current[0] or any(m.scale != scale for m in mods[:1]):
            for m in mods:
                m.scale = scale
            current[0] = scale
        return module(x, t, cond)

    return fn
