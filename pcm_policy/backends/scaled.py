"""A LoRA PCM's `denoiser(x, t, cond, scale)` whose scale-0 calls run the base network's denoiser instead.

At scale 0 the LoRA layers add nothing (`pcm_policy.model.lora` skips the delta), so those calls - every base round
of weight-space switching - may run the base network's faster denoiser (its plain graph, its `auto` router) with the
same result.
"""
from __future__ import annotations

from typing import Callable

import torch


class BaseAtScaleZero:
    """`eps = denoiser(x, t, cond, scale)`: `base(x, t, cond)` at scale 0, `scaled(x, t, cond, scale)` otherwise.

    Args:
        scaled: the LoRA network's denoiser with a scale argument.
        base: the base network's denoiser.
    """

    def __init__(self, scaled: Callable, base: Callable):
        self.scaled, self.base = scaled, base

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, scale: float) -> torch.Tensor:
        """The prediction (N, H, Da) for x (N, H, Da), t (N,), cond (N, C) at LoRA `scale` (0: the base network)."""
        if float(scale) == 0.0:
            return self.base(x, t, cond)
        return self.scaled(x, t, cond, scale)
