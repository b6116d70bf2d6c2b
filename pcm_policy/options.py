"""Generic option checks: read one dotted key of a composed config and raise a one-line ConfigError naming it.

The lowest layer of option handling: it knows config shapes (nested mappings and lists) and value types, not
what any option means. Each domain rule lives on its own type (`SamplerConfig`, `PolicyConfig`, the checkpoint
card, each command's config) and uses these tools. Imports nothing of the package but its errors.
"""
from __future__ import annotations

import math
import numbers
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from pcm_policy.errors import ConfigError

MISSING = object()


def lookup(cfg: Mapping[str, Any], key: str, default: Any = MISSING) -> Any:
    """`cfg["a"]["b"]` for key `a.b` (a digit part indexes a list).

    Args:
        cfg: the composed config (nested mappings and lists).
        key: the dotted key.
        default: returned when the key is absent; without it an absent key is an error.

    Raises:
        ConfigError: the key is absent and no `default` was given.
    """
    node: Any = cfg
    for part in key.split("."):
        if isinstance(node, Sequence) and not isinstance(node, str) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, Mapping) and part in node:
            node = node[part]
        elif default is MISSING:
            raise ConfigError(f"{key}: missing from the config")
        else:
            return default
    return node


def show(value: Any) -> str:
    """A value as the user typed it: strings quoted, YAML's true/false/null."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return repr(value) if isinstance(value, str) else str(value)


def check_int(key: str, value: Any, low: int | None = None, high: int | None = None, null: bool = False,
              why: str = "") -> int | None:
    """`value` (option `key`) as an integer in [low, high] (None = unbounded side); None allowed when `null`.

    Raises:
        ConfigError: `value` is a bool or not an integer, or out of range; `why` is appended to the
            out-of-range message.
    """
    if value is None and null:
        return None
    limits = " and ".join(s for s in (f">= {low}" if low is not None else "", f"<= {high}" if high is not None else "")
                          if s)
    what = f"an integer{' ' + limits if limits else ''}{' or null' if null else ''}"
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ConfigError(f"{key}={show(value)}: expected {what}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"{key}={value}: expected {what}{why}")
    return int(value)


def check_number(key: str, value: Any, low: float | None = None, high: float | None = None, low_open: bool = False,
                 high_open: bool = False, null: bool = False) -> float | None:
    """`value` (option `key`) as a finite real number in the interval given by low/high (open ends when `*_open`);
    None allowed when `null`.

    Raises:
        ConfigError: a bool, not a number, NaN/inf, or outside the interval.
    """
    if value is None and null:
        return None
    lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
    what = "a number" + (f" {lo}" if lo else "") + (" and" if lo and hi else "") + (f" {hi}" if hi else "") + \
        (" or null" if null else "")
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{key}={show(value)}: expected {what}")
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(f"{key}={value}: expected {what}")
    if high is not None and (value >= high if high_open else value > high):
        raise ConfigError(f"{key}={value}: expected {what}")
    return float(value)


def check_choice(key: str, value: Any, options: Sequence[str], null: bool = False) -> str | None:
    """`value` (option `key`), which must be one of `options`; None allowed when `null`.

    Raises:
        ConfigError: not one of `options` (the message lists them).
    """
    if value is None and null:
        return None
    if value not in options:
        raise ConfigError(f"{key}={show(value)}: expected one of {', '.join(options)}{' or null' if null else ''}")
    return value


def check_flag(key: str, value: Any) -> bool:
    """`value` (option `key`) as a YAML boolean (true/false; 0/1 and strings refused).

    Raises:
        ConfigError: not a bool.
    """
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={show(value)}: expected true or false")
    return value


def check_text(key: str, value: Any, null: bool = False) -> str | None:
    """`value` (option `key`) as a non-empty string; None allowed when `null`.

    Raises:
        ConfigError: not a string, or empty.
    """
    if value is None and null:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}={show(value)}: expected a non-empty string{' or null' if null else ''}")
    return value


def check_mapping(key: str, value: Any, example: str, null: bool = True) -> dict:
    """`value` (option `key`) as a mapping (None -> {} when `null`).

    Raises:
        ConfigError: not a mapping; `example` shows the expected form.
    """
    if value is None and null:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a mapping such as {example}")
    return dict(value)


def check_list(key: str, value: Any, example: str, null: bool = False) -> list | None:
    """`value` (option `key`) as a non-empty list (None allowed when `null`).

    Raises:
        ConfigError: not a non-empty list (a string is not a list); `example` shows the expected form.
    """
    if value is None and null:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise ConfigError(f"{key}={show(value)}: expected a non-empty list such as {example}"
                          f"{' or null' if null else ''}")
    return list(value)


def integer(cfg, key: str, low: int | None = None, high: int | None = None, null: bool = False,
            why: str = "") -> int | None:
    """cfg's `key` as an integer in [low, high] (`check_int`); absent counts as null when `null`.

    Raises:
        ConfigError: absent (unless `null`), not an integer, or out of range.
    """
    return check_int(key, lookup(cfg, key, None if null else MISSING), low, high, null, why)


def number(cfg, key: str, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False, null: bool = False) -> float | None:
    """cfg's `key` as a finite number in an interval (`check_number`); absent counts as null when `null`.

    Raises:
        ConfigError: absent (unless `null`), not a finite number, or outside the interval.
    """
    return check_number(key, lookup(cfg, key, None if null else MISSING), low, high, low_open, high_open, null)


def choice(cfg, key: str, options: Sequence[str], null: bool = False) -> str | None:
    """cfg's `key`, one of `options` (`check_choice`); absent counts as null when `null`.

    Raises:
        ConfigError: absent (unless `null`) or not one of `options`.
    """
    return check_choice(key, lookup(cfg, key, None if null else MISSING), options, null)


def flag(cfg, key: str) -> bool:
    """cfg's `key` as a YAML boolean (`check_flag`).

    Raises:
        ConfigError: absent or not a bool.
    """
    return check_flag(key, lookup(cfg, key))


def text(cfg, key: str, null: bool = False) -> str | None:
    """cfg's `key` as a non-empty string (`check_text`); absent counts as null when `null`.

    Raises:
        ConfigError: absent (unless `null`), not a string, or empty.
    """
    return check_text(key, lookup(cfg, key, None if null else MISSING), null)


def output_dir(cfg, key: str = "output_dir") -> Path:
    """cfg's `key` as a directory that exists or can be created (nothing is created here).

    Returns:
        The path, `~` expanded.

    Raises:
        ConfigError: not a non-empty string, an existing non-directory, a dangling symbolic link on the way,
            or its nearest existing ancestor is a file or not writable.
    """
    return writable_dir(key, text(cfg, key))


def writable_dir(key: str, value: str | os.PathLike) -> Path:
    """`value` (option `key`) as a directory that exists or can be created (nothing is created here).

    Raises:
        ConfigError: an existing non-directory, a dangling symbolic link on the way, or its nearest existing
            ancestor is a file or not writable.
    """
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}={path}: exists and is not a directory")
    ancestor = path
    while not ancestor.exists():
        if ancestor.is_symlink():  # a dangling link: mkdir would fail on it
            raise ConfigError(f"{key}={path}: {ancestor} is a dangling symbolic link")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{key}={path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path}: {ancestor} is not writable")
    return path


def unknown_keys(key: str, given: Mapping[str, Any], known: Sequence[str]) -> None:
    """Refuse keys of the group `key` that are not in `known`.

    Raises:
        ConfigError: naming the first unknown key (sorted) and listing the known ones.
    """
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")


def renamed(cfg: Mapping[str, Any], old: str, new: str) -> tuple[str, Any]:
    """(key, value) of option `new`, or of its deprecated name `old` when that is set (not null, and for a
    mapping, with a value that is not null); then a one-line warning on stderr says to use `new`. The old name
    keeps working for one release.

    Raises:
        ConfigError: `new` is absent from the config.
    """
    value = lookup(cfg, old, None)
    if value is None or (isinstance(value, Mapping) and all(v is None for v in value.values())):
        return new, lookup(cfg, new)
    print(f"pcm: warning: {old} is deprecated and will be removed in the next release; use {new}", file=sys.stderr)
    return old, value
