"""Per-call and per-chunk latency of the denoiser on each backend, in one run (docs/latency-benchmark.md#backends).

    .venv/bin/python scripts/measure_backends.py [--checkpoint data/pusht/base] [--threads 1] [--reps 30]

Per call (rows 1, 10, 100; median ms over `--reps` calls, the implementations interleaved call by call so machine
load hits them alike): torch eager; the same network through torch's TorchScript exporter (opset 17, dynamic batch:
the graph before this project's rewrites) run by onnxruntime; and `pcm_policy.backends.onnx_graph`'s graph (after),
with their node counts and achieved GFLOP/s (`--mflop` per row). Per chunk (batch 1, median over `--chunks`
chunks, same noise): sequential DDIM-10 and DDPM-100 through `DiffusionPolicy.sampler(..., backend=...)` for torch,
onnx and auto, with auto's calibration.
"""
from __future__ import annotations

import argparse
import io
import statistics
import time
import warnings

import numpy as np
import onnx
import torch

from pcm_policy.backends.onnx_denoiser import OnnxDenoiser
from pcm_policy.backends.onnx_graph import denoiser_graph
from pcm_policy.backends.onnx_session import make_session
from pcm_policy.checkpoint import load_policy
from pcm_policy.sampler_config import SamplerConfig


def torch_exporter_graph(model, horizon: int, action_dim: int, cond_dim: int) -> bytes:
    """The network through torch's own exporter (the graph the issue's probe measured)."""
    buffer = io.BytesIO()
    example = (torch.zeros(1, horizon, action_dim), torch.zeros(1, dtype=torch.long), torch.zeros(1, cond_dim))
    names = ["sample", "timestep", "global_cond", "model_output"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, buffer, input_names=names[:3], output_names=names[3:],
                          dynamic_axes={n: {0: "N"} for n in names}, opset_version=17, dynamo=False)
    return buffer.getvalue()


def per_call(policy, reps: int, mflop: float, threads: int) -> None:
    c = policy.config
    cond_dim = c.step_cond_dim * c.n_obs_steps
    exported = torch_exporter_graph(policy.model, c.horizon, c.action_dim, cond_dim)
    ours = denoiser_graph(policy.model, c.horizon, c.num_train_timesteps)
    before = make_session(exported, threads)
    after = OnnxDenoiser(ours, (c.horizon, c.action_dim), cond_dim, threads)
    nodes = {name: len(onnx.load_from_string(g).graph.node) for name, g in (("before", exported), ("after", ours))}
    print(f"graph nodes: torch exporter {nodes['before']}, onnx_graph {nodes['after']}")
    print(f"{'rows':>5s} {'torch ms':>9s} {'ort (exporter) ms':>18s} {'ort (onnx_graph) ms':>20s} "
          f"{'after/before':>12s} {'torch/after':>11s} {'GFLOP/s torch':>13s} {'GFLOP/s after':>13s}")
    g = torch.Generator().manual_seed(0)
    for rows in (1, 10, 100):
        x = torch.randn(rows, c.horizon, c.action_dim, generator=g)
        t = torch.randint(0, c.num_train_timesteps, (rows,), generator=g)
        cond = torch.randn(rows, cond_dim, generator=g)
        feeds = {"sample": x.numpy(), "timestep": t.numpy(), "global_cond": cond.numpy()}
        calls = {"torch": lambda: policy.model(x, t, cond), "before": lambda: before.run(None, feeds),
                 "after": lambda: after(x, t, cond)}
        times = {k: [] for k in calls}
        n = reps if rows < 100 else max(5, reps // 4)
        with torch.no_grad():
            for i in range(n + 3):
                for name, call in calls.items():
                    t0 = time.perf_counter()
                    call()
                    if i >= 3:
                        times[name].append((time.perf_counter() - t0) * 1e3)
        ms = {k: statistics.median(v) for k, v in times.items()}
        print(f"{rows:5d} {ms['torch']:9.2f} {ms['before']:18.2f} {ms['after']:20.2f} "
              f"{ms['before'] / ms['after']:12.2f} {ms['torch'] / ms['after']:11.2f} "
              f"{mflop * rows / ms['torch']:13.1f} {mflop * rows / ms['after']:13.1f}")


def per_chunk(policy, chunks: int) -> None:
    cond = policy.encode(torch.from_numpy(np.random.default_rng(0).uniform(100, 400, (1, policy.config.n_obs_steps,
                                                                                        policy.config.obs_dim))).float())
    for scheduler, steps, n in (("ddim", 10, chunks), ("ddpm", 100, max(3, chunks // 5))):
        config = SamplerConfig(name="sequential", scheduler=scheduler, steps=steps)
        samplers = {b: policy.sampler(config, backend=b) for b in ("torch", "onnx", "auto")}
        times = {b: [] for b in samplers}
        out = {}
        for i in range(n + 2):
            noise = samplers["torch"].make_noise(1, torch.Generator().manual_seed(i))
            for b, s in samplers.items():
                t0 = time.perf_counter()
                out[b] = s.sample(*noise, cond)[0]
                if i >= 2:
                    times[b].append((time.perf_counter() - t0) * 1e3)
        ms = {b: statistics.median(v) for b, v in times.items()}
        dev = max(float((out[b] - out["torch"]).abs().max()) for b in out)
        print(f"sequential {scheduler}{steps}: " + ", ".join(
            f"{b} {ms[b]:.1f} ms ({ms['torch'] / ms[b]:.2f}x)" for b in samplers) + f"; max deviation {dev:.1e}")
        print(f"  {samplers['auto'].calibration.summary()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="data/pusht/base")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30, help="timed calls per row count (100 rows: a quarter)")
    ap.add_argument("--chunks", type=int, default=20, help="timed DDIM-10 chunks per backend (DDPM-100: a fifth)")
    ap.add_argument("--mflop", type=float, default=39.5, help="network MFLOP per row (shipped PushT UNet: 39.5)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    policy, _ = load_policy(args.checkpoint, "cpu")
    print(f"{args.checkpoint}, {args.threads} thread(s), torch {torch.__version__}")
    per_call(policy, args.reps, args.mflop, args.threads)
    per_chunk(policy, args.chunks)


if __name__ == "__main__":
    main()
