"""Training: loss decreases, checkpoints are complete and atomic, resuming reproduces the uninterrupted run."""
import json
import shutil

import pytest
import torch

from pcm_policy import checkpoint as ckpt_io
from pcm_policy.commands import run_command, run_composed
from pcm_policy.config import compose
from pcm_policy.errors import CheckpointError, ConfigError
from pcm_policy.policy import DiffusionPolicy
from pcm_policy.training import batch_indices
from tests.fixtures import TINY_POLICY, tree, write_pusht_zarr


def _cfg(tmp_path, data, out="run", **train_overrides):
    overrides = [f"dataset.path={data}", f"output_dir={tmp_path / out}", "device=cpu", "train.batch_size=16",
                 "train.log_every=1", "train.warmup_steps=0", "policy.down_dims=[16,32]",
                 "policy.diffusion_step_embed_dim=32", "policy.n_groups=4"]
    overrides += [f"train.{k}={v}" for k, v in train_overrides.items()]
    return compose("train", overrides)


@pytest.fixture
def small_zarr(tmp_path):
    return write_pusht_zarr(tmp_path / "d.zarr", lengths=[30, 40, 25, 35, 28])


def test_loss_decreases(tmp_path, small_zarr):
    cfg = _cfg(tmp_path, small_zarr, steps=150, checkpoint_every=150, lr=1e-3)
    metrics = run_composed("train", cfg)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run/log.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 150
    assert sum(losses[-20:]) / 20 < 0.75 * sum(losses[:10]) / 10
    assert (tmp_path / "run/metrics.json").is_file() and (tmp_path / "run/loss.png").is_file()
    assert metrics["steps"] == 150


def test_checkpoint_contents_and_policy_load(tmp_path, small_zarr):
    run_composed("train", _cfg(tmp_path, small_zarr, steps=4, checkpoint_every=2, keep_checkpoints=2))
    ckpts = ckpt_io.list_checkpoints(tmp_path / "run")
    assert [s for s, _ in ckpts] == [2, 4]
    latest = ckpts[-1][1]
    for name in ("policy.yaml", "policy.safetensors", "config.yaml", "train_state.pt"):
        assert (latest / name).is_file()
    policy, card = ckpt_io.load_policy(tmp_path / "run")
    assert card["task"] == "pusht" and policy.config.obs_dim == 20 and policy.config.action_dim == 2
    obs = torch.randn(3, 2, 20) * 10 + 200
    chunk = policy.predict_chunk(obs, {"name": "sequential", "scheduler": "ddim", "steps": 4},
                                 generator=torch.Generator().manual_seed(0))
    assert chunk.action.shape == (3, 8, 2) and chunk.action_pred.shape == (3, 16, 2)
    assert torch.isfinite(chunk.action).all()


def test_resume_matches_uninterrupted_run(tmp_path, small_zarr):
    run_composed("train", _cfg(tmp_path, small_zarr, out="straight", steps=8, checkpoint_every=4))
    # The "interrupted" run lost everything after its step-4 checkpoint; re-running the command resumes.
    resumed = _cfg(tmp_path, small_zarr, out="resumed", steps=8, checkpoint_every=4)
    run_composed("train", resumed)
    shutil.rmtree(ckpt_io.step_dir(tmp_path / "resumed", 8))
    run_composed("train", resumed)
    a = ckpt_io.read_weights(ckpt_io.step_dir(tmp_path / "straight", 8) / "policy.safetensors")
    b = ckpt_io.read_weights(ckpt_io.step_dir(tmp_path / "resumed", 8) / "policy.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "resumed/metrics.json").read_text())["resumed_from"] == 4


def test_resume_refuses_other_policy_shape(tmp_path, small_zarr):
    run_composed("train", _cfg(tmp_path, small_zarr, steps=2, checkpoint_every=2))
    cfg = _cfg(tmp_path, small_zarr, steps=4, checkpoint_every=2)
    cfg["policy"]["down_dims"] = [8, 16]
    with pytest.raises(CheckpointError, match="another task or policy"):
        run_composed("train", cfg)


def test_init_from_starts_from_another_runs_weights(tmp_path, small_zarr):
    run_composed("train", _cfg(tmp_path, small_zarr, out="first", steps=6, checkpoint_every=6, lr=1e-3))
    first = ckpt_io.latest_checkpoint(tmp_path / "first")
    # lr=1e-12 barely moves the weights: the run must end where the initial checkpoint's weights were
    metrics = run_composed("train", _cfg(tmp_path, small_zarr, out="tuned", steps=2, checkpoint_every=2, lr=1e-12,
                         init_from=str(first)))
    assert metrics["init_from"] == str(first)
    a = ckpt_io.read_weights(first / "policy.safetensors")
    b = ckpt_io.read_weights(ckpt_io.latest_checkpoint(tmp_path / "tuned") / "policy.safetensors")
    for k in a:
        if k.startswith("model."):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    fresh = ckpt_io.read_weights(ckpt_io.latest_checkpoint(tmp_path / "first") / "policy.safetensors")
    assert fresh.keys() == b.keys()


def test_init_from_refuses_other_shape_or_task_before_work(tmp_path, small_zarr):
    run_composed("train", _cfg(tmp_path, small_zarr, out="first", steps=2, checkpoint_every=2))
    first = ckpt_io.latest_checkpoint(tmp_path / "first")
    cfg = _cfg(tmp_path, small_zarr, out="wider", steps=2, init_from=str(first))
    cfg["policy"]["down_dims"] = [8, 16]
    with pytest.raises(CheckpointError, match=r"train.init_from=.*down_dims=\[16, 32\]"):
        run_composed("train", cfg)
    cfg = _cfg(tmp_path, small_zarr, out="other_task", steps=2, init_from=str(first))
    cfg["task"]["name"] = "lift"
    with pytest.raises(CheckpointError, match="train.init_from=.*task 'pusht'"):
        run_composed("train", cfg)
    with pytest.raises(CheckpointError, match="train.init_from"):
        run_composed("train", _cfg(tmp_path, small_zarr, out="missing", steps=2, init_from=str(tmp_path / "nothing")))
    assert not (tmp_path / "wider").exists() and not (tmp_path / "other_task").exists()
    assert not (tmp_path / "missing").exists()


def test_batch_schedule_is_deterministic_and_covers_epoch():
    a = [batch_indices(10, 4, seed=1, step=s) for s in range(2)]
    b = [batch_indices(10, 4, seed=1, step=s) for s in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len(set(torch.cat(a).tolist())) == 8  # no repeats within an epoch


def test_missing_dataset_and_bad_device(tmp_path):
    with pytest.raises(Exception, match="missing.zarr"):
        run_composed("train", _cfg(tmp_path, tmp_path / "missing.zarr", steps=1))
    with pytest.raises(ConfigError, match="CUDA"):
        cfg = _cfg(tmp_path, tmp_path / "missing.zarr", steps=1)
        cfg["device"] = "cuda"
        run_composed("train", cfg)


def test_corrupt_checkpoint_is_reported(tmp_path, small_zarr):
    run_composed("train", _cfg(tmp_path, small_zarr, steps=2, checkpoint_every=2))
    latest = ckpt_io.latest_checkpoint(tmp_path / "run")
    (latest / "policy.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="policy.safetensors"):
        ckpt_io.load_policy(latest)


def test_checkpoint_observations_with_an_empty_validation_split(tmp_path, small_zarr):
    from pcm_policy.observations import dataset_observations as checkpoint_observations

    cfg = _cfg(tmp_path, small_zarr, steps=2, checkpoint_every=2)
    cfg["dataset"]["val_ratio"] = 0.0
    run_composed("train", cfg)
    train_obs, val_obs = checkpoint_observations(ckpt_io.resolve_checkpoint(tmp_path / "run"))
    assert train_obs.shape[0] > 0 and val_obs.shape == (0, *train_obs.shape[1:])


def test_training_refused_before_its_first_checkpoint_leaves_no_folder(tmp_path, monkeypatch):
    """A refusal once training started (here a NaN loss) removes the output folder this run created."""
    data = write_pusht_zarr(tmp_path / "d.zarr", lengths=[30, 40, 25, 35, 28])
    monkeypatch.setattr(DiffusionPolicy, "compute_loss",
                        lambda self, batch, **kw: torch.tensor(float("nan"), requires_grad=True))
    before = tree(tmp_path)
    with pytest.raises(ConfigError, match="loss became nan"):
        run_command("train", [f"dataset.path={data}", f"output_dir={tmp_path / 'out'}", "device=cpu",
                              "train.steps=3", "train.log_every=1", "train.checkpoint_every=3", *TINY_POLICY])
    assert tree(tmp_path) == before

