"""The bench report: speed-ups over torch sequential, the accuracy-matched summaries (the fastest exact row per
schedule in milliseconds; each sampler's rounds at the deviation bound), `bench.md` (Markdown tables), `bench.png`
(latency and rounds per row) and `bench_sweep.png` (rounds against deviation from sequential)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np


def _torch_sequential(results: list[dict]) -> dict[tuple[str, bool], dict]:
    """(schedule, graph) -> the torch sequential row of that schedule and mode: the baseline of every speed-up."""
    return {(r["schedule"], r["graph"]): r for r in results
            if r["algorithm"] == "sequential" and r.get("backend", "torch") == "torch"}


def add_speedups(results: list[dict]) -> None:
    """Each row's p50 speed-up against the torch sequential row of its schedule and mode (a `+graph` row against the
    CUDA-graph sequential sampler: the honest baseline), and its iteration ratio against plain Picard at the same
    tolerance on the same backend."""
    seq = _torch_sequential(results)
    picard = {(r["schedule"], r["tol"], r.get("backend")): r for r in results if r["sampler"] == "picard"}
    for r in results:
        s = seq.get((r["schedule"], r["graph"]))
        r["speedup_p50_vs_sequential"] = s["latency_ms_p50"] / r["latency_ms_p50"] if s else None
        p = picard.get((r["schedule"], r["tol"], r.get("backend"))) or picard.get((r["schedule"], None, None))
        r["iteration_ratio_vs_picard"] = p["iterations_mean"] / r["iterations_mean"] if p else None


def fastest_exact(results: list[dict], bound: float) -> list[dict[str, Any]]:
    """The accuracy-matched summary in milliseconds: per schedule (and mode, eager or CUDA graph), the row with the
    lowest p50 latency among those whose chunks lie within `bound` of the torch sequential sample at p99, whatever
    its sampler, tolerance or backend, and its speed-up over torch sequential.

    Args:
        results: the bench rows (`add_speedups` done).
        bound: the p99 deviation bound (normalized action units).

    Returns:
        One entry per (schedule, mode) in row order: {"schedule", "graph", "bound", "sampler", "backend", "tol",
        "latency_ms_p50", "latency_ms_p99", "iterations_mean", "abs_err_p99_vs_sequential", "gflops",
        "peak_fraction", "sequential_ms_p50", "speedup_p50_vs_sequential"}.
    """
    out = []
    for (schedule, graph), seq in _torch_sequential(results).items():
        exact = [r for r in results if r["schedule"] == schedule and r["graph"] == graph
                 and r["abs_err_p99_vs_sequential"] <= bound]
        best = min(exact, key=lambda r: r["latency_ms_p50"])  # the reference itself is exact
        out.append({"schedule": schedule, "graph": graph, "bound": bound,
                    **{k: best.get(k) for k in ("sampler", "backend", "tol", "latency_ms_p50", "latency_ms_p99",
                                                "iterations_mean", "abs_err_p99_vs_sequential", "gflops",
                                                "peak_fraction")},
                    "sequential_ms_p50": seq["latency_ms_p50"],
                    "speedup_p50_vs_sequential": seq["latency_ms_p50"] / best["latency_ms_p50"]})
    return out


def sweep_summary(results: list[dict], bound: float) -> list[dict[str, Any]]:
    """Accuracy-matched comparison: for every sampler and schedule of the sweep (eager rows), the first tolerance,
    from the loosest, whose chunks lie within `bound` of the sequential sample at p99, and what it cost there.

    Args:
        results: the bench rows (each iterative sampler once per tol).
        bound: the p99 deviation bound (normalized action units).

    Returns:
        One entry per (sampler, schedule, backend), in row order: {"sampler", "schedule", "backend", "bound", "tol",
        "iterations_mean", "evaluations_mean", "latency_ms_p50", "abs_err_p99_vs_sequential"}; `tol` and the figures
        are None where no tol met the bound (then `best_p99` is the smallest p99 deviation reached).
    """
    curves: dict[tuple[str, str, str], list[dict]] = {}
    for r in results:
        if r["tol"] is not None and not r["graph"]:
            curves.setdefault((r["sampler"], r["schedule"], r.get("backend", "torch")), []).append(r)
    out = []
    for (sampler, schedule, backend), rows in curves.items():
        rows = sorted(rows, key=lambda r: -r["tol"])
        met = next((r for r in rows if r["abs_err_p99_vs_sequential"] <= bound), None)
        entry = {"sampler": sampler, "schedule": schedule, "backend": backend, "bound": bound, "tol": None,
                 "iterations_mean": None,
                 "evaluations_mean": None, "latency_ms_p50": None, "abs_err_p99_vs_sequential": None,
                 "best_p99": min(r["abs_err_p99_vs_sequential"] for r in rows)}
        if met is not None:
            entry.update({k: met[k] for k in ("tol", "iterations_mean", "evaluations_mean", "latency_ms_p50",
                                              "abs_err_p99_vs_sequential")})
        out.append(entry)
    return out


def _fmt(value, spec: str) -> str:
    """`value` formatted with `spec`; empty for None or NaN."""
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)


def _table(header: list[str], cells: list[list[str]]) -> list[str]:
    """Markdown table lines, then an empty line."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(row) + " |" for row in cells] + [""]


def _fastest(report: Mapping[str, Any]) -> list[str]:
    bound = report["fastest"][0]["bound"]
    return [f"Fastest exact chunk per schedule (p99 deviation <= {bound:g} from the torch sequential sample, any "
            "sampler, tol and backend; speed-up p50 over torch sequential of the same mode):", ""] + _table(
        ["schedule", "fastest exact row", "backend", "tol", "p50 ms", "p99 ms", "rounds", "p99 dev", "GFLOP/s",
         "torch sequential p50 ms", "speed-up"],
        [[e["schedule"], e["sampler"], e["backend"], _fmt(e["tol"], "g"), f"{e['latency_ms_p50']:.1f}",
          f"{e['latency_ms_p99']:.1f}", f"{e['iterations_mean']:.2f}", f"{e['abs_err_p99_vs_sequential']:.2e}",
          _fmt(e.get("gflops"), ".1f"), f"{e['sequential_ms_p50']:.1f}", f"**{e['speedup_p50_vs_sequential']:.2f}x**"]
         for e in report["fastest"]])


def _routing(routing: Mapping[str, Any]) -> list[str]:
    lines = []
    for role, entry in (routing.get("denoisers") or {}).items():
        lines += [f"backend=auto, {role} network ({routing['threads']} thread(s)): {entry['rule']}; one call, fastest "
                  "of 3 (ms):", ""]
        lines += _table(["rows", "torch ms", "onnx ms", "chosen"],
                        [[str(p["rows"]), f"{p['torch_ms']:.2f}", f"{p['onnx_ms']:.2f}", p["chosen"]]
                         for p in entry["table"]])
    return lines


def _sweep(sweep: list[dict]) -> list[str]:
    return [f"Rounds at p99 deviation <= {sweep[0]['bound']:g} from sequential (the first tol, from the loosest, that "
            "meets it; normalized action units):", ""] + _table(
        ["sampler", "schedule", "backend", "tol", "rounds", "evaluations", "p50 ms", "p99 dev"],
        [[e["sampler"], e["schedule"], e.get("backend", "torch"), _fmt(e["tol"], "g") or "not met",
          _fmt(e["iterations_mean"], ".2f"), _fmt(e["evaluations_mean"], ".1f"), _fmt(e["latency_ms_p50"], ".1f"),
          _fmt(e["abs_err_p99_vs_sequential"], ".2e") or "best " + format(e["best_p99"], ".2e")] for e in sweep])


def _rows(report: Mapping[str, Any], peak: float | None) -> list[str]:
    def gflops(r):
        text = _fmt(r.get("gflops"), ".1f")
        return text + (f" ({r['peak_fraction']:.0%})" if text and r.get("peak_fraction") else "")

    return ["Latencies: denoising per chunk (p50/p99 ms); the observation is encoded once per chunk before it "
            "(encode p50/p99 ms); deadline misses count encoding + denoising; speed-up p50 over torch sequential; "
            "GFLOP/s: network FLOPs of a chunk over its p50" + (f" (% of the {peak:.0f} GFLOP/s peak)" if peak else "")
            + ".", ""] + _table(
        ["sampler", "schedule", "backend", "window", "tol", "iterations", "evaluations", "p50 ms", "p99 ms",
         "encode p50/p99 ms", "speedup p50", "iter. ratio vs Picard", "GFLOP/s", "p50 dev", "p99 dev", "max dev",
         "deadline misses", "success", "score"],
        [[r["sampler"], r["schedule"], r.get("backend", "torch"), str(r["window"]), _fmt(r["tol"], "g"),
          f"{r['iterations_mean']:.2f}", f"{r['evaluations_mean']:.1f}", f"{r['latency_ms_p50']:.1f}",
          f"{r['latency_ms_p99']:.1f}", f"{_fmt(r.get('encode_ms_p50'), '.2f')}/{_fmt(r.get('encode_ms_p99'), '.2f')}",
          _fmt(r.get("speedup_p50_vs_sequential"), ".2f"), _fmt(r.get("iteration_ratio_vs_picard"), ".2f"), gflops(r),
          _fmt(r.get("abs_err_p50_vs_sequential"), ".2e"), _fmt(r.get("abs_err_p99_vs_sequential"), ".2e"),
          f"{r['max_abs_err_vs_sequential']:.2e}", f"{r['deadline_misses']}/{r['chunks']}",
          _fmt(r.get("success_rate"), ".2f"), _fmt(r.get("score"), ".3f")] for r in report["rows"]])


def _early_stop(early: list[dict]) -> list[str]:
    return ["Early stop: iterations capped at 1, 2, 3 (mean abs action error vs the sequential sampler of the same "
            "schedule, normalized units; closed-loop success/score where episodes were run):", ""] + _table(
        ["rounds", "sampler", "reference", "mean abs err", "success", "score", "episodes"],
        [[str(e["rounds"]), e["sampler"], e["reference"], f"{e['mean_abs_err']:.4f}", _fmt(e.get("success_rate"), ".2f"),
          _fmt(e.get("score"), ".3f"), str(e.get("episodes", ""))] for e in early])


def markdown_table(report: Mapping[str, Any]) -> str:
    """A bench report (`bench.json`'s content) as Markdown (`bench.md`): the fastest exact row per schedule,
    `backend=auto`'s routing, the accuracy-matched summary of the tolerance sweep, the row table, the early-stop
    table, skipped rows."""
    peak = report.get("peak_gflops")
    lines = [f"Device: {report['device']}; threads: {report['threads']}; control {report['control_hz']} Hz, "
             f"budget {report['budget_ms']:.0f} ms per chunk; checkpoint `{report['checkpoint']}`"
             + (f"; backends: {', '.join(report['backends'])}" if report.get("backends") else ""), ""]
    if peak:
        flops = report.get("flops_per_row") or {}
        lines += ["Network FLOPs per row: " + ", ".join(f"{k} {v / 1e6:.1f} MFLOP" for k, v in flops.items())
                  + f"; peak {peak:.1f} GFLOP/s ({report.get('peak_source', 'given')}).", ""]
    if report.get("fastest"):
        lines += _fastest(report)
    if report.get("auto_routing"):
        lines += _routing(report["auto_routing"])
    if report.get("sweep"):
        lines += _sweep(report["sweep"])
    lines += _rows(report, peak)
    if report.get("early_stop"):
        lines += _early_stop(report["early_stop"])
    lines += [f"skipped: {s}\n" for s in report.get("skipped", [])]
    return "\n".join(lines).rstrip("\n") + "\n"


def plot(results: list[dict], path: Path, budget_ms: float) -> None:
    """Write `path` (PNG): per-row latency box plots (ms, log scale, budget line) and mean iterations per row.

    Args:
        results: `measure_rows`'s results, with their `_latencies` arrays (ms).
        path: the PNG to write.
        budget_ms: the per-chunk budget drawn as a line, in ms.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['sampler']}\n{r['schedule']}" + (f" [{r['backend']}]" if r.get("backend", "torch") != "torch" else "")
             for r in results]
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


def plot_sweep(results: list[dict], path: Path) -> None:
    """Write `path` (PNG): mean rounds against p99 deviation from sequential (log x), one curve per sampler over the
    tolerance sweep, one panel per schedule (eager rows).

    Args:
        results: the bench rows.
        path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schedules = list(dict.fromkeys(r["schedule"] for r in results if r["tol"] is not None))
    fig, axes = plt.subplots(1, max(1, len(schedules)), figsize=(5.5 * max(1, len(schedules)), 4.2), squeeze=False)
    for ax, schedule in zip(axes[0], schedules):
        curves: dict[str, list[dict]] = {}
        for r in results:
            if r["schedule"] == schedule and r["tol"] is not None and not r["graph"]:
                backend = r.get("backend", "torch")
                curves.setdefault(r["sampler"] + ("" if backend == "torch" else f" [{backend}]"), []).append(r)
        for sampler, rows in curves.items():
            rows = sorted(rows, key=lambda r: r["abs_err_p99_vs_sequential"])
            ax.plot([max(r["abs_err_p99_vs_sequential"], 1e-9) for r in rows], [r["iterations_mean"] for r in rows],
                    "o-", label=sampler, ms=4)
        ax.axvline(1e-2, color="grey", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("p99 deviation from sequential (normalized)")
        ax.set_ylabel("mean rounds")
        ax.set_title(schedule)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

