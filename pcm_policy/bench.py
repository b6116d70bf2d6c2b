"""`pcm bench`: latency at control frequency, side by side, on one checkpoint, observations and noise.

Rows: for each base schedule (DDPM-100, DDIM-10, DDIM-16): sequential, Picard, PCM (output-space switching)
and PCM-LoRA (weight-space switching), the PCM rows only where a PCM trained for that schedule is given.
Every row samples the same `chunks` (observation, noise) pairs at batch 1; errors are measured against the
sequential sampler of the same schedule. A chunk slower than the control-period budget is a deadline miss.
With `episodes > 0`, each row also runs closed-loop episodes under the real-time controller (simulated clock).
An early-stop study caps the iterations at 1, 2, 3 (PCM vs Picard) against DDIM with that many steps (action
error, and closed-loop success with `early_stop_episodes > 0`).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from pcm_policy.atomic import atomic_write_text
from pcm_policy.checkpoint import load_policy
from pcm_policy.chunk_sampler import ChunkSampler
from pcm_policy.config import require_int, resolve_path
from pcm_policy.errors import ConfigError
from pcm_policy.latency import latency_summary
from pcm_policy.pcm.attach import load_pcm, pcm_denoiser
from pcm_policy.runtime import resolve_device
from pcm_policy.sampler_config import SamplerConfig

def parse_base(name: str) -> tuple[str, int]:
    """Split a schedule name: `ddpm100` -> ("ddpm", 100), `ddim10` -> ("ddim", 10).

    Raises:
        ConfigError: not `ddpm<S>` / `ddim<S>` with S >= 1.
    """
    import re

    m = re.fullmatch(r"(ddpm|ddim)(\d+)", str(name))
    if not m or int(m.group(2)) < 1:
        raise ConfigError(f"bases: {name!r} is not a schedule name like ddpm100 or ddim10")
    return m.group(1), int(m.group(2))


def bench_observations(ckpt_path, n: int, seed: int) -> torch.Tensor:
    """Observation histories from the policy's own dataset, shuffled with `seed` and cycled to n.

    Args:
        ckpt_path: the base checkpoint (or its run directory).
        n: number of histories.
        seed: shuffle seed.

    Returns:
        (n, To, Do) float32 in env units.

    Raises:
        CheckpointError: no checkpoint or no run config at `ckpt_path`.
        DatasetError: the checkpoint's dataset is missing or unreadable.
    """
    from pcm_policy.checkpoint import resolve_checkpoint
    from pcm_policy.data.windows import checkpoint_observations

    train_obs, val_obs = checkpoint_observations(resolve_checkpoint(ckpt_path))
    obs = torch.cat([val_obs, train_obs])
    order = torch.randperm(len(obs), generator=torch.Generator().manual_seed(seed))
    return obs[order[torch.arange(n) % len(obs)]]


class Row:
    """One bench row: a `ChunkSampler` on one base schedule (`ddim10`, ...), eager or CUDA-graph replayed.

    Args:
        sampler: the row's sampler.
        base: the schedule name, e.g. `ddim10`.
        pcm_path: the PCM checkpoint of a switching row (None otherwise).
        graph: the row's denoisers are CUDA-graph replayed.
    """

    def __init__(self, sampler: ChunkSampler, base: str, pcm_path: str | None = None, graph: bool = False):
        self.sampler, self.base, self.pcm_path, self.graph = sampler, base, pcm_path, graph

    @property
    def config(self) -> SamplerConfig:
        """The row's sampler config."""
        return self.sampler.config

    @property
    def name(self) -> str:
        """Label for tables and progress bars, e.g. `pcm_lora+graph/ddim10`."""
        return f"{self.config.variant}{'+graph' if self.graph else ''}/{self.base}"


def graphed_rows(policy, rows: list[Row]) -> list[Row]:
    """CUDA-graph variants of every row, each denoiser captured once per input shape and replayed.

    The sequential rows are the honest baseline: their batch-1 calls have one fixed shape, so a graphed sequential
    sampler replays one graph per step; the Picard rows use fixed-shape (padded) windows.

    Args:
        policy: the base policy (its training noise schedule).
        rows: the eager rows.

    Returns:
        One graphed `Row` per row.
    """
    from pcm_policy.sampling.cuda_graph import GraphedDenoiser

    out = []
    for row in rows:
        s = row.sampler
        config = dataclasses.replace(row.config, fixed_shape=True)
        graphed = ChunkSampler(config, policy.noise_scheduler.config, GraphedDenoiser(s.base),
                               GraphedDenoiser(s.pcm) if s.pcm else None, s.sample_shape, s.device)
        out.append(Row(graphed, row.base, row.pcm_path, graph=True))
    return out


def accelerated_config(cfg: Mapping[str, Any], base: str, common: Mapping[str, Any]) -> dict[str, Any] | None:
    """The acceleration/start settings of the extra `+aa` rows of one base (`accelerated.<base>`), or None."""
    extra = (cfg.get("accelerated") or {}).get(base)
    if not extra:
        return None
    return {**common, **dict(extra)}


def build_rows(policy, cfg: Mapping[str, Any], device) -> tuple[list[Row], list[str]]:
    """The bench rows for every base schedule.

    Sequential, Picard, PCM, PCM-LoRA, and each iterative row again with the base's `accelerated` settings
    (Anderson acceleration, noise-carrying start).

    Args:
        policy: the base policy.
        cfg: the `bench` config (bases, tol, window, stiffness, pcm.<base>, pcm_lora.<base>, accelerated.<base>).
        device: where PCMs are loaded.

    Returns:
        (rows, skipped): the rows, and one reason per PCM row that could not be built (no checkpoint given, a
        PCM for another schedule, a full PCM for weight-space switching).

    Raises:
        ConfigError: an invalid base name or sampler setting.
        CheckpointError: a PCM checkpoint that is missing, corrupt or for another base.
    """
    rows, skipped = [], []
    for base in cfg["bases"]:
        kind, steps = parse_base(base)
        common = dict(scheduler=kind, steps=steps, tol=cfg["tol"], window=cfg.get("window"))
        variants = [common] + [v for v in [accelerated_config(cfg, base, common)] if v]
        rows.append(Row(policy.sampler(SamplerConfig(name="sequential", scheduler=kind, steps=steps)), base))
        for variant in variants:
            rows.append(Row(policy.sampler(SamplerConfig(name="picard", **variant)), base))
        for name in ("pcm", "pcm_lora"):
            path = (cfg.get(name) or {}).get(base)
            if not path:
                skipped.append(f"{name}/{base}: no PCM checkpoint given ({name}.{base}=...)")
                continue
            net, card = load_pcm(resolve_path(path), policy, device)
            if (card["scheduler"], card["steps"]) != (kind, steps):
                skipped.append(f"{name}/{base}: {path} was trained for {card['scheduler']}{card['steps']}")
                continue
            if name == "pcm_lora" and card["mode"] != "lora":
                skipped.append(f"{name}/{base}: {path} is a full PCM (weight-space switching needs LoRA)")
                continue
            pcm = pcm_denoiser(net, name)
            for variant in variants:  # a PCM starts from the X^0 it was trained from
                variant = {**variant, "start": card.get("start", "x_T")}
                config = SamplerConfig(name=name, stiffness=cfg.get("stiffness"), **variant)
                rows.append(Row(policy.sampler(config, pcm=pcm), base, str(path)))
    return rows, skipped


@torch.no_grad()
def time_row(policy, row: Row, observations: torch.Tensor, noise_seed: int, warmup: int, max_iters=None,
             progress: bool = True):
    """Latency, stats and outputs of `row` over all observations (batch 1, same noise per chunk index).

    Args:
        policy: the base policy (its `global_cond`).
        row: the row to time.
        observations: (n, To, Do) float32 in env units.
        noise_seed: chunk i uses the noise of seed noise_seed + i.
        warmup: untimed chunks run first (on observation 0).
        max_iters: caps the Picard rounds (early-stop study); None: the config's.
        progress: show a progress bar.

    Returns:
        (x0 (n, H, Da) normalized actions on the CPU, latencies (n,) ms, iterations (n,), evaluations (n,),
        converged (n,) bool), numpy arrays except x0.
    """
    sampler = row.sampler
    conds = policy.global_cond(observations.to(policy.device))
    outputs, latencies, iterations, evaluations, converged = [], [], [], [], []
    n = len(observations)
    bar = tqdm(range(-warmup, n), desc=row.name, unit="chunk", disable=not progress, dynamic_ncols=True, leave=False)
    for i in bar:
        j = max(i, 0)
        x_T, noise = sampler.make_noise(1, torch.Generator().manual_seed(noise_seed + j))
        t0 = time.perf_counter()
        x0, stats = sampler.sample(x_T, noise, conds[j:j + 1], max_iters=max_iters)
        if x0.is_cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if i < 0:
            continue
        latencies.append(dt * 1e3)
        iterations.append(stats.iterations)
        evaluations.append(stats.evaluations)
        converged.append(stats.converged)
        outputs.append(x0.cpu())
    return torch.cat(outputs), np.asarray(latencies), np.asarray(iterations), np.asarray(evaluations), np.asarray(converged)


def run_bench(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """`pcm bench`: time every row, compare outputs, write `bench.json`, `bench.md`, `bench.png`, `metrics.json`.

    Args:
        cfg: the composed `bench` config (checkpoint, bases, chunks, control_hz, budget_ms, episodes, ...).

    Returns:
        The report written to `bench.json`: rows (latency p50/p99 in ms, iterations, errors vs sequential in
        normalized action units, deadline misses against the budget in ms, optional success/score), the
        early-stop study, skipped rows.

    Raises:
        ConfigError: no checkpoint, a count out of range, or an invalid sampler setting.
        CheckpointError: an unusable base or PCM checkpoint (nothing is written then).
    """
    from pcm_policy.validation import validate_bench

    validate_bench(cfg)  # every option, against the checkpoint cards, before any work
    device = resolve_device(cfg.get("device"))
    threads = torch.get_num_threads()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({threads} intra-op threads)"
    print(f"device: {device_name}; torch threads: {threads}")
    if not cfg.get("checkpoint"):
        raise ConfigError("checkpoint: no base checkpoint given (checkpoint=<run or checkpoint dir>)")
    for key, low in (("chunks", 1), ("warmup", 0), ("seed", 0), ("episodes", 0), ("early_stop_episodes", 0)):
        require_int(key, cfg.get(key, low), low)
    ckpt_path = resolve_path(cfg["checkpoint"])
    policy, card = load_policy(ckpt_path, device, expect_task=cfg["task"]["name"])
    out = Path(cfg["output_dir"])
    period_ms = 1e3 / cfg["control_hz"]
    budget_ms = cfg.get("budget_ms") or period_ms
    observations = bench_observations(ckpt_path, cfg["chunks"], cfg["seed"])
    rows, skipped = build_rows(policy, cfg, device)
    out.mkdir(parents=True, exist_ok=True)  # only once the inputs have loaded: bad input leaves no output
    for reason in skipped:
        print(f"skipped {reason}")
    if device.type == "cuda":
        rows += graphed_rows(policy, rows)
    else:
        skipped.append("cuda-graph rows: no CUDA device on this machine")
        print("skipped cuda-graph rows: no CUDA device on this machine")

    results, references = [], {}
    chunks_by_base = cfg.get("chunks_by_base") or {}
    for row in rows:
        n = min(int(chunks_by_base.get(row.base) or cfg["chunks"]), len(observations))
        x0, lat, iters, evals, conv = time_row(policy, row, observations[:n], cfg["seed"], cfg["warmup"])
        if row.config.name == "sequential" and not row.graph:
            references[row.base] = x0
        if row.base in references:  # per chunk: its largest action deviation from the sequential sample
            chunk_err = (x0 - references[row.base]).abs().flatten(1).amax(dim=1).numpy()
            err, err_p99 = float(chunk_err.max()), float(np.percentile(chunk_err, 99))
        else:
            err = err_p99 = float("nan")
        c = row.config
        iterative = c.name != "sequential"
        results.append({
            "sampler": c.variant + ("+graph" if row.graph else ""), "base": row.base, "algorithm": c.name,
            "accel": c.accel if iterative else None, "start": c.start if iterative else None,
            "memory": c.memory if c.accel == "anderson" else None,
            "damping": c.damping if c.accel == "anderson" else None,
            "triangular": c.triangular if c.accel == "anderson" else None,
            "graph": row.graph, "window": c.window or c.steps,
            "tol": c.tol if iterative else None, "chunks": len(lat),
            "iterations_mean": float(iters.mean()), "evaluations_mean": float(evals.mean()),
            **latency_summary(lat), "max_abs_err_vs_sequential": err,
            "abs_err_p99_vs_sequential": err_p99,
            "exact_fraction": float(conv.mean()), "deadline_misses": int((lat > budget_ms).sum()),
            "budget_ms": budget_ms, "device": device_name, "threads": threads, "pcm_checkpoint": row.pcm_path,
            "_latencies": lat,
        })
        print(f"{row.name:20s} p50 {results[-1]['latency_ms_p50']:7.1f} ms  p99 {results[-1]['latency_ms_p99']:7.1f} ms  "
              f"iters {results[-1]['iterations_mean']:5.2f}  err {err:.2e}")

    if cfg.get("episodes", 0) > 0:
        _closed_loop(policy, rows, results, cfg)
    early = _early_stop_study(policy, rows, observations, references, cfg) if cfg.get("early_stop") else []
    _add_speedups(results)
    report = {"command": "bench", "task": card["task"], "checkpoint": str(ckpt_path), "device": device_name,
              "threads": threads, "control_hz": cfg["control_hz"], "budget_ms": budget_ms,
              "rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results],
              "early_stop": early, "skipped": skipped}
    atomic_write_text(out / "bench.json", json.dumps(report, indent=2))
    atomic_write_text(out / "bench.md", markdown_table(report))
    atomic_write_text(out / "metrics.json", json.dumps({k: report[k] for k in ("command", "task", "device", "threads")}
                                                       | {"rows": len(results), "bench": str(out / "bench.json")}, indent=2))
    plot(results, out / "bench.png", budget_ms)
    return report


def _add_speedups(results: list[dict]) -> None:
    """Each row's p50 speed-up against the sequential row of its base and mode (a `+graph` row against the
    CUDA-graph sequential sampler: the honest baseline), and its iteration ratio against plain Picard."""
    seq = {(r["base"], r["graph"]): r for r in results if r["algorithm"] == "sequential"}
    picard = {r["base"]: r for r in results if r["sampler"] == "picard"}
    for r in results:
        s = seq.get((r["base"], r["graph"]))
        r["speedup_p50_vs_sequential"] = s["latency_ms_p50"] / r["latency_ms_p50"] if s else None
        p = picard.get(r["base"])
        r["iteration_ratio_vs_picard"] = p["iterations_mean"] / r["iterations_mean"] if p else None


def _episodes(policy, sampler: ChunkSampler, cfg, n: int, desc: str) -> dict[str, Any]:
    """Closed-loop episodes under the real-time controller (simulated clock); success/score summary."""
    from pcm_policy.control import Controller, ControllerConfig
    from pcm_policy.control.episodes import run_controller_episodes
    from pcm_policy.episodes import summarize

    task = cfg["task"]
    ctrl = Controller(policy, sampler, ControllerConfig(control_hz=cfg["control_hz"], budget_ms=cfg.get("budget_ms")),
                      seed=cfg["seed"])
    run = run_controller_episodes(ctrl, task["env_id"], task["max_steps"], n, cfg["seed_start"],
                                  desc=f"closed loop {desc}")
    s = summarize(run.results, task["name"])
    return {"success_rate": s["success_rate"], "score": s["score"], "episodes": s["episodes"]}


def _closed_loop(policy, rows: list[Row], results: list[dict], cfg) -> None:
    bases = cfg.get("episodes_bases")
    for row, result in zip(rows, results):
        if row.graph:  # same outputs as the eager row; closed-loop figures would repeat it
            continue
        if bases is not None and row.base not in bases:
            continue
        result.update(_episodes(policy, row.sampler, cfg, cfg["episodes"], row.name))


def _early_stop_study(policy, rows: list[Row], observations, references, cfg) -> list[dict]:
    """Anytime quality: each iterative sampler capped at 1, 2, 3 sequential rounds against DDIM with as many steps.

    Action error against the sequential sampler of the row's schedule, for every schedule benchmarked; with
    `early_stop_episodes > 0` also closed-loop success of the capped samplers (simulated clock).
    """
    n_ep = int(cfg.get("early_stop_episodes") or 0)
    bases = cfg.get("episodes_bases")
    study, ddim_loop = [], {}
    for base, ref_all in references.items():
        n = min(len(ref_all), cfg.get("early_stop_chunks", 100))
        ref = ref_all[:n]
        closed = n_ep > 0 and (bases is None or base in bases)
        for cap in (1, 2, 3):
            for row in rows:
                if row.base != base or row.config.name == "sequential" or row.graph:
                    continue
                x0, *_ = time_row(policy, row, observations[:n], cfg["seed"], 0, max_iters=cap, progress=False)
                entry = {"rounds": cap, "sampler": row.name, "reference": f"sequential/{base}",
                         "mean_abs_err": float((x0 - ref).abs().mean())}
                if closed:
                    capped = policy.sampler(dataclasses.replace(row.config, max_iters=cap), pcm=row.sampler.pcm)
                    entry.update(_episodes(policy, capped, cfg, n_ep, f"{row.name} <= {cap} rounds"))
                study.append(entry)
            ddim = Row(policy.sampler(SamplerConfig(name="sequential", scheduler="ddim", steps=cap)), f"ddim{cap}")
            x0, *_ = time_row(policy, ddim, observations[:n], cfg["seed"], 0, progress=False)
            entry = {"rounds": cap, "sampler": f"sequential/ddim{cap}", "reference": f"sequential/{base}",
                     "mean_abs_err": float((x0 - ref).abs().mean())}
            if closed:
                if cap not in ddim_loop:  # the same sampler whatever the reference: run its episodes once
                    ddim_loop[cap] = _episodes(policy, ddim.sampler, cfg, n_ep, ddim.name)
                entry.update(ddim_loop[cap])
            study.append(entry)
    return study


def markdown_table(report: Mapping[str, Any]) -> str:
    """The report of `run_bench` as Markdown (`bench.md`): the row table, the early-stop table, skipped rows."""
    lines = [f"Device: {report['device']}; threads: {report['threads']}; control {report['control_hz']} Hz, "
             f"budget {report['budget_ms']:.0f} ms per chunk; checkpoint `{report['checkpoint']}`", "",
             "| sampler | base | window | tol | iterations | evaluations | p50 ms | p99 ms | speedup p50 | "
             "iter. ratio vs Picard | max abs err | p99 chunk err | deadline misses | success | score |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, f)  # noqa: E731
    for r in report["rows"]:
        lines.append(f"| {r['sampler']} | {r['base']} | {r['window']} | {fmt(r['tol'], 'g')} | {r['iterations_mean']:.2f} | "
                     f"{r['evaluations_mean']:.1f} | {r['latency_ms_p50']:.1f} | {r['latency_ms_p99']:.1f} | "
                     f"{fmt(r.get('speedup_p50_vs_sequential'), '.2f')} | {fmt(r.get('iteration_ratio_vs_picard'), '.2f')} | "
                     f"{r['max_abs_err_vs_sequential']:.2e} | {fmt(r.get('abs_err_p99_vs_sequential'), '.2e')} | {r['deadline_misses']}/{r['chunks']} | "
                     f"{fmt(r.get('success_rate'), '.2f')} | {fmt(r.get('score'), '.3f')} |")
    if report.get("early_stop"):
        lines += ["", "Early stop: iterations capped at 1, 2, 3 (mean abs action error vs the sequential sampler of the "
                  "same schedule, normalized units; closed-loop success/score where episodes were run):", "",
                  "| rounds | sampler | reference | mean abs err | success | score | episodes |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {e['rounds']} | {e['sampler']} | {e['reference']} | {e['mean_abs_err']:.4f} | "
                  f"{fmt(e.get('success_rate'), '.2f')} | {fmt(e.get('score'), '.3f')} | {e.get('episodes', '')} |"
                  for e in report["early_stop"]]
    for s in report.get("skipped", []):
        lines.append(f"\nskipped: {s}")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path, budget_ms: float) -> None:
    """Write `path` (PNG): per-row latency box plots (ms, log scale, budget line) and mean iterations per row.

    Args:
        results: `run_bench`'s rows, with their `_latencies` arrays (ms).
        path: the PNG to write.
        budget_ms: the per-chunk budget drawn as a line, in ms.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['sampler']}\n{r['base']}" for r in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, len(results) * 1.1), 4.5))
    ax1.boxplot([r["_latencies"] for r in results], showfliers=False)
    ax1.set_xticks(range(1, len(names) + 1), names, fontsize=7, rotation=45, ha="right")
    ax1.axhline(budget_ms, color="red", ls="--", lw=1, label=f"budget {budget_ms:.0f} ms")
    ax1.set_yscale("log")
    ax1.set_ylabel("latency per chunk (ms)")
    ax1.legend(fontsize=8)
    ax2.bar(range(len(names)), [r["iterations_mean"] for r in results], color="tab:blue")
    ax2.set_xticks(range(len(names)), names, fontsize=7, rotation=45, ha="right")
    ax2.set_ylabel("sequential rounds (network calls in sequence)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
