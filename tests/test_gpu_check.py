"""scripts/gpu_check.sh, the one-call GPU check: its dry run on this CPU (slow set), and its Python steps."""
import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)

SAMPLERS = ("sequential", "picard", "pcm", "pcm_lora")


def _row(sampler, schedule, p50, p99=None, exact=1.0):
    return {"sampler": sampler, "schedule": schedule, "latency_ms_p50": p50, "latency_ms_p99": p99 or p50 * 1.2,
            "exact_fraction": exact}


def test_report_compares_graph_rows_with_the_graphed_sequential_sampler():
    rows = [_row("sequential", "ddim10", 20.0), _row("pcm_lora", "ddim10", 10.0),
            _row("sequential+graph", "ddim10", 4.0, 4.5), _row("pcm_lora+graph", "ddim10", 2.5, 3.0, exact=0.99),
            _row("sequential+graph", "ddpm100", 40.0), _row("picard+graph", "ddpm100", 10.0)]
    gpu_check.honest_speedups(rows)
    by = {(r["sampler"], r["schedule"]): r for r in rows}
    assert by[("pcm_lora", "ddim10")]["speedup_p50_vs_sequential"] == 2.0
    assert by[("pcm_lora+graph", "ddim10")]["speedup_p50_vs_sequential"] == 4.0 / 2.5
    assert by[("pcm_lora+graph", "ddim10")]["speedup_reference"] == "sequential+graph/ddim10"
    assert by[("pcm_lora+graph", "ddim10")]["graph_gain_p50"] == 10.0 / 2.5
    assert by[("picard+graph", "ddpm100")]["graph_gain_p50"] is None  # no eager Picard row measured
    met = {t["target"].split(":")[0].split(" >=")[0]: (t["measured"], t["met"]) for t in gpu_check.targets(rows)}
    assert met["best exact configuration"] == ("sequential+graph/ddim10 p99 4.50 ms", True)  # pcm_lora+graph: not exact
    assert met["pcm_lora+graph/ddim10"][1] is False  # 1.6x < 2x
    assert met["picard+graph/ddpm100"] == ("4.00x (10.00 vs 40.00 ms)", True)


def test_saved_observations_are_the_bench_observations(tmp_path):
    """The file `make gpu-wheels` carries gives `pcm bench observations=FILE` exactly the observations it would draw
    itself from the checkpoint's dataset (the first n of a longer draw are its draw of n)."""
    from pcm_policy.checkpoint import resolve_checkpoint
    from pcm_policy.observations import load_observations, sample_observations

    path = tmp_path / "obs.safetensors"
    assert gpu_check.main(["observations", str(path), "--chunks", "7"]) == 0
    observations, seed = gpu_check.load_observations(path, "data/pusht/base")
    assert seed == 0
    torch.testing.assert_close(load_observations(path)[:5], observations[:5], rtol=0, atol=0)
    torch.testing.assert_close(observations[:5], sample_observations(resolve_checkpoint(ROOT / "data/pusht/base"), 5, 0),
                               rtol=0, atol=0)
    with pytest.raises(Exception, match="not of data/lift/base"):
        gpu_check.load_observations(path, "data/lift/base")


@pytest.mark.slow
def test_dry_run_writes_the_device_files(tmp_path):
    """`gpu_check.sh --dry-run`: tests and both benches on this CPU, without the packages the device lacks."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OUT": str(tmp_path)}
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["gpu_bench.json", "gpu_bench.md", "gpu_bench_ddim10.png", "gpu_bench_ddpm100.png",
                     "gpu_check.log", "gpu_tests.log"]  # the device returns at most 8 plainly named files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) and (tmp_path / n).stat().st_size > 0 for n in names)
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert report["device"].startswith("cpu") and report["command"].endswith("--dry-run")
    schedules = ("ddim10", "ddpm100")
    assert {(r["algorithm"], r["schedule"]) for r in report["rows"]} == {(s, b) for s in SAMPLERS for b in schedules}
    # every iterative sampler also as its Anderson-accelerated variant (configs/bench.yaml `accelerated`)
    assert {(r["algorithm"], r["schedule"]) for r in report["rows"] if r["accel"] == "anderson"} == {
        (s, b) for s in SAMPLERS if s != "sequential" for b in schedules}
    assert all(s["status"] == "ok" for s in report["steps"]), report["steps"]
    assert re.fullmatch(r"\d+ passed, \d+ deselected", report["tests"]), report["tests"]  # none failed or skipped
    assert "| pcm_lora | ddim10 |" in (tmp_path / "gpu_bench.md").read_text()
