"""Refuse stored arrays whose data does not cover their declared shape, before anything reads them.

Missing storage silently reads as the fill value in zarr and in HDF5 alike: a zarr chunk file that is absent
(or stored under another key layout than the metadata declares), an HDF5 chunk never written, a contiguous
dataset never allocated, a missing external raw file or virtual-dataset source. A truncated Blosc chunk is
worse: numcodecs 0.16 decodes a truncated memcpy'd chunk from memory past the buffer (garbage, no error).

The checks read metadata, file listings and 16-byte chunk headers only, so `pcm data info` runs them without
loading any data. Each failure is a DatasetError naming the file and the array.
"""
from __future__ import annotations

import itertools
import math
import os
import struct
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from pcm_policy.errors import DatasetError

if TYPE_CHECKING:  # zarr is imported where a zarr array is checked: the hdf5 path (and the GPU image) has no zarr
    import zarr

_BLOSC_HEADER = 16  # Blosc 1 header: version, versionlz, flags, typesize, then uint32 LE nbytes, blocksize, cbytes


def _plain(value):
    """A numpy scalar as its Python value, for messages (0.0, not np.float32(0.0))."""
    return value.item() if isinstance(value, np.generic) else value


# ---- zarr ------------------------------------------------------------------------------------------------
class RawZarrStore:
    """Key listing, sizes and leading bytes of the objects of a zarr directory or zip, without decoding.

    Keys are store-relative POSIX paths (e.g. `data/action/0.0`); `key in store` tests presence.

    Args:
        path: a zarr directory, or a zip file (kept open until `close`).

    Raises:
        OSError: the directory or file cannot be read.
        zipfile.BadZipFile: `path` is a file but not a valid zip.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._zip = zipfile.ZipFile(self.path) if self.path.is_file() else None
        if self._zip is not None:
            self._sizes = {i.filename: i.file_size for i in self._zip.infolist() if not i.is_dir()}
        else:
            self._sizes = {}
            for dirpath, _, files in os.walk(self.path):
                rel = Path(dirpath).relative_to(self.path).as_posix()
                for f in files:
                    self._sizes[f if rel == "." else f"{rel}/{f}"] = None  # sized lazily: os.stat per chunk

    def close(self) -> None:
        """Close the zip file (nothing to do for a directory)."""
        if self._zip is not None:
            self._zip.close()

    def __contains__(self, key: str) -> bool:
        return key in self._sizes

    def size(self, key: str) -> int:
        """Stored size of object `key` in bytes (for a zip: uncompressed member size).

        Raises:
            KeyError: a zip has no member `key`.
            OSError: a directory has no file `key`.
        """
        if self._zip is not None:
            return self._sizes[key]
        return (self.path / key).stat().st_size

    def head(self, key: str, n: int) -> bytes:
        """The first `n` bytes of object `key` (fewer when it is shorter).

        Raises:
            KeyError: a zip has no member `key`.
            OSError: the object cannot be read.
            zipfile.BadZipFile: a zip member fails its CRC check.
        """
        if self._zip is not None:
            with self._zip.open(key) as f:
                return f.read(n)
        with open(self.path / key, "rb") as f:
            return f.read(n)


def _chunk_codec(arr: zarr.Array) -> str | None:
    """'raw' (stored bytes = chunk bytes), 'blosc', or None (another codec: its decoder reports truncation)."""
    import zarr

    meta = arr.metadata
    if isinstance(meta, zarr.core.metadata.ArrayV2Metadata):
        if meta.filters:
            return None
        if meta.compressor is None:
            return "raw"
        return "blosc" if meta.compressor.codec_id == "blosc" else None
    if arr.shards is not None:
        return None
    names = [type(c).__name__ for c in meta.codecs]
    if names == ["BytesCodec"]:
        return "raw"
    return "blosc" if names[-1:] == ["BloscCodec"] and len(names) == 2 else None


def check_zarr_array(raw: RawZarrStore, arr: zarr.Array, where: str | os.PathLike, name: str) -> None:
    """Every stored object (chunk, or shard) of `arr` is present under the metadata's key encoding and whole.

    Whole: an uncompressed chunk holds exactly prod(chunks) * itemsize bytes; a Blosc chunk's 16-byte header
    declares its file size and that decoded size. Chunks of other codecs are only checked present (their
    decoders report truncation).

    Args:
        raw: the raw listing of the store `arr` lives in.
        arr: the zarr array (v2 or v3 metadata).
        where: the dataset path, for messages.
        name: the array's name, for messages (e.g. `data/action`).

    Raises:
        DatasetError: "<where>: <name>: 9 of 10 chunks present (...)", or naming a chunk file that is
            unreadable, truncated or of the wrong decoded size.
    """
    grid_step = arr.shards or arr.chunks
    grid = [range(math.ceil(s / c)) if c else range(0) for s, c in zip(arr.shape, grid_step)]
    keys = [f"{arr.path}/{arr.metadata.encode_chunk_key(coords)}" for coords in itertools.product(*grid)]
    missing = [k for k in keys if k not in raw]
    if missing:
        kind = "shards" if arr.shards else "chunks"
        raise DatasetError(f"{where}: {name}: {len(keys) - len(missing)} of {len(keys)} {kind} present (first missing: "
                           f"{missing[0]}; a missing chunk would read as the fill value {_plain(arr.fill_value)})")
    codec = _chunk_codec(arr)
    if codec is None:
        return
    expected = math.prod(arr.chunks) * np.dtype(arr.dtype).itemsize
    for key in keys:
        try:
            size = raw.size(key)
            header = raw.head(key, _BLOSC_HEADER) if codec == "blosc" else b""
        except (OSError, zipfile.BadZipFile) as e:  # e.g. a zip member failing its CRC
            raise DatasetError(f"{where}: cannot read {name} (chunk file {key}: {' '.join(str(e).split())})") from e
        if codec == "raw":
            if size != expected:
                raise DatasetError(f"{where}: cannot read {name} (chunk file {key} holds {size} bytes, a chunk of "
                                   f"{arr.chunks} {arr.dtype} needs {expected}: truncated)")
            continue
        if len(header) < _BLOSC_HEADER:
            raise DatasetError(f"{where}: cannot read {name} (chunk file {key} is truncated: {size} bytes, "
                               "shorter than a Blosc header)")
        nbytes, _, cbytes = struct.unpack("<III", header[4:16])
        if cbytes != size:
            raise DatasetError(f"{where}: cannot read {name} (chunk file {key} holds {size} bytes, its Blosc header "
                               f"declares {cbytes}: truncated or not a Blosc chunk)")
        if nbytes != expected:
            raise DatasetError(f"{where}: cannot read {name} (chunk file {key} decodes to {nbytes} bytes, a chunk of "
                               f"{arr.chunks} {arr.dtype} needs {expected})")


# ---- HDF5 ------------------------------------------------------------------------------------------------
def _hdf5_file_candidates(name: str, h5_path: Path, env_prefix: str) -> list[Path]:
    """Where HDF5 looks for a relative external/virtual-source file: $env prefix, the file's folder, the cwd."""
    p = Path(name)
    if p.is_absolute():
        return [p]
    prefixes = [s.replace("${ORIGIN}", str(h5_path.parent))
                for s in os.environ.get(env_prefix, "").split(os.pathsep) if s]
    return [Path(d) / p for d in prefixes] + [h5_path.parent / p, Path.cwd() / p]


def _first_existing(paths: list[Path]) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def check_hdf5_dataset(ds: h5py.Dataset, where: str | os.PathLike) -> h5py.Dataset:
    """`ds` itself when its storage covers its shape (an empty dataset always does).

    Chunked: every chunk of the grid allocated (h5py `id.get_num_chunks()`); contiguous: storage allocated;
    external: every raw file present and long enough; virtual: every source file and dataset present (each
    checked in turn), and the mappings cover the whole dataset. Relative external and virtual-source files are
    looked up as HDF5 does: `$HDF5_EXTFILE_PREFIX` / `$HDF5_VDS_PREFIX`, the file's folder, the working directory.

    Args:
        ds: an open h5py dataset.
        where: the file path, for messages.

    Raises:
        DatasetError: naming the file and the dataset, for any storage that would read as the fill value, or a
            virtual source file that is unreadable.
    """
    name = ds.name.lstrip("/")
    if ds.size == 0:
        return ds
    fill = f"the fill value {_plain(ds.fillvalue)}"
    dcpl = ds.id.get_create_plist()
    layout = dcpl.get_layout()
    h5_path = Path(ds.file.filename)
    if layout == h5py.h5d.VIRTUAL:
        mapped = 0
        for src in ds.virtual_sources():
            mapped += src.vspace.get_select_npoints()
            src_file = h5_path if src.file_name == "." else _first_existing(
                _hdf5_file_candidates(src.file_name, h5_path, "HDF5_VDS_PREFIX"))
            if src_file is None:
                raise DatasetError(f"{where}: {name}: virtual source file {src.file_name} not found "
                                   f"(its part of the dataset would read as {fill})")
            try:
                with h5py.File(src_file, "r") as f:
                    sds = f.get(src.dset_name)
                    if not isinstance(sds, h5py.Dataset):
                        raise DatasetError(f"{where}: {name}: virtual source {src_file}:{src.dset_name} does not exist")
                    check_hdf5_dataset(sds, src_file)
            except DatasetError:
                raise
            except OSError as e:
                raise DatasetError(f"{where}: {name}: virtual source file {src_file} is unreadable "
                                   f"({' '.join(str(e).split())})") from e
        if mapped < ds.size:
            raise DatasetError(f"{where}: {name}: virtual mappings cover {mapped} of {ds.size} elements "
                               f"(the rest would read as {fill})")
        return ds
    if dcpl.get_external_count() > 0:
        need = ds.size * ds.dtype.itemsize
        for i in range(dcpl.get_external_count()):
            fname, offset, size = dcpl.get_external(i)
            fname = fname.decode() if isinstance(fname, bytes) else str(fname)
            take = min(size, need)
            ext = _first_existing(_hdf5_file_candidates(fname, h5_path, "HDF5_EXTFILE_PREFIX"))
            if ext is None:
                raise DatasetError(f"{where}: {name}: external data file {fname} not found")
            if ext.stat().st_size < offset + take:
                raise DatasetError(f"{where}: {name}: external data file {ext} holds {ext.stat().st_size} bytes, "
                                   f"the dataset needs {offset + take} (truncated)")
            need -= take
            if need <= 0:
                break
        return ds
    if layout == h5py.h5d.CHUNKED:
        total = math.prod(math.ceil(s / c) for s, c in zip(ds.shape, ds.chunks))
        present = ds.id.get_num_chunks()
        if present < total:
            raise DatasetError(f"{where}: {name}: {present} of {total} chunks present (never-written chunks read as "
                               f"{fill})")
    elif layout == h5py.h5d.CONTIGUOUS and ds.id.get_storage_size() == 0:
        raise DatasetError(f"{where}: {name}: no data stored (created but never written; it would read as {fill})")
    return ds
