"""`pcm demo` happy path on a tiny checkpoint and PCM: closed loop under the controller, a video, the latency
table, the plot and metrics.json, in seconds."""
import json
import subprocess
import sys

import pytest

from tests.fixtures import train_tiny_base, train_tiny_pcm

pytestmark = [pytest.mark.sim, pytest.mark.integration]


@pytest.mark.parametrize("sampler", ["auto", "pcm_lora"])
def test_demo_on_a_tiny_checkpoint(tmp_path, sampler):
    """The default `sampler=auto` chooses the closed loop's sampler by timing (its table in metrics.json); any other
    sampler runs as configured."""
    base = train_tiny_base(tmp_path, steps=4)
    pcm = train_tiny_pcm(base, tmp_path / "pcm", scheduler="ddim", steps=4)
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "pcm_policy.cli", "demo", f"checkpoint={base}", "pcm_lora.ddpm100=null",
         "pcm_lora.ddim10=null", f"+pcm_lora.ddim4={pcm}", f"sampler={sampler}", "sampler.scheduler=ddim",
         "sampler.steps=4", "schedules=[ddim4]", "episodes=2", "chunks=3", "ddpm100_chunks=1", "task.max_steps=12",
         f"output_dir={out}", "device=cpu", *(["sampler.chunks=2"] if sampler == "auto" else [])],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    closed = metrics["closed_loop"]
    if sampler == "auto":
        auto = metrics["auto"]
        chosen = auto["chosen"]
        assert chosen["exact"] and metrics["sampler"] == f"{chosen['sampler']}/ddim4"
        assert metrics["backend"] == chosen["backend"]
        assert {c["sampler"] for c in auto["candidates"]} == {"sequential", "picard", "picard+aa", "pcm_lora",
                                                              "pcm_lora+aa"}  # the demo's LoRA PCM is a candidate
        assert "sampler=auto chose" in result.stdout and "sampler=auto:" in result.stdout
    else:
        assert metrics["sampler"] == "pcm_lora/ddim4" and metrics["auto"] is None
        assert 1 <= closed["iterations_mean"] <= 1 + 4  # one PCM step, then at most S base rounds
    assert metrics["checkpoint"] == str(base)
    assert closed["episodes"] == 2 and closed["seed_range"] == [100000, 100001] and closed["steps"] <= 2 * 12
    assert closed["chunks"] >= 2 and closed["latency_ms_p50"] <= closed["latency_ms_p99"]
    assert [(r["sampler"], r["schedule"], r["chunks"], r["backend"]) for r in metrics["bench"]] == [
        (s, "ddim4", 3, b) for b in ("torch", "onnx", "auto") for s in ("sequential", "picard", "pcm", "pcm_lora")]
    assert [f["schedule"] for f in metrics["fastest"]] == ["ddim4"] and "fastest exact ddim4" in result.stdout
    assert metrics["video"] == str(out / "videos" / "demo_0.mp4") and (out / "videos" / "demo_0.mp4").stat().st_size > 0
    assert (out / "bench" / "bench.png").stat().st_size > 0 and (out / "bench" / "bench.json").is_file()
    assert "== pcm demo: pusht on cpu" in result.stdout
    assert metrics["sampler"] in result.stdout and f"metrics: {out / 'metrics.json'}" in result.stdout


@pytest.mark.parametrize("task,pcms", [("pusht", {"ddpm100": "data/pusht/pcm_lora_ddpm100",
                                                  "ddim10": "data/pusht/pcm_lora_ddim10"}),
                                       ("pusht_image", {"ddpm100": None, "ddim10": "data/pusht_image/pcm_lora_ddim10"}),
                                       ("can", {"ddpm100": None, "ddim10": "data/can/pcm_lora_ddim10"})])
def test_demo_defaults_are_the_tasks_shipped_base_and_pcms(task, pcms):
    """`pcm demo task=X` runs X's shipped base with its shipped PCMs and compares the schedules they serve."""
    from pcm_policy.config import compose
    from pcm_policy.paths import resolve_path

    cfg = compose("demo", [f"task={task}"])
    assert cfg["checkpoint"] == f"data/{task}/base" and cfg["pcm_lora"] == pcms
    assert cfg["schedules"] == [s for s, path in pcms.items() if path]
    for path in (cfg["checkpoint"], *filter(None, pcms.values())):
        assert (resolve_path(path) / "policy.yaml").is_file(), path  # they ship
