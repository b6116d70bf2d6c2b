import json
import shutil

import numpy as np
import pytest
import zarr

from pcm_policy.data.replay_buffer import ReplayBuffer
from pcm_policy.errors import DatasetError
from tests.fixtures import PUSHT_EPISODE_LENGTHS, pusht_arrays, write_pusht_zarr


def _raises_one_line(path, match, **kw):
    with pytest.raises(DatasetError, match=match) as info:
        ReplayBuffer.open(path, **kw)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def _buffer(lengths=(5, 1, 8), seed=0):
    rng = np.random.default_rng(seed)
    rb = ReplayBuffer()
    for n in lengths:
        rb.add_episode({"state": rng.normal(size=(n, 5)).astype(np.float32),
                        "keypoint": rng.normal(size=(n, 9, 2)).astype(np.float32),
                        "img": rng.integers(0, 255, (n, 4, 4, 3), dtype=np.uint8)})
    return rb


@pytest.mark.parametrize("fixture", ["pusht_zarr_dir", "pusht_zarr_zip"])
def test_open_reads_the_diffusion_policy_layout(fixture, request):
    path = request.getfixturevalue(fixture)
    rb = ReplayBuffer.open(path)
    expected = pusht_arrays()
    assert rb.n_episodes == 4 and rb.n_steps == sum(PUSHT_EPISODE_LENGTHS)
    np.testing.assert_array_equal(rb.episode_ends, expected["episode_ends"])
    np.testing.assert_array_equal(rb.episode_lengths, PUSHT_EPISODE_LENGTHS)
    assert sorted(rb.keys()) == ["action", "keypoint", "n_contacts", "state"]
    for k in rb.keys():
        np.testing.assert_array_equal(rb[k], expected[k])
    assert rb["keypoint"].shape == (46, 9, 2) and rb["state"].dtype == np.float32
    ep = rb.get_episode(2)
    np.testing.assert_array_equal(ep["action"], expected["action"][21:36])
    np.testing.assert_array_equal(rb.get_episode(-1)["state"], expected["state"][36:])


def test_open_loads_only_requested_keys(pusht_zarr_dir):
    rb = ReplayBuffer.open(pusht_zarr_dir, keys=["state", "action"])
    assert rb.keys() == ["state", "action"]
    _raises_one_line(pusht_zarr_dir, "no array data/img; available: action, keypoint, n_contacts, state", keys=["img"])


@pytest.mark.parametrize("name", ["rb.zarr", "rb.zarr.zip"])
@pytest.mark.parametrize("chunk_length", [1, 3, 5, 1000, None])
def test_save_open_round_trip_with_odd_chunking(tmp_path, name, chunk_length):
    rb = _buffer()
    path = tmp_path / name
    rb.save(path, chunk_length=chunk_length)
    back = ReplayBuffer.open(path)
    np.testing.assert_array_equal(back.episode_ends, [5, 6, 14])
    for k in rb.keys():
        np.testing.assert_array_equal(back[k], rb[k])
        assert back[k].dtype == rb[k].dtype
    store = zarr.storage.ZipStore(path, mode="r") if name.endswith(".zip") else str(path)
    root = zarr.open_group(store, mode="r")
    assert root.metadata.zarr_format == 2
    st = root["data/state"]
    assert st.chunks[0] == min(chunk_length or 14, 14) and st.chunks[1:] == (5,)
    assert st.compressors[0].codec_id == "blosc"
    ends = root["meta/episode_ends"]
    assert ends.dtype == np.int64 and ends.compressors == ()
    if not isinstance(store, str):
        store.close()


def test_saved_files_are_zarr_v2_on_disk(tmp_path):
    _buffer().save(tmp_path / "rb.zarr", chunk_length=4)
    meta = json.loads((tmp_path / "rb.zarr/data/keypoint/.zarray").read_text())
    assert meta["zarr_format"] == 2 and meta["chunks"] == [4, 9, 2] and meta["compressor"]["id"] == "blosc"
    assert json.loads((tmp_path / "rb.zarr/meta/episode_ends/.zarray").read_text())["compressor"] is None
    assert (tmp_path / "rb.zarr/.zgroup").exists()


@pytest.mark.parametrize("name", ["rb.zarr", "rb.zarr.zip"])
def test_save_overwrites_atomically_and_failure_keeps_old_file(tmp_path, monkeypatch, name):
    path = tmp_path / name
    _buffer((3, 3)).save(path)
    _buffer((2, 4, 6), seed=1).save(path)
    assert ReplayBuffer.open(path).episode_ends.tolist() == [2, 6, 12]
    # fail in the middle of writing: after the first array is on disk
    original, calls = zarr.Group.create_array, []

    def failing_create_array(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(zarr.Group, "create_array", failing_create_array)
    with pytest.raises(OSError, match="disk full"):
        _buffer((7,)).save(path)
    monkeypatch.undo()
    assert ReplayBuffer.open(path).episode_ends.tolist() == [2, 6, 12]
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temp leftovers


def test_add_episode_validates_and_get_episode():
    rb = ReplayBuffer()
    assert rb.n_episodes == 0 and rb.n_steps == 0 and rb.episode_ends.tolist() == []
    rb.add_episode({"a": np.zeros((3, 2)), "b": np.ones(3)})
    rb.add_episode({"a": np.ones((2, 2)), "b": np.zeros(2)})
    assert rb.episode_ends.tolist() == [3, 5] and rb["a"].shape == (5, 2)
    np.testing.assert_array_equal(rb.get_episode(1)["a"], np.ones((2, 2)))
    with pytest.raises(ValueError, match="keys"):
        rb.add_episode({"a": np.zeros((3, 2))})
    with pytest.raises(ValueError, match="first dim"):
        rb.add_episode({"a": np.zeros((3, 2)), "b": np.zeros(4)})
    with pytest.raises(ValueError, match="per-step shape"):
        rb.add_episode({"a": np.zeros((3, 3)), "b": np.zeros(3)})
    with pytest.raises(ValueError, match="at least one step"):
        rb.add_episode({"a": np.zeros((0, 2)), "b": np.zeros(0)})
    with pytest.raises(IndexError):
        rb.get_episode(2)
    assert rb.episode_ends.tolist() == [3, 5]  # failed adds changed nothing
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer().save("/nonexistent/never.zarr")


# ---- bad inputs: each is a one-line DatasetError naming the path -------------------------------------

def test_missing_path(tmp_path):
    _raises_one_line(tmp_path / "nope.zarr", "no such file")


def test_not_a_zarr(tmp_path):
    (tmp_path / "empty.zarr").mkdir()
    _raises_one_line(tmp_path / "empty.zarr", "not a readable zarr group")
    (tmp_path / "x.zarr.zip").write_bytes(b"this is not a zip")
    _raises_one_line(tmp_path / "x.zarr.zip", "not a valid zip file")
    (tmp_path / "x.bin").write_bytes(b"\x00" * 64)
    _raises_one_line(tmp_path / "x.bin", "not a zarr directory or .zarr.zip")


def test_truncated_zip(tmp_path, pusht_zarr_zip):
    data = pusht_zarr_zip.read_bytes()
    bad = tmp_path / "trunc.zarr.zip"
    bad.write_bytes(data[: len(data) // 2])
    _raises_one_line(bad, "not a valid zip file")


def test_zip_member_corrupt(tmp_path, pusht_zarr_zip):
    import zipfile

    # zarr writes chunks concurrently, so member order varies: locate the chunk's payload through the zip index.
    with zipfile.ZipFile(pusht_zarr_zip) as zf:
        member = zf.getinfo("data/state/0.0")
    data = bytearray(pusht_zarr_zip.read_bytes())
    name_len = int.from_bytes(data[member.header_offset + 26:member.header_offset + 28], "little")
    extra_len = int.from_bytes(data[member.header_offset + 28:member.header_offset + 30], "little")
    payload = member.header_offset + 30 + name_len + extra_len
    data[payload + member.compress_size // 2] ^= 0xFF
    bad = tmp_path / "crc.zarr.zip"
    bad.write_bytes(bytes(data))
    _raises_one_line(bad, "cannot read data/state")


def test_ends_not_increasing(tmp_path):
    arrays = pusht_arrays()
    arrays["episode_ends"] = np.array([12, 30, 21, 46])
    path = write_pusht_zarr(tmp_path / "x.zarr", arrays=arrays)
    _raises_one_line(path, r"must increase strictly, but \[1\]=30 >= \[2\]=21")


def test_ends_not_positive_or_empty(tmp_path):
    arrays = pusht_arrays()
    arrays["episode_ends"] = np.array([0, 12, 21, 36, 46])
    _raises_one_line(write_pusht_zarr(tmp_path / "a.zarr", arrays=arrays), r"episode_ends\[0\]=0")
    arrays = {k: v[:0] for k, v in pusht_arrays().items()}
    _raises_one_line(write_pusht_zarr(tmp_path / "b.zarr", arrays=arrays), "empty")


def test_ends_do_not_match_array_length(tmp_path):
    arrays = pusht_arrays()
    arrays["action"] = arrays["action"][:40]
    path = write_pusht_zarr(tmp_path / "x.zarr", arrays=arrays)
    msg = _raises_one_line(path, r"meta/episode_ends\[-1\]=46 but data/action has 40 rows")
    assert msg == f"{path}: meta/episode_ends[-1]=46 but data/action has 40 rows"


def test_missing_data_group_or_ends_or_arrays(pusht_zarr_dir, tmp_path):
    other = tmp_path / "copy.zarr"
    shutil.copytree(pusht_zarr_dir, other)
    shutil.rmtree(pusht_zarr_dir / "data")
    _raises_one_line(pusht_zarr_dir, "missing group data/")
    shutil.rmtree(other / "meta/episode_ends")
    _raises_one_line(other, "missing array meta/episode_ends")
    root = zarr.open_group(tmp_path / "nodata.zarr", mode="w", zarr_format=2)
    root.create_group("data")
    root.create_array("meta/episode_ends", data=np.array([3]), compressors=None)
    _raises_one_line(tmp_path / "nodata.zarr", "data/ holds no arrays")


def test_garbage_chunk_bytes(pusht_zarr_dir):
    (pusht_zarr_dir / "data/state/1.0").write_bytes(b"\x00garbage" * 4)
    _raises_one_line(pusht_zarr_dir, "cannot read data/state")


def test_truncated_chunk(pusht_zarr_dir):
    chunk = pusht_zarr_dir / "data/keypoint/2.0.0"
    chunk.write_bytes(chunk.read_bytes()[:20])
    _raises_one_line(pusht_zarr_dir, "cannot read data/keypoint")
    assert ReplayBuffer.open(pusht_zarr_dir, keys=["state"]).n_steps == 46  # other arrays still load


def test_corrupt_array_metadata(pusht_zarr_dir):
    (pusht_zarr_dir / "data/action/.zarray").write_text("{not json")
    _raises_one_line(pusht_zarr_dir, str(pusht_zarr_dir))
