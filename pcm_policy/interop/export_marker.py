"""The mark an export leaves in what it writes, so that a later export replaces only pcm's own earlier exports.

A Diffusion Policy export carries it in its config (`cfg.exported_by`, a key DP's code never reads); a lerobot
export directory holds it as `pcm_export.json` beside lerobot's files (lerobot reads only the files it names). The
mark is `{"tool": "pcm-policy", "version": ..., "checkpoint": the exported checkpoint}`; the lerobot file adds what
`import_lerobot` needs to give back the exported policy exactly (`lerobot_export` documents it).
"""
from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

TOOL = "pcm-policy"
MARKER_FILE = "pcm_export.json"


def exported_by(checkpoint: str | Path) -> dict[str, str]:
    """The mark for an export of `checkpoint`: {"tool", "version", "checkpoint"}."""
    try:
        version = importlib.metadata.version(TOOL)
    except importlib.metadata.PackageNotFoundError:  # running from a source tree that was never installed
        version = "unknown"
    return {"tool": TOOL, "version": version, "checkpoint": str(checkpoint)}


def is_pcm_mark(mark: Any) -> bool:
    """Whether `mark` (a config's `exported_by`, or the marker file's) names this tool."""
    return isinstance(mark, dict) and mark.get("tool") == TOOL
