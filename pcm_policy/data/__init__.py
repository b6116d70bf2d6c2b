"""Dataset layer: replay buffers and robomimic files -> padded windows -> normalized tensors."""
from pcm_policy.data.info import dataset_info, detect_format
from pcm_policy.data.lowdim_dataset import LowDimDataset
from pcm_policy.data.normalizer import Normalizer
from pcm_policy.data.replay_buffer import ReplayBuffer
from pcm_policy.data.robomimic import DEFAULT_OBS_KEYS, RobomimicFile, write_robomimic_hdf5
from pcm_policy.data.rotation import (
    abs_action_from_10d,
    abs_action_to_10d,
    axis_angle_to_matrix,
    axis_angle_to_rot6d,
    matrix_to_axis_angle,
    matrix_to_rot6d,
    rot6d_to_axis_angle,
    rot6d_to_matrix,
)
from pcm_policy.data.sequence import SequenceSampler, split_episodes

__all__ = [
    "DEFAULT_OBS_KEYS", "LowDimDataset", "Normalizer", "ReplayBuffer", "RobomimicFile", "SequenceSampler",
    "abs_action_from_10d", "abs_action_to_10d", "axis_angle_to_matrix", "axis_angle_to_rot6d",
    "dataset_info", "detect_format", "matrix_to_axis_angle", "matrix_to_rot6d", "rot6d_to_axis_angle",
    "rot6d_to_matrix", "split_episodes", "write_robomimic_hdf5",
]
