"""What one request frame may hold, and the check that turns a decoded frame into observation steps.

A request is a msgpack map (`pcm_policy.serving.wire`) of:
- every observation key of the policy (`ObservationSpec`): the low-dim vector `obs`, (Do,) float, and for an image
  policy each camera, (3, H, W) uint8 (channel first, as the envs give them). Either ONE control step per key (the
  server keeps the history), or the whole history, (To, ...) per key, oldest first - all keys alike;
- optionally `reset` (bool): start a new episode: the history is refilled with this step (To copies);
- optionally `seed` (int >= 0): restart the connection's noise generator at this seed before this request.

Low-dim values may be any float dtype (they are cast to float32) and must be finite; camera frames must be uint8.
Any other key, a missing key, another shape or dtype, NaN or inf is a `FrameError` whose one-line message starts
with the key at fault.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from pcm_policy.serving.wire import describe, key_name

LOW_DIM_KEY = "obs"
RESET_KEY = "reset"
SEED_KEY = "seed"
CONTROL_KEYS = (RESET_KEY, SEED_KEY)


class FrameError(ValueError):
    """A request frame the server cannot serve; `str(error)` is one line starting with the key at fault."""


@dataclass(frozen=True)
class ObservationKey:
    """One observation key of a control step.

    Attributes:
        name: the key in the request map.
        shape: its shape per control step, e.g. (20,) or (3, 96, 96).
        dtype: `float32` (low-dim; any float dtype is accepted and cast) or `uint8` (camera frames).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def step_bytes(self) -> int:
        """Bytes of one control step of this key at its largest accepted dtype (float64 for low-dim)."""
        itemsize = 8 if self.dtype == "float32" else np.dtype(self.dtype).itemsize
        return int(np.prod(self.shape)) * itemsize


@dataclass(frozen=True)
class Frame:
    """A checked request.

    Attributes:
        steps: key -> one step (shape of its `ObservationKey`) or, when `history`, (To, ...) steps; low-dim as
            float32, cameras as uint8.
        history: the frame holds the whole history rather than one step.
        reset: the client asked for a new episode.
        seed: restart the connection's noise generator at this seed (None: keep it).
    """

    steps: dict[str, np.ndarray]
    history: bool
    reset: bool
    seed: int | None


@dataclass(frozen=True)
class ObservationSpec:
    """The observation a served policy takes per control step, and its history length.

    Attributes:
        keys: the observation keys, the low-dim `obs` first, then the cameras in the policy's order.
        n_obs_steps: To, the control steps a chunk is conditioned on.
    """

    keys: tuple[ObservationKey, ...]
    n_obs_steps: int

    @classmethod
    def of_policy(cls, config) -> "ObservationSpec":
        """The spec of a policy's config (`PolicyConfig`): `obs` (Do,) float32 and each of `camera_keys`
        (3, H, W) uint8 at the encoder's `image_shape`."""
        keys = [ObservationKey(LOW_DIM_KEY, (int(config.obs_dim),), "float32")]
        vision = config.vision_config
        for camera in config.camera_keys:
            keys.append(ObservationKey(camera, (3, *vision.image_shape), "uint8"))
        return cls(tuple(keys), int(config.n_obs_steps))

    @property
    def cameras(self) -> tuple[str, ...]:
        """The camera keys, in the policy's order (empty for a low-dim policy)."""
        return tuple(k.name for k in self.keys if k.name != LOW_DIM_KEY)

    def metadata(self) -> dict[str, dict[str, Any]]:
        """{key: {"shape": [...], "dtype": "float32" | "uint8"}} per control step (the metadata's `observation`)."""
        return {k.name: {"shape": list(k.shape), "dtype": k.dtype} for k in self.keys}

    def history_bytes(self) -> int:
        """Bytes of a whole-history frame's arrays (To steps of every key, low-dim as float64)."""
        return self.n_obs_steps * sum(k.step_bytes for k in self.keys)

    def parse(self, message: Any) -> Frame:
        """Check a decoded request and return its steps.

        Args:
            message: what `wire.unpack` returned for the frame.

        Returns:
            The `Frame`.

        Raises:
            FrameError: not a map, an unknown or missing key, a value that is not an array, another shape or dtype
                than the spec's (one step or To steps, the same for every key), NaN/inf in the low-dim part, or a
                bad `reset`/`seed`; the message starts with the key.
        """
        if not isinstance(message, Mapping):
            raise FrameError(f"frame: expected a map of observation keys, got {type(message).__name__}")
        known = {k.name for k in self.keys}
        for key in message:
            if key not in known and key not in CONTROL_KEYS:
                raise FrameError(f"{key_name(key)}: unknown key (expected {', '.join(sorted(known))}; optional "
                                 f"{RESET_KEY}, {SEED_KEY})")
        reset = _flag(message.get(RESET_KEY, False))
        seed = _seed(message[SEED_KEY]) if SEED_KEY in message else None
        steps: dict[str, np.ndarray] = {}
        history = None
        for spec in self.keys:
            if spec.name not in message:
                raise FrameError(f"{spec.name}: missing (expected {self._expected(spec)})")
            value, is_history = self._check(spec, message[spec.name])
            if history is not None and is_history != history:
                raise FrameError(f"{spec.name}: {'a history' if is_history else 'one step'} while "
                                 f"{self.keys[0].name} is {'a history' if history else 'one step'} "
                                 "(send one step for every key, or the whole history for every key)")
            history = is_history
            steps[spec.name] = value
        return Frame(steps, bool(history), reset, seed)

    def _expected(self, spec: ObservationKey) -> str:
        kind = "float" if spec.dtype == "float32" else spec.dtype
        return f"{kind} {spec.shape} per step or {(self.n_obs_steps, *spec.shape)} history"

    def _check(self, spec: ObservationKey, value: Any) -> tuple[np.ndarray, bool]:
        if not isinstance(value, np.ndarray):
            raise FrameError(f"{spec.name}: expected an array ({self._expected(spec)}), got {type(value).__name__}")
        if value.shape == spec.shape:
            is_history = False
        elif value.shape == (self.n_obs_steps, *spec.shape):
            is_history = True
        else:
            raise FrameError(f"{spec.name}: shape {value.shape}, expected {self._expected(spec)}")
        if spec.dtype == "uint8":
            if value.dtype != np.uint8:
                raise FrameError(f"{spec.name}: dtype {value.dtype}, expected uint8 camera frames (0..255)")
            return value, is_history
        if value.dtype.kind != "f":
            raise FrameError(f"{spec.name}: dtype {value.dtype}, expected a float array")
        if not np.isfinite(value).all():
            raise FrameError(f"{spec.name}: contains NaN or inf")
        with np.errstate(over="ignore"):  # checked just below, no warning on the server's console
            out = value.astype(np.float32)
        if not np.isfinite(out).all():
            raise FrameError(f"{spec.name}: values overflow float32")
        return out, is_history


def _flag(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, np.ndarray) and value.shape == () and value.dtype == np.bool_:
        return bool(value)
    raise FrameError(f"{RESET_KEY}: expected true or false, got {describe(value)}")


def _seed(value: Any) -> int:
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and 0 <= value < 2**63:
        return int(value)
    raise FrameError(f"{SEED_KEY}: expected an integer in [0, 2^63), got {describe(value)}")
