"""openpi-client's wire encoding: msgpack maps whose numpy arrays are maps of raw bytes (never pickle).

As `openpi_client.msgpack_numpy` (0.1.2) writes them:
- an ndarray: {b"__ndarray__": True, b"data": its raw bytes, b"dtype": `dtype.str` (e.g. "<f4"), b"shape": [..]};
- a numpy scalar: {b"__npgeneric__": True, b"data": the Python value, b"dtype": `dtype.str`};
- everything else as plain msgpack (maps, lists, str, bytes, int, float, bool, None).

Decoding accepts only bool, integer and float dtypes whose bytes match the shape; anything else (object, void,
complex, strings, a short or long buffer) is a `WireError` naming what is wrong. The arrays decoded are read-only
views of the frame's bytes.
"""
from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

NUMERIC_KINDS = "biuf"  # bool, signed and unsigned integers, floats: what a robot observation holds
MAX_NDIM = 8
MAX_DEPTH = 8  # maps and lists inside a request (a request is one flat map)


class WireError(ValueError):
    """A frame that is not a valid openpi msgpack-numpy message; the message is one line."""


def _encode(obj: Any) -> Any:
    """msgpack's `default` hook: numpy arrays and scalars as openpi-client maps."""
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in NUMERIC_KINDS:
            raise TypeError(f"cannot send an array of dtype {obj.dtype} (only bool, integer and float arrays)")
        return {b"__ndarray__": True, b"data": np.ascontiguousarray(obj).tobytes(), b"dtype": obj.dtype.str,
                b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        if obj.dtype.kind not in NUMERIC_KINDS:
            raise TypeError(f"cannot send a numpy scalar of dtype {obj.dtype}")
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot send a {type(obj).__name__}")


def pack(message: Any) -> bytes:
    """One message as openpi-client encodes it.

    Args:
        message: a map (or any msgpack value) whose leaves may be numpy arrays or scalars of bool/int/float dtype.

    Returns:
        The msgpack bytes.

    Raises:
        TypeError: a value msgpack cannot hold (an object or complex array, an arbitrary Python object).
    """
    return msgpack.packb(message, default=_encode, use_bin_type=True)


def _dtype(value: Any) -> np.dtype:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        raise WireError(f"array dtype {describe(value)}: expected a numpy dtype string such as '<f4'")
    try:
        dtype = np.dtype(value)
    except (TypeError, ValueError):
        raise WireError(f"array dtype {describe(value)}: not a numpy dtype") from None
    if dtype.kind not in NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise WireError(f"array dtype {describe(value)}: only bool, integer and float arrays are accepted")
    return dtype


def _decode_map(obj: dict) -> Any:
    """openpi-client's array or scalar map back to numpy; any other map as it is."""
    if obj.get(b"__ndarray__") is True:
        dtype = _dtype(obj.get(b"dtype"))
        shape, data = obj.get(b"shape"), obj.get(b"data")
        if (not isinstance(shape, (list, tuple)) or len(shape) > MAX_NDIM
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
            raise WireError(f"array shape {describe(shape)}: expected a list of at most {MAX_NDIM} sizes >= 0")
        if not isinstance(data, bytes):
            raise WireError("array data: expected bytes")
        if len(data) != math.prod(shape) * dtype.itemsize:
            raise WireError(f"array data: {len(data)} bytes do not hold shape {tuple(shape)} of {dtype.str}")
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    if obj.get(b"__npgeneric__") is True:
        dtype = _dtype(obj.get(b"dtype"))
        try:
            return dtype.type(obj.get(b"data"))
        except (TypeError, ValueError, OverflowError):
            raise WireError(f"numpy scalar of dtype {dtype.str}: bad value {describe(obj.get(b'data'))}") from None
    return obj


def _decode(value: Any, where: str, depth: int = 0) -> Any:
    """`value` with every openpi array/scalar map inside it decoded; errors name `where` (the key path)."""
    if depth > MAX_DEPTH:
        raise WireError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        try:
            value = _decode_map(value)
        except WireError as e:
            raise WireError(f"{where}: {e}") from None
        if isinstance(value, dict):
            return {k: _decode(v, _path(where, k), depth + 1) for k, v in value.items()}
    elif isinstance(value, list):
        return [_decode(v, _path(where, i), depth + 1) for i, v in enumerate(value)]
    return value


def _path(where: str, key: Any) -> str:
    return key_name(key) if where == "frame" else f"{where}.{key_name(key)}"


def key_name(key: Any) -> str:
    """A client-supplied map key for a one-line message: as it is when a short printable string, else `describe`d."""
    return key if isinstance(key, str) and 0 < len(key) <= 40 and key.isprintable() else describe(key)


def unpack(frame: bytes) -> Any:
    """One received binary frame, decoded as openpi-client encodes it.

    Args:
        frame: the frame's bytes.

    Returns:
        The message (a dict for every valid request), arrays as read-only numpy arrays.

    Raises:
        WireError: not msgpack (or trailing bytes): `frame: ...`; a malformed array or scalar map, or a dtype
            other than bool/int/float: `<key>: ...`; one line.
    """
    try:
        message = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several types (ExtraData, FormatError, StackError, ValueError, ...)
        raise WireError(f"frame: not a msgpack message ({type(e).__name__})") from None
    return _decode(message, "frame")


def describe(value: Any, limit: int = 40) -> str:
    """A client-supplied value (e.g. an unknown key) for a one-line error message: its repr on one line, cut to
    `limit` characters."""
    text = repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."
