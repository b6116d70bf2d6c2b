"""Where user paths are found: relative to the working directory, else to the repository root (shipped data)."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_path(path: str | os.PathLike | None) -> Path | None:
    """A user path: `~` expanded; a relative path is taken from the working directory, else from the repository
    root (shipped data under `data/`).

    Args:
        path: the path, or None.

    Returns:
        `path` when absolute or present under the working directory, else the repository-root path when that
        exists, else `path` unchanged (its reader reports it); None for None.
    """
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    in_repo = REPO_ROOT / p
    return in_repo if in_repo.exists() else p
