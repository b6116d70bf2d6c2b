"""Same seed and config give identical results: training losses, collected datasets, evaluation metrics."""
import json

import numpy as np
import pytest

from pcm_policy.commands import run_command
from pcm_policy.data.replay_buffer import ReplayBuffer
from tests.fixtures import write_pusht_zarr

TINY = ["policy.down_dims=[16,32]", "policy.diffusion_step_embed_dim=32", "policy.n_groups=4", "device=cpu",
        "train.batch_size=8", "train.log_every=1", "train.warmup_steps=0"]


def _losses(path):
    return [json.loads(line)["loss"] for line in path.read_text().splitlines() if '"loss"' in line]


def test_training_losses_repeat(tmp_path):
    data = write_pusht_zarr(tmp_path / "d.zarr", lengths=[30, 40, 25, 35, 28])
    for run in ("a", "b"):
        run_command("train", [f"dataset.path={data}", f"output_dir={tmp_path / run}", "train.steps=6",
                                "train.checkpoint_every=6", *TINY])
    assert _losses(tmp_path / "a/log.jsonl") == _losses(tmp_path / "b/log.jsonl")


@pytest.mark.sim
def test_collected_pusht_dataset_repeats(tmp_path):
    from envs.collect_pusht import collect_pusht

    for name in ("a.zarr", "b.zarr"):
        collect_pusht(tmp_path / name, episodes=1, seed=3, keep_failed=True, max_steps=40, progress=False)
    a, b = ReplayBuffer.open(tmp_path / "a.zarr"), ReplayBuffer.open(tmp_path / "b.zarr")
    assert a.keys() == b.keys()
    for key in a.keys():
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.sim
def test_eval_metrics_repeat(tmp_path):
    data = write_pusht_zarr(tmp_path / "d.zarr", lengths=[30, 40, 25, 35, 28])
    run_command("train", [f"dataset.path={data}", f"output_dir={tmp_path / 'base'}", "train.steps=2",
                            "train.checkpoint_every=2", *TINY])
    runs = []
    for run in ("a", "b"):
        run_command("eval", [f"checkpoint={tmp_path / 'base'}", "sampler=ddim", "sampler.steps=3", "episodes=3",
                                  "n_envs=2", "videos=0", "task.max_steps=24", f"output_dir={tmp_path / run}",
                                  "device=cpu"])
        runs.append((tmp_path / run / "episodes.jsonl").read_text())
    assert runs[0] == runs[1]
