"""Diffusion Policy's replay buffer: episodes stored back to back, read and written as zarr v2.

Layout: `data/<key>` arrays (N, ...) holding every step of every episode, and `meta/episode_ends` (E,) int64,
the exclusive cumulative end of each episode (episode i is rows [ends[i-1], ends[i])). On disk a zarr v2
directory or a `.zarr.zip`, data arrays Blosc-compressed with any chunking, read with zarr-python 3.
"""
from __future__ import annotations

import contextlib
import os
import zipfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numcodecs
import numpy as np
import zarr

from pcm_policy.atomic import atomic_path
from pcm_policy.data.integrity import RawZarrStore, check_zarr_array
from pcm_policy.errors import DatasetError
from pcm_policy.tasks import missing_dataset

ENDS_KEY = "meta/episode_ends"
_CHUNK_BYTES = 1 << 20  # default chunk: about 1 MiB of rows, the scale Diffusion Policy's files use
_ALL_CHUNKS = {"write_empty_chunks": True}


def _one_line(err: BaseException) -> str:
    msg = " ".join(str(err).split()) or "no detail"
    return f"{type(err).__name__}: {msg}"


@contextlib.contextmanager
def open_zarr_group(path: str | os.PathLike) -> Iterator[zarr.Group]:
    """Open a zarr directory or zip read-only, as a context manager yielding the root group (zip closed on exit).

    Raises:
        DatasetError: naming the path: it does not exist, is a file that is not a valid zip, or is not a
            readable zarr group.
    """
    p = Path(path)
    if not p.exists():
        raise missing_dataset(path)
    store = None
    try:
        if p.is_file():
            if not zipfile.is_zipfile(p):
                what = "not a valid zip file (truncated or corrupt)" if p.suffix == ".zip" else \
                    "not a zarr directory or .zarr.zip file"
                raise DatasetError(f"{path}: {what}")
            store = zarr.storage.ZipStore(p, mode="r")
            root = zarr.open_group(store, mode="r")
        else:
            root = zarr.open_group(zarr.storage.LocalStore(p, read_only=True), mode="r")
    except DatasetError:
        if store is not None:
            store.close()
        raise
    except Exception as e:  # zarr / zipfile raise many types for a non-group or a corrupt store
        if store is not None:
            store.close()
        raise DatasetError(f"{path}: not a readable zarr group ({_one_line(e)})") from e
    try:
        yield root
    finally:
        if store is not None:
            store.close()


def _read(path, arr: zarr.Array, name: str) -> np.ndarray:
    """Read a whole array; decompression/IO errors (garbage or truncated chunks) become DatasetError."""
    try:
        return np.asarray(arr[...])
    except Exception as e:
        raise DatasetError(f"{path}: cannot read {name} ({_one_line(e)})") from e


def inspect_group(root: zarr.Group, path) -> tuple[np.ndarray, dict[str, zarr.Array]]:
    """Validate the replay-buffer layout -> (episode_ends (E,) int64, {key: lazy data array}, keys sorted).

    The data arrays' chunks are not checked here: callers check those they read with `check_complete`.

    Args:
        root: the opened root group.
        path: the store path, for messages.

    Raises:
        DatasetError: unreadable metadata, no `meta/episode_ends` or `data/` (or no array in it), episode
            ends that are not a non-empty 1-d integer array of positive, strictly increasing values, ends
            stored incompletely, or a data array whose first dim is not episode_ends[-1].
    """
    try:
        ends_arr = root.get(ENDS_KEY)
        data = root.get("data")
        members = dict(sorted(data.arrays())) if isinstance(data, zarr.Group) else None  # store order varies
    except Exception as e:
        raise DatasetError(f"{path}: cannot read zarr metadata ({_one_line(e)})") from e
    if not isinstance(ends_arr, zarr.Array):
        raise DatasetError(f"{path}: missing array {ENDS_KEY}")
    if members is None:
        raise DatasetError(f"{path}: missing group data/")
    if not members:
        raise DatasetError(f"{path}: group data/ holds no arrays")
    check_complete(path, {ENDS_KEY: ends_arr})
    ends = _read(path, ends_arr, ENDS_KEY)
    if ends.ndim != 1 or not np.issubdtype(ends.dtype, np.integer):
        raise DatasetError(f"{path}: {ENDS_KEY} must be a 1-d integer array, got shape {ends.shape} {ends.dtype}")
    if len(ends) == 0:
        raise DatasetError(f"{path}: {ENDS_KEY} is empty (no episodes)")
    ends = ends.astype(np.int64)
    if ends[0] <= 0:
        raise DatasetError(f"{path}: {ENDS_KEY}[0]={ends[0]} but episode ends must be positive")
    bad = np.nonzero(np.diff(ends) <= 0)[0]
    if len(bad):
        i = int(bad[0]) + 1
        raise DatasetError(f"{path}: {ENDS_KEY} must increase strictly, but [{i - 1}]={ends[i - 1]} >= [{i}]={ends[i]}")
    for name, arr in members.items():
        if len(arr.shape) == 0 or arr.shape[0] != ends[-1]:
            rows = arr.shape[0] if arr.shape else "no"
            raise DatasetError(f"{path}: {ENDS_KEY}[-1]={ends[-1]} but data/{name} has {rows} rows")
    return ends, members


def check_complete(path, arrays: Mapping[str, zarr.Array]) -> None:
    """Every chunk of every array stored and whole (a missing chunk would silently read as the fill value).

    Args:
        path: the store (directory or zip) the arrays live in.
        arrays: name (for messages) -> array.

    Raises:
        DatasetError: the store cannot be listed, or a chunk is missing or truncated
            (`pcm_policy.data.integrity.check_zarr_array`).
    """
    try:
        raw = RawZarrStore(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise DatasetError(f"{path}: cannot list the store ({_one_line(e)})") from e
    try:
        for name, arr in arrays.items():
            check_zarr_array(raw, arr, path, name)
    finally:
        raw.close()


def describe_zarr(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, tuple[tuple[int, ...], np.dtype]]]:
    """Validated episode_ends (E,) int64 and {key: (shape, dtype)} without loading the data (for `pcm info`).

    Every array's chunks are checked present and whole (a missing chunk would read as the fill value).

    Raises:
        DatasetError: as `open_zarr_group`, `inspect_group` and `check_complete`.
    """
    with open_zarr_group(path) as root:
        ends, members = inspect_group(root, path)
        check_complete(path, {f"data/{k}": a for k, a in members.items()})
        return ends, {k: (tuple(a.shape), np.dtype(a.dtype)) for k, a in members.items()}


def default_compressor() -> numcodecs.Blosc:
    """The Blosc codec `ReplayBuffer.save` writes data arrays with: zstd, level 5, bit-shuffle."""
    return numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.BITSHUFFLE)


class ReplayBuffer:
    """In-memory episodes of equal-keyed per-step arrays; `open` loads a file, `save` writes one.

    `buffer[key]` is the whole array (N, ...) of every episode back to back (KeyError for an unknown key);
    `key in buffer` tests a key. Diffusion Policy's PushT file holds `action` (N, 2) float32 (target agent
    position, px), `state` (N, 5) float32 (agent xy, block xy in px, block angle in rad), `keypoint` (N, 9, 2)
    float32 (px), `img` (N, 96, 96, 3) and `n_contacts` (N, 1).
    """

    def __init__(self):
        self._parts: dict[str, list[np.ndarray]] = {}  # appended episodes, concatenated lazily
        self._ends: list[int] = []

    # ---- reading -------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, keys: Iterable[str] | None = None) -> "ReplayBuffer":
        """Load a zarr replay buffer into numpy. `keys` limits which data arrays are read (e.g. skip images).

        Arrays keep their stored dtypes; the layout and the chunks of the arrays read are checked first.

        Raises:
            DatasetError: a missing or unreadable store, a broken layout (`inspect_group`), a requested key
                that is not in `data/`, or a missing, truncated or undecodable chunk.
        """
        with open_zarr_group(path) as root:
            ends, members = inspect_group(root, path)
            wanted = list(members) if keys is None else list(keys)
            missing = [k for k in wanted if k not in members]
            if missing:
                raise DatasetError(f"{path}: no array data/{missing[0]}; available: {', '.join(sorted(members))}")
            check_complete(path, {f"data/{k}": members[k] for k in wanted})
            buf = cls()
            buf._ends = [int(e) for e in ends]
            buf._parts = {k: [_read(path, members[k], f"data/{k}")] for k in wanted}
        return buf

    # ---- building ------------------------------------------------------------------------------------
    def add_episode(self, episode: Mapping[str, np.ndarray]) -> None:
        """Append one episode (copied): every array shares its first dim (the episode length, >= 1).

        Raises:
            ValueError: no arrays, other keys than earlier episodes, unequal or zero lengths, a 0-d array, or a
                per-step shape that differs from the buffer's.
        """
        if not episode:
            raise ValueError("episode has no arrays")
        arrays = {k: np.asarray(v) for k, v in episode.items()}
        if self._ends and set(arrays) != set(self._parts):
            raise ValueError(f"episode keys {sorted(arrays)} differ from the buffer's keys {sorted(self._parts)}")
        lengths = {k: (v.shape[0] if v.ndim else None) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1 or None in lengths.values():
            raise ValueError(f"episode arrays must share their first dim, got lengths {lengths}")
        n = next(iter(lengths.values()))
        if n < 1:
            raise ValueError("episode must have at least one step")
        for k, v in arrays.items():
            if self._ends and v.shape[1:] != self._parts[k][0].shape[1:]:
                raise ValueError(f"episode array {k!r} has per-step shape {v.shape[1:]}, "
                                 f"buffer has {self._parts[k][0].shape[1:]}")
            self._parts.setdefault(k, []).append(v.copy())
        self._ends.append((self._ends[-1] if self._ends else 0) + n)

    # ---- access --------------------------------------------------------------------------------------
    @property
    def episode_ends(self) -> np.ndarray:
        """(E,) int64 exclusive cumulative ends: episode i is rows [ends[i-1], ends[i])."""
        return np.asarray(self._ends, dtype=np.int64)

    @property
    def episode_lengths(self) -> np.ndarray:
        """(E,) int64 steps per episode."""
        return np.diff(self.episode_ends, prepend=0)

    @property
    def n_episodes(self) -> int:
        """E, the number of episodes."""
        return len(self._ends)

    @property
    def n_steps(self) -> int:
        """N, the steps of all episodes together (0 when empty)."""
        return self._ends[-1] if self._ends else 0

    def keys(self) -> list[str]:
        """The data array names, in insertion order (an opened file: sorted, or the order of its `keys`)."""
        return list(self._parts)

    def __contains__(self, key: str) -> bool:
        return key in self._parts

    def __getitem__(self, key: str) -> np.ndarray:
        parts = self._parts[key]
        if len(parts) > 1:
            parts[:] = [np.concatenate(parts)]
        return parts[0]

    def get_episode(self, i: int) -> dict[str, np.ndarray]:
        """Every array's rows of episode `i` (negative counts from the end), as views (T_i, ...).

        Raises:
            IndexError: `i` out of range.
        """
        n = self.n_episodes
        if not -n <= i < n:
            raise IndexError(f"episode {i} out of range ({n} episodes)")
        i %= n
        start = self._ends[i - 1] if i > 0 else 0
        return {k: self[k][start:self._ends[i]] for k in self._parts}

    # ---- writing -------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, chunk_length: int | None = None, compressor=None) -> None:
        """Write zarr v2 atomically: a directory, or a zip file when `path` ends with `.zip`.

        Data arrays are chunked along time (`chunk_length` rows, default about 1 MiB per chunk) and
        Blosc-compressed; meta/episode_ends is stored uncompressed, as Diffusion Policy's files are. Every
        chunk is written, even an all-zero one.

        Args:
            path: the output directory, or a `.zip` file; an existing one is replaced.
            chunk_length: rows per chunk; None = about 1 MiB of rows.
            compressor: a numcodecs codec; None = `default_compressor()`.

        Raises:
            ValueError: the buffer is empty, or chunk_length < 1.
            OSError: the output cannot be written (nothing is left behind).
        """
        if not self._ends:
            raise ValueError("cannot save an empty ReplayBuffer (a replay buffer file needs one episode)")
        if chunk_length is not None and chunk_length < 1:
            raise ValueError(f"chunk_length must be >= 1, got {chunk_length}")
        compressor = compressor or default_compressor()
        as_zip = str(path).endswith(".zip")
        with atomic_path(path) as tmp:
            store = zarr.storage.ZipStore(tmp, mode="w") if as_zip else zarr.storage.LocalStore(tmp)
            try:
                root = zarr.open_group(store, mode="w", zarr_format=2)
                for key in self._parts:
                    arr = self[key]
                    rows = chunk_length or max(1, _CHUNK_BYTES // max(1, arr[:1].nbytes))
                    chunks = (min(rows, len(arr)), *arr.shape[1:])
                    # Every chunk is written, even an all-zero one (zarr 3 skips those by default): readers
                    # refuse a store with missing chunks, as Diffusion Policy's zarr 2 files never have any.
                    root.create_array(f"data/{key}", data=arr, chunks=chunks, compressors=compressor,
                                      config=_ALL_CHUNKS)
                ends = self.episode_ends
                root.create_array(ENDS_KEY, data=ends, chunks=ends.shape, compressors=None, config=_ALL_CHUNKS)
            finally:
                store.close()


class LazyArray:
    """One `data/<key>` array of a replay-buffer file, decoded on demand: `lazy[a:b]` reads rows a..b-1 only.

    The layout and the array's chunks are checked on construction (as `ReplayBuffer.open` does), but no data is
    read. The store is opened on first read in each process (a forked DataLoader worker reopens it rather than
    share a zip file's handle); pickling drops the handle.

    Args:
        path: the zarr directory or `.zarr.zip`.
        key: the array under `data/`, e.g. `img`.

    Attributes:
        path, key: as given (path as a string).
        shape: the array's shape (N, ...); dtype: its stored dtype; chunk_rows: rows per stored chunk.
        episode_ends: (E,) int64, the file's validated `meta/episode_ends`.

    Raises:
        DatasetError: as `ReplayBuffer.open` (a missing or unreadable store, a broken layout, no `data/<key>`, a
            missing or truncated chunk).
    """

    def __init__(self, path: str | os.PathLike, key: str):
        with open_zarr_group(path) as root:
            ends, members = inspect_group(root, path)
            if key not in members:
                raise DatasetError(f"{path}: no array data/{key}; available: {', '.join(sorted(members))}")
            arr = members[key]
            check_complete(path, {f"data/{key}": arr})
            self.shape, self.dtype, self.chunk_rows = tuple(arr.shape), np.dtype(arr.dtype), int(arr.chunks[0])
        self.path, self.key, self.episode_ends = str(path), key, ends
        self._handle: tuple[int, contextlib.ExitStack, zarr.Array] | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice):
            raise TypeError(f"LazyArray takes a slice of rows, got {type(rows).__name__}")
        if self._handle is None or self._handle[0] != os.getpid():
            stack = contextlib.ExitStack()
            arr = stack.enter_context(open_zarr_group(self.path))[f"data/{self.key}"]
            self._handle = (os.getpid(), stack, arr)
        try:
            return np.asarray(self._handle[2][rows])
        except Exception as e:
            raise DatasetError(f"{self.path}: cannot read data/{self.key} rows {rows.start}:{rows.stop} "
                               f"({_one_line(e)})") from e

    def close(self) -> None:
        """Close the store if this process opened it (reading again reopens it)."""
        if self._handle is not None and self._handle[0] == os.getpid():
            self._handle[1].close()
        self._handle = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handle": None}
