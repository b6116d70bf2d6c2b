"""The bench report: speed-ups, `bench.md` (Markdown tables) and `bench.png` (latency and rounds per row)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np


def add_speedups(results: list[dict]) -> None:
    """Each row's p50 speed-up against the sequential row of its schedule and mode (a `+graph` row against the
    CUDA-graph sequential sampler: the honest baseline), and its iteration ratio against plain Picard."""
    seq = {(r["schedule"], r["graph"]): r for r in results if r["algorithm"] == "sequential"}
    picard = {r["schedule"]: r for r in results if r["sampler"] == "picard"}
    for r in results:
        s = seq.get((r["schedule"], r["graph"]))
        r["speedup_p50_vs_sequential"] = s["latency_ms_p50"] / r["latency_ms_p50"] if s else None
        p = picard.get(r["schedule"])
        r["iteration_ratio_vs_picard"] = p["iterations_mean"] / r["iterations_mean"] if p else None


def markdown_table(report: Mapping[str, Any]) -> str:
    """A bench report (`bench.json`'s content) as Markdown (`bench.md`): the row table, the early-stop table, skipped rows."""
    lines = [f"Device: {report['device']}; threads: {report['threads']}; control {report['control_hz']} Hz, "
             f"budget {report['budget_ms']:.0f} ms per chunk; checkpoint `{report['checkpoint']}`", "",
             "| sampler | schedule | window | tol | iterations | evaluations | p50 ms | p99 ms | speedup p50 | "
             "iter. ratio vs Picard | max abs err | p99 chunk err | deadline misses | success | score |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, f)  # noqa: E731
    for r in report["rows"]:
        lines.append(f"| {r['sampler']} | {r['schedule']} | {r['window']} | {fmt(r['tol'], 'g')} | {r['iterations_mean']:.2f} | "
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
        results: `measure_rows`'s results, with their `_latencies` arrays (ms).
        path: the PNG to write.
        budget_ms: the per-chunk budget drawn as a line, in ms.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['sampler']}\n{r['schedule']}" for r in results]
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
