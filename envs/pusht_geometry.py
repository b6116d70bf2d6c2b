"""Fixed geometry of the PushT task: the T block, the goal pose and Diffusion Policy's keypoint features.

Everything here is pure numpy (shapely only for the exact coverage, imported lazily), so the dataset code can
compute features without the simulator.

Conventions (gym-pusht 0.1.8 and Diffusion Policy):
- world coordinates are pixels, x to the right, y DOWN (pygame screen), 0..512; walls at 5 and 506;
- the block pose is (x, y, theta): (x, y) is the pymunk body ORIGIN in world px (not its centre of gravity)
  and theta the body angle; a local point p maps to world as R(theta) @ p + (x, y) with the standard
  rotation matrix R = [[cos, -sin], [sin, cos]] (pymunk's, in a y-down frame);
- the low-dim state is (agent_x, agent_y, block_x, block_y, block_angle).
"""
from __future__ import annotations

import math

import numpy as np

# --- the T block, in its local (body) frame ------------------------------------------------------------
TEE_SCALE = 30.0
TEE_LENGTH = 4.0
# Horizontal bar: x in [-60, 60], y in [0, 30]; stem: x in [-15, 15], y in [30, 120].
TEE_BAR_LOCAL = np.array([(-60.0, 30.0), (60.0, 30.0), (60.0, 0.0), (-60.0, 0.0)])
TEE_STEM_LOCAL = np.array([(-15.0, 30.0), (-15.0, 120.0), (15.0, 120.0), (15.0, 30.0)])
TEE_POLYGONS_LOCAL = (TEE_BAR_LOCAL, TEE_STEM_LOCAL)
# The whole outline as one simple (non-convex) polygon, counter-clockwise in a y-down frame
# (clockwise on screen is irrelevant: use polygon_normals_outward, which checks the orientation).
TEE_OUTLINE_LOCAL = np.array(
    [(-60.0, 0.0), (60.0, 0.0), (60.0, 30.0), (15.0, 30.0), (15.0, 120.0), (-15.0, 120.0), (-15.0, 30.0),
     (-60.0, 30.0)]
)
# Centre of gravity set by gym-pusht (mean of the two rectangles' centroids).
TEE_COG_LOCAL = np.array([0.0, 45.0])
TEE_AREA = 120.0 * 30.0 + 30.0 * 90.0  # 6300 px^2

AGENT_RADIUS = 15.0
WORKSPACE = (0.0, 512.0)
WALL_MIN, WALL_MAX = 5.0, 506.0

# Goal pose of the block (x, y, theta), as in gym-pusht and Diffusion Policy.
GOAL_POSE = np.array([256.0, 256.0, math.pi / 4])
SUCCESS_THRESHOLD = 0.95

# --- Diffusion Policy's block keypoints ----------------------------------------------------------------
# Diffusion Policy's PushTKeypointsEnv (which wrote `data/keypoint` of pusht_cchi_v7_replay.zarr) builds its
# 9 block keypoints at run time: it draws the T alone at origin (256, 300), angle 0, with its pygame
# DrawOptions, takes every non-white pixel, converts it to the body frame (x - 256, y - 300), runs farthest
# point sampling from a random start (numpy default_rng(seed=0), 9 points) and adds uniform(0, 1) jitter
# from the same generator. The values below are the result of that procedure reproduced here with
# gym-pusht's identical drawing code (see `derive_dp_keypoint_map`, checked by the tests).
DP_KEYPOINTS_LOCAL = np.array(
    [
        [9.269786713763871, 90.04097352393619],
        [-60.983472364471474, -1.1867297607997276],
        [60.91275557727772, -1.3933642242328201],
        [-0.2705034390160016, 25.54362499146542],
        [-14.064927576212233, 122.81585355412153],
        [39.002738500170146, 32.857404276587566],
        [-39.966414424694534, 32.729655446429945],
        [-16.82434437939744, 62.86317892234989],
        [23.54146122024909, -1.7002881094626152],
    ]
)
N_KEYPOINTS = 9
LOWDIM_OBS_DIM = 2 * N_KEYPOINTS + 2  # 20


def rotation(theta) -> np.ndarray:
    """Rotation matrices (..., 2, 2) for angles theta (...,)."""
    theta = np.asarray(theta, dtype=np.float64)
    c, s = np.cos(theta), np.sin(theta)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def local_to_world(points_local: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """Map local points (N, 2) through poses (..., 3) -> (..., N, 2)."""
    pose = np.asarray(pose, dtype=np.float64)
    rot = rotation(pose[..., 2])  # (..., 2, 2)
    pts = np.einsum("...ij,nj->...ni", rot, np.asarray(points_local, dtype=np.float64))
    return pts + pose[..., None, :2]


def world_to_local(points_world: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """Inverse of local_to_world for a single pose (3,): points (..., 2) -> (..., 2)."""
    pose = np.asarray(pose, dtype=np.float64)
    c, s = math.cos(pose[2]), math.sin(pose[2])
    d = np.asarray(points_world, dtype=np.float64) - pose[:2]
    return np.stack([c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1]], -1)


def block_keypoints(state: np.ndarray) -> np.ndarray:
    """Diffusion Policy's 9 block keypoints in world px from low-dim states (..., 5) -> (..., 9, 2)."""
    state = np.asarray(state, dtype=np.float64)
    if state.shape[-1] != 5:
        raise ValueError(f"state must have last dimension 5, got shape {state.shape}")
    return local_to_world(DP_KEYPOINTS_LOCAL, state[..., 2:5])


def lowdim_obs_from_state(state: np.ndarray) -> np.ndarray:
    """Diffusion Policy low-dim observation (..., 20) = 9 keypoints flattened (18) + agent position (2)."""
    state = np.asarray(state, dtype=np.float64)
    kp = block_keypoints(state)
    return np.concatenate([kp.reshape(*kp.shape[:-2], 2 * N_KEYPOINTS), state[..., :2]], axis=-1)


def lowdim_obs_from_keypoints(keypoint: np.ndarray, agent_pos: np.ndarray) -> np.ndarray:
    """(..., 9, 2) keypoints + (..., 2) agent position -> (..., 20), the layout used by the datasets."""
    keypoint = np.asarray(keypoint)
    return np.concatenate([keypoint.reshape(*keypoint.shape[:-2], -1), np.asarray(agent_pos)], axis=-1)


def legacy_reset_offset(theta: float) -> np.ndarray:
    """Displacement gym-pusht applies to the block origin in `reset_to_state`.

    gym-pusht sets the body position (origin) first and the angle second; pymunk rotates about the centre of
    gravity (0, 45), so the origin ends at pos + (45 sin theta, 45 - 45 cos theta).
    """
    cx, cy = TEE_COG_LOCAL
    c, s = math.cos(theta), math.sin(theta)
    # origin' = pos + cog - R cog
    return np.array([cx - (c * cx - s * cy), cy - (s * cx + c * cy)])


def to_legacy_reset_state(state) -> np.ndarray:
    """State to pass to gym-pusht's reset_to_state so that the block origin lands exactly at state[2:4]."""
    state = np.asarray(state, dtype=np.float64).copy()
    state[2:4] -= legacy_reset_offset(state[4])
    return state


def tee_polygons_world(pose) -> list[np.ndarray]:
    """The two rectangles of the T in world px for a block pose (3,)."""
    return [local_to_world(p, pose) for p in TEE_POLYGONS_LOCAL]


def _clip_convex(subject: np.ndarray, clip: np.ndarray) -> np.ndarray:
    """Sutherland-Hodgman clipping of a convex polygon by another convex polygon (any orientation)."""
    # Orientation of the clip polygon decides which side is inside.
    area2 = np.sum(clip[:, 0] * np.roll(clip[:, 1], -1) - np.roll(clip[:, 0], -1) * clip[:, 1])
    sign = 1.0 if area2 > 0 else -1.0
    out = list(subject)
    n = len(clip)
    for i in range(n):
        if not out:
            break
        a, b = clip[i], clip[(i + 1) % n]
        ex, ey = b - a

        def side(p):
            return sign * (ex * (p[1] - a[1]) - ey * (p[0] - a[0]))

        inp, out = out, []
        for j in range(len(inp)):
            p, q = inp[j], inp[(j + 1) % len(inp)]
            sp, sq = side(p), side(q)
            if sp >= 0:
                out.append(p)
            if (sp >= 0) != (sq >= 0):
                t = sp / (sp - sq)
                out.append(p + t * (q - p))
    return np.array(out) if out else np.zeros((0, 2))


def _area(poly: np.ndarray) -> float:
    if len(poly) < 3:
        return 0.0
    return 0.5 * abs(float(np.sum(poly[:, 0] * np.roll(poly[:, 1], -1) - np.roll(poly[:, 0], -1) * poly[:, 1])))


def coverage(block_pose, goal_pose=GOAL_POSE) -> float:
    """Fraction of the goal T's area covered by the block T (what gym-pusht reports as `coverage`).

    Exact polygon intersection in numpy: the two rectangles of each T have disjoint interiors, so the
    intersection area is the sum of the four convex rectangle-rectangle intersections.
    """
    blk = tee_polygons_world(np.asarray(block_pose, dtype=np.float64))
    goal = tee_polygons_world(np.asarray(goal_pose, dtype=np.float64))
    inter = sum(_area(_clip_convex(b, g)) for b in blk for g in goal)
    return inter / TEE_AREA


def pose_from_state(state) -> np.ndarray:
    state = np.asarray(state, dtype=np.float64)
    return state[..., 2:5]


def wrap_angle(a):
    """Wrap angles to (-pi, pi]."""
    return (np.asarray(a) + np.pi) % (2 * np.pi) - np.pi


def derive_dp_keypoint_map(n_keypoints: int = N_KEYPOINTS, seed: int = 0) -> np.ndarray:
    """Re-derive DP_KEYPOINTS_LOCAL by Diffusion Policy's procedure (needs pygame, pymunk and gym-pusht).

    Draw the T alone at origin (256, 300), angle 0, collect the non-white pixels in the body frame (row-major
    pixel order), farthest point sampling from a start drawn with default_rng(seed), then uniform(0, 1) jitter.
    """
    import os

    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    import pygame
    import pymunk
    from gym_pusht.envs.pusht import PushTEnv
    from gym_pusht.envs.pymunk_override import DrawOptions

    space = pymunk.Space()
    PushTEnv.add_tee(space, (256, 300), 0)
    surface = pygame.Surface((512, 512))
    surface.fill(pygame.Color("white"))
    space.debug_draw(DrawOptions(surface))
    img = np.uint8(pygame.surfarray.array3d(surface).transpose(1, 0, 2))
    rows, cols = np.nonzero((img != 255).any(axis=-1))
    pts = np.stack([cols - 256.0, rows - 300.0], axis=-1)
    rng = np.random.default_rng(seed)
    chosen = [int(rng.choice(len(pts)))]
    dmin = np.linalg.norm(pts - pts[chosen[0]], axis=-1)
    for _ in range(n_keypoints - 1):
        j = int(np.argmax(dmin))
        chosen.append(j)
        dmin = np.minimum(dmin, np.linalg.norm(pts - pts[j], axis=-1))
    return pts[chosen] + rng.uniform(0, 1, size=(n_keypoints, 2))
