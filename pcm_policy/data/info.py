"""`dataset_info(path)`: what a dataset file holds, without loading it (backs `pcm info`)."""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import h5py
import numpy as np

from pcm_policy.data.robomimic import RobomimicFile
from pcm_policy.errors import DatasetError
from pcm_policy.tasks import missing_dataset


def detect_format(path: str | os.PathLike) -> str:
    """The format of a dataset file, by content rather than by name.

    Args:
        path: a zarr directory, a `.zarr.zip`, or a robomimic hdf5 file.

    Returns:
        `zarr` (a directory holding `.zgroup` or `zarr.json`, or a zip file) or `robomimic` (an HDF5 file).

    Raises:
        DatasetError: the path does not exist, is a directory that is not a zarr store, or is neither HDF5 nor zip.
    """
    p = Path(path)
    if not p.exists():
        raise missing_dataset(path)
    if p.is_dir():
        if any((p / marker).exists() for marker in (".zgroup", "zarr.json")):
            return "zarr"
        raise DatasetError(f"{path}: directory is not a zarr store (no .zgroup or zarr.json)")
    if h5py.is_hdf5(p):
        return "robomimic"
    if zipfile.is_zipfile(p):
        return "zarr"
    raise DatasetError(f"{path}: unknown dataset format (expected a zarr directory, .zarr.zip or robomimic hdf5)")


def dataset_info(path: str | os.PathLike) -> dict:
    """What a dataset file holds, read from metadata (no data arrays are loaded); backs `pcm data info`.

    The storage of every array is checked first (`pcm_policy.data.integrity`).

    Args:
        path: a PushT zarr replay buffer (directory or `.zarr.zip`) or a robomimic low-dim hdf5 file.

    Returns:
        {"format", "path", "episodes", "steps", "arrays" (name -> shape as a list, first dim = steps),
        "episode_length" ({"min", "max", "mean"} in steps)}; a zarr adds "dtypes" (name -> dtype string) and
        names arrays `data/<key>`; a robomimic file names `actions` and `obs/<key>` and adds "env_name" (None
        without `env_args`) and "masks" (filter name -> number of demos).

    Raises:
        DatasetError: a missing or unknown file, a broken replay-buffer layout (`meta/episode_ends`, row
            counts), an array whose storage does not cover its shape, no demos, a demo without actions, or
            demos whose arrays differ in names, step counts or per-step shapes.
    """
    fmt = detect_format(path)
    return _zarr_info(path) if fmt == "zarr" else _robomimic_info(path)


def _zarr_info(path) -> dict:
    from pcm_policy.data.replay_buffer import describe_zarr  # zarr loads only for a zarr file

    ends, arrays = describe_zarr(path)
    return {
        "format": "zarr", "path": str(path), "episodes": int(len(ends)), "steps": int(ends[-1]),
        "arrays": {f"data/{k}": list(shape) for k, (shape, _) in arrays.items()},
        "dtypes": {f"data/{k}": str(dtype) for k, (_, dtype) in arrays.items()},
        "episode_length": _length_stats(np.diff(ends, prepend=0)),
    }


def _robomimic_info(path) -> dict:
    with RobomimicFile(path) as rf:
        names = rf.demo_names()
        if not names:
            raise DatasetError(f"{path}: data/ holds no demos")
        lengths = []
        widths: dict[str, list[int]] = {}  # array name -> per-step shape, checked equal across demos
        for name in names:
            g = rf.demo_group(name)
            if not isinstance(g.get("actions"), h5py.Dataset):
                raise DatasetError(f"{path}: data/{name} has no actions")
            T = g["actions"].shape[0]
            entries = {"actions": g["actions"]}
            entries.update({f"obs/{k}": g[f"obs/{k}"] for k in rf.obs_keys(name)})
            if set(widths) and set(entries) != set(widths):
                raise DatasetError(f"{path}: data/{name} has arrays {sorted(entries)}, "
                                   f"data/{names[0]} has {sorted(widths)}")
            for key, ds in entries.items():
                if ds.shape[0] != T:
                    raise DatasetError(f"{path}: data/{name}/{key} has {ds.shape[0]} steps but actions has {T}")
                if widths.setdefault(key, list(ds.shape[1:])) != list(ds.shape[1:]):
                    raise DatasetError(f"{path}: data/{name}/{key} has per-step shape {list(ds.shape[1:])}, "
                                       f"data/{names[0]} has {widths[key]}")
            lengths.append(T)
        total = int(sum(lengths))
        env_args = rf.env_args if rf.has_env_args else {}
        masks = {m: len(rf.demo_names(m)) for m in rf.mask_names()}
    return {
        "format": "robomimic", "path": str(path), "episodes": len(names), "steps": total,
        "arrays": {k: [total, *w] for k, w in sorted(widths.items())},
        "env_name": env_args.get("env_name"), "masks": masks,
        "episode_length": _length_stats(np.asarray(lengths)),
    }


def _length_stats(lengths: np.ndarray) -> dict:
    return {"min": int(lengths.min()), "max": int(lengths.max()), "mean": float(lengths.mean())}
