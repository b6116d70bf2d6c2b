"""robomimic low-dim hdf5 datasets (read and write) with h5py only.

Layout: `data` (attrs `total`, `env_args` JSON) holding `demo_<k>` groups (attr `num_samples`) with `actions`
(T, 7), `obs/<key>` (T, d), `next_obs/<key>`, `rewards`, `dones`, `states`; `mask/<filter>` arrays of demo
names (bytes). Demo numbers are not contiguous, so they are ordered numerically, not as strings.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import h5py
import numpy as np

from pcm_policy.atomic import atomic_path
from pcm_policy.data.integrity import check_hdf5_dataset
from pcm_policy.data.rotation import abs_action_to_10d
from pcm_policy.errors import DatasetError
from pcm_policy.tasks import missing_dataset

DEFAULT_OBS_KEYS = ("object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
_DEMO_RE = re.compile(r"^demo_(\d+)$")


def demo_sort_key(name: str) -> tuple:
    """Sort key ordering `demo_<k>` names by k (demo_2 before demo_10), any other name after them, alphabetically."""
    m = _DEMO_RE.match(name)
    return (0, int(m.group(1)), name) if m else (1, 0, name)  # odd names last, alphabetically


def _decode(name) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)


class RobomimicFile:
    """Read-only view of a robomimic hdf5 file; use as a context manager or call `close()`.

    Opening it checks that every dataset's storage covers its shape (pcm_policy.data.integrity): a chunk never
    written or a missing external/virtual source would otherwise read as fill values without an error.

    Args:
        path: the hdf5 file.

    Attributes:
        path: the file path as a string.

    Raises:
        DatasetError: the file does not exist, is not HDF5 or cannot be opened, has no `data` group, or a
            dataset's storage does not cover its shape (or cannot be inspected).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        if not Path(path).exists():
            raise missing_dataset(path)
        if Path(path).is_dir() or not h5py.is_hdf5(path):
            raise DatasetError(f"{path}: not an HDF5 file")
        try:
            self._f = h5py.File(path, "r")
        except Exception as e:
            raise DatasetError(f"{path}: cannot open HDF5 file ({' '.join(str(e).split())})") from e
        data = self._f.get("data")
        if not isinstance(data, h5py.Group):
            self._f.close()
            raise DatasetError(f"{path}: missing group data/ (not a robomimic dataset)")
        self._data = data
        try:
            self._f.visititems(self._check_dataset)
        except BaseException:
            self._f.close()
            raise

    def _check_dataset(self, name: str, obj) -> None:
        if not isinstance(obj, h5py.Dataset):
            return
        try:
            check_hdf5_dataset(obj, self.path)
        except DatasetError:
            raise
        except Exception as e:  # a damaged chunk index or layout message
            raise DatasetError(f"{self.path}: {name}: cannot inspect its storage ({' '.join(str(e).split())})") from e

    def __enter__(self) -> "RobomimicFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the file."""
        self._f.close()

    # ---- index ---------------------------------------------------------------------------------------
    def mask_names(self) -> list[str]:
        """The filter names under `mask/` (e.g. train, valid), sorted; empty without a `mask` group."""
        masks = self._f.get("mask")
        return sorted(masks.keys()) if isinstance(masks, h5py.Group) else []

    def demo_names(self, filter_key: str | None = None) -> list[str]:
        """Demo names sorted numerically (demo_2 before demo_10); from `mask/<filter_key>` when given.

        Args:
            filter_key: a name of `mask_names()`; None lists every group under `data`.

        Raises:
            DatasetError: an unknown filter key, or a mask naming a demo that does not exist.
        """
        if filter_key is None:
            names = [n for n, g in self._data.items() if isinstance(g, h5py.Group)]
        else:
            available = self.mask_names()
            if filter_key not in available:
                raise DatasetError(f"{self.path}: unknown filter key {filter_key!r}; "
                                   f"available: {', '.join(available) or 'none (no mask/ group)'}")
            names = [_decode(n) for n in self._f["mask"][filter_key][()]]
            missing = [n for n in names if n not in self._data]
            if missing:
                raise DatasetError(f"{self.path}: mask/{filter_key} names {missing[0]} "
                                   f"but data/{missing[0]} does not exist")
        return sorted(names, key=demo_sort_key)

    @property
    def has_env_args(self) -> bool:
        """`data` carries the `env_args` attribute (needed to build an eval env, not for training)."""
        return "env_args" in self._data.attrs

    @property
    def env_args(self) -> dict:
        """The decoded `data.attrs["env_args"]` JSON: env_name, env_type, env_kwargs (controller configs,
        control_freq 20 Hz, ...).

        Raises:
            DatasetError: the attribute is missing or not valid JSON.
        """
        raw = self._data.attrs.get("env_args")
        if raw is None:
            raise DatasetError(f"{self.path}: data/ has no env_args attribute")
        try:
            return json.loads(_decode(raw))
        except json.JSONDecodeError as e:
            raise DatasetError(f"{self.path}: data.attrs['env_args'] is not valid JSON ({e})") from e

    def demo_group(self, name: str) -> h5py.Group:
        """The group `data/<name>` (valid while the file is open).

        Raises:
            DatasetError: there is no such group.
        """
        g = self._data.get(name)
        if not isinstance(g, h5py.Group):
            raise DatasetError(f"{self.path}: no demo data/{name}")
        return g

    def obs_keys(self, demo: str) -> list[str]:
        """The names under `data/<demo>/obs`, sorted; empty without an `obs` group.

        Raises:
            DatasetError: no demo `demo`.
        """
        obs = self.demo_group(demo).get("obs")
        return sorted(obs.keys()) if isinstance(obs, h5py.Group) else []

    def obs_dims(self, demo: str, obs_keys: Sequence[str]) -> list[int]:
        """Per-step width of each obs key, product of the dims after T (a key stored as (T,) counts as 1).

        Raises:
            DatasetError: no demo `demo`, or it lacks one of the keys (the message lists those it has).
        """
        g = self.demo_group(demo)
        dims = []
        for k in obs_keys:
            ds = g.get(f"obs/{k}")
            if not isinstance(ds, h5py.Dataset):
                raise DatasetError(f"{self.path}: data/{demo} has no obs/{k}; "
                                   f"available: {', '.join(self.obs_keys(demo))}")
            dims.append(int(np.prod(ds.shape[1:])))
        return dims

    def obs_dataset(self, demo: str, key: str) -> h5py.Dataset:
        """The dataset `data/<demo>/obs/<key>`, unread (e.g. a camera's (T, H, W, 3) uint8 images, sliced lazily;
        valid while the file is open).

        Raises:
            DatasetError: no demo `demo`, or it has no such obs key (the message lists those it has).
        """
        ds = self.demo_group(demo).get(f"obs/{key}")
        if not isinstance(ds, h5py.Dataset):
            raise DatasetError(f"{self.path}: data/{demo} has no obs/{key}; available: {', '.join(self.obs_keys(demo))}")
        return ds

    def num_samples(self, demo: str) -> int:
        """T, the steps of `demo`: its `num_samples` attribute, else the length of its actions.

        Raises:
            DatasetError: no demo `demo`, or neither the attribute nor `actions`.
        """
        g = self.demo_group(demo)
        if "num_samples" in g.attrs:
            return int(g.attrs["num_samples"])
        if "actions" not in g:
            raise DatasetError(f"{self.path}: data/{demo} has no actions")
        return int(g["actions"].shape[0])

    # ---- loading -------------------------------------------------------------------------------------
    def load_demo(self, name: str, obs_keys: Sequence[str] = DEFAULT_OBS_KEYS,
                  abs_action: bool = False) -> dict[str, np.ndarray]:
        """One demo's arrays, in env units.

        Args:
            name: the demo, e.g. `demo_0`.
            obs_keys: obs keys concatenated in this order (each flattened per step).
            abs_action: convert the stored [pos3, axisangle3 (rad), gripper] to [pos3, rot6d, gripper] float32.

        Returns:
            {"obs": (T, sum of widths) float32, "actions": (T, A) (stored dtype; (T, 10) float32 with
            `abs_action`), and "states": (T, S) MuJoCo flat states when stored}.

        Raises:
            DatasetError: no such demo, no or non-2-d actions, a missing obs key, an obs key with another step
                count than the actions, `abs_action` with actions that are not 7-d, or unreadable data.
        """
        g = self.demo_group(name)
        where = f"{self.path}: data/{name}"
        if not isinstance(g.get("actions"), h5py.Dataset):
            raise DatasetError(f"{where} has no actions")
        try:
            actions = np.asarray(g["actions"][()])
            T = actions.shape[0] if actions.ndim else -1
            if actions.ndim != 2:
                raise DatasetError(f"{where}/actions must be 2-d (T, A), got shape {actions.shape}")
            self.obs_dims(name, obs_keys)  # raises a DatasetError naming a missing key
            parts = []
            for k in obs_keys:
                x = np.asarray(g[f"obs/{k}"][()])
                if x.shape[0] != T:
                    raise DatasetError(f"{where}/obs/{k} has {x.shape[0]} steps but actions has {T}")
                parts.append(x.reshape(T, -1).astype(np.float32))
            out = {"obs": np.concatenate(parts, axis=1) if parts else np.zeros((T, 0), np.float32)}
            if abs_action:
                if actions.shape[1] != 7:
                    raise DatasetError(f"{where}/actions has {actions.shape[1]} dims; abs_action needs 7")
                actions = abs_action_to_10d(actions.astype(np.float64)).astype(np.float32)
            out["actions"] = actions
            if isinstance(g.get("states"), h5py.Dataset):
                out["states"] = np.asarray(g["states"][()])
        except DatasetError:
            raise
        except Exception as e:  # corrupt dataset blocks surface as OSError/KeyError from h5py
            raise DatasetError(f"{where}: cannot read ({' '.join(str(e).split())})") from e
        return out


def _json_default(obj):
    """Controller configs built in code often hold numpy scalars/arrays, which json cannot encode."""
    if isinstance(obj, (np.ndarray, np.generic)):
        return obj.tolist()
    raise TypeError(f"env_args value of type {type(obj).__name__} is not JSON-serialisable")


def _frame_storage(arr: np.ndarray) -> dict:
    """h5py storage options of an obs array: per-frame gzip chunks for camera frames, defaults otherwise."""
    if arr.dtype == np.uint8 and arr.ndim == 4 and arr.shape[0] > 0:
        return {"chunks": (1, *arr.shape[1:]), "compression": "gzip", "compression_opts": 4}
    return {}


def write_robomimic_hdf5(path: str | os.PathLike, demos: Sequence[Mapping], env_args: Mapping,
                         masks: Mapping[str, Sequence[str]] | None = None,
                         demo_names: Sequence[str] | None = None) -> None:
    """Write demos in robomimic's layout, atomically.

    Each demo: {"obs": {key: (T, d)}, "next_obs": {key: (T, d)}, "actions": (T, A), "rewards": (T,),
    "dones": (T,), "states": (T, S)}; only "actions" is required. Demos are named demo_0, demo_1, ... unless
    `demo_names` is given; `masks` maps a filter name (e.g. "train", "valid") to demo names. Arrays are
    stored as given (dtype kept); camera frames ((T, H, W, 3) uint8) are gzip-compressed one frame per chunk, as
    robomimic's image datasets (a window reads only its frames); `data.attrs` gets `total` (all steps) and
    `env_args` (JSON), each demo `num_samples`.

    Args:
        path: the output file; an existing one is replaced.
        demos: the demos, as above.
        env_args: robomimic's env description (env_name, env_type, env_kwargs); numpy values are converted.
        masks: filter name -> demo names; None writes no `mask` group.
        demo_names: one distinct name per demo; None = demo_0, demo_1, ...

    Raises:
        ValueError: names not distinct or not one per demo, a mask naming an unknown demo, or an array whose
            step count differs from its demo's actions (nothing is written).
        TypeError: `env_args` holds a value JSON cannot encode.
    """
    names = list(demo_names) if demo_names is not None else [f"demo_{i}" for i in range(len(demos))]
    if len(names) != len(demos) or len(set(names)) != len(names):
        raise ValueError(f"need {len(demos)} distinct demo names, got {names}")
    for mask, members in (masks or {}).items():
        unknown = [n for n in members if n not in names]
        if unknown:
            raise ValueError(f"mask {mask!r} names unknown demo {unknown[0]!r}")
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            data = f.create_group("data")
            total = 0
            for name, demo in zip(names, demos):
                actions = np.asarray(demo["actions"])
                T = actions.shape[0]
                g = data.create_group(name)
                g.attrs["num_samples"] = T
                g.create_dataset("actions", data=actions)
                for field in ("rewards", "dones", "states"):
                    if field in demo:
                        arr = np.asarray(demo[field])
                        if arr.shape[0] != T:
                            raise ValueError(f"{name}/{field} has {arr.shape[0]} steps, actions has {T}")
                        g.create_dataset(field, data=arr)
                for group in ("obs", "next_obs"):
                    for key, arr in (demo.get(group) or {}).items():
                        arr = np.asarray(arr)
                        if arr.shape[0] != T:
                            raise ValueError(f"{name}/{group}/{key} has {arr.shape[0]} steps, actions has {T}")
                        g.create_dataset(f"{group}/{key}", data=arr, **_frame_storage(arr))
                total += T
            data.attrs["total"] = total
            data.attrs["env_args"] = json.dumps(dict(env_args), default=_json_default)
            for mask, members in (masks or {}).items():
                f.create_dataset(f"mask/{mask}", data=np.array([n.encode() for n in members], dtype="S"))
