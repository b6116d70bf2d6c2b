import numpy as np
import pytest
import torch

from pcm_policy.data.rotation import (
    abs_action_from_10d, abs_action_to_10d, axis_angle_to_matrix, matrix_to_axis_angle, matrix_to_quaternion,
    matrix_to_rot6d, matrix_to_rot6d_torch, rot6d_to_matrix, rot6d_to_matrix_torch,
)


def _random_axes(n, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _angles_incl_edges():
    # generic angles plus the two places where naive formulas divide by ~0
    return np.array([0.0, 1e-12, 1e-8, 1e-5, 0.3, 1.0, 2.0, 3.0, np.pi - 1e-5, np.pi - 1e-9, np.pi])


def _assert_rotation(m):
    np.testing.assert_allclose(m @ np.swapaxes(m, -1, -2), np.broadcast_to(np.eye(3), m.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(m), 1.0, atol=1e-12)


def test_axis_angle_to_matrix_known_values():
    r = axis_angle_to_matrix(np.array([0, 0, np.pi / 2]))
    np.testing.assert_allclose(r, [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-15)
    np.testing.assert_allclose(axis_angle_to_matrix(np.zeros(3)), np.eye(3), atol=0)
    r = axis_angle_to_matrix(np.array([np.pi, 0, 0]))
    np.testing.assert_allclose(r, np.diag([1.0, -1.0, -1.0]), atol=1e-15)


@pytest.mark.parametrize("angle", _angles_incl_edges())
def test_axis_angle_matrix_round_trip(angle):
    aa = _random_axes(20, seed=1) * angle
    m = axis_angle_to_matrix(aa)
    _assert_rotation(m)
    back = matrix_to_axis_angle(m)
    assert np.all(np.isfinite(back))
    np.testing.assert_allclose(np.linalg.norm(back, axis=1), angle, atol=1e-7)
    # at exactly pi, r and -r are the same rotation: compare the rotations, not the vectors
    np.testing.assert_allclose(axis_angle_to_matrix(back), m, atol=1e-9)
    if angle < np.pi - 1e-3:
        np.testing.assert_allclose(back, aa, atol=1e-9)


def test_small_angle_series_is_accurate():
    aa = np.array([[3e-7, -1e-7, 2e-7]])
    m = axis_angle_to_matrix(aa)
    # first order: R ~ I + skew(aa)
    assert m[0, 1, 0] == pytest.approx(2e-7, rel=1e-9) and m[0, 0, 2] == pytest.approx(-1e-7, rel=1e-9)
    np.testing.assert_allclose(matrix_to_axis_angle(m), aa, rtol=1e-6, atol=1e-20)


def test_quaternion_is_unit_with_nonnegative_w():
    m = axis_angle_to_matrix(_random_axes(50, seed=2) * np.linspace(0, np.pi, 50)[:, None])
    q = matrix_to_quaternion(m)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-12)
    assert np.all(q[:, 0] >= 0)


def test_rot6d_is_first_two_rows_and_round_trips():
    m = axis_angle_to_matrix(_random_axes(30, seed=3) * np.linspace(0, np.pi, 30)[:, None])
    d6 = matrix_to_rot6d(m)
    assert d6.shape == (30, 6)
    np.testing.assert_array_equal(d6[:, :3], m[:, 0, :])
    np.testing.assert_array_equal(d6[:, 3:], m[:, 1, :])
    np.testing.assert_allclose(rot6d_to_matrix(d6), m, atol=1e-12)


def test_rot6d_decoding_orthonormalises_noisy_input():
    m = axis_angle_to_matrix(np.array([0.4, -0.2, 1.1]))
    noisy = matrix_to_rot6d(m) * 3.0 + np.random.default_rng(4).normal(scale=1e-3, size=6)
    r = rot6d_to_matrix(noisy)
    _assert_rotation(r)
    np.testing.assert_allclose(r, m, atol=1e-2)
    # Gram-Schmidt keeps the direction of the first row exactly
    np.testing.assert_allclose(r[0], noisy[:3] / np.linalg.norm(noisy[:3]), atol=1e-12)


def test_torch_versions_match_numpy():
    m = axis_angle_to_matrix(_random_axes(10, seed=5) * 2.0)
    d6 = matrix_to_rot6d(m) + 0.01
    np.testing.assert_allclose(rot6d_to_matrix_torch(torch.from_numpy(d6)).numpy(), rot6d_to_matrix(d6), atol=1e-12)
    np.testing.assert_array_equal(matrix_to_rot6d_torch(torch.from_numpy(m)).numpy(), matrix_to_rot6d(m))


@pytest.mark.parametrize("angle", [0.0, 1e-9, 1.5, np.pi - 1e-7])
def test_abs_action_10d_round_trip(angle):
    rng = np.random.default_rng(6)
    a7 = np.concatenate([rng.normal(size=(4, 5, 3)), _random_axes(20, 7).reshape(4, 5, 3) * angle,
                         rng.choice([-1.0, 1.0], (4, 5, 1))], axis=-1)
    a10 = abs_action_to_10d(a7)
    assert a10.shape == (4, 5, 10) and a10.dtype == a7.dtype
    np.testing.assert_array_equal(a10[..., :3], a7[..., :3])
    np.testing.assert_array_equal(a10[..., 9], a7[..., 6])
    back = abs_action_from_10d(a10)
    assert back.shape == (4, 5, 7)
    np.testing.assert_allclose(back, a7, atol=1e-6)


def test_abs_action_float32_keeps_dtype_and_checks_width():
    a7 = np.array([[0.1, 0.2, 0.3, 0.5, -0.5, 0.1, 1.0]], dtype=np.float32)
    a10 = abs_action_to_10d(a7)
    assert a10.dtype == np.float32
    np.testing.assert_allclose(abs_action_from_10d(a10), a7, atol=1e-6)
    with pytest.raises(ValueError, match="7 values"):
        abs_action_to_10d(np.zeros((2, 6)))
    with pytest.raises(ValueError, match="10 values"):
        abs_action_from_10d(np.zeros((2, 7)))
