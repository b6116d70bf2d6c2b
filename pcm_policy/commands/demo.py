"""`pcm demo`: the whole mission on shipped defaults, in a few minutes on a CPU (`configs/demo.yaml`).

1. Load the task's shipped base policy and its PCMs (or train a quick stand-in when the shipped base is absent).
2. `sampler=auto` (the default): time every exact sampler under every backend on this machine and take the fastest
   that fits the control period (`pcm_policy.auto_sampler`); any other `sampler=` runs as configured.
3. Closed-loop episodes under the real-time controller (simulated clock) with that sampler, recording a video of
   the first one.
4. A short latency comparison (a `pcm bench` config, every row on each of `backends`) on the same checkpoint,
   observations and noise.
5. A summary table with success, score, iterations, latency, deadline misses and speed-ups.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pcm_policy.atomic import atomic_write_text
from pcm_policy.auto_sampler import AutoSettings, check_auto, check_backends, choose_sampler, is_auto
from pcm_policy.backends import check_backend
from pcm_policy.checkpoint import Card, load_policy
from pcm_policy.commands import bench, compose_command, train, train_pcm
from pcm_policy.control import Controller, ControllerConfig
from pcm_policy.errors import ConfigError
from pcm_policy.latency import latency_summary
from pcm_policy.observations import check_dataset, sample_observations
from pcm_policy.options import integer, lookup, output_dir, renamed
from pcm_policy.paths import resolve_path
from pcm_policy.pcm.attach import check_sampler, load_sampler
from pcm_policy.rollout.controlled import run_controller_episodes
from pcm_policy.rollout.env import check_registered
from pcm_policy.rollout.results import summarize
from pcm_policy.runtime import RuntimeOptions
from pcm_policy.sampler_config import SamplerConfig, check_schedules
from pcm_policy.tasks import TaskOptions


@dataclass(frozen=True)
class Config:
    """A checked `pcm demo` config.

    Attributes:
        task: the task.
        checkpoint: the base policy's card, or None when the task's shipped base is absent (a stand-in is
            trained first).
        sampler: the closed-loop sampler, or `sampler=auto`'s settings (chosen by timing at start).
        sampler_pcm: its PCM, `pcm_lora.<its schedule>` (None for a sampler without one; for `sampler=auto` the
            PCM it may choose).
        pcm_lora: schedule -> LoRA PCM (the weight-space rows, and the output-space rows without `pcm`).
        pcm: schedule -> PCM of the output-space rows.
        schedules: the latency comparison's schedules.
        backends: the latency comparison's backends (every row on each).
        episodes: closed-loop episodes (reset seeds seed_start, ...).
        chunks: latency-comparison chunks per row; ddpm100_chunks for the slow DDPM-100 rows.
        seed_start: the first reset seed.
        runtime: seed, device, threads.
        output_dir: where metrics.json, the video and the bench go.
        backend: the closed loop's runtime for a fixed sampler: torch, onnx or auto (`sampler=auto` chooses among its
            `sampler.backends`; a `backend=` given restricts them to that one).
    """

    task: TaskOptions
    checkpoint: Card | None
    sampler: SamplerConfig | AutoSettings
    sampler_pcm: str | None
    pcm_lora: dict[str, str]
    pcm: dict[str, str]
    schedules: list[str]
    backends: list[str]
    episodes: int
    chunks: int
    ddpm100_chunks: int
    seed_start: int
    runtime: RuntimeOptions
    output_dir: Path
    backend: str = "torch"

    @classmethod
    def from_hydra(cls, cfg: Mapping[str, Any]) -> "Config":
        """Check every option of a composed `demo` config; the checkpoint, its PCM maps and the sampler's PCM as
        `pcm bench` and `pcm eval` would, unless the task's shipped base is absent (then only the sampler's own
        keys: the stand-in gets stand-in PCMs).

        Raises:
            ConfigError: a key of the wrong type or range, no checkpoint given, a sampler the checkpoint
                cannot run, or a backend that cannot run here (onnx on CUDA, onnxruntime missing).
            CheckpointError: an unreadable checkpoint, a PCM as the base, or a base for another task.
            DatasetError: the checkpoint's dataset (the latency comparison's observations) is missing.
        """
        runtime = RuntimeOptions.from_mapping(cfg)
        backend = lookup(cfg, "backend", None)  # null: torch, or sampler=auto's own backends
        backend = None if backend is None else check_backend(backend, runtime.device)
        task = TaskOptions.from_mapping(lookup(cfg, "task"))
        out = output_dir(cfg)
        counts = {k: integer(cfg, k, low) for k, low in
                  (("episodes", 1), ("chunks", 1), ("ddpm100_chunks", 1), ("seed_start", 0))}
        path = lookup(cfg, "checkpoint", None)
        if not path:
            raise ConfigError("checkpoint: no base checkpoint given (checkpoint=<run or checkpoint dir>)")
        card = None
        if resolve_path(path).exists() or Path(path) != resolve_path(task.spec.base):
            card = Card.open_base("checkpoint", path, task=task.name)
            card.check_closed_loop()
            task = dataclasses.replace(task, env_id=task.env_for(card.observation_kind, card.observation_parts))
            check_dataset(card.path)  # the latency comparison draws its observations from it
        check_registered(task.env_id)
        T = card.num_train_timesteps if card else None
        key, value = renamed(cfg, "bases", "schedules")
        schedules = check_schedules(key, value, T, card.path if card else None)
        pcm_lora = bench.pcm_map(cfg, "pcm_lora", schedules) if card else {}  # (a stand-in gets stand-in PCMs)
        pcm = bench.pcm_map(cfg, "pcm", schedules) if card else {}
        group = lookup(cfg, "sampler")
        schedule = f"{group.get('scheduler')}{group.get('steps')}" if isinstance(group, Mapping) else None
        # demo attaches the LoRA PCM of the sampler's schedule (pcm_lora.<schedule>) whatever the switching space
        sampler_pcm = (lookup(cfg, "pcm_lora", None) or {}).get(schedule)
        backends = check_backends("backends", lookup(cfg, "backends"), runtime.device)
        if is_auto(group):
            sampler = check_auto(group, "sampler", T, card.path if card else None, pcm_key=f"pcm_lora.{schedule}",
                                 pcm_path=sampler_pcm if card else None, device=runtime.device, backend=backend)
            return cls(task, card, sampler, sampler.pcm_checkpoint, pcm_lora, pcm, schedules, backends, **counts,
                       runtime=runtime, output_dir=out)
        sampler = check_sampler(group, "sampler", T, card.path if card else None, pcm_key=f"pcm_lora.{schedule}",
                                pcm_path=sampler_pcm, check_pcm=card is not None)
        return cls(task, card, sampler, sampler_pcm if sampler.needs_pcm else None, pcm_lora, pcm, schedules,
                   backends, **counts, runtime=runtime, output_dir=out, backend=backend or "torch")


def _stand_in(config: Config) -> tuple[Card, dict[str, str]]:
    """A short training run and a short PCT run when no trained checkpoint ships (not a good policy)."""
    print("no shipped checkpoint found: training a quick stand-in (its closed-loop figures mean nothing)")
    out = config.output_dir
    base = train.Config.from_hydra(compose_command("train", [f"task={config.task.name}",
                                                             f"policy={config.task.spec.policy}"]))
    base = dataclasses.replace(base, output_dir=out / "quick_base", runtime=config.runtime,
                               train=dataclasses.replace(base.train, steps=200, checkpoint_every=200))
    train.run(base)
    card = Card.open_base("checkpoint", str(base.output_dir), task=config.task.name)
    pcm = train_pcm.Config(
        base=card, runtime=config.runtime, output_dir=out / "quick_pcm_ddim10",
        settings=train_pcm.PctSettings(scheduler="ddim", steps=10, collect_batch=16, epochs=2),
        observations=train_pcm.ObservationSource(trajectories=16, held_out=2))
    train_pcm.run(pcm)
    return card, {"ddim10": str(pcm.output_dir)}


def run(config: Config) -> dict[str, Any]:
    """Closed-loop episodes under the controller, then a short bench; print and write a summary.

    Returns:
        The summary written to `output_dir/metrics.json`: closed-loop success/score, latency p50/p99 (ms),
        iterations, deadline misses, exact fraction; the bench rows; video and plot paths; wall time (s).

    Raises:
        CheckpointError: a PCM that does not fit the base.
    """
    t0 = time.perf_counter()
    task, out, device = config.task, config.output_dir, config.runtime.device
    card, pcm_lora, pcm, sampler_pcm = config.checkpoint, config.pcm_lora, config.pcm, config.sampler_pcm
    if card is None:
        out.mkdir(parents=True, exist_ok=True)
        card, pcm_lora = _stand_in(config)
        pcm, sampler_pcm = {}, pcm_lora.get(config.sampler.schedule)

    # 2-3: the sampler (auto: timed here), then closed loop under the controller.
    policy, _ = load_policy(card.path, device, expect_task=task.name)
    auto = None
    if isinstance(config.sampler, AutoSettings):
        settings = dataclasses.replace(config.sampler, pcm_checkpoint=sampler_pcm)
        observations = sample_observations(card.path, settings.chunks, settings.seed)
        sampler, auto = choose_sampler(policy, settings, observations, 1e3 / task.control_hz, device)
    else:
        sampler = load_sampler(policy, config.sampler, device, sampler_pcm, backend=config.backend)
    out.mkdir(parents=True, exist_ok=True)  # only once the inputs have loaded: bad input leaves no output
    ctrl = Controller(policy, sampler, ControllerConfig(control_hz=task.control_hz), seed=config.runtime.seed)
    run_ = run_controller_episodes(ctrl, task.env_id, task.max_steps, config.episodes, config.seed_start,
                                   video_prefix=out / "videos" / "demo", desc=f"closed loop ({sampler.label})")
    closed = summarize(run_.results, task.name)

    # 3: latency comparison on the same checkpoint (output space: a full PCM where given, else the LoRA one).
    chunks = {s: config.ddpm100_chunks if s == "ddpm100" else config.chunks for s in config.schedules}
    report = bench.run(bench.Config(
        task=task, checkpoint=card, schedules=config.schedules, backends=config.backends, pcm={**pcm_lora, **pcm},
        pcm_lora=pcm_lora, accelerated=_default_acceleration(), chunks=chunks, warmup=2, tols=[0.1], tol=0.1,
        deviation_bound=0.01, peak_gflops=None, window=None, stiffness=None,
        control_hz=task.control_hz, budget_ms=None, episodes=0, episodes_schedules=None,
        seed_start=config.seed_start, early_stop=False, early_stop_chunks=1, early_stop_episodes=0,
        observations=None, runtime=config.runtime, output_dir=out / "bench"), echo=False)

    chunks_run = run_.chunks
    warm = chunks_run[1:] or chunks_run  # without the very first chunk: it also pays the one-off warm-up
    summary = {"command": "demo", "task": task.name, "checkpoint": card.given, "sampler": sampler.label,
               "backend": sampler.backend, "auto": auto.to_dict() if auto else None,
               "closed_loop": {**closed, "chunks": len(chunks_run), **latency_summary(c.latency_ms for c in warm),
                               "iterations_mean": float(np.mean([c.iterations for c in chunks_run])),
                               "deadline_misses": int(sum(c.deadline_missed for c in chunks_run)),
                               "exact_fraction": float(np.mean([c.exact for c in chunks_run]))},
               "bench": report["rows"], "fastest": report["fastest"], "device": report["device"],
               "threads": report["threads"],
               "calibration": sampler.calibration.to_dict() if sampler.calibration is not None else None,
               "video": str(run_.video) if run_.video else None, "plot": str(out / "bench" / "bench.png"),
               "wall_s": round(time.perf_counter() - t0, 1)}
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2))
    print_summary(summary)
    return summary


def _default_acceleration() -> dict[str, dict]:
    """The bench's default `accelerated` settings (configs/bench.yaml), which the demo's comparison shows too."""
    return bench.accelerated_settings(compose_command("bench"), [])


def print_summary(s: Mapping[str, Any]) -> None:
    """Print `run`'s summary: auto's choice, the closed-loop line, the fastest exact row per schedule, the bench
    table (latencies in ms, per backend), output paths."""
    c = s["closed_loop"]
    print()
    print(f"== pcm demo: {s['task']} on {s['device']} ==")
    if s.get("auto"):
        a = s["auto"]["chosen"]
        timed = sum(e["p50_ms"] is not None for e in s["auto"]["candidates"])
        print(f"sampler=auto chose {a['sampler']}/{a['schedule']} (tol {a['tol']}) on {a['backend']}, "
              f"{a['threads']} thread(s): p50 {a['p50_ms']:.1f} ms, max deviation {a['max_dev']:.1e} "
              f"({timed} timed in {s['auto']['seconds']:.1f} s)")
    print(f"closed loop, {s['sampler']} [{s.get('backend', 'torch')}] under the real-time controller (simulated "
          f"clock), {c['episodes']} episodes:")
    if s.get("calibration"):
        for role, entry in s["calibration"]["denoisers"].items():
            print(f"  auto backend, {role} network: {entry['rule']}")
    print(f"  success {c['success_rate']:.2f}  score {c['score']:.3f}  iterations/chunk {c['iterations_mean']:.2f}  "
          f"latency p50 {c['latency_ms_p50']:.1f} ms p99 {c['latency_ms_p99']:.1f} ms  deadline misses "
          f"{c['deadline_misses']}/{c['chunks']}  exact chunks {c['exact_fraction']:.0%}")
    print()
    for f in s.get("fastest") or []:
        print(f"fastest exact {f['schedule']}: {f['sampler']} on {f['backend']} {f['latency_ms_p50']:.1f} ms p50, "
              f"{f['speedup_p50_vs_sequential']:.2f}x torch sequential ({f['sequential_ms_p50']:.1f} ms)")
    print()
    print(f"{'sampler':26s} {'backend':>7s} {'iters':>6s} {'p50 ms':>8s} {'p99 ms':>8s} {'misses':>8s} "
          f"{'speedup':>8s} {'GFLOP/s':>8s} {'max err':>9s}")
    for r in s["bench"]:
        speed, gflops = r.get("speedup_p50_vs_sequential"), r.get("gflops")
        print(f"{r['sampler'] + '/' + r['schedule']:26s} {r.get('backend', 'torch'):>7s} {r['iterations_mean']:6.2f} "
              f"{r['latency_ms_p50']:8.1f} {r['latency_ms_p99']:8.1f} "
              f"{str(r['deadline_misses']) + '/' + str(r['chunks']):>8s} {(f'{speed:.2f}x' if speed else ''):>8s} "
              f"{(f'{gflops:.1f}' if gflops else ''):>8s} {r['max_abs_err_vs_sequential']:9.1e}")
    print()
    if s["video"]:
        print(f"video: {s['video']}")
    print(f"plot: {s['plot']}")
    print(f"metrics: {Path(s['plot']).parent.parent / 'metrics.json'}  ({s['wall_s']:.0f} s)")
