"""Shared test setup: quiet, offline, single-threaded; small dataset files in the real layouts; one set of tiny
trained runs for every test that needs a checkpoint; tripwires that fail a test when a command starts work."""
import os
import sys
from pathlib import Path

# The repo root is not on sys.path under an editable install; tests import shared writers as tests.fixtures.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # the test machine's cores are shared

from tests.fixtures import TINY_POLICY, write_pusht_zarr, write_robomimic_fixture  # noqa: E402


@pytest.fixture
def pusht_zarr_dir(tmp_path):
    """A PushT replay buffer as a zarr v2 directory (4 episodes, lengths 12, 9, 15, 10, chunks of 7 rows)."""
    return write_pusht_zarr(tmp_path / "pusht.zarr")


@pytest.fixture
def pusht_zarr_zip(tmp_path):
    """The same buffer as pusht_zarr_dir, as a .zarr.zip file."""
    return write_pusht_zarr(tmp_path / "pusht.zarr.zip")


@pytest.fixture
def robomimic_hdf5(tmp_path):
    """robomimic low-dim (delta actions) with demos demo_0, demo_2, demo_10; masks train / valid."""
    return write_robomimic_fixture(tmp_path / "low_dim.hdf5")


@pytest.fixture
def robomimic_abs_hdf5(tmp_path):
    """As robomimic_hdf5 but with absolute [pos3, axisangle3, gripper] actions."""
    return write_robomimic_fixture(tmp_path / "low_dim_abs.hdf5", abs_action=True)


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """Tiny PushT runs (seconds on a CPU; their actions mean nothing), trained once per session on `d.zarr`:
    `base` (10 steps, seed 0, T = 100), `other_base` (2 steps, seed 1), and LoRA PCMs for `base`: `pcm`
    (ddim8) and `pcm_ddpm8`. Tests must leave them as they found them."""
    from pcm_policy.commands import run_command

    root = tmp_path_factory.mktemp("tiny_runs")
    data = write_pusht_zarr(root / "d.zarr", lengths=[30, 40, 25, 35, 28])
    common = [f"dataset.path={data}", "device=cpu", "train.batch_size=16", *TINY_POLICY]
    run_command("train", [*common, f"output_dir={root / 'base'}", "train.steps=10", "train.checkpoint_every=10"])
    run_command("train", [*common, f"output_dir={root / 'other_base'}", "train.steps=2", "train.checkpoint_every=2",
                          "seed=1"])
    for name, scheduler, steps in (("pcm", "ddim", 8), ("pcm_ddpm8", "ddpm", 8)):
        run_command("train-pcm", [f"base={root / 'base'}", f"output_dir={root / name}", "device=cpu",
                                  f"scheduler={scheduler}", f"steps={steps}", "trajectories=4", "collect_batch=4",
                                  "epochs=1", "batch_size=4", "eval_observations=1", "lora_rank=2"])
    return root


class WorkStarted(BaseException):
    """Raised by a tripwire: the command started work before refusing (not caught by the CLI)."""


@pytest.fixture
def no_work(monkeypatch):
    """Loading a dataset or weights, making an env, collecting or saving now raises WorkStarted."""
    import importlib
    import pkgutil

    import gymnasium

    import pcm_policy

    # every module imported first, so none binds a tripwire by name (`from pcm_policy.checkpoint import ...` in
    # a module a refused command imports for the first time) and keeps it after the test
    for module in pkgutil.walk_packages(pcm_policy.__path__, "pcm_policy."):
        importlib.import_module(module.name)

    import envs.collect_pusht
    import envs.collect_robomimic
    import pcm_policy.checkpoint
    from pcm_policy.data.lowdim_dataset import LowDimDataset

    def tripwire(name):
        def trip(*args, **kwargs):
            raise WorkStarted(name)
        return trip

    monkeypatch.setattr(LowDimDataset, "from_config", tripwire("dataset loaded"))
    monkeypatch.setattr(pcm_policy.checkpoint, "read_weights", tripwire("weights loaded"))
    monkeypatch.setattr(pcm_policy.checkpoint, "save_checkpoint", tripwire("checkpoint saved"))
    monkeypatch.setattr(gymnasium, "make", tripwire("env made"))
    monkeypatch.setattr(gymnasium.vector, "SyncVectorEnv", tripwire("env made"))
    monkeypatch.setattr(gymnasium.vector, "AsyncVectorEnv", tripwire("env made"))
    monkeypatch.setattr(envs.collect_pusht, "collect_pusht", tripwire("collection started"))
    monkeypatch.setattr(envs.collect_robomimic, "collect_robomimic", tripwire("collection started"))

