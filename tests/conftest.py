"""Shared test setup: quiet, offline, single-threaded; small dataset files in the real layouts."""
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

from tests.fixtures import write_pusht_zarr, write_robomimic_fixture  # noqa: E402


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
