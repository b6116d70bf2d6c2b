"""What the hardware could do: the network's FLOPs per row, counted once from its graph, and the core's fp32 peak,
so that every bench row reports its achieved GFLOP/s against the peak.

FLOPs are counted by torch's own counter (`torch.utils.flop_counter.FlopCounterMode`: 2 per multiply-accumulate
of every convolution and matrix product, the operations that dominate a UNet) on one call with one row; the shipped
PushT UNet costs 39.5 MFLOP per row. The peak is a large fp32 matrix product timed at the bench's thread count
(best of a few), i.e. what oneDNN/MKL reach on this core when nothing but arithmetic is left: about 90-100 GFLOP/s
for one AVX-512 core of this machine.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

PEAK_MATMUL_SIZE = 1024  # 2.1 GFLOP per product: ~20 ms on one core, long enough to time, short enough to repeat
PEAK_REPEATS = 5


@torch.no_grad()
def flops_per_row(policy, denoiser: Callable | None = None, extra: tuple = ()) -> int:
    """FLOPs of one network row: a torch denoiser called once on one row of `policy`'s shapes under torch's FLOP
    counter.

    Args:
        policy: the base `DiffusionPolicy` (its chunk shape (H, Da), condition size To * features, device).
        denoiser: `eps = denoiser(x, t, cond, *extra)` running torch modules (None: the base network; a LoRA PCM's
            `denoiser(x, t, cond, scale)` with `extra = (scale,)` counts its adapters too).
        extra: further arguments after `cond`.

    Returns:
        The FLOPs of one row (2 per multiply-accumulate of convolutions and matrix products).
    """
    c = policy.config
    x = torch.zeros((1, c.horizon, c.action_dim), device=policy.device)
    t = torch.zeros((1,), dtype=torch.long, device=policy.device)
    cond = torch.zeros((1, c.step_cond_dim * c.n_obs_steps), device=policy.device)
    with FlopCounterMode(display=False) as counter:
        (denoiser or policy.denoiser)(x, t, cond, *extra)
    return int(counter.get_total_flops())


def measure_peak_gflops(size: int = PEAK_MATMUL_SIZE, repeats: int = PEAK_REPEATS) -> float:
    """The fp32 peak of the cores torch computes on: the best of `repeats` `size` x `size` matrix products at torch's
    current intra-op thread count, in GFLOP/s per the process CPU time they took (divided by the thread count).

    CPU time, not wall time: on a shared machine other work takes the core away for whole scheduler slices, which
    wall time would count and CPU time does not (it still pays their cache pollution, so the figure can only be
    low). About 0.1 s at size 1024 on one core.

    Returns:
        2 size^3 / (best CPU seconds / threads) / 1e9.
    """
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # the first product pays one-off set-up
    threads = torch.get_num_threads()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        a @ b
        best = min(best, (time.process_time() - t0) / threads)
    return 2 * size ** 3 / max(best, 1e-9) / 1e9


def achieved_gflops(rows_per_chunk: float, flops_row: int, latency_ms: float) -> float:
    """GFLOP/s a chunk achieved: its network rows' FLOPs over its wall time.

    Args:
        rows_per_chunk: network rows per chunk (`SamplerStats.network_rows`, padding included).
        flops_row: FLOPs per row (`flops_per_row`).
        latency_ms: the chunk's wall time, ms.
    """
    return rows_per_chunk * flops_row / (latency_ms * 1e-3) / 1e9
