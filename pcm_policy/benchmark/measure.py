"""Time every bench row on the same observations and noise and compare its chunks with the torch sequential
sampler's."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from pcm_policy.benchmark.flops import achieved_gflops
from pcm_policy.benchmark.rows import EncodedObservations, Row, time_rows
from pcm_policy.latency import latency_summary


def chunk_deviations(x0: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """Each chunk's largest action deviation from its reference chunk (normalized action units).

    Args:
        x0: (n, H, Da) chunks.
        reference: (>= n, H, Da) the reference chunks of the same observations and noise (the first n are used).

    Returns:
        (n,) max abs difference per chunk.
    """
    return (x0 - reference[:len(x0)]).abs().flatten(1).amax(dim=1).numpy()


def measure_rows(policy, rows: list[Row], encoded: EncodedObservations, chunks: Mapping[str, int], seed: int,
                 warmup: int, budget_ms: float, device_name: str, threads: int, peak_gflops: float | None = None,
                 interleave: bool = True) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """One result per row: denoising latency p50/p99 (ms), the encoding of its chunks' observations p50/p99 (ms,
    once per chunk, shared by every row), rounds, network rows, deviation from the torch sequential sample of the
    same schedule (max abs over each chunk, normalized action units: p50, p99 and max over chunks), exact fraction,
    deadline misses against `budget_ms` (of encoding + denoising), and the GFLOP/s achieved (a chunk's mean network
    rows times the row's FLOPs per row, over its p50 latency) against `peak_gflops`.

    Args:
        policy: the base policy.
        rows: the rows; each schedule's eager torch sequential row (`Row.is_reference`) must come before its other
            rows.
        encoded: the observations' conditions and encoding times; a row samples the first `chunks[schedule]`.
        chunks: schedule -> chunks to time.
        seed: chunk i uses the noise of seed + i, in every row.
        warmup: untimed chunks per row.
        budget_ms: the per-chunk deadline.
        device_name: the device, as reported.
        threads: torch intra-op threads, as reported.
        peak_gflops: the core's fp32 peak in GFLOP/s (None: no `peak_fraction`).
        interleave: time the rows chunk by chunk (`time_rows`), else each row's chunks in turn.

    Returns:
        (results, references): the result dicts in row order (each with its latencies under `_latencies`, not
        for the report), and each schedule's sequential chunks (n, H, Da).
    """
    results, references = [], {}
    counts = [min(int(chunks[row.schedule]), len(encoded.conds)) for row in rows]
    for row, n, t in zip(rows, counts, time_rows(policy, rows, encoded.conds, counts, seed, warmup, interleave)):
        encode_ms = encoded.encode_ms[:n]
        if row.is_reference:
            references[row.schedule] = t.x0
        if row.schedule in references:  # per chunk: its largest action deviation from the torch sequential sample
            chunk_err = chunk_deviations(t.x0, references[row.schedule])
            err, err_p50, err_p99 = float(chunk_err.max()), *np.percentile(chunk_err, [50, 99]).tolist()
        else:
            err = err_p50 = err_p99 = float("nan")
        c = row.config
        iterative = c.name != "sequential"
        anderson = c.accel == "anderson"
        latency = latency_summary(t.latencies)
        rows_mean = float(t.network_rows.mean())
        gflops = (achieved_gflops(rows_mean, row.flops_row, latency["latency_ms_p50"]) if row.flops_row else None)
        results.append({
            "sampler": c.variant + ("+graph" if row.graph else ""), "schedule": row.schedule, "backend": row.backend,
            "algorithm": c.name,
            "accel": c.accel if iterative else None, "start": c.start if iterative else None,
            "memory": c.memory if anderson else None, "damping": c.damping if anderson else None,
            "triangular": c.triangular if anderson else None, "graph": row.graph, "window": c.window or c.steps,
            "tol": c.tol if iterative else None, "chunks": len(t.latencies),
            "iterations_mean": float(t.iterations.mean()), "evaluations_mean": float(t.evaluations.mean()),
            "network_rows_mean": rows_mean, **latency, "encode_ms_p50": float(np.percentile(encode_ms, 50)),
            "encode_ms_p99": float(np.percentile(encode_ms, 99)), "max_abs_err_vs_sequential": err,
            "abs_err_p50_vs_sequential": err_p50, "abs_err_p99_vs_sequential": err_p99,
            "exact_fraction": float(t.converged.mean()),
            "deadline_misses": int((t.latencies + encode_ms > budget_ms).sum()),
            "budget_ms": budget_ms, "device": device_name, "threads": threads, "pcm_checkpoint": row.pcm_path,
            "flops_per_row": row.flops_row or None, "gflops": gflops,
            "peak_fraction": gflops / peak_gflops if gflops and peak_gflops else None, "_latencies": t.latencies,
        })
        r = results[-1]
        print(f"{row.name:20s} {row.backend:5s} tol {c.tol if iterative else '-':<6} p50 {r['latency_ms_p50']:7.1f} ms"
              f"  p99 {r['latency_ms_p99']:7.1f} ms  iters {r['iterations_mean']:5.2f}  err {err:.2e}"
              + (f"  {gflops:5.1f} GFLOP/s" if gflops else ""))
    return results, references
