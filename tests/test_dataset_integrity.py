"""Incomplete arrays are refused by every reader, never read as fill values: zarr chunks missing or truncated,
hdf5 chunks never written, external or virtual storage missing or short, truncated files. One line naming the file
and the array, from the library and from every command that reads the file."""
import os
import shutil
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from pcm_policy.data.info import dataset_info
from pcm_policy.data.lowdim_dataset import LowDimDataset
from pcm_policy.data.replay_buffer import ReplayBuffer
from pcm_policy.data.robomimic import RobomimicFile
from pcm_policy.errors import DatasetError
from tests.fixtures import TINY_POLICY, assert_refused, pusht_arrays, write_pusht_zarr, write_robomimic_fixture


def _zip_without(src: Path, dst: Path, member: str) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename != member:
                zout.writestr(info, zin.read(info.filename))
    return dst


@pytest.fixture
def broken_zarrs(tmp_path):
    """name -> (path, needles): PushT replay buffers whose data does not cover their declared shapes."""
    out = {}
    p = write_pusht_zarr(tmp_path / "missing.zarr")  # 7 chunks of 7 rows; drop the 4th
    os.remove(p / "data/action/3.0")
    out["missing chunk (dir)"] = (p, ["data/action: 6 of 7 chunks present", "data/action/3.0"])
    z = write_pusht_zarr(tmp_path / "full.zarr.zip")
    out["missing chunk (zip)"] = (_zip_without(z, tmp_path / "missing.zarr.zip", "data/action/3.0"),
                                  ["data/action: 6 of 7 chunks present"])
    p = write_pusht_zarr(tmp_path / "nested.zarr")  # chunks stored as a/3/0 while .zarray declares "." keys
    for chunk in sorted((p / "data/action").glob("[0-9]*.0")):
        (chunk.parent / chunk.name.split(".")[0]).mkdir()
        chunk.rename(chunk.parent / chunk.name.split(".")[0] / "0")
    out["chunks under another key layout"] = (p, ["data/action: 0 of 7 chunks present"])
    p = write_pusht_zarr(tmp_path / "truncated_blosc.zarr")
    chunk = p / "data/action/3.0"
    chunk.write_bytes(chunk.read_bytes()[:-8])  # numcodecs would decode this from memory past the buffer
    out["truncated Blosc chunk"] = (p, ["data/action", "data/action/3.0", "Blosc header"])
    p = write_pusht_zarr(tmp_path / "truncated_raw.zarr")
    chunk = p / "meta/episode_ends/0"
    chunk.write_bytes(chunk.read_bytes()[:-8])
    out["truncated uncompressed chunk"] = (p, ["meta/episode_ends", "truncated"])
    p = write_pusht_zarr(tmp_path / "missing_ends.zarr")
    os.remove(p / "meta/episode_ends/0")
    out["missing episode_ends chunk"] = (p, ["meta/episode_ends: 0 of 1 chunks present"])
    return out


def test_missing_chunk_count_agrees_with_zarr(broken_zarrs):
    path = broken_zarrs["missing chunk (dir)"][0]
    arr = zarr.open_group(str(path), mode="r")["data/action"]
    assert (arr.nchunks_initialized, arr.nchunks) == (6, 7)  # the count the message reports


def test_incomplete_zarr_refused_by_every_reader(broken_zarrs, capsys):
    for name, (path, needles) in broken_zarrs.items():
        with pytest.raises(DatasetError) as info:
            dataset_info(path)
        assert str(path) in str(info.value) and all(n in str(info.value) for n in needles), (name, info.value)
        with pytest.raises(DatasetError, match="data/action|episode_ends"):
            ReplayBuffer.open(path)
        with pytest.raises(DatasetError):
            LowDimDataset.from_config("pusht_zarr", path, horizon=16, n_obs_steps=2, n_action_steps=8)
        assert_refused(capsys, path.parent, "data", "info", path, needles=[str(path), *needles])


def test_incomplete_zarr_refused_by_pcm_train(broken_zarrs, capsys, tmp_path):
    path, needles = broken_zarrs["missing chunk (dir)"]
    assert_refused(capsys, tmp_path, "train", f"dataset.path={path}", f"output_dir={tmp_path / 'out'}", "device=cpu",
                   "train.steps=2", *TINY_POLICY, needles=needles)


def test_reading_a_subset_checks_that_subset():
    """A reader refuses the arrays it reads; `pcm data info` (which lists all of them) refuses any."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = write_pusht_zarr(Path(d) / "p.zarr")
        os.remove(path / "data/n_contacts/2.0")
        assert ReplayBuffer.open(path, keys=["state", "action"]).n_steps == 46
        with pytest.raises(DatasetError, match="data/n_contacts: 6 of 7"):
            ReplayBuffer.open(path)
        with pytest.raises(DatasetError, match="data/n_contacts: 6 of 7"):
            dataset_info(path)


@pytest.mark.parametrize("suffix", [".zarr", ".zarr.zip"])
def test_all_zero_chunks_are_written_and_read_back(tmp_path, suffix):
    """zarr 3 skips all-fill chunks by default; the writers store them, so their files pass the check."""
    rb = ReplayBuffer()
    rb.add_episode({"action": np.ones((5, 2), np.float32), "n_contacts": np.zeros((5, 1), np.float32)})
    rb.add_episode({"action": np.ones((4, 2), np.float32), "n_contacts": np.zeros((4, 1), np.float32)})
    rb.save(tmp_path / f"b{suffix}", chunk_length=2)
    back = ReplayBuffer.open(tmp_path / f"b{suffix}")
    np.testing.assert_array_equal(back["n_contacts"], np.zeros((9, 1)))
    arrays = pusht_arrays()
    arrays["n_contacts"][:] = 0
    assert dataset_info(write_pusht_zarr(tmp_path / f"f{suffix}", arrays=arrays))["steps"] == 46


def _rewrite(path: Path, key: str, make) -> None:
    """Replace dataset `key` of an hdf5 file by `make(file, key, data)`."""
    with h5py.File(path, "a") as f:
        data = f[key][()]
        del f[key]
        make(f, key, data)


def _external(raw: Path):
    """A `make` for _rewrite: the dataset's bytes stored in the external raw file `raw`."""
    def make(f, k, data):
        f.create_dataset(k, shape=data.shape, dtype=data.dtype, external=[(str(raw), 0, data.nbytes)])[...] = data
    return make


def _virtual(source: Path, rows: int | None = None):
    """A `make` for _rewrite: a virtual dataset mapping the first `rows` rows (all) to dataset "a" of `source`."""
    def make(f, k, data):
        n = len(data) if rows is None else rows
        with h5py.File(source, "w") as src:
            src["a"] = data[:n]
        layout = h5py.VirtualLayout(shape=data.shape, dtype=data.dtype)
        layout[:n] = h5py.VirtualSource(str(source), "a", shape=(n, *data.shape[1:]))
        f.create_virtual_dataset(k, layout, fillvalue=0)
    return make


@pytest.fixture
def broken_hdf5s(tmp_path):
    """name -> (path, needles): robomimic files whose datasets' storage does not cover their shapes."""
    out = {}
    key = "data/demo_0/actions"  # (8, 7)

    def partial_chunks(f, k, data):
        ds = f.create_dataset(k, shape=data.shape, dtype=data.dtype, chunks=(2, 7))
        ds[:4] = data[:4]  # chunks 2 and 3 never written
    p = write_robomimic_fixture(tmp_path / "chunks.hdf5")
    _rewrite(p, key, partial_chunks)
    out["chunks never written"] = (p, [f"{key}: 2 of 4 chunks present"])

    p = write_robomimic_fixture(tmp_path / "unallocated.hdf5")
    _rewrite(p, key, lambda f, k, data: f.create_dataset(k, shape=data.shape, dtype=data.dtype))
    out["contiguous, never written"] = (p, [key, "no data stored"])

    p = write_robomimic_fixture(tmp_path / "external.hdf5")
    _rewrite(p, key, _external(tmp_path / "raw.bin"))
    os.remove(tmp_path / "raw.bin")
    out["external file missing"] = (p, [key, "external data file", "raw.bin"])

    p = write_robomimic_fixture(tmp_path / "external_short.hdf5")
    _rewrite(p, key, _external(tmp_path / "short.bin"))
    with open(tmp_path / "short.bin", "r+b") as f:
        f.truncate(16)
    out["external file truncated"] = (p, [key, "short.bin", "truncated"])

    p = write_robomimic_fixture(tmp_path / "virtual.hdf5")
    _rewrite(p, key, _virtual(tmp_path / "source.h5"))
    os.remove(tmp_path / "source.h5")
    out["virtual source missing"] = (p, [key, "virtual source file", "source.h5"])

    p = write_robomimic_fixture(tmp_path / "virtual_half.hdf5")
    _rewrite(p, key, _virtual(tmp_path / "half.h5", rows=4))
    out["virtual mapping covers half"] = (p, [key, "cover 28 of 56 elements"])

    p = write_robomimic_fixture(tmp_path / "truncated.hdf5")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) * 2 // 3])
    out["truncated file"] = (p, ["truncated"])
    return out


@pytest.mark.parametrize("storage", ["virtual", "external"])
def test_complete_virtual_and_external_datasets_still_load(tmp_path, storage):
    p = write_robomimic_fixture(tmp_path / "v.hdf5")
    with h5py.File(p, "r") as f:
        expected = f["data/demo_0/actions"][()]
    make = _virtual(tmp_path / "source.h5") if storage == "virtual" else _external(tmp_path / "raw.bin")
    _rewrite(p, "data/demo_0/actions", make)
    with RobomimicFile(p) as rf:
        np.testing.assert_array_equal(rf.load_demo("demo_0")["actions"], expected)


def test_incomplete_hdf5_refused_by_every_reader(broken_hdf5s, capsys, tmp_path):
    for name, (path, needles) in broken_hdf5s.items():
        with pytest.raises(DatasetError) as info:
            dataset_info(path)
        assert str(path) in str(info.value) and all(n in str(info.value) for n in needles), (name, info.value)
        with pytest.raises(DatasetError):
            RobomimicFile(path)
        with pytest.raises(DatasetError):
            LowDimDataset.from_config("robomimic_hdf5", path, horizon=4, n_obs_steps=2, n_action_steps=2)
        assert_refused(capsys, tmp_path, "data", "info", path, needles=[str(path), *needles])
    path, needles = broken_hdf5s["chunks never written"]
    assert_refused(capsys, tmp_path, "train", "task=lift", f"dataset.path={path}", f"output_dir={tmp_path / 'out'}",
                   "device=cpu", "train.steps=2", "policy.horizon=4", "policy.n_action_steps=2", *TINY_POLICY, needles=needles)


def test_incomplete_dataset_refused_by_train_pcm_and_bench(tiny_runs, broken_zarrs, capsys):
    """Commands that read a checkpoint's training set (train-pcm, bench) refuse it before writing anything."""
    runs = tiny_runs
    path, needles = broken_zarrs["missing chunk (dir)"]
    assert_refused(capsys, runs, "train-pcm", f"base={runs / 'base'}", f"dataset_path={path}", "device=cpu",
                   f"output_dir={runs / 'new_pcm'}", "steps=8", needles=needles)
    data = runs / "d.zarr"  # the dataset the base's config.yaml names, which bench reads observations from
    shutil.copytree(data, runs / "d_ok.zarr")
    try:
        os.remove(data / "data/action/1.0")
        assert_refused(capsys, runs, "bench", f"checkpoint={runs / 'base'}", "device=cpu", "chunks=1", "warmup=0",
                       "schedules=[ddim2]", "early_stop=false", f"output_dir={runs / 'bench'}",
                       needles=["data/action", "chunks present"])
    finally:
        shutil.rmtree(data)
        shutil.move(runs / "d_ok.zarr", data)
