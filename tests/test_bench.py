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
                            "tols=[0]", "tol=0", "early_stop_chunks=2", f"output_dir={out}", "device=cpu"])
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
                            "task.max_steps=6", f"output_dir={out}", "device=cpu"])
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

