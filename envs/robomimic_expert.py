"""Scripted experts for robomimic Lift and PickPlaceCan on the OSC_POSE *delta* controller.

Each expert is a small state machine that reads the simulator state (object pose, end-effector pose, gripper
opening) from a :class:`envs.robomimic_env.RobomimicLowDimEnv` and returns a 7-d action
``[dpos3, daxisangle3, gripper]`` in [-1, 1] (gripper -1 = open, +1 = close). The OSC controller scales the
first three values by 0.05 m and the next three by 0.5 rad (world-frame rotation applied to the current
orientation), so the experts command a clipped proportional step towards the current waypoint.

Usage::

    expert = LiftExpert()
    obs, info = env.reset(seed=s)
    expert.reset(env)
    while ...:
        obs, r, term, trunc, info = env.step(expert.act(env))

Run ``python -m envs.robomimic_expert --task lift --episodes 50`` to measure success on the evaluation seeds
(100000.. by default); it prints one line per seed.
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np

_POS_SCALE = 0.05  # metres per unit action (controller output_max)
_ROT_SCALE = 0.5  # radians per unit action
# gripper pointing straight down, fingers closing along world y at yaw 0 (Panda's home orientation)
_R_DOWN = np.array([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]])


def _quat_xyzw_to_mat(q: np.ndarray) -> np.ndarray:
    x, y, z, w = (float(v) for v in q)
    n = x * x + y * y + z * z + w * w
    if n < 1e-12:
        return np.eye(3)
    s = 2.0 / n
    return np.array(
        [
            [1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w)],
            [s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w)],
            [s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y)],
        ]
    )


def _rot_z(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _mat_to_axisangle(r: np.ndarray) -> np.ndarray:
    """Axis-angle vector (angle in [0, pi]) of a rotation matrix."""
    cos = np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0)
    angle = math.acos(cos)
    if angle < 1e-8:
        return np.zeros(3)
    v = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
    if math.sin(angle) > 1e-4:
        return v / (2.0 * math.sin(angle)) * angle
    # angle close to pi: axis from the diagonal of (R + I) / 2
    b = (r + np.eye(3)) / 2.0
    axis = np.sqrt(np.clip(np.diag(b), 0.0, None))
    i = int(np.argmax(axis))
    axis = b[:, i] / max(axis[i], 1e-8)
    return axis / np.linalg.norm(axis) * angle


def _wrap(a: float, period: float) -> float:
    """Wrap an angle to [-period/2, period/2)."""
    return (a + period / 2.0) % period - period / 2.0


def _yaw_of(r: np.ndarray) -> float:
    return math.atan2(r[1, 0], r[0, 0])


class _OSCExpert:
    """Waypoint tracking on the OSC_POSE delta controller; subclasses implement the phase logic."""

    pos_gain = 12.0  # action units per metre of position error (1/0.05 = 20 reaches the goal in one step)
    rot_gain = 1.5  # action units per (0.5 rad) of orientation error

    def __init__(self) -> None:
        self.phase = "start"
        self.t = 0
        self.phase_t = 0
        self.target_rot = _R_DOWN

    def reset(self, env) -> None:
        self.phase = "start"
        self.t = 0
        self.phase_t = 0
        self.target_rot = _R_DOWN

    def _goto(self, phase: str) -> None:
        if phase != self.phase:
            self.phase = phase
            self.phase_t = 0

    @staticmethod
    def _raw(env):
        return getattr(env, "unwrapped", env).raw_obs

    def _move(self, eef_pos, eef_quat, target_pos, gripper: float, max_speed: float = 1.0) -> np.ndarray:
        dpos = np.clip((np.asarray(target_pos) - eef_pos) * self.pos_gain, -max_speed, max_speed)
        r_err = self.target_rot @ _quat_xyzw_to_mat(eef_quat).T
        drot = np.clip(_mat_to_axisangle(r_err) / _ROT_SCALE * self.rot_gain, -1.0, 1.0)
        return np.concatenate([dpos, drot, [gripper]]).astype(np.float64)

    def _rot_err(self, eef_quat) -> float:
        return float(np.linalg.norm(_mat_to_axisangle(self.target_rot @ _quat_xyzw_to_mat(eef_quat).T)))

    def act(self, env) -> np.ndarray:
        action = self._act(self._raw(env))
        self.t += 1
        self.phase_t += 1
        return action

    def _act(self, obs: dict) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


class LiftExpert(_OSCExpert):
    """Lift: align the gripper yaw with the cube, hover above it, descend, close, lift 20 cm."""

    hover = 0.08
    grasp_dz = -0.005  # grip site relative to the cube centre
    lift_height = 0.20

    def _act(self, obs):
        eef, quat = obs["robot0_eef_pos"], obs["robot0_eef_quat"]
        cube = obs["cube_pos"]
        if self.phase == "start":
            # cube is symmetric under 90 degree yaw turns: pick the nearest aligned gripper yaw
            cube_yaw = _yaw_of(_quat_xyzw_to_mat(obs["cube_quat"]))
            self.target_rot = _rot_z(_wrap(cube_yaw, math.pi / 2)) @ _R_DOWN
            self._goto("approach")
        if self.phase == "approach":
            target = cube + [0.0, 0.0, self.hover]
            xy = np.linalg.norm((target - eef)[:2])
            if (xy < 0.01 and abs(target[2] - eef[2]) < 0.02 and self._rot_err(quat) < 0.08) or self.phase_t > 80:
                self._goto("descend")
            return self._move(eef, quat, target, -1.0)
        if self.phase == "descend":
            target = cube + [0.0, 0.0, self.grasp_dz]
            if np.linalg.norm(target - eef) < 0.008 or self.phase_t > 40:
                self._goto("grasp")
            return self._move(eef, quat, target, -1.0)
        if self.phase == "grasp":
            target = cube + [0.0, 0.0, self.grasp_dz]
            if self.phase_t >= 8:
                self.lift_from = eef.copy()
                self._goto("lift")
            return self._move(eef, quat, target, 1.0)
        # lift; if the cube slipped out (far from the fingers), start over
        if np.linalg.norm(cube - eef) > 0.05:
            self._goto("approach")
            return self._move(eef, quat, eef + [0, 0, 0.05], -1.0)
        target = self.lift_from + [0.0, 0.0, self.lift_height]
        return self._move(eef, quat, target, 1.0, max_speed=0.6)


class CanExpert(_OSCExpert):
    """PickPlaceCan: grasp the can from above, lift, carry over its bin quadrant, lower, release, retreat."""

    hover = 0.10
    grasp_dz = 0.005
    carry_z = 1.06
    release_dz = 0.03  # release with the can's centre this far above its resting height

    def reset(self, env) -> None:
        super().reset(env)
        rs = getattr(env, "unwrapped", env).robosuite_env
        self.goal_xy = np.asarray(rs.target_bin_placements[rs.object_id][:2], dtype=np.float64)
        self.floor_z = float(rs.bin2_pos[2])
        obj = rs.objects[rs.object_id]
        self.rest_center_z = self.floor_z - float(obj.bottom_offset[2])

    def _act(self, obs):
        eef, quat = obs["robot0_eef_pos"], obs["robot0_eef_quat"]
        can = obs["Can_pos"]
        if self.phase == "start":
            self.target_rot = _R_DOWN
            self._goto("approach")
        if self.phase == "approach":
            target = can + [0.0, 0.0, self.hover]
            target[2] = max(target[2], eef[2]) if np.linalg.norm((target - eef)[:2]) > 0.05 else target[2]
            xy = np.linalg.norm((target - eef)[:2])
            if (xy < 0.008 and abs(target[2] - eef[2]) < 0.02) or self.phase_t > 100:
                self._goto("descend")
            return self._move(eef, quat, target, -1.0)
        if self.phase == "descend":
            target = can + [0.0, 0.0, self.grasp_dz]
            if np.linalg.norm(target - eef) < 0.008 or self.phase_t > 40:
                self._goto("grasp")
            return self._move(eef, quat, target, -1.0)
        if self.phase == "grasp":
            target = can + [0.0, 0.0, self.grasp_dz]
            if self.phase_t >= 8:
                self._goto("lift")
            return self._move(eef, quat, target, 1.0)
        held = np.linalg.norm(can - eef) < 0.06
        if self.phase in ("lift", "carry", "lower") and not held:
            self._goto("recover")
        if self.phase == "lift":
            target = np.array([eef[0], eef[1], self.carry_z])
            if eef[2] > self.carry_z - 0.03:
                self._goto("carry")
            return self._move(eef, quat, target, 1.0)
        if self.phase == "carry":
            target = np.array([self.goal_xy[0], self.goal_xy[1], self.carry_z])
            if np.linalg.norm((target - eef)[:2]) < 0.015 or self.phase_t > 120:
                self._goto("lower")
            return self._move(eef, quat, target, 1.0)
        if self.phase == "lower":
            # move the can (not the gripper) to just above its resting height over the goal
            offset = eef - can
            target = np.array([self.goal_xy[0], self.goal_xy[1], self.rest_center_z + self.release_dz]) + offset
            if can[2] < self.rest_center_z + self.release_dz + 0.01 or self.phase_t > 60:
                self._goto("release")
            return self._move(eef, quat, target, 1.0, max_speed=0.6)
        if self.phase == "release":
            if self.phase_t >= 6:
                self._goto("retreat")
            return self._move(eef, quat, eef, -1.0)
        if self.phase == "retreat":
            return self._move(eef, quat, np.array([eef[0], eef[1], self.carry_z]), -1.0)
        # recover: open, rise, and approach the can again
        if eef[2] < can[2] + self.hover - 0.02:
            return self._move(eef, quat, eef + [0.0, 0.0, 0.05], -1.0)
        self._goto("approach")
        return self._move(eef, quat, eef, -1.0)


EXPERTS = {"Lift": LiftExpert, "PickPlaceCan": CanExpert}


def make_expert(task: str) -> _OSCExpert:
    from envs.robomimic_env import canonical_task

    return EXPERTS[canonical_task(task)]()


def evaluate_expert(task: str, seeds, max_steps: int = 400, verbose: bool = True) -> dict:
    """Roll the expert out on each seed (fresh placement); success = task solved at any step."""
    from envs.robomimic_env import RobomimicLowDimEnv

    env = RobomimicLowDimEnv(task)
    expert = make_expert(task)
    results = []
    n_steps, t0 = 0, time.perf_counter()
    try:
        for seed in seeds:
            env.reset(seed=int(seed))
            expert.reset(env)
            first = None
            for t in range(max_steps):
                _, _, _, _, info = env.step(expert.act(env))
                n_steps += 1
                if info["is_success"]:
                    first = t + 1
                    break
            results.append((int(seed), first is not None, first))
            if verbose:
                status = f"success at step {first}" if first is not None else f"FAIL (phase {expert.phase})"
                print(f"{env.task} seed {seed}: {status}", flush=True)
    finally:
        env.close()
    wall = time.perf_counter() - t0
    n_ok = sum(ok for _, ok, _ in results)
    stats = {
        "task": env.task,
        "episodes": len(results),
        "successes": n_ok,
        "success_rate": n_ok / max(len(results), 1),
        "results": results,
        "steps": n_steps,
        "wall_s": wall,
        "steps_per_s": n_steps / max(wall, 1e-9),
    }
    if verbose:
        print(
            f"{env.task}: {n_ok}/{len(results)} = {stats['success_rate']:.1%} success "
            f"({n_steps} steps, {stats['steps_per_s']:.0f} steps/s)"
        )
    return stats


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="lift")
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--seed", type=int, default=100000)
    p.add_argument("--max-steps", type=int, default=400)
    a = p.parse_args(argv)
    evaluate_expert(a.task, range(a.seed, a.seed + a.episodes), max_steps=a.max_steps)


if __name__ == "__main__":
    main()
