"""Multi-process training: torchrun with 2 CPU processes (gloo, DDP) gives the single-process result.

Each test trains the same tiny run once in this process and once under `torchrun --nproc_per_node=2`, with the
same global batch, and compares the shipped (EMA) weights, the online weights and the logged losses.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pcm_policy.commands import run_command
from pcm_policy import checkpoint as ckpt_io
from pcm_policy.cli import main
from pcm_policy.distributed import Dist
from tests.fixtures import write_pusht_zarr

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
TINY = ["policy.down_dims=[16,32]", "policy.diffusion_step_embed_dim=32", "policy.n_groups=4", "device=cpu"]
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LR = 1e-3
# Sums run in another order across processes, so gradients agree to float rounding, not bitwise. Adam divides
# each gradient element by its own running RMS, which turns the rounding of a near-zero gradient element into an
# update of up to a few percent of lr (measured: 1.7e-5 at lr 1e-3; one process with 2 threads instead of 1 differs
# from itself by 1.2e-5). A wrong shard of the batch or its noise moves most weights by about lr.
WEIGHT_ATOL = 0.05 * LR


def torchrun(command: str, overrides: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(OMP_NUM_THREADS="1", PCM_DEBUG="1")
    # --standalone: a local rendezvous on a free port, so parallel test runs do not collide.
    r = subprocess.run([str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", "-m", "pcm_policy.cli", command,
                        *overrides, "threads=1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def assert_same_checkpoint(a: Path, b: Path, online_key: str) -> None:
    """Shipped (EMA) weights and the online weights of the train state agree."""
    wa, wb = (ckpt_io.read_weights(d / ckpt_io.POLICY_WEIGHTS) for d in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=WEIGHT_ATOL, msg=lambda m: f"{k}: {m}")
    sa, sb = ckpt_io.read_train_state(a), ckpt_io.read_train_state(b)
    assert sa["step"] == sb["step"]
    online_a, online_b = sa[online_key], sb[online_key]
    pairs = zip(online_a.values(), online_b.values()) if isinstance(online_a, dict) else zip(online_a, online_b)
    for x, y in pairs:
        torch.testing.assert_close(y, x, rtol=1e-5, atol=WEIGHT_ATOL)


def log_rows(run: Path, key: str) -> list[float]:
    return [r[key] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if key in r]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_pusht_zarr(tmp_path_factory.mktemp("ddp") / "d.zarr", lengths=[30, 40, 25, 35, 28])


def test_shards_cover_the_batch_and_weights_average_to_one():
    for n, world in [(16, 2), (7, 2), (3, 2), (10, 4)]:
        ranks = [Dist(rank=r, world_size=world) for r in range(world)]
        rows = [i for d in ranks for i in range(n)[d.shard(n)]]
        assert rows == list(range(n))
        assert sum(d.loss_weight(n) for d in ranks) == pytest.approx(world)
    assert Dist().shard(5) == slice(0, 5) and Dist().loss_weight(5) == 1.0


def test_torchrun_train_matches_single_process_and_resumes(tmp_path, data):
    overrides = [f"dataset.path={data}", "train.batch_size=16", "train.steps=4", "train.checkpoint_every=2",
                 "train.log_every=1", "train.warmup_steps=0", f"train.lr={LR}", *TINY]
    single, multi = tmp_path / "single", tmp_path / "multi"
    run_command("train", overrides + [f"output_dir={single}"])
    torchrun("train", overrides + [f"output_dir={multi}"])

    assert_same_checkpoint(ckpt_io.step_dir(single, 4), ckpt_io.step_dir(multi, 4), "model")
    for key in ("loss", "val_loss"):  # one log, written by rank 0 alone
        assert log_rows(multi, key) == pytest.approx(log_rows(single, key), rel=1e-5)
    metrics = json.loads((multi / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["final_loss"] == pytest.approx(log_rows(single, "loss")[-1], rel=1e-5)

    # Resume: both ranks load the step-2 checkpoint and finish as the uninterrupted run did.
    shutil.rmtree(ckpt_io.step_dir(multi, 4))
    torchrun("train", overrides + [f"output_dir={multi}"])
    assert_same_checkpoint(ckpt_io.step_dir(single, 4), ckpt_io.step_dir(multi, 4), "model")
    assert json.loads((multi / "metrics.json").read_text())["resumed_from"] == 2


@pytest.mark.slow  # about 25 s; the torchrun `pcm train` test stays in the fast set
def test_torchrun_train_pcm_matches_single_process(tmp_path, data):
    run_command("train", [f"dataset.path={data}", f"output_dir={tmp_path / 'base'}", "train.steps=20",
                            "train.batch_size=16", "train.checkpoint_every=20", "train.warmup_steps=0", *TINY])
    # 7 trajectories in batches of 4: the last batch of each epoch (3 rows) splits unevenly, 2 + 1; collection in
    # 3 batches is split over the ranks (0 and 2 on rank 0, 1 on rank 1).
    overrides = [f"base={tmp_path / 'base'}", "mode=lora", "lora_rank=4", "steps=10", "trajectories=7",
                 "collect_batch=3", "epochs=2", "batch_size=4", "eval_observations=2", "checkpoint_every=1",
                 f"lr={LR}", "device=cpu"]
    single, multi = tmp_path / "pcm_single", tmp_path / "pcm_multi"
    m_single = run_command("train-pcm", overrides + [f"output_dir={single}"])
    torchrun("train-pcm", overrides + [f"output_dir={multi}"])

    for shard in sorted((single / "trajectories").glob("batch_*.safetensors")):
        a, b = ckpt_io.read_weights(shard), ckpt_io.read_weights(multi / "trajectories" / shard.name)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    assert_same_checkpoint(ckpt_io.latest_checkpoint(single), ckpt_io.latest_checkpoint(multi), "online")
    m_multi = json.loads((multi / "metrics.json").read_text())
    assert m_multi["processes"] == 2 and m_multi["steps"] == m_single["steps"] == 4
    assert m_multi["loss_per_epoch"] == pytest.approx(m_single["loss_per_epoch"], rel=1e-5)


@pytest.mark.parametrize("command, overrides, message", [
    ("train", ["train.batch_size=15", *TINY], "train.batch_size=15 is not divisible by the 2 processes"),
    ("train-pcm", ["base=unused", "batch_size=3", "device=cpu"], "batch_size=3 is not divisible by the 2 processes"),
])
def test_batch_not_divisible_by_processes_is_a_one_line_error(monkeypatch, capsys, tmp_path, data, command,
                                                                 overrides, message):
    # The check runs before any process group is set up, so the torchrun environment alone triggers it.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    dataset = f"dataset.path={data}" if command == "train" else f"dataset_path={data}"
    assert main([command, dataset, f"output_dir={tmp_path / 'out'}", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
