import h5py
import numpy as np
import pytest
import torch

from pcm_policy.data.image_dataset import ImageDataset, ZarrImages
from pcm_policy.data.lowdim_dataset import LowDimDataset
from pcm_policy.errors import DatasetError
from tests.fixtures import (PUSHT_EPISODE_LENGTHS, ROBOMIMIC_LENGTHS, pusht_image_arrays,
                            write_robomimic_image_fixture, write_pusht_zarr)

H, TO, TA = 8, 2, 4


def _held_arrays(obj, depth=2):
    """numpy arrays reachable from obj's attributes (depth levels), to show what a dataset keeps in memory."""
    out = []
    for value in vars(obj).values():
        if isinstance(value, np.ndarray):
            out.append(value)
        elif isinstance(value, dict):
            out += [v for v in value.values() if isinstance(v, np.ndarray)]
        elif depth > 1 and hasattr(value, "__dict__") and not isinstance(value, type):
            out += _held_arrays(value, depth - 1)
    return out


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_pusht_windows_match_lowdim_and_frames_follow_the_padding(tmp_path, dtype):
    arrays = pusht_image_arrays(dtype=dtype)
    path = write_pusht_zarr(tmp_path / "img.zarr", arrays=arrays)
    ds = ImageDataset.from_config("pusht_zarr", path, H, TO, TA, val_ratio=0.0)
    low = LowDimDataset(arrays["state"][:, :2], arrays["action"], arrays["episode_ends"], H, TO, TA,
                        np.ones(4, bool), np.zeros(4, bool))
    assert len(ds) == len(low) == sum(L - H + TA + TO - 1 for L in PUSHT_EPISODE_LENGTHS)
    assert (ds.obs_dim, ds.action_dim, ds.image_shape, ds.camera_keys) == (2, 2, (96, 96), ("img",))
    rows = np.arange(len(arrays["action"]))
    for i in (0, 1, 8, 9, len(ds) - 1):  # padded at the start, interior, padded at the end, next episode
        item = ds[i]
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (TO, 1, 3, 96, 96)
        np.testing.assert_array_equal(item["obs"].numpy(), low[i]["obs"].numpy())
        np.testing.assert_array_equal(item["action"].numpy(), low[i]["action"].numpy())
        expected_rows = low.sampler.sample({"row": rows}, i)["row"][:TO]  # the low-dim padding, applied to rows
        np.testing.assert_array_equal(item["image"][:, 0, 0, 0, 0].numpy(), expected_rows)
        np.testing.assert_array_equal(item["image"][:, 0].numpy(), arrays["img"][expected_rows].transpose(0, 3, 1, 2))
    assert ds.window_rows(0).tolist() == [0, 0]  # episode 0 starting one frame early: the first image repeats
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3, shuffle=True)))
    assert batch["image"].shape == (3, TO, 1, 3, 96, 96) and batch["obs"].shape == (3, TO, 2)


def test_pusht_images_are_read_lazily_with_a_bounded_cache(tmp_path):
    arrays = pusht_image_arrays()
    path = write_pusht_zarr(tmp_path / "img.zarr.zip", arrays=arrays, chunk_length=7)
    full = arrays["img"].nbytes
    chunk = 7 * 96 * 96 * 3
    ds = ImageDataset.from_config("pusht_zarr", path, H, TO, TA, val_ratio=0.0, cache_bytes=2 * chunk)
    held = sum(a.nbytes for a in _held_arrays(ds))
    assert held <= chunk + full // 40 and ds.images.cached_bytes == chunk  # one chunk decoded, no image array
    for i in range(len(ds)):
        ds[i]
    assert ds.images.cached_bytes <= 2 * chunk < full
    off = ImageDataset.from_config("pusht_zarr", path, H, TO, TA, val_ratio=0.0, cache_bytes=0)
    np.testing.assert_array_equal(off[5]["image"].numpy(), ds[5]["image"].numpy())
    assert off.images.cached_bytes == 0
    val = ImageDataset.from_config("pusht_zarr", path, H, TO, TA, val_ratio=0.3).get_validation_dataset()
    assert val.split == "val" and val.n_episodes == 1 and len(val) > 0 and val[0]["image"].shape[0] == TO


def test_robomimic_images_two_cameras_match_lowdim_windows(tmp_path):
    path = write_robomimic_image_fixture(tmp_path / "image.hdf5")
    ds = ImageDataset.from_config("robomimic_hdf5", path, H, TO, TA, val_ratio=0.0)
    assert ds.camera_keys == ("agentview_image", "robot0_eye_in_hand_image") and ds.image_shape == (84, 84)
    assert ds.obs_dim == 9 and ds.demo_names == ["demo_0", "demo_2", "demo_10"]  # eef pos 3 + quat 4 + gripper 2
    low = LowDimDataset.from_config("robomimic_hdf5", path, H, TO, TA, val_ratio=0.0,
                                    obs_keys=["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"])
    rows = np.arange(sum(ROBOMIMIC_LENGTHS))
    assert len(ds) == len(low)
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (TO, 2, 3, 84, 84)
        np.testing.assert_array_equal(item["obs"].numpy(), low[i]["obs"].numpy())
        np.testing.assert_array_equal(item["action"].numpy(), low[i]["action"].numpy())
        np.testing.assert_array_equal(item["image"][:, :, 0, 0, 0].numpy(),
                                      np.repeat(low.sampler.sample({"r": rows}, i)["r"][:TO, None], 2, axis=1))
        assert item["image"][:, :, 1, 0, 0].tolist() == [[0, 1]] * TO  # camera order as asked
    one = ImageDataset.from_config("robomimic_hdf5", path, H, TO, TA, val_ratio=0.0,
                                   camera_keys=["robot0_eye_in_hand_image"], filter_key="train")
    assert one.demo_names == ["demo_0", "demo_10"] and one[0]["image"].shape == (TO, 1, 3, 84, 84)


def test_missing_camera_wrong_size_channel_order_and_range_refused(tmp_path):
    path = write_robomimic_image_fixture(tmp_path / "image.hdf5")
    with pytest.raises(DatasetError, match=r"image.hdf5: data/demo_0 has no obs/frontview_image; available: "):
        ImageDataset.from_config("robomimic_hdf5", path, H, TO, TA, camera_keys=["frontview_image"])
    with pytest.raises(DatasetError, match=r"data/demo_0/obs/agentview_image holds 84x84 images: expected 96x96"):
        ImageDataset.from_config("robomimic_hdf5", path, H, TO, TA, image_shape=(96, 96))
    with h5py.File(path, "a") as f:
        img = f["data/demo_2/obs/agentview_image"][()]
        del f["data/demo_2/obs/agentview_image"]
        f["data/demo_2/obs/agentview_image"] = img.transpose(0, 3, 1, 2)
    with pytest.raises(DatasetError, match=r"demo_2/obs/agentview_image has shape \(6, 3, 84, 84\): channel-first"):
        ImageDataset.from_config("robomimic_hdf5", path, H, TO, TA)

    arrays = pusht_image_arrays()
    del arrays["img"]
    bare = write_pusht_zarr(tmp_path / "bare.zarr", arrays=arrays)
    with pytest.raises(DatasetError, match=r"bare.zarr: no array data/img; available: action, keypoint"):
        ImageDataset.from_config("pusht_zarr", bare, H, TO, TA)
    arrays = pusht_image_arrays(size=64)
    small = write_pusht_zarr(tmp_path / "small.zarr", arrays=arrays)
    with pytest.raises(DatasetError, match=r"small.zarr: data/img holds 64x64 images: expected 96x96"):
        ImageDataset.from_config("pusht_zarr", small, H, TO, TA, image_shape=(96, 96))
    arrays = pusht_image_arrays(dtype=np.float32)
    arrays["img"] /= 255.0
    unit = write_pusht_zarr(tmp_path / "unit.zarr", arrays=arrays)
    with pytest.raises(DatasetError, match=r"unit.zarr: data/img rows 0:7: float images within \[0, 1\]"):
        ImageDataset.from_config("pusht_zarr", unit, H, TO, TA)
    arrays = pusht_image_arrays(dtype=np.float32)
    arrays["img"][:7] = 0.0  # an all-black first chunk is 0..255 data, not [0, 1] floats
    arrays["img"][30, 5, 5, 2] = 300.0
    hot = write_pusht_zarr(tmp_path / "hot.zarr", arrays=arrays)
    ds = ImageDataset.from_config("pusht_zarr", hot, H, TO, TA, val_ratio=0.0)
    assert ds[0]["image"].max() == 0
    with pytest.raises(DatasetError, match=r"hot.zarr: data/img rows 28:35: float images outside 0..255 \(min 0, max 300"):
        ds.images.read(np.array([30]))
    arrays = pusht_image_arrays(size=32)
    arrays["img"] = np.ascontiguousarray(arrays["img"].transpose(0, 3, 1, 2))
    chw = write_pusht_zarr(tmp_path / "chw.zarr", arrays=arrays)
    with pytest.raises(DatasetError, match=r"chw.zarr: data/img has shape \(46, 3, 32, 32\): channel-first"):
        ImageDataset.from_config("pusht_zarr", chw, H, TO, TA)


def test_zarr_images_pickle_without_cache_or_handle(tmp_path):
    import pickle

    path = write_pusht_zarr(tmp_path / "img.zarr.zip", arrays=pusht_image_arrays())
    images = ZarrImages(path)
    first = images.read(np.array([3, 4]))
    clone = pickle.loads(pickle.dumps(images))
    assert clone.cached_bytes == 0
    np.testing.assert_array_equal(clone.read(np.array([3, 4])), first)


def test_image_modules_import_no_zarr_or_simulator():
    """The GPU image has no zarr/gymnasium: an hdf5 image dataset and the encoder must not pull them in."""
    import subprocess
    import sys

    code = ("import sys, pcm_policy.data.image_dataset, pcm_policy.model.vision; "
            "print(' '.join(m for m in sys.modules if m.split('.')[0] in ('zarr', 'numcodecs', 'gymnasium')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == []
