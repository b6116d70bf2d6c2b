"""Training survives SIGKILL at any moment (atomic checkpoints, resume) and saves on SIGINT."""
import signal
import subprocess
import sys
import time

import torch

from pcm_policy import checkpoint as ckpt_io
from tests.fixtures import write_pusht_zarr


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
