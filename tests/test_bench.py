"""`pcm bench` writes its schema on a tiny policy in seconds; switched rows are exact at tol -> 0."""
import json

import pytest

from pcm_policy.commands import run_command, run_composed
from pcm_policy.config import compose
from pcm_policy.errors import ConfigError

ROW_KEYS = {"sampler", "schedule", "window", "tol", "chunks", "iterations_mean", "evaluations_mean", "latency_ms_p50",
            "latency_ms_p99", "max_abs_err_vs_sequential", "deadline_misses", "device", "threads"}


def test_bench_schema_table_and_plot(tiny_runs, tmp_path):
    out = tmp_path / "out"
    cfg = compose("bench", [f"checkpoint={tiny_runs / 'base'}", "pcm.ddpm100=null", "pcm.ddim10=null",
                            "pcm_lora.ddpm100=null", "pcm_lora.ddim10=null", f"+pcm.ddpm8={tiny_runs / 'pcm_ddpm8'}",
                            f"+pcm_lora.ddpm8={tiny_runs / 'pcm_ddpm8'}", "schedules=[ddpm8,ddim4]", "chunks=3", "warmup=1",
                            "tols=[0]", "tol=0", "early_stop_chunks=2", f"output_dir={out}", "device=cpu",
                            "backends=[torch]", "interleave=false"])
    report = run_composed("bench", cfg)
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert [(r["sampler"], r["schedule"]) for r in rows] == [
        ("sequential", "ddpm8"), ("picard", "ddpm8"), ("pcm", "ddpm8"), ("pcm_lora", "ddpm8"),
        ("sequential", "ddim4"), ("picard", "ddim4")]
    for r in rows:
        assert ROW_KEYS <= set(r) and r["chunks"] == 3 and r["threads"] >= 1
        assert r["max_abs_err_vs_sequential"] < 1e-4  # tol = 0: every row equals its sequential base
        assert r["abs_err_p99_vs_sequential"] <= r["max_abs_err_vs_sequential"]
    early = report["early_stop"]
    assert {e["rounds"] for e in early} == {1, 2, 3}
    assert {e["sampler"] for e in early} == {"picard/ddpm8", "pcm/ddpm8", "pcm_lora/ddpm8", "picard/ddim4",
                                             "sequential/ddim1", "sequential/ddim2", "sequential/ddim3"}
    assert {e["reference"] for e in early} == {"sequential/ddpm8", "sequential/ddim4"}
    assert all("success_rate" not in e for e in early)  # no closed-loop episodes asked for
    assert (out / "bench.md").read_text().count("| picard |") == 2
    assert (out / "bench.png").stat().st_size > 0 and (out / "metrics.json").is_file()


def test_bench_rejects_unknown_base(tiny_runs, tmp_path):
    cfg = compose("bench", [f"checkpoint={tiny_runs / 'base'}", "schedules=[euler5]", f"output_dir={tmp_path / 'x'}",
                            "device=cpu", "chunks=1"])
    with pytest.raises(ConfigError, match="euler5"):
        run_composed("bench", cfg)


@pytest.mark.sim
def test_bench_closed_loop_rows_and_capped_episodes(tiny_runs, tmp_path):
    """episodes>0 adds success/score to the chosen bases' rows; early_stop_episodes to the capped samplers."""
    out = tmp_path / "loop"
    cfg = compose("bench", [f"checkpoint={tiny_runs / 'base'}", "pcm.ddpm100=null", "pcm.ddim10=null",
                            "pcm_lora.ddpm100=null", "pcm_lora.ddim10=null", "schedules=[ddim4]", "chunks=2", "warmup=0",
                            "tols=[0.1]", "episodes=1", "episodes_schedules=[ddim4]", "early_stop_episodes=1", "early_stop_chunks=2",
                            "task.max_steps=6", f"output_dir={out}", "device=cpu", "backends=[torch]"])
    report = run_composed("bench", cfg)
    for r in report["rows"]:
        assert r["episodes"] == 1 and 0.0 <= r["score"] <= 1.0 and r["success_rate"] in (0.0, 1.0)
    assert {(e["sampler"], e["rounds"]) for e in report["early_stop"]} == {
        (s, k) for k in (1, 2, 3) for s in ("picard/ddim4", f"sequential/ddim{k}")}
    assert all(e["episodes"] == 1 and 0.0 <= e["score"] <= 1.0 for e in report["early_stop"])
    assert "| 1 | picard/ddim4 | sequential/ddim4 |" in (out / "bench.md").read_text()


def test_tolerance_sweep_rows_summary_and_plot(tiny_runs, tmp_path):
    """Every iterative row once per tol (same observations and noise), the rounds at the deviation bound, the plot."""
    out = tmp_path / "sweep"
    report = run_command("bench", [f"checkpoint={tiny_runs / 'base'}", "pcm=null", "pcm_lora.ddpm100=null",
                                   "pcm_lora.ddim10=null", f"+pcm_lora.ddpm8={tiny_runs / 'pcm_ddpm8'}",
                                   "schedules=[ddpm8]", "tols=[0.1,0.001,0]", "tol=0.1", "deviation_bound=1e-5",
                                   "chunks=2", "warmup=0", "early_stop_chunks=2", f"output_dir={out}", "device=cpu"])
    rows = {(r["sampler"], r["tol"]): r for r in report["rows"]}
    assert set(rows) == {("sequential", None)} | {(s, t) for s in ("picard", "pcm_lora") for t in (0.1, 0.001, 0.0)}
    assert report["tols"] == [0.1, 0.001, 0.0]
    summary = {e["sampler"]: e for e in report["sweep"]}
    assert set(summary) == {"picard", "pcm_lora"}
    for e in summary.values():  # tol 0 is exact, so the bound is met at the latest there
        assert e["tol"] is not None and e["abs_err_p99_vs_sequential"] <= 1e-5
        assert e["iterations_mean"] == rows[(e["sampler"], e["tol"])]["iterations_mean"]
    assert "Rounds at p99 deviation <= 1e-05" in (out / "bench.md").read_text()
    assert (out / "bench_sweep.png").stat().st_size > 0
    assert {e["sampler"] for e in report["early_stop"]} >= {"picard/ddpm8", "pcm_lora/ddpm8"}  # studies: tol rows



def test_bench_runs_every_row_on_every_backend_in_milliseconds(tiny_runs, tmp_path):
    """backends=[torch,onnx,auto]: every row once per backend, deviations against the torch sequential chunks, the
    fastest exact row per schedule in ms with its speed-up, and GFLOP/s from the FLOPs counted once per network."""
    from pcm_policy.benchmark.flops import flops_per_row
    from pcm_policy.checkpoint import load_policy

    out = tmp_path / "backends"
    report = run_command("bench", [f"checkpoint={tiny_runs / 'base'}", "pcm=null", "pcm_lora.ddpm100=null",
                                   "pcm_lora.ddim10=null", f"+pcm_lora.ddpm8={tiny_runs / 'pcm_ddpm8'}",
                                   "schedules=[ddpm8,ddim4]", "backends=[torch,onnx,auto]", "tols=[0.1,0]", "tol=0.1",
                                   "chunks=3", "warmup=1", "early_stop=false", "peak_gflops=100",
                                   f"output_dir={out}", "device=cpu"])
    saved = json.loads((out / "bench.json").read_text())
    assert saved["backends"] == ["torch", "onnx", "auto"] and saved["peak_gflops"] == 100
    rows = saved["rows"]
    keys = [(r["sampler"], r["schedule"], r["tol"], r["backend"]) for r in rows]
    assert len(keys) == len(set(keys))
    for backend in ("torch", "onnx", "auto"):  # every row on every backend
        assert {k[:3] for k in keys if k[3] == backend} == {k[:3] for k in keys if k[3] == "torch"}
    policy, _ = load_policy(tiny_runs / "base", "cpu")
    base_flops = flops_per_row(policy)
    assert saved["flops_per_row"]["base"] == base_flops > 0 and saved["flops_per_row"]["LoRA PCM ddpm8"] > base_flops
    for r in rows:
        assert r["flops_per_row"] == (saved["flops_per_row"]["LoRA PCM ddpm8"] if r["algorithm"] == "pcm_lora"
                                      else base_flops)
        expected = r["network_rows_mean"] * r["flops_per_row"] / (r["latency_ms_p50"] * 1e-3) / 1e9
        assert r["gflops"] == pytest.approx(expected) and r["peak_fraction"] == pytest.approx(r["gflops"] / 100)
        if r["algorithm"] == "sequential":  # the same chunks on every backend: within float rounding of torch's
            assert r["max_abs_err_vs_sequential"] < 1e-4
            assert r["max_abs_err_vs_sequential"] == 0.0 or r["backend"] != "torch"
        if r["tol"] == 0:  # exact at tol 0 on every backend, measured against the torch sequential chunks
            assert r["max_abs_err_vs_sequential"] < 1e-4
    seq = {r["schedule"]: r for r in rows if r["algorithm"] == "sequential" and r["backend"] == "torch"}
    for r in rows:
        speedup = seq[r["schedule"]]["latency_ms_p50"] / r["latency_ms_p50"]
        assert r["speedup_p50_vs_sequential"] == pytest.approx(speedup)
    fastest = {f["schedule"]: f for f in saved["fastest"]}
    assert set(fastest) == {"ddpm8", "ddim4"}
    for schedule, f in fastest.items():
        exact = [r for r in rows if r["schedule"] == schedule and r["abs_err_p99_vs_sequential"] <= 0.01]
        assert f["latency_ms_p50"] == min(r["latency_ms_p50"] for r in exact) and f["bound"] == 0.01
        assert f["speedup_p50_vs_sequential"] == pytest.approx(seq[schedule]["latency_ms_p50"] / f["latency_ms_p50"])
        assert f["backend"] in ("torch", "onnx", "auto") and f["abs_err_p99_vs_sequential"] <= 0.01
    assert {(e["sampler"], e["backend"]) for e in saved["sweep"] if e["schedule"] == "ddpm8"} == {
        (s, b) for s in ("picard", "pcm_lora") for b in ("torch", "onnx", "auto")}
    md = (out / "bench.md").read_text()
    assert "Fastest exact chunk per schedule" in md and "| picard | ddim4 | onnx |" in md and "GFLOP/s" in md
    assert "peak 100.0 GFLOP/s (given (peak_gflops))" in md
    assert report["fastest"] == saved["fastest"]
    routing = saved["auto_routing"]
    assert set(routing["denoisers"]) == {"base", "pcm ddpm8"} and routing["threads"] == 1
    assert all(p["chosen"] in ("torch", "onnx") for e in routing["denoisers"].values() for p in e["table"])
    assert "backend=auto, base network" in md


def test_bench_measures_the_peak_when_not_given(tiny_runs, tmp_path):
    report = run_command("bench", [f"checkpoint={tiny_runs / 'base'}", "pcm=null", "pcm_lora=null",
                                   "schedules=[ddim2]", "backends=[torch]", "tols=[0.1]", "chunks=1", "warmup=0",
                                   "early_stop=false", f"output_dir={tmp_path}", "device=cpu"])
    assert report["peak_gflops"] > 0 and report["peak_source"].startswith("measured: best of 5 1024x1024")
    assert report["peak_source"].endswith("CPU time")
    assert report["rows"][0]["peak_fraction"] == pytest.approx(report["rows"][0]["gflops"] / report["peak_gflops"])


def test_rows_are_timed_chunk_by_chunk(monkeypatch):
    """Interleaved timing: every row's warm-up, then chunk j of every row before chunk j + 1 of any (a burst of load
    hits all rows alike); each chunk keeps its own noise seed."""
    import numpy as np
    import torch

    from pcm_policy.benchmark import rows as rows_module

    calls = []

    def fake_time_row(policy, row, conds, seed, warmup, progress=True):
        calls.append((row, seed, len(conds), warmup))
        n = len(conds)
        return rows_module.RowTiming(torch.full((n, 2, 2), float(seed)), np.ones(n), np.ones(n), np.ones(n),
                                     np.ones(n, bool), np.ones(n))

    monkeypatch.setattr(rows_module, "time_row", fake_time_row)
    out = rows_module.time_rows(None, ["a", "b"], torch.zeros(3, 1), [3, 2], 10, warmup=1)
    assert calls == [("a", 10, 1, 0), ("b", 10, 1, 0), ("a", 10, 1, 0), ("b", 10, 1, 0), ("a", 11, 1, 0),
                     ("b", 11, 1, 0), ("a", 12, 1, 0)]
    assert [len(t.latencies) for t in out] == [3, 2] and out[0].x0[:, 0, 0].tolist() == [10.0, 11.0, 12.0]
