import json

import h5py
import numpy as np
import pytest

from pcm_policy.data.robomimic import DEFAULT_OBS_KEYS, RobomimicFile, write_robomimic_hdf5
from pcm_policy.data.rotation import abs_action_from_10d
from pcm_policy.errors import DatasetError
from tests.fixtures import ROBOMIMIC_LENGTHS, robomimic_demos, write_robomimic_fixture


def _open_raises(path, match):
    with pytest.raises(DatasetError, match=match) as info:
        with RobomimicFile(path) as rf:
            for name in rf.demo_names():
                rf.load_demo(name)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_writer_produces_robomimic_layout(tmp_path):
    demos = robomimic_demos((4, 3))
    path = tmp_path / "d.hdf5"
    write_robomimic_hdf5(path, demos, {"env_name": "Lift", "env_kwargs": {"control_freq": np.int64(20),
                                                                       "kp": np.array([150.0, 150.0])}},
                         masks={"train": ["demo_0"], "valid": ["demo_1"]})
    with h5py.File(path, "r") as f:
        assert f["data"].attrs["total"] == 7
        env_args = json.loads(f["data"].attrs["env_args"])
        assert env_args["env_name"] == "Lift" and env_args["env_kwargs"] == {"control_freq": 20, "kp": [150.0, 150.0]}
        assert sorted(f["data"].keys()) == ["demo_0", "demo_1"]
        g = f["data/demo_1"]
        assert g.attrs["num_samples"] == 3
        np.testing.assert_array_equal(g["actions"][()], demos[1]["actions"])
        np.testing.assert_array_equal(g["obs/object"][()], demos[1]["obs"]["object"])
        np.testing.assert_array_equal(g["next_obs/robot0_eef_pos"][()], demos[1]["next_obs"]["robot0_eef_pos"])
        for k in ("rewards", "dones", "states"):
            assert g[k].shape[0] == 3
        assert f["mask/train"][()].tolist() == [b"demo_0"] and f["mask/valid"].dtype.kind == "S"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.hdf5"]  # written atomically, no temp left


def test_writer_rejects_inconsistent_demos_without_leaving_a_file(tmp_path):
    demos = robomimic_demos((4,))
    demos[0]["rewards"] = np.zeros(3)
    with pytest.raises(ValueError, match="rewards"):
        write_robomimic_hdf5(tmp_path / "d.hdf5", demos, {})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="unknown demo"):
        write_robomimic_hdf5(tmp_path / "d.hdf5", robomimic_demos((4,)), {}, masks={"train": ["demo_7"]})


def test_demo_names_sorted_numerically_and_masks(robomimic_hdf5):
    with RobomimicFile(robomimic_hdf5) as rf:
        assert rf.demo_names() == ["demo_0", "demo_2", "demo_10"]
        assert rf.demo_names("train") == ["demo_0", "demo_10"]
        assert rf.demo_names("valid") == ["demo_2"]
        assert rf.mask_names() == ["train", "valid"]
        assert rf.env_args["env_name"] == "Lift" and rf.env_args["env_kwargs"]["control_freq"] == 20
        assert rf.obs_keys("demo_2") == sorted(["object", "robot0_eef_pos", "robot0_eef_quat",
                                                "robot0_gripper_qpos", "robot0_joint_pos"])
        with pytest.raises(DatasetError, match=r"unknown filter key 'test'; available: train, valid"):
            rf.demo_names("test")


def test_load_demo_concatenates_in_the_given_order(robomimic_hdf5):
    demos = robomimic_demos()  # same seed as the fixture: demo_10 is the third demo
    with RobomimicFile(robomimic_hdf5) as rf:
        d = rf.load_demo("demo_10")
        T = ROBOMIMIC_LENGTHS[2]
        assert d["obs"].shape == (T, 19) and d["obs"].dtype == np.float32  # Lift: 10 + 3 + 4 + 2
        expected = np.concatenate([demos[2]["obs"][k] for k in DEFAULT_OBS_KEYS], 1).astype(np.float32)
        np.testing.assert_array_equal(d["obs"], expected)
        np.testing.assert_array_equal(d["actions"], demos[2]["actions"])
        np.testing.assert_array_equal(d["states"], demos[2]["states"])
        d2 = rf.load_demo("demo_10", ["robot0_eef_pos", "object"])
        np.testing.assert_array_equal(d2["obs"][:, :3], demos[2]["obs"]["robot0_eef_pos"].astype(np.float32))
        assert d2["obs"].shape == (T, 13)


def test_abs_actions_become_10d_and_convert_back(robomimic_abs_hdf5):
    demos = robomimic_demos(abs_action=True)
    with RobomimicFile(robomimic_abs_hdf5) as rf:
        a10 = rf.load_demo("demo_0", abs_action=True)["actions"]
        assert a10.shape == (ROBOMIMIC_LENGTHS[0], 10)
        np.testing.assert_allclose(abs_action_from_10d(a10), demos[0]["actions"], atol=1e-5)
        assert rf.load_demo("demo_0")["actions"].shape == (ROBOMIMIC_LENGTHS[0], 7)


def test_missing_file_not_hdf5_and_missing_data_group(tmp_path):
    _open_raises(tmp_path / "none.hdf5", "no such file")
    (tmp_path / "x.hdf5").write_bytes(b"not hdf5 at all")
    _open_raises(tmp_path / "x.hdf5", "not an HDF5 file")
    with h5py.File(tmp_path / "empty.hdf5", "w") as f:
        f.create_group("something")
    _open_raises(tmp_path / "empty.hdf5", "missing group data/")


def test_missing_obs_key_or_actions_or_length_mismatch(robomimic_hdf5):
    with h5py.File(robomimic_hdf5, "a") as f:
        del f["data/demo_2/obs/object"]
    _open_raises(robomimic_hdf5, r"data/demo_2 has no obs/object; available: robot0_eef_pos")
    with h5py.File(robomimic_hdf5, "a") as f:
        del f["data/demo_0/actions"]
    _open_raises(robomimic_hdf5, "data/demo_0 has no actions")


def test_obs_length_mismatch(tmp_path):
    path = write_robomimic_fixture(tmp_path / "d.hdf5")
    with h5py.File(path, "a") as f:
        del f["data/demo_10/obs/robot0_eef_pos"]
        f["data/demo_10/obs/robot0_eef_pos"] = np.zeros((3, 3))
    _open_raises(path, r"demo_10/obs/robot0_eef_pos has 3 steps but actions has 11")


def test_mask_naming_a_missing_demo(robomimic_hdf5):
    with h5py.File(robomimic_hdf5, "a") as f:
        f["mask/bad"] = np.array([b"demo_0", b"demo_99"])
    with RobomimicFile(robomimic_hdf5) as rf:
        with pytest.raises(DatasetError, match="mask/bad names demo_99"):
            rf.demo_names("bad")


def test_unknown_filter_without_masks(tmp_path):
    path = write_robomimic_fixture(tmp_path / "d.hdf5", masks={})
    with RobomimicFile(path) as rf:
        with pytest.raises(DatasetError, match="available: none"):
            rf.demo_names("train")


def test_env_args_missing_or_invalid(robomimic_hdf5):
    with h5py.File(robomimic_hdf5, "a") as f:
        f["data"].attrs["env_args"] = "{broken"
    with RobomimicFile(robomimic_hdf5) as rf:
        with pytest.raises(DatasetError, match="not valid JSON"):
            rf.env_args
    with h5py.File(robomimic_hdf5, "a") as f:
        del f["data"].attrs["env_args"]
    with RobomimicFile(robomimic_hdf5) as rf:
        assert not rf.has_env_args
        with pytest.raises(DatasetError, match="no env_args"):
            rf.env_args
        assert len(rf.load_demo("demo_0")["actions"]) == ROBOMIMIC_LENGTHS[0]  # data stays readable
