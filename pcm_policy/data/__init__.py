"""Dataset layer: replay buffers and robomimic files -> padded windows -> normalized tensors.

The public names load on first use (PEP 562), so importing one submodule (the normalizer, for a policy) does not
pull in zarr/numcodecs: the GPU machine runs the samplers and the benchmark without them.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "dataset_info": "info", "detect_format": "info",
    "ImageDataset": "image_dataset",
    "LowDimDataset": "lowdim_dataset",
    "Normalizer": "normalizer",
    "LazyArray": "replay_buffer", "ReplayBuffer": "replay_buffer",
    "DEFAULT_OBS_KEYS": "robomimic", "RobomimicFile": "robomimic", "write_robomimic_hdf5": "robomimic",
    "abs_action_from_10d": "rotation", "abs_action_to_10d": "rotation", "axis_angle_to_matrix": "rotation",
    "axis_angle_to_rot6d": "rotation", "matrix_to_axis_angle": "rotation", "matrix_to_rot6d": "rotation",
    "rot6d_to_axis_angle": "rotation", "rot6d_to_matrix": "rotation",
    "SequenceSampler": "sequence", "split_episodes": "sequence",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
