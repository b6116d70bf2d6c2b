"""Rehearse the GPU machine's package set on this one: refuse imports of the packages it lacks.

`gpu_check.sh --dry-run` puts this folder first on PYTHONPATH, so Python loads it at start-up (see `site`), and
lists the refused top-level packages in PCM_BLOCK_IMPORTS (comma-separated): a step that would need one of them
on the device fails here too, with an ImportError naming it.
"""
import os
import sys

_BLOCKED = frozenset(filter(None, os.environ.get("PCM_BLOCK_IMPORTS", "").split(",")))


class _RefuseMissingOnDevice:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _BLOCKED:
            raise ImportError(f"{name}: not on the GPU machine (gpu_check.sh --dry-run refuses it)", name=name)
        return None


if _BLOCKED:
    sys.meta_path.insert(0, _RefuseMissingOnDevice())
