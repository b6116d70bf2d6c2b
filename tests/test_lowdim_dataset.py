import h5py
import numpy as np
import pytest
import torch

from pcm_policy.data.lowdim_dataset import LowDimDataset
from pcm_policy.errors import ConfigError, DatasetError
from tests.fixtures import ROBOMIMIC_LENGTHS, pusht_arrays, write_pusht_zarr


def _pusht_obs_action():
    a = pusht_arrays()
    return np.concatenate([a["keypoint"].reshape(-1, 18), a["state"][:, :2]], 1), a["action"]


@pytest.mark.parametrize("fixture", ["pusht_zarr_dir", "pusht_zarr_zip"])
def test_pusht_windows_match_hand_computed_padding(fixture, request):
    path = request.getfixturevalue(fixture)
    ds = LowDimDataset.from_config("pusht_zarr", path, horizon=8, n_obs_steps=2, n_action_steps=4, val_ratio=0.0)
    obs, act = _pusht_obs_action()
    assert (ds.obs_dim, ds.action_dim, ds.n_episodes, ds.n_total_episodes) == (20, 2, 4, 4)
    # per episode of length L: windows start at -1 .. L - 8 + 3
    assert len(ds) == sum(L - 8 + 3 + 1 + 1 for L in (12, 9, 15, 10))
    first = ds[0]  # episode 0 starting one frame early: the first frame repeats
    assert first["obs"].dtype == torch.float32 and first["obs"].shape == (2, 20) and first["action"].shape == (8, 2)
    np.testing.assert_array_equal(first["obs"].numpy(), obs[[0, 0]])
    np.testing.assert_array_equal(first["action"].numpy(), act[[0, 0, 1, 2, 3, 4, 5, 6]])
    last_ep0 = ds[8]  # episode 0 (12 steps) starting at 7: frames 7..11 then the last frame three times
    np.testing.assert_array_equal(last_ep0["obs"].numpy(), obs[[7, 8]])
    np.testing.assert_array_equal(last_ep0["action"].numpy(), act[[7, 8, 9, 10, 11, 11, 11, 11]])
    np.testing.assert_array_equal(ds[9]["action"].numpy(), act[[12, 12, 13, 14, 15, 16, 17, 18]])


def test_items_are_copies(pusht_zarr_dir):
    ds = LowDimDataset.from_config("pusht_zarr", pusht_zarr_dir, 8, 2, 4, val_ratio=0.0)
    item = ds[3]
    item["action"].zero_()
    assert ds[3]["action"].abs().sum() > 0


def test_split_normalizer_and_dataloader(pusht_zarr_dir):
    ds = LowDimDataset.from_config("pusht_zarr", pusht_zarr_dir, 16, 2, 8, val_ratio=0.3, seed=1)
    val = ds.get_validation_dataset()
    assert ds.n_episodes + val.n_episodes == 4 and val.n_episodes == 1
    assert not np.any(ds.train_mask & ds.val_mask)
    ends = ds.episode_ends
    starts = np.concatenate([[0], ends[:-1]])
    (val_ep,) = np.nonzero(ds.val_mask)[0]
    assert np.all((val.sampler.indices[:, 0] >= starts[val_ep]) & (val.sampler.indices[:, 1] <= ends[val_ep]))
    assert len(val) > 0 and len(ds) > 0
    # same seed -> same split
    again = LowDimDataset.from_config("pusht_zarr", pusht_zarr_dir, 16, 2, 8, val_ratio=0.3, seed=1)
    np.testing.assert_array_equal(again.val_mask, ds.val_mask)
    # normalizer is fitted on training episodes only
    norm = ds.get_normalizer()
    obs, act = _pusht_obs_action()
    rows = np.repeat(ds.train_mask, np.diff(ends, prepend=0))
    np.testing.assert_allclose(norm.params["action"]["min"].numpy(), act[rows].min(0))
    np.testing.assert_allclose(norm.params["obs"]["max"].numpy(), obs[rows].max(0))
    assert not np.allclose(norm.params["action"]["min"].numpy(), act.min(0))  # the val episode differs
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True)))
    assert batch["obs"].shape == (4, 2, 20) and batch["action"].shape == (4, 16, 2)
    n = norm.normalize("action", batch["action"])
    assert n.min() >= -1 - 1e-6 and n.max() <= 1 + 1e-6


def test_max_train_episodes(pusht_zarr_dir):
    ds = LowDimDataset.from_config("pusht_zarr", pusht_zarr_dir, 8, 2, 4, val_ratio=0.0, max_train_episodes=2)
    assert ds.n_episodes == 2 and ds.n_total_episodes == 4


def test_robomimic_delta_abs_and_filter_key(robomimic_hdf5, robomimic_abs_hdf5):
    ds = LowDimDataset.from_config("robomimic_hdf5", robomimic_hdf5, 8, 2, 4, val_ratio=0.0)
    assert (ds.obs_dim, ds.action_dim, ds.n_episodes) == (19, 7, 3)
    assert ds.demo_names == ["demo_0", "demo_2", "demo_10"] and ds.env_args["env_name"] == "Lift"
    assert ds.episode_ends.tolist() == np.cumsum(ROBOMIMIC_LENGTHS).tolist()
    ab = LowDimDataset.from_config("robomimic_hdf5", robomimic_abs_hdf5, 8, 2, 4, abs_action=True, val_ratio=0.0)
    assert ab.action_dim == 10 and ab.abs_action and ab[0]["action"].shape == (8, 10)
    tr = LowDimDataset.from_config("robomimic_hdf5", robomimic_hdf5, 8, 2, 4, filter_key="train", val_ratio=0.0,
                                   obs_keys=["robot0_eef_pos", "robot0_gripper_qpos"])
    assert tr.demo_names == ["demo_0", "demo_10"] and tr.obs_dim == 5
    with pytest.raises(DatasetError, match="unknown filter key 'test'"):
        LowDimDataset.from_config("robomimic_hdf5", robomimic_hdf5, 8, 2, 4, filter_key="test")
    with pytest.raises(DatasetError, match="has no obs/nope"):
        LowDimDataset.from_config("robomimic_hdf5", robomimic_hdf5, 8, 2, 4, obs_keys=["nope"])


def test_nan_rejected_naming_file_episode_and_key(tmp_path):
    arrays = pusht_arrays()
    arrays["state"][25, 3] = np.nan  # episode 2 covers rows 21..35
    path = write_pusht_zarr(tmp_path / "x.zarr", arrays=arrays)
    with pytest.raises(DatasetError) as info:
        LowDimDataset.from_config("pusht_zarr", path, 8, 2, 4)
    assert str(info.value) == f"{path}: episode 2 has NaN/inf in data/state"
    arrays = pusht_arrays()
    arrays["action"][0, 0] = np.inf
    path = write_pusht_zarr(tmp_path / "y.zarr", arrays=arrays)
    with pytest.raises(DatasetError, match="episode 0 has NaN/inf in data/action"):
        LowDimDataset.from_config("pusht_zarr", path, 8, 2, 4)


def test_nan_rejected_in_robomimic(robomimic_hdf5):
    with h5py.File(robomimic_hdf5, "a") as f:
        f["data/demo_10/obs/robot0_eef_quat"][3, 1] = np.nan
    with pytest.raises(DatasetError, match=r"episode 2 \(demo_10\) has NaN/inf in obs/robot0_eef_quat"):
        LowDimDataset.from_config("robomimic_hdf5", robomimic_hdf5, 8, 2, 4)


def test_empty_and_too_short_datasets_and_bad_config(tmp_path, robomimic_hdf5, pusht_zarr_dir):
    with h5py.File(robomimic_hdf5, "a") as f:
        f["mask/empty"] = np.array([], dtype="S8")
    with pytest.raises(DatasetError, match="no demos in mask/empty"):
        LowDimDataset.from_config("robomimic_hdf5", robomimic_hdf5, 8, 2, 4, filter_key="empty")
    with pytest.raises(DatasetError, match="no training windows"):
        LowDimDataset.from_config("pusht_zarr", pusht_zarr_dir, 40, 2, 8)
    with pytest.raises(ConfigError, match="kind"):
        LowDimDataset.from_config("lerobot", pusht_zarr_dir, 8, 2, 4)
    with pytest.raises(ConfigError, match="n_action_steps"):
        LowDimDataset.from_config("pusht_zarr", pusht_zarr_dir, 8, 2, 8)
    with pytest.raises(DatasetError, match="no such file"):
        LowDimDataset.from_config("pusht_zarr", tmp_path / "missing.zarr", 8, 2, 4)
