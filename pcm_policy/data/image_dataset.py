"""Image-observation training windows: low-dim windows as `LowDimDataset`'s, plus the image history of each window,
decoded lazily from a PushT zarr (`data/img`) or a robomimic image hdf5 (`data/<demo>/obs/<camera>`).

Item i: {"obs": (To, Dlow) float32, "image": (To, N, 3, H, W) uint8 (0..255, channel-first RGB; the encoder maps
it to [0, 1]), "action": (H, Da) float32}, with N cameras. Windows, padding and the episode split are exactly
`LowDimDataset`'s (one is built inside; `SequenceSampler`, `split_episodes`); the image of observation frame j is
the frame of the buffer row that frame's low-dim observation comes from (padded frames repeat the episode's first
or last image).

Images are never loaded whole: a PushT file's `data/img` is decoded one stored chunk at a time and kept as uint8 in
a bounded LRU cache (Diffusion Policy's own file stores it as float32 0..255: 2.8 GB decoded for its 25,650 frames,
0.7 GB as uint8); robomimic frames are sliced from the hdf5 datasets per window. Stored images must be
channel-last (T, H, W, 3), uint8, or float in 0..255 (DP's float32 copies; rounded to uint8 on read).
"""
from __future__ import annotations

import collections
import os
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from pcm_policy.data.lowdim_dataset import LowDimDataset, check_finite, load_robomimic
from pcm_policy.data.normalizer import Normalizer
from pcm_policy.data.robomimic import RobomimicFile
from pcm_policy.data.sequence_sampler import split_episodes
from pcm_policy.errors import ConfigError, DatasetError
from pcm_policy.tasks import ROBOMIMIC_CAMERA_KEYS, ROBOMIMIC_ROBOT_KEYS

KINDS = ("pusht_zarr", "robomimic_hdf5")
PUSHT_IMAGE_KEY = "img"
DEFAULT_CACHE_BYTES = 1 << 30  # decoded PushT chunks kept (uint8): DP's 25,650-frame file is 0.7 GB


def check_image_layout(shape: tuple[int, ...], dtype: np.dtype, where: str,
                       image_shape: tuple[int, int] | None) -> tuple[int, int]:
    """(H, W) of a stored image array (T, H, W, 3), uint8 or float.

    Args:
        shape, dtype: the stored array's.
        where: file and key, for messages.
        image_shape: the (H, W) required; None accepts any.

    Raises:
        DatasetError: naming `where`: not 4-d, channel-first, not 3 channels, another size, or another dtype.
    """
    if len(shape) != 4 or shape[-1] != 3:
        if len(shape) == 4 and shape[1] == 3:
            raise DatasetError(f"{where} has shape {shape}: channel-first images; expected channel-last "
                               f"(T, H, W, 3) RGB")
        raise DatasetError(f"{where} has shape {shape}: expected (T, H, W, 3) RGB images")
    if image_shape is not None and tuple(shape[1:3]) != tuple(image_shape):
        raise DatasetError(f"{where} holds {shape[1]}x{shape[2]} images: expected {image_shape[0]}x{image_shape[1]}")
    if not (dtype == np.uint8 or np.issubdtype(dtype, np.floating)):
        raise DatasetError(f"{where} has dtype {dtype}: expected uint8 (or float 0..255)")
    return int(shape[1]), int(shape[2])


def frames_to_uint8(frames: np.ndarray, where: str) -> np.ndarray:
    """Stored frames as uint8: uint8 as they are, floats (0..255, DP's float32 copies) rounded.

    Raises:
        DatasetError: naming `where`: float frames with NaN/inf or values outside [0, 255], or frames within
            [0, 1] with fractional values (floats in [0, 1] instead of 0..255).
    """
    if frames.dtype == np.uint8:
        return frames
    lo, hi = (float(frames.min()), float(frames.max())) if frames.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > 255:
        raise DatasetError(f"{where}: float images outside 0..255 (min {lo:g}, max {hi:g}, or NaN)")
    rounded = np.rint(frames)
    if hi <= 1.0 and np.any(rounded != frames):  # fractions below 1: [0, 1] floats (all-black 0..255 frames pass)
        raise DatasetError(f"{where}: float images within [0, 1]; expected 0..255 (Diffusion Policy's convention)")
    return rounded.astype(np.uint8)


class ZarrImages:
    """One camera's frames in a PushT replay buffer, `data/<key>` (N, H, W, 3), read a stored chunk at a time.

    Decoded chunks are kept as uint8 in an LRU cache of at most `cache_bytes` (0: none), so each chunk is decoded
    once while the dataset fits and memory stays bounded when it does not. Constructing it decodes the first chunk
    only (to check the value range).

    Args:
        path: the zarr directory or `.zarr.zip`.
        key: the image array under `data/`.
        image_shape: the (H, W) required; None accepts the file's.
        cache_bytes: the cache's size limit in bytes.

    Attributes:
        path, key, camera_keys (`(key,)`), image_shape, n_rows, cache_bytes.
        cached_bytes: bytes of decoded frames held now.

    Raises:
        DatasetError: as `pcm_policy.data.replay_buffer.LazyArray` (no `data/<key>` among them), and as
            `check_image_layout` / `frames_to_uint8` for the first chunk.
    """

    def __init__(self, path: str | os.PathLike, key: str = PUSHT_IMAGE_KEY, image_shape: tuple[int, int] | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES):
        from pcm_policy.data.replay_buffer import LazyArray  # zarr only where a PushT buffer is read

        self.path, self.key, self.camera_keys = str(path), key, (key,)
        self._array = LazyArray(path, key)
        self.image_shape = check_image_layout(self._array.shape, self._array.dtype, f"{path}: data/{key}", image_shape)
        self.n_rows = self._array.shape[0]
        self.cache_bytes = int(cache_bytes)
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self.cached_bytes = 0  # bytes of decoded frames held now
        self._chunk(0)

    def _chunk(self, index: int) -> np.ndarray:
        """Stored chunk `index` as uint8 (rows index * chunk_rows onwards), from the cache or decoded."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        rows = self._array.chunk_rows
        start = index * rows
        where = f"{self.path}: data/{self.key} rows {start}:{min(start + rows, self.n_rows)}"
        frames = frames_to_uint8(self._array[start:start + rows], where)
        if frames.nbytes <= self.cache_bytes:
            while self._cache and self.cached_bytes + frames.nbytes > self.cache_bytes:
                self.cached_bytes -= self._cache.popitem(last=False)[1].nbytes
            self._cache[index] = frames
            self.cached_bytes += frames.nbytes
        return frames

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Frames of buffer rows `rows` (n,) int -> (n, 1, H, W, 3) uint8.

        Raises:
            DatasetError: a chunk that cannot be decoded or holds out-of-range values.
        """
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), 1, *self.image_shape, 3), dtype=np.uint8)
        chunk_of = rows // self._array.chunk_rows
        for index in np.unique(chunk_of):
            sel = chunk_of == index
            out[sel, 0] = self._chunk(int(index))[rows[sel] - index * self._array.chunk_rows]
        return out

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": collections.OrderedDict(), "cached_bytes": 0}  # a worker fills its own


class Hdf5Images:
    """Camera frames of a robomimic image hdf5, `data/<demo>/obs/<camera>` (T, H, W, 3), sliced per read.

    Construction checks every demo's cameras (present, channel-last, one size, one frame per step); the file is
    reopened on first read in each process (forked DataLoader workers do not share an h5py handle).

    Args:
        path: the hdf5 file.
        demo_names: the demos in episode order (as the low-dim windows were built).
        lengths: (E,) steps per demo, in the same order.
        camera_keys: the obs keys of the cameras, stacked in this order.
        image_shape: the (H, W) required; None accepts the file's (one size for all cameras).

    Attributes:
        path, camera_keys, image_shape, n_rows (all demos' steps).

    Raises:
        DatasetError: naming the file and `data/<demo>/obs/<camera>`: a missing camera key, a channel-first or
            wrongly sized image, a dtype other than uint8/float, another step count than the demo's actions.
    """

    def __init__(self, path: str | os.PathLike, demo_names: Sequence[str], lengths: Sequence[int],
                 camera_keys: Sequence[str] = ROBOMIMIC_CAMERA_KEYS, image_shape: tuple[int, int] | None = None):
        self.path, self.camera_keys, self.demo_names = str(path), tuple(camera_keys), list(demo_names)
        if not self.camera_keys:
            raise ConfigError("dataset.camera_keys: no camera given")
        self._ends = np.cumsum(np.asarray(lengths, dtype=np.int64))
        self.n_rows = int(self._ends[-1]) if len(self._ends) else 0
        self.image_shape = image_shape
        with RobomimicFile(path) as rf:
            for name, T in zip(self.demo_names, lengths):
                for cam in self.camera_keys:
                    ds = rf.obs_dataset(name, cam)
                    where = f"{path}: data/{name}/obs/{cam}"
                    self.image_shape = check_image_layout(ds.shape, ds.dtype, where, self.image_shape)
                    if ds.shape[0] != T:
                        raise DatasetError(f"{where} has {ds.shape[0]} frames but the demo has {T} steps")
        self._file = None  # (pid, RobomimicFile)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Frames of rows `rows` (n,) int, all in one demo -> (n, cameras, H, W, 3) uint8.

        Raises:
            DatasetError: unreadable data, float frames out of range, or rows spanning two demos.
        """
        if self._file is None or self._file[0] != os.getpid():
            self._file = (os.getpid(), RobomimicFile(self.path))
        rows = np.asarray(rows, dtype=np.int64)
        demo = int(np.searchsorted(self._ends, rows.min(), side="right"))
        if demo != int(np.searchsorted(self._ends, rows.max(), side="right")):
            raise DatasetError(f"{self.path}: rows {rows.min()}..{rows.max()} span two demos")
        local = rows - (self._ends[demo - 1] if demo else 0)
        lo, hi = int(local.min()), int(local.max()) + 1
        name, out = self.demo_names[demo], []
        for cam in self.camera_keys:
            where = f"{self.path}: data/{name}/obs/{cam}"
            try:
                frames = np.asarray(self._file[1].obs_dataset(name, cam)[lo:hi])
            except DatasetError:
                raise
            except Exception as e:  # corrupt blocks surface as OSError from h5py
                raise DatasetError(f"{where}: cannot read frames {lo}:{hi} ({' '.join(str(e).split())})") from e
            out.append(frames_to_uint8(frames, where)[local - lo])
        return np.stack(out, axis=1)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None}


class ImageDataset(Dataset):
    """Training windows with image histories; item i is {"obs", "image", "action"} tensors (see the module).

    Built by `from_config`. Everything about windows and the split is the inner `LowDimDataset`'s: attributes
    not defined here (`sampler`, `episode_ends`, `horizon`, `n_obs_steps`, `n_action_steps`, `train_mask`,
    `val_mask`, `split`, `obs_dim`, `action_dim`, `n_episodes`, `n_total_episodes`, `env_args`, `demo_names`,
    `abs_action`, `path`) are read from it.

    Args:
        lowdim: the low-dim windows (obs (N, Dlow), action (N, Da), split, sampler).
        images: the frames of the same N buffer rows (`ZarrImages` or `Hdf5Images`).

    Attributes:
        lowdim, images: as given.

    Raises:
        DatasetError: `images` has another number of rows than `lowdim`.
    """

    def __init__(self, lowdim: LowDimDataset, images: ZarrImages | Hdf5Images):
        self.lowdim, self.images = lowdim, images
        n = int(lowdim.episode_ends[-1])
        if images.n_rows != n:
            raise DatasetError(f"{lowdim.path}: {images.n_rows} image frames but {n} low-dim steps")

    def __getattr__(self, name: str):
        if name in ("lowdim", "images") or name.startswith("__"):  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.lowdim, name)

    @classmethod
    def from_config(cls, kind: str, path: str | os.PathLike, horizon: int, n_obs_steps: int, n_action_steps: int,
                    val_ratio: float = 0.02, seed: int = 42, max_train_episodes: int | None = None,
                    camera_keys: Sequence[str] | None = None, obs_keys: Sequence[str] | None = None,
                    abs_action: bool = False, filter_key: str | None = None,
                    image_shape: tuple[int, int] | None = None,
                    cache_bytes: int = DEFAULT_CACHE_BYTES) -> "ImageDataset":
        """Load a dataset's low-dim part and open its images lazily; the training split (seeded, as `LowDimDataset`).

        Args:
            kind: `pusht_zarr` (low-dim obs = agent position, `data/state[:, :2]`, 2 px; images `data/img`) or
                `robomimic_hdf5` (low-dim obs = `obs_keys`; images = `camera_keys`).
            path: the dataset file.
            horizon, n_obs_steps, n_action_steps: H, To, Ta.
            val_ratio, seed, max_train_episodes: the episode split (`split_episodes`).
            camera_keys: the image keys, in stacking order; None = `img` (PushT) or `ROBOMIMIC_CAMERA_KEYS`.
            obs_keys: robomimic low-dim obs keys, concatenated in this order; None = `ROBOMIMIC_ROBOT_KEYS`
                (Diffusion Policy's image tasks: the robot's own state, no `object`).
            abs_action, filter_key: robomimic, as `LowDimDataset.from_config`.
            image_shape: the (H, W) every image must have; None accepts the file's.
            cache_bytes: PushT: bytes of decoded image chunks kept (`ZarrImages`).

        Returns:
            The training split; `get_validation_dataset` gives the other.

        Raises:
            ConfigError: an unknown kind, PushT with a camera other than one `data/` key, or a window shape
                `LowDimDataset` refuses.
            DatasetError: a missing, corrupt or inconsistent file, a missing camera key, images of the wrong
                size, channel order or range (naming the file and key), NaN/inf in low-dim data, no training window.
            ValueError: `val_ratio` outside [0, 1) or `max_train_episodes` < 1.
        """
        if kind == "pusht_zarr":
            from pcm_policy.data.replay_buffer import ReplayBuffer  # zarr only where a PushT buffer is read

            keys = list(camera_keys or [PUSHT_IMAGE_KEY])
            if len(keys) != 1:
                raise ConfigError(f"dataset.camera_keys={keys}: a PushT replay buffer has one camera (data/img)")
            images = ZarrImages(path, keys[0], image_shape, cache_bytes)
            rb = ReplayBuffer.open(path, keys=["state", "action"])
            for key in ("state", "action"):
                check_finite(path, rb.episode_ends, rb[key], f"data/{key}")
            if rb["state"].ndim != 2 or rb["state"].shape[1] < 2:
                raise DatasetError(f"{path}: data/state must be (N, >=2), got shape {rb['state'].shape}")
            obs, action = rb["state"][:, :2].astype(np.float32), rb["action"].astype(np.float32)
            ends, names, env_args = rb.episode_ends, None, None
        elif kind == "robomimic_hdf5":
            src = load_robomimic(path, list(obs_keys or ROBOMIMIC_ROBOT_KEYS), abs_action, filter_key)
            obs, action, ends, names, env_args = src["obs"], src["action"], src["ends"], src["names"], src["env_args"]
            cameras = camera_keys or ROBOMIMIC_CAMERA_KEYS
            images = Hdf5Images(path, names, np.diff(ends, prepend=0), cameras, image_shape)
        else:
            raise ConfigError(f"dataset kind {kind!r} is unknown; expected one of {', '.join(KINDS)}")
        train_mask, val_mask = split_episodes(len(ends), val_ratio, seed, max_train_episodes)
        lowdim = LowDimDataset(obs, action, ends, horizon, n_obs_steps, n_action_steps, train_mask, val_mask,
                               path=str(path))
        lowdim.env_args, lowdim.demo_names, lowdim.abs_action = env_args, names, abs_action
        return cls(lowdim, images)

    def get_validation_dataset(self) -> "ImageDataset":
        """The validation split, sharing the arrays and the image reader (may be empty)."""
        return ImageDataset(self.lowdim.get_validation_dataset(), self.images)

    def get_normalizer(self, mode: str = "limits") -> Normalizer:
        """Fit the low-dim obs and the action on the training episodes (images are not fitted: the encoder maps
        them to [0, 1] and its fixed per-channel affine).

        Raises:
            ValueError: an unknown mode.
        """
        return self.lowdim.get_normalizer(mode)

    @property
    def image_shape(self) -> tuple[int, int]:
        """(H, W) of the stored images."""
        return self.images.image_shape

    @property
    def camera_keys(self) -> tuple[str, ...]:
        """The camera keys, in the order of the item's camera axis."""
        return self.images.camera_keys

    def window_rows(self, idx: int) -> np.ndarray:
        """Buffer rows (To,) of window `idx`'s observation frames, padded as `SequenceSampler.sample` pads."""
        bs, be, ss, _ = self.lowdim.sampler.indices[idx]
        return bs + np.clip(np.arange(self.lowdim.n_obs_steps) - ss, 0, be - bs - 1)

    def window_images(self, indices: Sequence[int]) -> torch.Tensor:
        """The frames of windows `indices`, (n, To, N, 3, H, W) uint8, each frame decoded once per call."""
        rows = np.stack([self.window_rows(i) for i in indices])  # (n, To)
        unique, inverse = np.unique(rows, return_inverse=True)
        episode = np.searchsorted(self.lowdim.episode_ends, unique, side="right")
        # one read per episode (an hdf5 reader reads one demo at a time; a zarr one is chunk-cached either way)
        parts = [self.images.read(unique[episode == e]) for e in np.unique(episode)]
        frames = np.concatenate(parts)[inverse.reshape(rows.shape)]  # (n, To, N, H, W, 3)
        return torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 1, 2, 5, 3, 4)))

    def __len__(self) -> int:
        return len(self.lowdim)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        item = self.lowdim[idx]
        rows = self.window_rows(idx)
        unique, inverse = np.unique(rows, return_inverse=True)
        frames = self.images.read(unique)[inverse]  # (To, N, H, W, 3)
        item["image"] = torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 1, 4, 2, 3)))
        return item
