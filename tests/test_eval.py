"""`pcm eval` on the real PushT env: a trained checkpoint through vectorised envs, and the scripted expert."""
import json

import pytest

from pcm_policy.commands import run_command, run_composed
from pcm_policy.config import compose
from pcm_policy.errors import CheckpointError

pytestmark = pytest.mark.sim

METRIC_KEYS = {"success_rate", "score", "episodes", "steps", "wall_s"}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    run_command("train", ["output_dir=" + str(root / "base"), "device=cpu", "train.steps=2", "train.batch_size=8",
                            "train.checkpoint_every=2", "policy.down_dims=[16,32]", "policy.diffusion_step_embed_dim=32",
                            "policy.n_groups=4"])
    return root / "base"


@pytest.mark.parametrize("vector", ["sync", "async"])
def test_eval_checkpoint_writes_metrics_and_video(tmp_path, tiny_checkpoint, vector):
    cfg = compose("eval", [f"checkpoint={tiny_checkpoint}", "sampler=ddim", "sampler.steps=3", "episodes=3",
                           "n_envs=2", f"vector={vector}", "videos=1", "task.max_steps=16", f"output_dir={tmp_path}",
                           "device=cpu"])
    metrics = run_composed("eval", cfg)
    assert METRIC_KEYS <= set(metrics) and metrics["episodes"] == 3
    assert 0.0 <= metrics["score"] <= 1.0 and metrics["steps"] <= 3 * 16
    assert metrics["chunks"] > 0 and metrics["iterations_mean"] == 3
    episodes = [json.loads(line) for line in (tmp_path / "episodes.jsonl").read_text().splitlines()]
    assert [e["seed"] for e in episodes] == [100000, 100001, 100002]
    assert len(metrics["videos"]) == 1 and (tmp_path / "videos").is_dir()
    assert json.loads((tmp_path / "metrics.json").read_text())["episodes"] == 3


def test_eval_refuses_checkpoint_of_other_task(tmp_path, tiny_checkpoint):
    cfg = compose("eval", ["task=lift", f"checkpoint={tiny_checkpoint}", "episodes=1", f"output_dir={tmp_path}"])
    with pytest.raises(CheckpointError, match="pusht"):
        run_composed("eval", cfg)


def test_eval_pusht_expert(tmp_path):
    metrics = run_command("eval", ["policy=expert", "episodes=1", "videos=0", f"output_dir={tmp_path}"])
    assert metrics["episodes"] == 1 and metrics["success_rate"] == 1.0 and metrics["score"] == 1.0
    assert metrics["success_ci95"] == pytest.approx([0.2065, 1.0], abs=1e-4)  # Wilson, 1 of 1


def test_eval_prints_and_saves_the_wilson_interval(tmp_path, capsys):
    from pcm_policy.cli import main

    assert main(["eval", "policy=expert", "episodes=2", "videos=0", f"output_dir={tmp_path}"]) == 0
    assert "success 1.00 (95% Wilson interval [0.34, 1.00])" in capsys.readouterr().out
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["success_ci95"] == pytest.approx([0.3424, 1.0], abs=1e-4)
