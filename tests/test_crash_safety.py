"""Training, PCT and collection survive SIGKILL at any moment (atomic writes, resume); training saves on SIGINT.

Each test kills a real `pcm` process, re-runs the same command and compares with an uninterrupted run.
"""
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pcm_policy import checkpoint as ckpt_io
from pcm_policy.data.replay_buffer import ReplayBuffer
from tests.fixtures import train_tiny_base, write_pusht_zarr

pytestmark = pytest.mark.integration


def _cmd(data, out, steps=60):
    return [sys.executable, "-m", "pcm_policy.cli", "train", f"dataset.path={data}", f"output_dir={out}", "device=cpu",
            f"train.steps={steps}", "train.checkpoint_every=5", "train.batch_size=8", "train.warmup_steps=0",
            "policy.down_dims=[16,32]", "policy.diffusion_step_embed_dim=32", "policy.n_groups=4", "threads=1"]


def _wait_for_checkpoint(out, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if ckpt_io.list_checkpoints(out) or proc.poll() is not None:
            return
        time.sleep(0.05)


def test_sigkill_then_rerun_matches_uninterrupted(tmp_path):
    data = write_pusht_zarr(tmp_path / "d.zarr", lengths=[30, 40, 25, 35, 28])
    subprocess.run(_cmd(data, tmp_path / "clean"), check=True, capture_output=True, timeout=300)

    proc = subprocess.Popen(_cmd(data, tmp_path / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_checkpoint(tmp_path / "killed", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = ckpt_io.list_checkpoints(tmp_path / "killed")
    assert done and done[-1][0] < 60  # killed part-way
    for _, path in done:  # every visible checkpoint is complete and loadable
        ckpt_io.load_policy(path)

    rerun = subprocess.run(_cmd(data, tmp_path / "killed"), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    a = ckpt_io.read_weights(ckpt_io.step_dir(tmp_path / "clean", 60) / "policy.safetensors")
    b = ckpt_io.read_weights(ckpt_io.step_dir(tmp_path / "killed", 60) / "policy.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_sigint_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    data = write_pusht_zarr(tmp_path / "d.zarr", lengths=[30, 40, 25, 35, 28])
    out = tmp_path / "run"
    proc = subprocess.Popen(_cmd(data, out, steps=100_000), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(out, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "checkpoint saved" in stdout
    step, path = ckpt_io.list_checkpoints(out)[-1]
    assert step >= 5  # at least the checkpoint we waited for; the SIGINT save is the newest
    assert ckpt_io.read_train_state(path)["step"] == step


# ---- helpers shared by the kill tests -------------------------------------------------------------------------
def _pcm(*args):
    return [sys.executable, "-m", "pcm_policy.cli", *map(str, args)]


def _wait_until(condition, proc, timeout=120):
    """Poll until `condition()` holds; fail if the process exits first (it was meant to be killed part-way)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if condition():
            return
        assert proc.poll() is None, "the process finished before it could be killed part-way"
        time.sleep(0.02)
    raise AssertionError("timed out waiting for progress")


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _leftovers(directory):
    """Temporary names of interrupted atomic writes (.<name>.tmp-*) and partial-collection directories."""
    return sorted(p.name for p in Path(directory).iterdir() if ".tmp-" in p.name or p.name.endswith(".partial"))


# ---- pcm collect ----------------------------------------------------------------------------------------------
def _hdf5_tree(path):
    """Every dataset of a robomimic hdf5 (by name) plus data/ attributes, for exact comparison."""
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        out["data.attrs"] = {k: str(v) for k, v in f["data"].attrs.items()}
    return out


def _assert_same_dataset(a_path, b_path):
    if a_path.suffix == ".hdf5":
        a, b = _hdf5_tree(a_path), _hdf5_tree(b_path)
        assert a.keys() == b.keys() and any(k.startswith("data/demo_") for k in a)
        for key in a:
            if key == "data.attrs":
                assert a[key] == b[key]
            else:
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        return
    a, b = ReplayBuffer.open(a_path), ReplayBuffer.open(b_path)
    assert a.keys() == b.keys()
    np.testing.assert_array_equal(a.episode_ends, b.episode_ends)
    for key in a.keys():
        assert a[key].dtype == b[key].dtype
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.sim
@pytest.mark.parametrize("task,args,name", [
    ("pusht", ["episodes=4"], "pusht_expert.zarr"),  # failures skipped, full-length successful episodes
    pytest.param("lift", ["episodes=6", "task.max_steps=40", "keep_failed=true"], "lift_expert.hdf5",
                 marks=pytest.mark.slow),  # robosuite: about 30 s
])
def test_collect_sigkill_then_rerun_matches_uninterrupted(tmp_path, task, args, name):
    cmd = lambda out: _pcm("collect", f"task={task}", "seed=0", *args, f"output_dir={out}")  # noqa: E731
    n = int(args[0].split("=")[1])
    clean = subprocess.run(cmd(tmp_path / "clean"), capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr[-2000:]

    out = tmp_path / "killed"
    dataset, partial = out / name, out / f"{name}.partial"
    done = lambda: sorted(partial.glob("seed_*.npz")) if partial.is_dir() else []  # noqa: E731
    rng = random.Random(0)
    for _ in range(2):  # kill twice: once after the first episode, once at a random moment later
        n_before = len(done())
        proc = subprocess.Popen(cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_until(lambda: len(done()) > n_before, proc)
        time.sleep(rng.uniform(0.0, 0.5))
        _kill(proc)
        assert not dataset.exists() and 0 < len(done()) < n  # killed part-way: only finished episodes are kept
        for f in done():  # every finished episode is complete and readable
            with np.load(f) as z:
                assert "__info__" in z.files

    rerun = subprocess.run(cmd(out), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming:" in rerun.stdout and "resumed=" in rerun.stderr  # the progress bar counts resumed episodes
    _assert_same_dataset(tmp_path / "clean" / name, dataset)
    assert _leftovers(out) == []
    m_clean, m_killed = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("clean", "killed"))
    for key in ("episodes", "attempts", "failed_seeds", "mean_length"):
        assert m_clean[key] == m_killed[key], key

    again = subprocess.run(cmd(out), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already complete" in again.stdout, again.stderr[-2000:]


def test_collect_resume_logic_at_function_level(tmp_path, monkeypatch):
    """The shared resume store: an interrupted robomimic-style collection picks up where it stopped."""
    from envs import collect_robomimic as cr

    calls = []

    class FakeEnv:
        task, env_args, cameras, camera_size = "Lift", {"env_name": "Lift", "env_kwargs": {}}, (), 84

        def __init__(self, task, env_args=None, cameras=(), camera_size=84):
            pass

        def close(self):
            pass

    def fake_record(env, expert, seed, max_steps, post_success_steps, obs_keys):
        calls.append(seed)
        if len(calls) == 3 and interrupt:
            raise KeyboardInterrupt  # stands in for a kill during the third episode
        rng = np.random.default_rng(seed)
        T = 3 + seed % 4
        demo = {"obs": {k: rng.normal(size=(T, 2)) for k in obs_keys},
                "next_obs": {k: rng.normal(size=(T, 2)) for k in obs_keys}, "actions": rng.normal(size=(T, 7)),
                "rewards": rng.normal(size=T), "dones": np.eye(T, dtype=np.int64)[-1], "states": rng.normal(size=(T, 5))}
        return demo, seed % 3 != 1  # seeds 1, 4, ... fail

    monkeypatch.setattr("envs.robomimic_env.RobomimicLowDimEnv", FakeEnv)
    monkeypatch.setattr("envs.robomimic_expert.make_expert", lambda task: None)
    monkeypatch.setattr(cr, "_record_episode", fake_record)
    kw = dict(episodes=4, seed=0, progress=False, obs_keys=("object", "robot0_eef_pos"))

    interrupt = False
    cr.collect_robomimic("lift", tmp_path / "clean.hdf5", **kw)
    calls.clear()
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        cr.collect_robomimic("lift", tmp_path / "resumed.hdf5", **kw)
    assert sorted(p.name for p in (tmp_path / "resumed.hdf5.partial").glob("seed_*")) == \
        ["seed_00000000.npz", "seed_00000001.npz"]
    interrupt = False
    calls.clear()
    stats = cr.collect_robomimic("lift", tmp_path / "resumed.hdf5", **kw)
    assert calls == [2, 3, 4, 5] and stats["resumed_episodes"] == 1 and stats["failed_seeds"] == [1, 4]
    assert not (tmp_path / "resumed.hdf5.partial").exists()

    _assert_same_dataset(tmp_path / "clean.hdf5", tmp_path / "resumed.hdf5")

    # a resume with other settings is refused; an existing complete output is left alone
    from pcm_policy.errors import ConfigError

    interrupt = True
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        cr.collect_robomimic("lift", tmp_path / "other.hdf5", **kw)
    with pytest.raises(ConfigError, match="max_steps"):
        cr.collect_robomimic("lift", tmp_path / "other.hdf5", **kw, max_steps=7)
    assert cr.collect_robomimic("lift", tmp_path / "clean.hdf5", **kw)["already_complete"]


# ---- pcm train-pcm --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pct_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("pct_crash")
    train_tiny_base(root)
    return root


def _pct_cmd(root, out):
    return _pcm("train-pcm", f"base={root / 'base'}", f"output_dir={out}", "device=cpu", "threads=1", "steps=8",
                "trajectories=12", "collect_batch=2", "epochs=6", "batch_size=4", "eval_observations=1",
                "checkpoint_every=1", "lora_rank=2")


@pytest.mark.slow  # about 45 s of subprocesses; `pcm train`'s kill-and-resume test stays in the fast set
def test_train_pcm_sigkill_in_collection_and_training_then_rerun_matches(pct_base):
    clean = subprocess.run(_pct_cmd(pct_base, pct_base / "clean"), capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr[-2000:]

    out = pct_base / "killed"
    shards = lambda: sorted((out / "trajectories").glob("batch_*.safetensors"))  # noqa: E731
    # 1. kill during trajectory collection (after the first shard)
    proc = subprocess.Popen(_pct_cmd(pct_base, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_until(lambda: len(shards()) >= 1, proc)
    _kill(proc)
    assert not ckpt_io.list_checkpoints(out)
    # 2. kill during training (after the first checkpoint)
    proc = subprocess.Popen(_pct_cmd(pct_base, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_until(lambda: bool(ckpt_io.list_checkpoints(out)), proc)
    _kill(proc)
    assert len(shards()) == 6 and not (out / "metrics.json").exists()
    for _, path in ckpt_io.list_checkpoints(out):  # every visible checkpoint is complete
        ckpt_io.read_weights(path / "policy.safetensors")
        assert ckpt_io.read_train_state(path) is not None

    rerun = subprocess.run(_pct_cmd(pct_base, out), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert _leftovers(out) == [] and _leftovers(out / "trajectories") == []
    (step_a, a_dir), (step_b, b_dir) = ckpt_io.list_checkpoints(pct_base / "clean")[-1], ckpt_io.list_checkpoints(out)[-1]
    assert step_a == step_b == 18
    a, b = ckpt_io.read_weights(a_dir / "policy.safetensors"), ckpt_io.read_weights(b_dir / "policy.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    m_a, m_b = (json.loads((d / "metrics.json").read_text()) for d in (pct_base / "clean", out))
    np.testing.assert_allclose(m_a["loss_per_epoch"], m_b["loss_per_epoch"], rtol=0, atol=1e-6)
    assert m_a["after"] == m_b["after"]
