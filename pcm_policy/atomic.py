"""Atomic writes: build outputs under a temporary name beside the target, rename into place on success.

A crash or an exception therefore never leaves a half-written checkpoint or dataset at the final path. What is
renamed into place has the modes of any file the user creates (0666 / 0777 less the process umask): the temporary
name and some writers (safetensors, `tempfile`) create 0600 / 0700 entries, which another user, a server or a
container sharing the volume could not read.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask (read from /proc where it can be, so no thread sees a changed umask meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give `path` and everything under it the modes a plain `open`/`mkdir` would: files 0666, directories 0777,
    less the umask (symbolic links are left alone)."""
    mask = current_umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    if path.is_symlink():
        return
    if not path.is_dir():
        os.chmod(path, file_mode)
        return
    for root, dirs, files in os.walk(path):
        for name in files:
            entry = os.path.join(root, name)
            if not os.path.islink(entry):
                os.chmod(entry, file_mode)
        for name in dirs:
            entry = os.path.join(root, name)
            if not os.path.islink(entry):
                os.chmod(entry, dir_mode)
    os.chmod(path, dir_mode)


def _as_os_error(error: BaseException, final: Path) -> OSError | None:
    """The OSError behind a writer's own exception type (safetensors reports a full disk as
    `SafetensorError(... (os error 28) ...)`) or an OSError that names no file, naming `final`; None if there is
    none (or the OSError names its file already)."""
    if isinstance(error, OSError):
        return OSError(error.errno, error.strerror, str(final)) if not error.filename and error.errno else None
    found = re.search(r"\(os error (\d+)\)", str(error))
    if found is None:
        return None
    code = int(found[1])
    return OSError(code, os.strerror(code), str(final))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path (file or directory, the caller decides) next to `final`.

    On normal exit the temporary path gets the umask's modes (`apply_umask`) and replaces `final` (an existing
    directory is swapped out and removed); on an exception it is deleted and `final` is left untouched.

    Args:
        final: the path the output should end up at; its parent directory is created if missing.
        overwrite: replace an existing `final`; if False and `final` exists at exit, nothing is replaced.

    Yields:
        A path beside `final` that does not exist yet; the caller creates a file or directory there.

    Raises:
        FileExistsError: `overwrite` is False and `final` exists when the block ends.
        OSError: the block failed writing (a full disk, a refused permission), also where the writer reported it
            as its own exception type; `final` is left untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.rmdir()  # the caller creates a file or a directory at this name
    try:
        yield tmp
    except BaseException as error:
        _remove(tmp)
        os_error = _as_os_error(error, final)
        if os_error is not None:
            raise os_error from error
        raise
    if final.exists() and not overwrite:
        _remove(tmp)
        raise FileExistsError(final)
    try:
        if tmp.exists() or tmp.is_symlink():
            apply_umask(tmp)
        if (final.is_dir() and not final.is_symlink()) or (tmp.is_dir() and final.exists()):
            # os.replace cannot replace a non-empty directory, nor a file by a directory: move the old one aside.
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            _remove(old)
            os.replace(final, old)
            os.replace(tmp, final)
            _remove(old)
        else:
            os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(final.parent)


def atomic_write_text(final: str | os.PathLike, text: str) -> None:
    """Write `text` to `final` atomically (temporary file, fsync, rename; see `atomic_path`).

    Raises:
        OSError: the directory cannot be written; `final` is then left as it was.
    """
    with atomic_path(final) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_bytes(final: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `final` atomically (temporary file, fsync, rename; see `atomic_path`).

    Raises:
        OSError: the directory cannot be written; `final` is then left as it was.
    """
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
