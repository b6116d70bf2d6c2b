"""Per-field affine normalizer (y = x * scale + offset), fitted on the training data, saved with the policy.

The denoiser works in normalized space; the policy unnormalizes its sampled actions before they reach the env.
Keeping only scale/offset per field makes the map exact to invert and trivially serialisable (safetensors).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

MODES = ("limits", "gaussian", "identity")
_PREFIX = "normalizer."
_RANGE_EPS = 1e-4  # a dim whose min/max range is below this is treated as constant (Diffusion Policy's value)
_STAT_NAMES = ("scale", "offset", "min", "max", "mean", "std")


class Normalizer:
    """Named fields, each with a per-dim affine map y = x * scale + offset; empty until fitted or loaded.

    Attributes:
        params: field name -> {"scale", "offset", "min", "max", "mean", "std"}, float32 CPU tensors (D,);
            min/max/mean/std are the raw statistics of the fitted data (a loaded state may hold only
            scale/offset).
    """

    def __init__(self):
        # name -> {"scale", "offset", "min", "max", "mean", "std"}: float32 CPU tensors of shape (D,)
        self.params: dict[str, dict[str, torch.Tensor]] = {}
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- fitting -------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, data: Mapping[str, np.ndarray], mode: str | Mapping[str, str] = "limits",
            output_min: float = -1.0, output_max: float = 1.0) -> "Normalizer":
        """Fit every field of `data` (arrays (..., D), statistics over all leading dims).

        Args:
            data: field name -> array (..., D), any real dtype (fitted in float64).
            mode: one mode of `MODES` for all fields, or a dict name -> mode (missing names: `limits`).
            output_min, output_max: the `limits` target range.

        Returns:
            The fitted normalizer.

        Raises:
            ValueError: see `fit_field`.
        """
        norm = cls()
        for name, arr in data.items():
            m = mode if isinstance(mode, str) else mode.get(name, "limits")
            norm.fit_field(name, arr, m, output_min, output_max)
        return norm

    def fit_field(self, name: str, arr, mode: str = "limits", output_min: float = -1.0,
                  output_max: float = 1.0) -> None:
        """Fit (or refit) one field on `arr` (..., D); statistics are per last-dim entry over all leading dims.

        Modes: `limits` maps [min, max] of each dim to [output_min, output_max] (Diffusion Policy's min/max
        normalizer; a dim whose range is below 1e-4 gets scale 1 and is shifted to the middle of the range);
        `gaussian` maps to zero mean and unit std (std below 1e-4 counts as 1); `identity` leaves values as they are.

        Args:
            name: the field name (no '.', which separates the parts of state-dict keys).
            arr: the data, array-like (..., D); a scalar counts as (1, 1).
            mode: one of `MODES`.
            output_min, output_max: the `limits` target range.

        Raises:
            ValueError: an unknown mode, a '.' in `name`, output_max <= output_min, an empty array, or NaN/inf.
        """
        if mode not in MODES:
            raise ValueError(f"unknown normalizer mode {mode!r}; expected one of {MODES}")
        if "." in name:
            raise ValueError(f"normalizer field name {name!r} must not contain '.' (used in state_dict keys)")
        if not output_max > output_min:
            raise ValueError(f"output_max ({output_max}) must exceed output_min ({output_min})")
        x = np.asarray(arr, dtype=np.float64)
        x = x.reshape(-1, x.shape[-1]) if x.ndim > 0 else x.reshape(1, 1)
        if x.shape[0] == 0:
            raise ValueError(f"cannot fit normalizer field {name!r} on an empty array")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"cannot fit normalizer field {name!r}: data contains NaN/inf")
        lo, hi, mean, std = x.min(0), x.max(0), x.mean(0), x.std(0)
        if mode == "limits":
            rng = hi - lo
            const = rng < _RANGE_EPS
            # Constant dims: scale 1 and shift the constant to the middle of the output range, instead of
            # dividing by ~0 (which would turn float noise at inference time into huge inputs).
            scale = np.where(const, 1.0, (output_max - output_min) / np.where(const, 1.0, rng))
            offset = np.where(const, (output_max + output_min) / 2 - lo, output_min - scale * lo)
        elif mode == "gaussian":
            safe_std = np.where(std < _RANGE_EPS, 1.0, std)
            scale, offset = 1.0 / safe_std, -mean / safe_std
        else:
            scale, offset = np.ones_like(lo), np.zeros_like(lo)
        stats = dict(scale=scale, offset=offset, min=lo, max=hi, mean=mean, std=std)
        self.params[name] = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in stats.items()}
        self._cache.clear()

    # ---- applying ------------------------------------------------------------------------------------
    def _affine(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self.params:
            raise KeyError(f"normalizer has no field {name!r}; fitted fields: {sorted(self.params)}")
        key = (name, x.device, x.dtype)
        if key not in self._cache:  # avoid a host->device copy per call
            p = self.params[name]
            self._cache[key] = (p["scale"].to(x.device, x.dtype), p["offset"].to(x.device, x.dtype))
        scale, offset = self._cache[key]
        if x.shape[-1] != scale.shape[0]:
            raise ValueError(f"normalizer field {name!r} has {scale.shape[0]} dims, input has shape {tuple(x.shape)}")
        return scale, offset

    def normalize(self, name: str, x):
        """x (..., D) torch tensor (or numpy array, returned as numpy) -> normalized, same device/dtype.

        A non-float numpy array is taken as float32.

        Raises:
            KeyError: no field `name`.
            ValueError: the last dim of `x` is not the field's D.
        """
        t, to_np = _as_tensor(x)
        scale, offset = self._affine(name, t)
        y = t * scale + offset
        return y.numpy() if to_np else y

    def unnormalize(self, name: str, x):
        """The inverse of `normalize`: (x - offset) / scale, same shape, device and dtype (numpy in, numpy out).

        Raises:
            KeyError: no field `name`.
            ValueError: the last dim of `x` is not the field's D.
        """
        t, to_np = _as_tensor(x)
        scale, offset = self._affine(name, t)
        y = (t - offset) / scale
        return y.numpy() if to_np else y

    def __contains__(self, name: str) -> bool:
        return name in self.params

    def keys(self):
        """The fitted field names (a dict view)."""
        return self.params.keys()

    # ---- saving --------------------------------------------------------------------------------------
    def state_dict(self, prefix: str = _PREFIX) -> dict[str, torch.Tensor]:
        """Flat {"normalizer.<field>.<stat>": tensor}; contiguous CPU tensors, ready for safetensors."""
        return {f"{prefix}{name}.{k}": v.contiguous().clone() for name, p in self.params.items() for k, v in p.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], prefix: str = _PREFIX) -> None:
        """Replace all fields with those under `prefix` in `state` (other keys, e.g. model weights, are ignored).

        Values are copied to float32 CPU tensors.

        Raises:
            ValueError: a key under `prefix` that is not `<field>.<stat>` with a known stat, or a field without
                scale and offset (the normalizer is then unchanged).
        """
        params: dict[str, dict[str, torch.Tensor]] = {}
        for key, val in state.items():
            if not key.startswith(prefix):
                continue
            name, _, stat = key[len(prefix):].rpartition(".")
            if not name or stat not in _STAT_NAMES:
                raise ValueError(f"unexpected normalizer state key {key!r}")
            params.setdefault(name, {})[stat] = torch.as_tensor(val).detach().to("cpu", torch.float32).clone()
        for name, p in params.items():
            if "scale" not in p or "offset" not in p:
                raise ValueError(f"normalizer state for field {name!r} lacks scale/offset")
        self.params = params
        self._cache.clear()

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], prefix: str = _PREFIX) -> "Normalizer":
        """A normalizer loaded from `state` (`load_state_dict`).

        Raises:
            ValueError: malformed entries (see `load_state_dict`).
        """
        norm = cls()
        norm.load_state_dict(state, prefix)
        return norm


def _as_tensor(x) -> tuple[torch.Tensor, bool]:
    if isinstance(x, torch.Tensor):
        return x, False
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr)), True
