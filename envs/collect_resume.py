"""Crash-safe, resumable collection: finished attempts are kept beside the output until the dataset is written.

`pcm collect` runs the scripted expert on reset seeds seed, seed+1, ... (deterministic). Every finished attempt
(kept episode or skipped failure) is written atomically to ``<output>.partial/seed_<s>.npz`` (its arrays plus
a small JSON record), so a run killed at any moment loses at most the episode in progress. Re-running the same
command loads the finished attempts, continues from the next seed, writes the final dataset atomically (temporary
name + rename) and removes the partial directory: the result is identical to an uninterrupted run.

``<output>.partial/meta.json`` records the settings that determine the episodes; resuming with other settings
is refused. An existing complete output is left alone unless ``overwrite`` is set.
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pcm_policy.atomic import atomic_write_bytes, atomic_write_text
from pcm_policy.errors import ConfigError, DatasetError

_INFO = "__info__"


def partial_dir(output_path: str | Path) -> Path:
    output = Path(output_path)
    return output.with_name(output.name + ".partial")


def check_existing_output(output_path: str | Path, episodes: int, overwrite: bool) -> dict | None:
    """Stats of an existing complete output with `episodes` episodes (nothing to do), else None (collect).

    Without `overwrite`, an existing output that is unreadable, or that holds another number of episodes,
    is an error naming the file. An output with a partial directory beside it is an interrupted run and resumes.
    """
    from pcm_policy.data.info import dataset_info

    output = Path(output_path)
    if overwrite or not (output.exists() or output.is_symlink()) or partial_dir(output).exists():
        return None
    try:
        info = dataset_info(output)
    except DatasetError as e:
        raise DatasetError(f"{e} (the output exists but is not a readable dataset; delete it or set overwrite=true)") \
            from None
    if info["episodes"] != episodes:
        raise ConfigError(f"{output}: already holds a dataset of {info['episodes']} episodes, not {episodes} "
                          "(set overwrite=true, or choose another output_dir / output_name)")
    return {"output_path": str(output), "episodes": info["episodes"], "steps": info["steps"], "already_complete": True}


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            flat.update(_flatten(v, f"{prefix}{k}/"))
        else:
            flat[f"{prefix}{k}"] = np.asarray(v)
    return flat


def _unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, v in flat.items():
        *groups, leaf = key.split("/")
        node = tree
        for g in groups:
            node = node.setdefault(g, {})
        node[leaf] = v
    return tree


class EpisodeStore:
    """Finished attempts of one collection, one ``seed_<s>.npz`` each, in ``<output>.partial/``."""

    def __init__(self, output_path: str | Path, settings: Mapping[str, Any]):
        self.output = Path(output_path)
        self.dir = partial_dir(self.output)
        self.settings = json.loads(json.dumps(dict(settings), default=str))  # as stored in meta.json

    def open(self) -> list[int]:
        """Create (or check) the partial directory; return the seeds already finished, in order from `seed`."""
        meta_path = self.dir / "meta.json"
        if meta_path.is_file():
            try:
                old = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                old = None
            if old != self.settings:
                diff = sorted(k for k in set(self.settings) | set(old or {})
                              if (old or {}).get(k) != self.settings.get(k)) if isinstance(old, dict) else ["meta.json"]
                raise ConfigError(f"{self.dir}: an interrupted collection with other settings ({', '.join(diff)}) is "
                                  "in progress here; re-run it with the same settings, or delete that directory")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if not meta_path.is_file():
                atomic_write_text(meta_path, json.dumps(self.settings, indent=2, sort_keys=True))
        except OSError as e:
            raise ConfigError(f"{self.output.parent}: cannot write the output here ({e.strerror or type(e).__name__})") \
                from None
        # leftovers of writes interrupted by a kill (atomic_path's temporary names)
        for stale in list(self.dir.glob(".*.tmp-*")) + list(self.output.parent.glob(f".{self.output.name}.tmp-*")):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        done, s = [], int(self.settings["seed"])
        while self._path(s).is_file():
            if self._info(s) is None:  # unreadable (cannot happen with atomic writes, unless the disk lies): redo
                self._path(s).unlink()
                break
            done.append(s)
            s += 1
        return done

    def _path(self, seed: int) -> Path:
        return self.dir / f"seed_{seed:08d}.npz"

    def _info(self, seed: int) -> dict | None:
        try:
            with np.load(self._path(seed), allow_pickle=False) as z:
                return json.loads(str(z[_INFO]))
        except Exception:  # zip / npy / json errors come in many types
            return None

    def kept(self, seeds, limit: int) -> int:
        """Episodes kept among finished attempts `seeds` (as `open` returns them), counting at most `limit`."""
        n = 0
        for s in seeds:
            if n >= limit:
                break
            n += int(self.info(s)["kept"])
        return n

    def has(self, seed: int) -> bool:
        return self._path(seed).is_file()

    def info(self, seed: int) -> dict:
        info = self._info(seed)
        if info is None:
            raise DatasetError(f"{self._path(seed)}: unreadable; delete it and re-run to collect that seed again")
        return info

    def load(self, seed: int) -> tuple[dict, dict | None]:
        """(record, episode arrays or None) of a finished attempt."""
        try:
            with np.load(self._path(seed), allow_pickle=False) as z:
                info = json.loads(str(z[_INFO]))
                arrays = {k: z[k] for k in z.files if k != _INFO}
        except Exception as e:
            raise DatasetError(f"{self._path(seed)}: unreadable ({type(e).__name__}); delete it and re-run") from None
        return info, (_unflatten(arrays) if arrays else None)

    def save(self, seed: int, info: Mapping[str, Any], episode: Mapping[str, Any] | None) -> None:
        """Write one finished attempt atomically (the episode's arrays only when it is kept)."""
        arrays = _flatten(episode) if episode is not None else {}
        buf = io.BytesIO()
        np.savez_compressed(buf, **{_INFO: np.array(json.dumps(dict(info)))}, **arrays)
        atomic_write_bytes(self._path(seed), buf.getvalue())

    def finish(self) -> None:
        """The final dataset is written: drop the finished attempts."""
        shutil.rmtree(self.dir, ignore_errors=True)
