"""`pcm demo`: the whole mission on shipped defaults, in a few minutes on a CPU.

1. Load the shipped PushT base policy and its PCMs (or train a quick stand-in when they are absent).
2. Closed-loop episodes under the real-time controller (simulated clock) with the configured PCM sampler,
   recording a video of the first one.
3. A short latency comparison (`pcm bench` rows) on the same checkpoint, observations and noise.
4. A summary table with success, score, iterations, latency, deadline misses and speedups.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pcm_policy.atomic import atomic_write_text
from pcm_policy.config import compose, require_int, resolve_path
from pcm_policy.errors import CheckpointError, ConfigError
from pcm_policy.latency import latency_summary

SHIPPED_BASE = "data/pusht/base"  # configs/demo.yaml's default: when it is absent, a quick stand-in is trained


def _quick_checkpoints(cfg: Mapping[str, Any], out: Path) -> tuple[str, dict[str, str]]:
    """Stand-ins when no trained checkpoint ships: a short training run and a short PCT run (not a good policy)."""
    from pcm_policy.pcm.training import train_pcm
    from pcm_policy.training import train

    print("no shipped checkpoint found: training a quick stand-in (its closed-loop figures mean nothing)")
    base = out / "quick_base"
    train(compose("train", [f"task={cfg['task']['name']}", f"output_dir={base}", "train.steps=200",
                            "train.checkpoint_every=200", f"device={cfg['device']}"]))
    pcm = out / "quick_pcm_ddim10"
    train_pcm(compose("train_pcm", [f"base={base}", f"output_dir={pcm}", "scheduler=ddim", "steps=10",
                                    "trajectories=16", "collect_batch=16", "epochs=2", "eval_observations=2",
                                    f"device={cfg['device']}"]))
    return str(base), {"ddim10": str(pcm)}


def run_demo(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """`pcm demo`: closed-loop episodes under the controller, then a short bench; prints and writes a summary.

    Args:
        cfg: the composed `demo` config (task, checkpoint, pcm_lora.<base>, pcm.<base>, sampler, episodes,
            chunks, ddpm100_chunks, bases, seed, seed_start, device, output_dir).

    Returns:
        The summary written to `output_dir/metrics.json`: closed-loop success/score, latency p50/p99 (ms),
        iterations, deadline misses, exact fraction; the bench rows; video and plot paths; wall time (s).

    Raises:
        ConfigError: no checkpoint, a count out of range, or an invalid sampler setting.
        CheckpointError: a named checkpoint that is missing, for another task, or a PCM for another base (only
            the shipped default base, when absent, is replaced by a quick stand-in).
    """
    from pcm_policy.bench import run_bench
    from pcm_policy.checkpoint import load_policy
    from pcm_policy.control import Controller, ControllerConfig
    from pcm_policy.control.episodes import run_controller_episodes
    from pcm_policy.episodes import summarize
    from pcm_policy.pcm.attach import load_sampler
    from pcm_policy.runtime import resolve_device
    from pcm_policy.sampler_config import SamplerConfig

    from pcm_policy.validation import validate_demo

    validate_demo(cfg)  # every option before any work (the CLI checks them too; library callers get the same)
    t0 = time.perf_counter()
    out = Path(cfg["output_dir"])
    task = cfg["task"]
    device = resolve_device(cfg.get("device"))
    for key, low in (("episodes", 1), ("chunks", 1), ("ddpm100_chunks", 1), ("seed", 0), ("seed_start", 0)):
        require_int(key, cfg.get(key), low)
    if not cfg.get("checkpoint"):
        raise ConfigError("checkpoint: no base checkpoint given (checkpoint=<run or checkpoint dir>)")
    checkpoint = resolve_path(cfg["checkpoint"])
    pcms = {k: str(resolve_path(v)) for k, v in (cfg.get("pcm_lora") or {}).items() if v}
    full_pcms = {k: str(resolve_path(v)) for k, v in (cfg.get("pcm") or {}).items() if v}
    if not checkpoint.exists():
        if Path(cfg["checkpoint"]) != Path(SHIPPED_BASE):  # a path the user named: a typo, not a fresh clone
            raise CheckpointError(f"{cfg['checkpoint']}: checkpoint not found")
        out.mkdir(parents=True, exist_ok=True)
        checkpoint, pcms = _quick_checkpoints(cfg, out)
        full_pcms = {}

    # 1-2: closed loop under the controller, PCM-LoRA with weight-space switching.
    policy, _ = load_policy(checkpoint, device, expect_task=task["name"])
    sampler_cfg = SamplerConfig.from_mapping(cfg["sampler"])
    sampler = load_sampler(policy, sampler_cfg, device, pcms.get(f"{sampler_cfg.scheduler}{sampler_cfg.steps}"))
    out.mkdir(parents=True, exist_ok=True)  # only once the inputs have loaded: bad input leaves no output
    ctrl = Controller(policy, sampler, ControllerConfig(control_hz=task["control_hz"]), seed=cfg["seed"])
    run = run_controller_episodes(ctrl, task["env_id"], task["max_steps"], cfg["episodes"], cfg["seed_start"],
                                  video_prefix=out / "videos" / "demo", desc=f"closed loop ({sampler.label})")
    chunks, video = run.chunks, run.video
    closed = summarize(run.results, task["name"])

    # 3: latency comparison on the same checkpoint.
    bench_cfg = compose("bench", [f"task={task['name']}", f"checkpoint={checkpoint}", f"chunks={cfg['chunks']}",
                                  f"chunks_by_base.ddpm100={cfg['ddpm100_chunks']}",
                                  f"bases=[{','.join(cfg['bases'])}]", f"output_dir={out / 'bench'}",
                                  f"device={cfg['device']}", "early_stop=false", "pcm.ddpm100=null", "pcm.ddim10=null",
                                  "pcm_lora.ddpm100=null", "pcm_lora.ddim10=null"]
                        + [f"+pcm_lora.{k}={v}" for k, v in pcms.items()]
                        + [f"+pcm.{k}={v}" for k, v in ({**pcms, **full_pcms}).items()])  # output space: a full PCM if given
    report = run_bench(bench_cfg)

    warm = chunks[1:] or chunks  # latencies without the very first chunk: it also pays the one-off warm-up
    summary = {"command": "demo", "task": task["name"], "checkpoint": str(checkpoint), "sampler": sampler.label,
               "closed_loop": {**closed, "chunks": len(chunks), **latency_summary(c.latency_ms for c in warm),
                               "iterations_mean": float(np.mean([c.iterations for c in chunks])),
                               "deadline_misses": int(sum(c.deadline_missed for c in chunks)),
                               "exact_fraction": float(np.mean([c.exact for c in chunks]))},
               "bench": report["rows"], "device": report["device"], "threads": report["threads"],
               "video": str(video) if video else None, "plot": str(out / "bench" / "bench.png"),
               "wall_s": round(time.perf_counter() - t0, 1)}
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2))
    print_summary(summary)
    return summary


def print_summary(s: Mapping[str, Any]) -> None:
    """Print `run_demo`'s summary: the closed-loop line, the bench table (latencies in ms), output paths."""
    c = s["closed_loop"]
    print()
    print(f"== pcm demo: {s['task']} on {s['device']} ==")
    print(f"closed loop, {s['sampler']} under the real-time controller (simulated clock), {c['episodes']} episodes:")
    print(f"  success {c['success_rate']:.2f}  score {c['score']:.3f}  iterations/chunk {c['iterations_mean']:.2f}  "
          f"latency p50 {c['latency_ms_p50']:.1f} ms p99 {c['latency_ms_p99']:.1f} ms  deadline misses "
          f"{c['deadline_misses']}/{c['chunks']}  exact chunks {c['exact_fraction']:.0%}")
    print()
    print(f"{'sampler':26s} {'iters':>6s} {'p50 ms':>8s} {'p99 ms':>8s} {'misses':>8s} {'speedup':>8s} {'max err':>9s}")
    for r in s["bench"]:
        speed = r.get("speedup_p50_vs_sequential")
        print(f"{r['sampler'] + '/' + r['base']:26s} {r['iterations_mean']:6.2f} {r['latency_ms_p50']:8.1f} "
              f"{r['latency_ms_p99']:8.1f} {str(r['deadline_misses']) + '/' + str(r['chunks']):>8s} "
              f"{(f'{speed:.2f}x' if speed else ''):>8s} {r['max_abs_err_vs_sequential']:9.1e}")
    print()
    if s["video"]:
        print(f"video: {s['video']}")
    print(f"plot: {s['plot']}")
    print(f"metrics: {Path(s['plot']).parent.parent / 'metrics.json'}  ({s['wall_s']:.0f} s)")
