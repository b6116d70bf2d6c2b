import h5py
import numpy as np
import pytest

from pcm_policy.data.info import dataset_info, detect_format
from pcm_policy.errors import DatasetError
from tests.fixtures import ROBOMIMIC_LENGTHS, pusht_arrays, write_pusht_zarr


@pytest.mark.parametrize("fixture", ["pusht_zarr_dir", "pusht_zarr_zip"])
def test_zarr_info(fixture, request):
    path = request.getfixturevalue(fixture)
    info = dataset_info(path)
    assert info["format"] == "zarr" and info["path"] == str(path)
    assert info["episodes"] == 4 and info["steps"] == 46
    assert info["arrays"] == {"data/action": [46, 2], "data/keypoint": [46, 9, 2], "data/n_contacts": [46, 1],
                              "data/state": [46, 5]}
    assert info["dtypes"]["data/state"] == "float32"
    assert info["episode_length"] == {"min": 9, "max": 15, "mean": 11.5}


def test_robomimic_info(robomimic_hdf5):
    info = dataset_info(robomimic_hdf5)
    total = sum(ROBOMIMIC_LENGTHS)
    assert info["format"] == "robomimic" and info["env_name"] == "Lift"
    assert info["episodes"] == 3 and info["steps"] == total
    assert info["arrays"]["obs/object"] == [total, 10] and info["arrays"]["actions"] == [total, 7]
    assert info["arrays"]["obs/robot0_eef_quat"] == [total, 4]
    assert info["masks"] == {"train": 2, "valid": 1}


def test_detect_format_by_content(tmp_path, robomimic_hdf5, pusht_zarr_zip):
    renamed = tmp_path / "data.bin"
    renamed.write_bytes(robomimic_hdf5.read_bytes())
    assert detect_format(renamed) == "robomimic"
    other = tmp_path / "buffer.dat"
    other.write_bytes(pusht_zarr_zip.read_bytes())
    assert detect_format(other) == "zarr"


def test_info_errors_name_the_file(tmp_path, robomimic_hdf5):
    cases = {}
    cases[tmp_path / "missing.zarr"] = "no such file"
    (tmp_path / "plain.txt").write_text("hello")
    cases[tmp_path / "plain.txt"] = "unknown dataset format"
    (tmp_path / "dir").mkdir()
    cases[tmp_path / "dir"] = "not a zarr store"
    arrays = pusht_arrays()
    arrays["state"] = arrays["state"][:45]
    cases[write_pusht_zarr(tmp_path / "bad.zarr", arrays=arrays)] = "data/state has 45 rows"
    with h5py.File(robomimic_hdf5, "a") as f:
        del f["data/demo_2/obs/object"]
        f["data/demo_2/obs/object"] = np.zeros((6, 12))
    cases[robomimic_hdf5] = r"data/demo_2/obs/object has per-step shape \[12\], data/demo_0 has \[10\]"
    for path, match in cases.items():
        with pytest.raises(DatasetError, match=match) as info:
            dataset_info(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
