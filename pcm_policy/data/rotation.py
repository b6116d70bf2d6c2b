"""Rotation conversions for absolute end-effector actions.

robomimic abs actions carry the orientation as an axis-angle vector, which is discontinuous (at angle pi the
vector flips sign), so Diffusion Policy trains on the continuous 6-d representation instead: the first two
ROWS of the rotation matrix, decoded back by Gram-Schmidt (Zhou et al., "On the Continuity of Rotation
Representations in Neural Networks", CVPR 2019, arXiv 1812.07035; rows rather than the paper's columns, as
Diffusion Policy (pytorch3d's convention) stores it). All functions take any leading batch dims; rotation
vectors are in rad.
"""
from __future__ import annotations

import numpy as np
import torch

_SMALL = 1e-6  # below this angle (rad) the Taylor expansions are exact to float64 precision


def _skew(v: np.ndarray) -> np.ndarray:
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    o = np.zeros_like(x)
    return np.stack([np.stack([o, -z, y], -1), np.stack([z, o, -x], -1), np.stack([-y, x, o], -1)], -2)


def axis_angle_to_matrix(aa: np.ndarray) -> np.ndarray:
    """(..., 3) rotation vector (axis * angle, rad) -> (..., 3, 3) float64 matrix (Rodrigues' formula)."""
    aa = np.asarray(aa, dtype=np.float64)
    theta = np.linalg.norm(aa, axis=-1)[..., None, None]
    small = theta < _SMALL
    safe = np.where(small, 1.0, theta)
    # R = I + a K + b K^2 with K = skew(aa); a, b switch to their series near 0 to avoid 0/0.
    a = np.where(small, 1.0 - theta**2 / 6.0, np.sin(safe) / safe)
    b = np.where(small, 0.5 - theta**2 / 24.0, (1.0 - np.cos(safe)) / safe**2)
    k = _skew(aa)
    return np.eye(3) + a * k + b * (k @ k)


def matrix_to_quaternion(m: np.ndarray) -> np.ndarray:
    """(..., 3, 3) rotation matrix -> (..., 4) float64 unit quaternion (w, x, y, z) with w >= 0.

    Shepperd's method (S. W. Shepperd, "Quaternion from rotation matrix", J. Guidance and Control 1(3), 1978):
    build the quaternion from whichever of the four diagonal combinations is largest, so no branch divides by a
    number near zero (the naive trace formula fails near angle pi).
    """
    m = np.asarray(m, dtype=np.float64)
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    cands = np.stack([
        np.stack([1 + m00 + m11 + m22, m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1),
        np.stack([m[..., 2, 1] - m[..., 1, 2], 1 + m00 - m11 - m22, m[..., 0, 1] + m[..., 1, 0], m[..., 0, 2] + m[..., 2, 0]], -1),
        np.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 0, 1] + m[..., 1, 0], 1 - m00 + m11 - m22, m[..., 1, 2] + m[..., 2, 1]], -1),
        np.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 2] + m[..., 2, 1], 1 - m00 - m11 + m22], -1),
    ], -2)  # (..., 4 candidates, 4): candidate i is 4 q_i * q
    best = np.argmax(np.stack([cands[..., i, i] for i in range(4)], -1), axis=-1)
    q = np.take_along_axis(cands, best[..., None, None], axis=-2)[..., 0, :]
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    return np.where(q[..., :1] < 0, -q, q)


def matrix_to_axis_angle(m: np.ndarray) -> np.ndarray:
    """(..., 3, 3) rotation matrix -> (..., 3) float64 rotation vector (axis * angle) with angle in [0, pi] rad."""
    q = matrix_to_quaternion(m)
    w, v = q[..., 0], q[..., 1:]
    s = np.linalg.norm(v, axis=-1)
    angle = 2.0 * np.arctan2(s, w)
    small = s < _SMALL
    # rotvec = v * angle / sin(angle/2) = v * angle / s; near 0 use the series of 2 atan2(s, w) / s.
    scale = np.where(small, 2.0 / w - 2.0 * s**2 / (3.0 * w**3), angle / np.where(small, 1.0, s))
    return v * scale[..., None]


def matrix_to_rot6d(m: np.ndarray) -> np.ndarray:
    """(..., 3, 3) -> (..., 6): the first two rows, row-major, in the input's dtype."""
    m = np.asarray(m)
    return m[..., :2, :].reshape(*m.shape[:-2], 6)


def rot6d_to_matrix(d6: np.ndarray) -> np.ndarray:
    """(..., 6) -> (..., 3, 3) float64 rotation matrix by Gram-Schmidt on the two rows (rows b1, b2, b1 x b2).

    The rows need not be orthonormal; a zero or parallel pair has no rotation and gives NaN.
    """
    d6 = np.asarray(d6, dtype=np.float64)
    a1, a2 = d6[..., :3], d6[..., 3:]
    b1 = a1 / np.linalg.norm(a1, axis=-1, keepdims=True)
    b2 = a2 - np.sum(b1 * a2, axis=-1, keepdims=True) * b1
    b2 = b2 / np.linalg.norm(b2, axis=-1, keepdims=True)
    b3 = np.cross(b1, b2)
    return np.stack([b1, b2, b3], axis=-2)


def axis_angle_to_rot6d(aa: np.ndarray) -> np.ndarray:
    """(..., 3) rotation vector (rad) -> (..., 6) float64 rot6d (the matrix's first two rows)."""
    return matrix_to_rot6d(axis_angle_to_matrix(aa))


def rot6d_to_axis_angle(d6: np.ndarray) -> np.ndarray:
    """(..., 6) rot6d -> (..., 3) float64 rotation vector, angle in [0, pi] rad (Gram-Schmidt first)."""
    return matrix_to_axis_angle(rot6d_to_matrix(d6))


def abs_action_to_10d(a7: np.ndarray) -> np.ndarray:
    """[pos3, axisangle3, gripper] (..., 7) -> [pos3, rot6d, gripper] (..., 10), same dtype as a float input
    (float64 for another dtype); position and gripper pass through unchanged.

    Raises:
        ValueError: the last dim is not 7.
    """
    a7 = np.asarray(a7)
    if a7.shape[-1] != 7:
        raise ValueError(f"abs action must have 7 values in the last dim, got shape {a7.shape}")
    out = np.concatenate([a7[..., :3], axis_angle_to_rot6d(a7[..., 3:6]), a7[..., 6:]], axis=-1)
    return out.astype(a7.dtype if np.issubdtype(a7.dtype, np.floating) else np.float64, copy=False)


def abs_action_from_10d(a10: np.ndarray) -> np.ndarray:
    """[pos3, rot6d, gripper] (..., 10) -> [pos3, axisangle3, gripper] (..., 7), for stepping the env; same
    dtype as a float input (float64 for another dtype).

    Raises:
        ValueError: the last dim is not 10.
    """
    a10 = np.asarray(a10)
    if a10.shape[-1] != 10:
        raise ValueError(f"10-d action must have 10 values in the last dim, got shape {a10.shape}")
    out = np.concatenate([a10[..., :3], rot6d_to_axis_angle(a10[..., 3:9]), a10[..., 9:]], axis=-1)
    return out.astype(a10.dtype if np.issubdtype(a10.dtype, np.floating) else np.float64, copy=False)


# torch versions of the two cheap maps, for code that stays on the device (e.g. a rot6d loss term).
def matrix_to_rot6d_torch(m: torch.Tensor) -> torch.Tensor:
    """`matrix_to_rot6d` for tensors: (..., 3, 3) -> (..., 6), same dtype and device, differentiable."""
    return m[..., :2, :].reshape(*m.shape[:-2], 6)


def rot6d_to_matrix_torch(d6: torch.Tensor) -> torch.Tensor:
    """`rot6d_to_matrix` for tensors: (..., 6) -> (..., 3, 3), same dtype and device, differentiable.

    Normalization uses `torch.nn.functional.normalize` (eps 1e-12): a zero or parallel pair gives zero rows,
    not NaN, and no rotation.
    """
    a1, a2 = d6[..., :3], d6[..., 3:]
    b1 = torch.nn.functional.normalize(a1, dim=-1)
    b2 = torch.nn.functional.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.linalg.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-2)
