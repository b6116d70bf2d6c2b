"""`pcm bench`: latency at control frequency, side by side, on one checkpoint, observations and noise
(`configs/bench.yaml`).

For each sampling schedule (`schedules`) and backend (`backends`: torch, onnx, auto): sequential, Picard, PCM
(output-space switching) and PCM-LoRA (weight-space switching), the PCM rows only where a PCM trained for that
schedule is given, and every iterative row again with the schedule's `accelerated` settings. Every row samples the
same `chunks` (observation, noise) pairs at batch 1; deviations are measured against the torch sequential sampler of
the same schedule; a chunk slower than the control-period budget is a deadline miss. The summary gives, per
schedule, the fastest exact row in milliseconds and its speed-up over torch sequential; every row its achieved
GFLOP/s against the core's peak (`peak_gflops`). Optional studies (on the torch rows): closed-loop episodes per row
under the real-time controller, and the early-stop study (iterations capped at 1, 2, 3).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from pcm_policy.atomic import atomic_write_text
from pcm_policy.auto_sampler import check_backends
from pcm_policy.backends import check_backend
from pcm_policy.benchmark.flops import PEAK_MATMUL_SIZE, PEAK_REPEATS, measure_peak_gflops
from pcm_policy.benchmark.measure import measure_rows
from pcm_policy.benchmark.report import add_speedups, fastest_exact, markdown_table, plot, plot_sweep, sweep_summary
from pcm_policy.benchmark.rows import build_rows, encode_observations, graphed_rows
from pcm_policy.benchmark.studies import EpisodeSettings, closed_loop_rows, early_stop_study
from pcm_policy.checkpoint import Card, load_policy
from pcm_policy.errors import ConfigError
from pcm_policy.observations import check_dataset, load_observations, rollout_observations, sample_observations
from pcm_policy.options import (check_int, check_list, check_mapping, check_number, flag, integer, lookup, number,
                                output_dir, renamed, show, text)
from pcm_policy.paths import resolve_path
from pcm_policy.runtime import RuntimeOptions
from pcm_policy.sampler_config import SamplerConfig, check_schedules
from pcm_policy.tasks import TaskOptions


@dataclass(frozen=True)
class Config:
    """A checked `pcm bench` config (see `configs/bench.yaml` for each key).

    Attributes:
        task: the task (its env for closed-loop studies, its control rate).
        checkpoint: the base policy's card.
        schedules: sampling schedules, e.g. [ddpm100, ddim10].
        backends: the runtimes every row runs on, e.g. [torch, onnx, auto] (the torch sequential row always runs:
            the reference).
        pcm: schedule -> PCM checkpoint of the output-space switching rows (schedules listed only).
        pcm_lora: schedule -> LoRA PCM checkpoint of the weight-space switching rows.
        accelerated: schedule -> acceleration settings of its `+aa` rows.
        chunks: chunks per row, by schedule.
        warmup: untimed chunks per row.
        tols: the tolerance sweep: every iterative row once per tol (the accuracy-matched comparison).
        tol: the tolerance of the rows the studies and bench.png use (added to the sweep when not in it).
        deviation_bound: the p99 deviation from torch sequential at which rows count as exact (the summaries).
        peak_gflops: the core's fp32 peak in GFLOP/s (None: measured at start, `measure_peak_gflops`).
        window, stiffness: the iterative rows' window and switching stiffness.
        control_hz: the control frequency; budget_ms the per-chunk deadline (default one control period).
        episodes: closed-loop episodes per row (0: none), for `episodes_schedules` (None: all).
        seed_start: the first closed-loop reset seed.
        early_stop: run the early-stop study, over `early_stop_chunks` chunks and `early_stop_episodes` episodes.
        observations: where observation histories come from: None (the checkpoint's dataset), a safetensors file,
            or `closed_loop` (rollouts of the policy itself, for a checkpoint that records no dataset).
        runtime: seed (observation draw and noise), device, threads.
        output_dir: where bench.json, bench.md, bench.png and metrics.json go.
        interleave: time the rows chunk by chunk (a burst of load on a shared machine hits every row alike).
    """

    task: TaskOptions
    checkpoint: Card
    schedules: list[str]
    backends: list[str]
    pcm: dict[str, str]
    pcm_lora: dict[str, str]
    accelerated: dict[str, dict]
    chunks: dict[str, int]
    warmup: int
    tols: list[float]
    tol: float
    deviation_bound: float
    peak_gflops: float | None
    window: int | None
    stiffness: float | None
    control_hz: float
    budget_ms: float | None
    episodes: int
    episodes_schedules: list[str] | None
    seed_start: int
    early_stop: bool
    early_stop_chunks: int
    early_stop_episodes: int
    observations: str | None
    runtime: RuntimeOptions
    output_dir: Path
    interleave: bool = True

    @classmethod
    def from_hydra(cls, cfg: Mapping[str, Any]) -> "Config":
        """Check every option of a composed `bench` config against the checkpoint cards, before any work.

        The deprecated keys `bases`, `chunks_by_base` and `episodes_bases` still work (with a warning) for one
        release.

        Raises:
            ConfigError: a key of the wrong type or range, a schedule beyond the policy's T or listed twice, an
                unknown `accelerated` key, an unknown backend or one listed twice, a backend that cannot run here
                (onnx on CUDA as `backend=`, onnxruntime missing), or an unregistered env when episodes run.
            CheckpointError: an unreadable checkpoint, a PCM as the base, a base for another task, or a non-PCM
                in a PCM map.
            DatasetError: the checkpoint's dataset is missing (when no observation file is given).
        """
        runtime = RuntimeOptions.from_mapping(cfg)
        backends = bench_backends(cfg, runtime.device)
        episodes = integer(cfg, "episodes", 0)
        early_stop = flag(cfg, "early_stop")
        early_episodes = integer(cfg, "early_stop_episodes", 0)
        task = TaskOptions.from_mapping(lookup(cfg, "task"))
        out = output_dir(cfg)
        card = Card.open_base("checkpoint", lookup(cfg, "checkpoint", None), task=task.name)
        observations = text(cfg, "observations", null=True)
        if observations is None:
            check_dataset(card.path, instead="observations=closed_loop or observations=<file>")
        elif observations != "closed_loop" and not resolve_path(observations).is_file():
            raise ConfigError(f"observations={observations}: no such file (a safetensors file of observation "
                              "histories, closed_loop, or null for the checkpoint's dataset)")
        if episodes > 0 or (early_stop and early_episodes > 0) or observations == "closed_loop":
            from pcm_policy.rollout.env import check_registered  # gymnasium only when episodes or rollouts run

            card.check_closed_loop()
            task = dataclasses.replace(task, env_id=task.env_for(card.observation_kind, card.observation_parts))
            check_registered(task.env_id)
        key, value = renamed(cfg, "bases", "schedules")
        schedules = check_schedules(key, value, card.num_train_timesteps, card.path)
        chunks = integer(cfg, "chunks", 1)
        key, by_schedule = renamed(cfg, "chunks_by_base", "chunks_by_schedule")
        by_schedule = check_mapping(key, by_schedule, f"{key}.ddpm100=200")
        for s, n in by_schedule.items():
            check_int(f"{key}.{s}", n, 1, null=True)
        key, chosen = renamed(cfg, "episodes_bases", "episodes_schedules")
        chosen = check_list(key, chosen, "[ddim10]", null=True)
        if chosen is not None and not set(chosen) <= set(schedules):
            raise ConfigError(f"{key}={show(chosen)}: expected a list drawn from schedules={schedules} or null")
        return cls(
            task=task, checkpoint=card, schedules=schedules,
            backends=backends,
            pcm=pcm_map(cfg, "pcm", schedules), pcm_lora=pcm_map(cfg, "pcm_lora", schedules),
            accelerated=accelerated_settings(cfg, schedules),
            chunks={s: by_schedule.get(s) or chunks for s in schedules}, warmup=integer(cfg, "warmup", 0),
            tols=tolerances(cfg), tol=number(cfg, "tol", 0),
            deviation_bound=number(cfg, "deviation_bound", 0, low_open=True),
            peak_gflops=number(cfg, "peak_gflops", 0, low_open=True, null=True),
            window=integer(cfg, "window", 1, null=True),
            stiffness=number(cfg, "stiffness", 0, low_open=True, null=True),
            control_hz=number(cfg, "control_hz", 0, low_open=True),
            budget_ms=number(cfg, "budget_ms", 0, low_open=True, null=True), episodes=episodes,
            episodes_schedules=chosen, seed_start=integer(cfg, "seed_start", 0), early_stop=early_stop,
            early_stop_chunks=integer(cfg, "early_stop_chunks", 1), early_stop_episodes=early_episodes,
            observations=observations, runtime=runtime, output_dir=out, interleave=flag(cfg, "interleave"))


def tolerances(cfg: Mapping[str, Any]) -> list[float]:
    """The sweep's tolerances (`tols`): a non-empty list of distinct numbers >= 0, loosest first.

    Raises:
        ConfigError: not a non-empty list, a bad entry, or one listed twice.
    """
    values = check_list("tols", lookup(cfg, "tols"), "[0.3,0.1,0.03,0.01]")
    tols = [check_number(f"tols.{i}", v, 0) for i, v in enumerate(values)]
    if len(set(tols)) != len(tols):
        raise ConfigError(f"tols={values}: lists a tolerance twice")
    return sorted(tols, reverse=True)


def pcm_map(cfg: Mapping[str, Any], key: str, schedules: list[str]) -> dict[str, str]:
    """A mapping schedule -> PCM checkpoint or null (`pcm`, `pcm_lora`); the PCMs of listed schedules must be PCM
    checkpoints. Whether each suits its row (schedule, LoRA) is the bench's call: it skips a row with the reason.

    Returns:
        The schedules listed in `schedules` that have a PCM, mapped to it.

    Raises:
        ConfigError: not a mapping, or a value that is not a path.
        CheckpointError: an unreadable checkpoint or not a PCM.
    """
    value = check_mapping(key, lookup(cfg, key, None), f"{key}.ddim10=<PCM checkpoint>")
    for s, path in value.items():
        if path is not None and not isinstance(path, str):
            raise ConfigError(f"{key}.{s}={show(path)}: expected a checkpoint path or null")
        if path and s in schedules:
            Card.open_pcm(f"{key}.{s}", path)
    return {s: p for s, p in value.items() if p and s in schedules}


def accelerated_settings(cfg: Mapping[str, Any], schedules: list[str]) -> dict[str, dict]:
    """The `accelerated` mapping schedule -> acceleration settings (or null), each checked as sampler keys.

    Raises:
        ConfigError: not a mapping, an entry that is not a mapping, an unknown key or a bad value.
    """
    value = check_mapping("accelerated", lookup(cfg, "accelerated", None),
                          "accelerated.ddim10.memory=3 (schedule -> settings)")
    out = {}
    for s, settings in value.items():
        if settings is None:
            continue
        SamplerConfig().with_acceleration(settings, f"accelerated.{s}")
        out[s] = dict(settings)
    return out


def bench_backends(cfg: Mapping[str, Any], device) -> list[str]:
    """The backends every row runs on: `backends` (a list), or `backend=X` as a shorthand for `backends=[X]`.

    Raises:
        ConfigError: a bad list (`check_backends`), or a `backend=` that cannot run here (`check_backend`: onnx on
            CUDA, onnxruntime missing).
    """
    backend = lookup(cfg, "backend", None)
    if backend is not None:
        return [check_backend(backend, device)]
    return check_backends("backends", lookup(cfg, "backends"), device)


def usable_backends(backends: list[str], device) -> tuple[list[str], list[str]]:
    """The backends the bench runs on `device`, and a note per backend left out: on CUDA only torch (with CUDA
    graphs, the `+graph` rows); onnxruntime's CPU provider is the CPU's runtime."""
    if device.type != "cuda":
        return list(backends), []
    dropped = [b for b in backends if b != "torch"]
    return ["torch"], [f"backend {b}: CPU only (on CUDA the bench runs torch with CUDA graphs, the +graph rows)"
                       for b in dropped]


def peak_estimate(given: float | None, threads: int, device) -> tuple[float | None, str]:
    """The fp32 peak in GFLOP/s and how it was obtained: `given` (the `peak_gflops` option), else measured on the
    CPU (`measure_peak_gflops`); on CUDA only a given one (a CPU matrix product says nothing of a GPU)."""
    if given is not None:
        return float(given), "given (peak_gflops)"
    if device.type == "cuda":
        return None, "not measured on CUDA (set peak_gflops)"
    measured = measure_peak_gflops()
    return measured, (f"measured: best of {PEAK_REPEATS} {PEAK_MATMUL_SIZE}x{PEAK_MATMUL_SIZE} fp32 matrix products "
                      f"at {threads} thread{'s' if threads != 1 else ''}, CPU time")


def network_flops(rows) -> dict[str, int]:
    """FLOPs per network row of each network the rows run: the base, and each LoRA PCM with its adapters."""
    flops = {}
    for row in rows:
        key = f"LoRA PCM {row.schedule}" if row.config.name == "pcm_lora" else "base"
        flops.setdefault(key, row.flops_row)
    return flops


def auto_routing(rows) -> dict[str, Any] | None:
    """What `backend=auto` measured on this machine (its routers are shared by the rows): per denoiser (`base`, and
    `pcm <schedule>` per PCM) the rule and the table of row counts with torch and onnx ms; None without auto rows."""
    routing: dict[str, Any] = {}
    for row in rows:
        calibration = row.sampler.calibration if row.backend == "auto" else None
        if calibration is None:
            continue
        record = calibration.to_dict()
        routing["threads"] = record["threads"]
        for role, entry in record["denoisers"].items():
            routing.setdefault("denoisers", {})[role if role == "base" else f"{role} {row.schedule}"] = entry
    return routing or None


def run(config: Config, echo: bool = True) -> dict[str, Any]:
    """Time every row, compare outputs, run the studies; write `bench.json`, `bench.md`, `bench.png`,
    `metrics.json` and (with `echo`) print the table and the file paths.

    Returns:
        The report written to `bench.json`: rows (backend, latency p50/p99 in ms, iterations, deviation from torch
        sequential in normalized action units, deadline misses against the budget in ms, GFLOP/s, optional
        success/score), `fastest` (the fastest exact row per schedule in ms and its speed-up over torch
        sequential), `flops_per_row`, `peak_gflops` and `peak_source`, the tolerance sweep's summary, the
        early-stop study, skipped rows.

    Raises:
        CheckpointError: a PCM that does not fit the base (nothing is written then).
        DatasetError: the checkpoint's dataset cannot be read.
    """
    device, seed = config.runtime.device, config.runtime.seed
    threads = torch.get_num_threads()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({threads} intra-op threads)"
    print(f"device: {device_name}; torch threads: {threads}")
    policy, card = load_policy(config.checkpoint.path, device, expect_task=config.task.name)
    budget_ms = config.budget_ms or 1e3 / config.control_hz
    n = max(config.chunks.values())
    if config.observations == "closed_loop":
        observations = rollout_observations(policy, config.task.env_id, config.task.max_steps, n, seed)
    elif config.observations is not None:
        observations = load_observations(config.observations)[:n]
    else:
        observations = sample_observations(config.checkpoint.path, n, seed)
    tols = sorted(set(config.tols) | {config.tol}, reverse=True)
    backends, skipped = usable_backends(config.backends, device)
    rows, skipped_rows = build_rows(policy, config.schedules, tols, config.window, config.stiffness, config.pcm,
                                    config.pcm_lora, config.accelerated, device, backends)
    skipped += skipped_rows
    out = config.output_dir
    out.mkdir(parents=True, exist_ok=True)  # only once the inputs have loaded: bad input leaves no output
    for reason in skipped:
        print(f"skipped {reason}")
    if device.type == "cuda":
        rows += graphed_rows(policy, rows)
    else:
        skipped.append("cuda-graph rows: no CUDA device on this machine")
        print("skipped cuda-graph rows: no CUDA device on this machine")
    peak, peak_source = peak_estimate(config.peak_gflops, threads, device)

    encoded = encode_observations(policy, observations)
    results, references = measure_rows(policy, rows, encoded, config.chunks, seed, config.warmup, budget_ms,
                                       device_name, threads, peak, config.interleave)
    episodes = EpisodeSettings(config.task.name, config.task.env_id, config.task.max_steps, config.control_hz,
                               config.budget_ms, seed, config.seed_start)
    # the latency plot: the sequential rows and the iterative rows at `tol`; the studies: those of one backend (the
    # others give the same chunks to within 1e-4)
    plotted = [i for i, row in enumerate(rows) if row.config.name == "sequential" or row.config.tol == config.tol]
    study_backend = "torch" if "torch" in backends else backends[0]
    studied = [i for i in plotted if rows[i].backend == study_backend]
    if config.episodes > 0:
        closed_loop_rows(policy, [rows[i] for i in studied], [results[i] for i in studied], episodes,
                         config.episodes, config.episodes_schedules)
    early = (early_stop_study(policy, [rows[i] for i in studied], encoded.conds, references, config.early_stop_chunks,
                              seed, episodes, config.early_stop_episodes, config.episodes_schedules)
             if config.early_stop else [])
    add_speedups(results)
    sweep = sweep_summary(results, config.deviation_bound) if len(tols) > 1 else []
    report = {"command": "bench", "task": card["task"], "checkpoint": str(config.checkpoint.given),
              "device": device_name, "threads": threads, "control_hz": config.control_hz, "budget_ms": budget_ms,
              "backends": backends, "tols": tols, "deviation_bound": config.deviation_bound,
              "flops_per_row": network_flops(rows), "peak_gflops": peak, "peak_source": peak_source,
              "fastest": fastest_exact(results, config.deviation_bound), "auto_routing": auto_routing(rows),
              "rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results],
              "sweep": sweep, "early_stop": early, "skipped": skipped}
    atomic_write_text(out / "bench.json", json.dumps(report, indent=2))
    atomic_write_text(out / "bench.md", markdown_table(report))
    summary = {k: report[k] for k in ("command", "task", "device", "threads", "backends")}
    atomic_write_text(out / "metrics.json",
                      json.dumps(summary | {"rows": len(results), "bench": str(out / "bench.json")}, indent=2))
    plot([results[i] for i in plotted], out / "bench.png", budget_ms)
    plots = ["bench.png"]
    if sweep:
        plot_sweep(results, out / "bench_sweep.png")
        plots.append("bench_sweep.png")
    if echo:
        print((out / "bench.md").read_text())
        for name in ("bench.json", "bench.md", *plots):
            print(f"{name}: {out / name}")
    return report
