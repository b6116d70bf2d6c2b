"""Per-chunk sampler overhead at batch 1: a sequential chunk's time against S bare network calls.

    .venv/bin/python scripts/measure_overhead.py [--checkpoint data/pusht/base] [--chunks 30]

Prints, for sequential DDPM-100 and DDIM-10 (and Picard DDIM-10), the median chunk time through
`policy.predict_chunk`, the median time of the same network calls made bare (`policy.denoiser` with exactly the
row counts the chunk used, recorded by a forward pre-hook), and the overhead ratio. The two are interleaved chunk
by chunk so machine load affects both alike. Works on any version of the code that has `predict_chunk`.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pcm_policy.checkpoint import load_policy
from pcm_policy.sampler_config import SamplerConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="data/pusht/base")
    ap.add_argument("--chunks", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    policy, _ = load_policy(args.checkpoint, "cpu")
    obs = torch.zeros(1, policy.config.n_obs_steps, policy.config.obs_dim)
    cond = policy.global_cond(obs)
    x = torch.randn(1, policy.config.horizon, policy.config.action_dim)
    for name, sched, steps in (("sequential", "ddpm", 100), ("sequential", "ddim", 10), ("picard", "ddim", 10)):
        cfg = SamplerConfig(name=name, scheduler=sched, steps=steps)
        chunk_ms, bare_ms, rounds = [], [], []
        for i in range(args.chunks + 2):
            noise = policy.make_noise(1, cfg, torch.Generator().manual_seed(i))
            shapes: list[int] = []
            hook = policy.model.register_forward_pre_hook(lambda m, a: shapes.append(a[0].shape[0]))
            t0 = time.perf_counter()
            policy.predict_chunk(obs, cfg, noise=noise)
            t1 = time.perf_counter()
            hook.remove()
            n_calls = len(shapes)
            inputs = [(x.repeat(n, 1, 1), torch.full((n,), 10, dtype=torch.long), cond.repeat(n, 1)) for n in shapes]
            with torch.no_grad():
                t2 = time.perf_counter()
                for xb, t, cb in inputs:
                    policy.denoiser(xb, t, cb)
                t3 = time.perf_counter()
            if i >= 2:  # warm-up
                chunk_ms.append((t1 - t0) * 1e3)
                bare_ms.append((t3 - t2) * 1e3)
                rounds.append(n_calls)
        c, b = statistics.median(chunk_ms), statistics.median(bare_ms)
        print(f"{cfg.label:18s} chunk p50 {c:7.2f} ms   {statistics.mean(rounds):5.1f} bare calls p50 {b:7.2f} ms   "
              f"overhead {100 * (c / b - 1):+5.1f}%")


if __name__ == "__main__":
    main()
