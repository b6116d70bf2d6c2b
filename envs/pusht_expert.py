"""Scripted PushT demonstrator that reads the simulator state.

The physics of gym-pusht is quasi-static: space damping 0 kills every velocity each substep, so the block
moves only while the (kinematic, PD-controlled) agent pushes it, and the contact is frictionless, so a push
acts along the contact normal. A push at body point c along the inward normal d therefore moves the block
with a constant body twist per pixel of push:

    J = 1 / (1/m + (r x d)^2 / I),  v = J d / m,  omega = J (r x d) / I,   r = c - centre_of_gravity.

Every control step the expert
1. predicts, in closed form, the block pose after pushing each candidate contact (points along the T's
   outline with their inward normals, plus fans of directions at convex corners) by each of a grid of push
   lengths, and scores it by the reduction of a keypoint distance to the goal pose per estimated step
   (routing time of the agent to that contact + push time);
2. keeps its current contact unless another is clearly better (hysteresis);
3. if the agent is not at the contact's pre-contact point, routes it there around the T without touching
   it (straight line when clear, else following the T's outline dilated by the agent radius plus a margin);
4. otherwise pushes, targeting a point inside the block along the contact normal, the depth shrinking
   with the wanted push length (fine pushes near the goal).
"""
from __future__ import annotations

import math

import numpy as np

from envs import pusht_geometry as geo

_R = geo.AGENT_RADIUS


def _point_seg_dist(p, a, b):
    """Distances from points p (..., 2) to segments a->b (..., 2) (broadcast)."""
    ab = b - a
    denom = np.maximum(np.sum(ab * ab, -1), 1e-12)
    t = np.clip(np.sum((p - a) * ab, -1) / denom, 0.0, 1.0)
    q = a + t[..., None] * ab
    return np.linalg.norm(p - q, axis=-1)


def _cross2(u, v):
    return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]


def _segs_intersect(p1, p2, q1, q2):
    d1 = _cross2(q2 - q1, p1 - q1)
    d2 = _cross2(q2 - q1, p2 - q1)
    d3 = _cross2(p2 - p1, q1 - p1)
    d4 = _cross2(p2 - p1, q2 - p1)
    return (d1 * d2 < 0) & (d3 * d4 < 0)


_EDGES_A = geo.TEE_OUTLINE_LOCAL
_EDGES_B = np.roll(geo.TEE_OUTLINE_LOCAL, -1, axis=0)


def _inside_tee(p):
    x, y = p[..., 0], p[..., 1]
    bar = (np.abs(x) <= 60) & (y >= 0) & (y <= 30)
    stem = (np.abs(x) <= 15) & (y >= 30) & (y <= 120)
    return bar | stem


def dist_to_tee(p):
    """Distance (..., ) from body-frame points (..., 2) to the T (0 inside)."""
    p = np.asarray(p, dtype=np.float64)
    d = _point_seg_dist(p[..., None, :], _EDGES_A, _EDGES_B).min(-1)
    return np.where(_inside_tee(p), 0.0, d)


def seg_dist_to_tee(p1, p2):
    """Distance from body-frame segments p1->p2 (..., 2) to the T (0 when crossing or inside)."""
    p1, p2 = np.broadcast_arrays(np.asarray(p1, dtype=np.float64), np.asarray(p2, dtype=np.float64))
    a, b = _EDGES_A, _EDGES_B
    P1, P2 = p1[..., None, :], p2[..., None, :]
    d = np.minimum.reduce([
        _point_seg_dist(P1, a, b), _point_seg_dist(P2, a, b),
        _point_seg_dist(a, P1, P2), _point_seg_dist(b, P1, P2),
    ]).min(-1)
    crossing = _segs_intersect(P1, P2, a, b).any(-1) | _inside_tee(p1) | _inside_tee(p2)
    return np.where(crossing, 0.0, d)


def _outline_normals():
    """Outward unit normals of the outline edges (body frame)."""
    e = _EDGES_B - _EDGES_A
    n = np.stack([e[:, 1], -e[:, 0]], -1)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    mid = (_EDGES_A + _EDGES_B) / 2
    flip = _inside_tee(mid + 0.5 * n)
    n[flip] *= -1
    return n


def _build_candidates(spacing=4.0, corner_fan=3):
    pts, nrm = [], []
    normals = _outline_normals()
    for i in range(len(_EDGES_A)):
        a, b, n = _EDGES_A[i], _EDGES_B[i], normals[i]
        length = np.linalg.norm(b - a)
        k = max(int(length // spacing), 1)
        for t in (np.arange(k) + 0.5) / k:
            pts.append(a + t * (b - a))
            nrm.append(n)
    # convex corners: fans of normals between the two adjacent edge normals
    m = len(_EDGES_A)
    for i in range(m):
        n_prev, n_next = normals[i - 1], normals[i]
        corner = _EDGES_A[i]
        if _cross2(n_prev, n_next) == 0:
            continue
        # convex when the corner pushed slightly outward along both normals is outside
        if _inside_tee(corner + 0.5 * (n_prev + n_next)):
            continue
        a0 = math.atan2(n_prev[1], n_prev[0])
        a1 = math.atan2(n_next[1], n_next[0])
        da = (a1 - a0 + math.pi) % (2 * math.pi) - math.pi
        for j in range(1, corner_fan + 1):
            ang = a0 + da * j / (corner_fan + 1)
            pts.append(corner.copy())
            nrm.append(np.array([math.cos(ang), math.sin(ang)]))
    pts, nrm = np.array(pts), np.array(nrm)
    pre = pts + nrm * _R
    ok = dist_to_tee(pre) >= _R - 1e-6
    return pts[ok], nrm[ok]


def _buffered_outline(offset: float, step: float = 3.0, arc_segments: int = 6) -> np.ndarray:
    """Closed polyline (M, 2) of the T dilated by `offset` (body frame), resampled every ~step px."""
    import shapely.geometry as sg

    poly = sg.Polygon(geo.TEE_OUTLINE_LOCAL).buffer(offset, quad_segs=arc_segments)
    ring = np.asarray(poly.exterior.coords)[:-1]
    seg = np.roll(ring, -1, 0) - ring
    out = []
    for p, s in zip(ring, seg):
        k = max(int(np.linalg.norm(s) // step), 1)
        for t in np.arange(k) / k:
            out.append(p + t * s)
    return np.array(out)


# Points used for the pose cost: the outline vertices and edge midpoints of the T.
_COST_POINTS = np.concatenate([geo.TEE_OUTLINE_LOCAL, (_EDGES_A + _EDGES_B) / 2])


class PushTExpert:
    """`expert = PushTExpert(env.unwrapped); action = expert.act(obs_or_none)`; call `reset()` per episode."""

    def __init__(self, env, margin: float = 7.0, seed: int = 0):
        self.env = env
        self.sim = getattr(env, "sim", env)  # PushTLowDimEnv or gym-pusht's PushTEnv
        self.margin = margin
        self.cand_c, self.cand_n = _build_candidates()
        self.ring = _buffered_outline(_R + margin)
        seg = np.linalg.norm(np.roll(self.ring, -1, 0) - self.ring, axis=-1)
        self.ring_len = seg
        self.ring_s = np.concatenate([[0.0], np.cumsum(seg)[:-1]])
        self.ring_total = float(seg.sum())
        pre = self.cand_c + self.cand_n * _R
        self.cand_ring_idx = np.argmin(np.linalg.norm(pre[:, None] - self.ring[None], axis=-1), axis=1)
        self.push_grid = np.array([0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 18.0, 26.0, 36.0, 50.0, 70.0])
        self.rng = np.random.default_rng(seed)
        self.reset()

    # ------------------------------------------------------------------------------------------------
    def reset(self, seed: int | None = None):
        """Forget the committed contact; `seed` reseeds the (rarely used) random nudge."""
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self.current = None  # index of the committed candidate
        self.n_steps = 0

    def _block_pose(self):
        b = self.sim.block
        return np.array([b.position[0], b.position[1], b.angle], dtype=np.float64)

    def _twists(self):
        b = self.sim.block
        m, inertia = b.mass, b.moment
        g = np.array(b.center_of_gravity, dtype=np.float64)
        d = -self.cand_n
        r = self.cand_c - g
        cr = _cross2(r, d)
        j = 1.0 / (1.0 / m + cr * cr / inertia)
        return j[:, None] * d / m, j * cr / inertia, g

    def _predict(self, pose, s):
        """Block poses (N, S, 3) after pushing every candidate by lengths s (S,) with constant body twist."""
        v, w, g = self._twists()
        th0 = pose[2]
        ws = w[:, None] * s[None]  # (N, S)
        small = np.abs(ws) < 1e-8
        w_safe = np.where(np.abs(w) < 1e-12, 1e-12, w)[:, None]
        a = np.where(small, s[None], np.sin(ws) / w_safe)
        bq = np.where(small, 0.0, (1 - np.cos(ws)) / w_safe)
        # displacement of the cog in the body frame at t=0
        dx = a * v[:, None, 0] - bq * v[:, None, 1]
        dy = bq * v[:, None, 0] + a * v[:, None, 1]
        c0, s0 = math.cos(th0), math.sin(th0)
        cog0 = pose[:2] + np.array([c0 * g[0] - s0 * g[1], s0 * g[0] + c0 * g[1]])
        cogx = cog0[0] + c0 * dx - s0 * dy
        cogy = cog0[1] + s0 * dx + c0 * dy
        th = th0 + ws
        ct, st = np.cos(th), np.sin(th)
        ox = cogx - (ct * g[0] - st * g[1])
        oy = cogy - (st * g[0] + ct * g[1])
        return np.stack([ox, oy, th], -1)

    def _cost(self, poses):
        """Mean squared distance of the cost points to their goal positions; poses (..., 3)."""
        goal_pts = geo.local_to_world(_COST_POINTS, geo.GOAL_POSE)
        pts = geo.local_to_world(_COST_POINTS, poses)
        return np.mean(np.sum((pts - goal_pts) ** 2, -1), -1)

    def _in_bounds(self, poses, lo=8.0, hi=503.0):
        pts = geo.local_to_world(geo.TEE_OUTLINE_LOCAL, poses)
        return np.all((pts >= lo) & (pts <= hi), axis=(-1, -2))

    # ------------------------------------------------------------------------------------------------
    def _route_lengths(self, agent_b, pre_b, pose):
        """Estimated agent path lengths (N,) from agent_b to pre-contact points pre_b (N, 2), body frame."""
        direct = np.linalg.norm(pre_b - agent_b, axis=-1)
        clear = seg_dist_to_tee(np.broadcast_to(agent_b, pre_b.shape), pre_b) >= _R - 0.5
        # around the dilated outline, avoiding parts outside the workspace
        ring_w = geo.local_to_world(self.ring, pose)
        blocked = np.any((ring_w < 1.0) | (ring_w > 511.0), axis=-1)
        ia = int(np.argmin(np.linalg.norm(self.ring - agent_b, axis=-1)))
        ib = self.cand_ring_idx
        fwd = (self.ring_s[ib] - self.ring_s[ia]) % self.ring_total
        bwd = self.ring_total - fwd
        nring = len(self.ring)
        tot = np.concatenate([[0], np.cumsum(np.concatenate([blocked, blocked]))])

        def blocked_between(i, j):  # ring indices i -> j going forward (inclusive), vectorised
            jj = np.where(j >= i, j, j + nring)
            return (tot[jj + 1] - tot[i]) > 0

        fwd_blocked = blocked_between(np.full_like(ib, ia), ib)
        bwd_blocked = blocked_between(ib, np.full_like(ib, ia))
        fwd = np.where(fwd_blocked, np.inf, fwd)
        bwd = np.where(bwd_blocked, np.inf, bwd)
        around = (np.linalg.norm(self.ring[ia] - agent_b) + np.minimum(fwd, bwd)
                  + np.linalg.norm(self.ring[ib] - pre_b, axis=-1))
        return np.where(clear, direct, around)

    def _plan(self, pose, agent_b):
        s = self.push_grid
        poses = self._predict(pose, s)  # (N, S, 3)
        cost0 = float(self._cost(pose))
        costs = self._cost(poses)
        costs = np.where(self._in_bounds(poses), costs, np.inf)
        k = np.argmin(costs, axis=1)
        best_cost = costs[np.arange(len(k)), k]
        best_s = s[k]
        pre_b = self.cand_c + self.cand_n * (_R + 1.0)
        pre_w = geo.local_to_world(pre_b, pose)
        reach = np.all((pre_w >= 0.0) & (pre_w <= 512.0), axis=-1)
        route = self._route_lengths(agent_b, pre_b, pose)
        in_contact_dist = np.linalg.norm(agent_b - (self.cand_c + self.cand_n * _R), axis=-1)
        route = np.where(in_contact_dist < 2.5, 0.0, route)
        t_route = np.where(route > 0, route / 18.0 + 3.0, 0.0)
        t_push = best_s / 8.0 + 1.0
        gain = cost0 - best_cost
        score = np.where(reach & np.isfinite(route) & (gain > 0), gain / (t_route + t_push), -np.inf)
        return score, best_s, cost0, route

    # ------------------------------------------------------------------------------------------------
    def act(self, obs=None) -> np.ndarray:
        self.n_steps += 1
        pose = self._block_pose()
        agent_w = np.array(self.sim.agent.position, dtype=np.float64)
        agent_b = geo.world_to_local(agent_w, pose)
        score, best_s, cost0, route = self._plan(pose, agent_b)
        best = int(np.argmax(score))
        if not np.isfinite(score[best]):
            # no predicted improvement: nudge somewhere random near the block
            self.current = None
            return np.clip(agent_w + self.rng.normal(0, 20, 2), 0, 512).astype(np.float32)
        cur = self.current
        if cur is None or not np.isfinite(score[cur]) or score[best] > 1.5 * score[cur]:
            cur = best
        self.current = cur
        c_b, n_b = self.cand_c[cur], self.cand_n[cur]
        contact_centre = c_b + n_b * _R
        dist_contact = float(np.linalg.norm(agent_b - contact_centre))
        if dist_contact < 3.0:
            # push: target inside the block along the inward normal
            depth = float(np.clip(0.6 * best_s[cur], 0.5, 25.0))
            target_b = c_b + n_b * (_R - depth)
        else:
            pre_b = c_b + n_b * (_R + 1.0)
            target_b = self._route_target(agent_b, pre_b, pose)
        target_w = geo.local_to_world(target_b[None], pose)[0]
        return np.clip(target_w, 0.0, 512.0).astype(np.float32)

    def _route_target(self, agent_b, pre_b, pose, lookahead=45.0, max_lead=60.0):
        if seg_dist_to_tee(agent_b, pre_b) >= _R - 0.5:
            # straight line; lead the agent by at most max_lead px (keeps actions near the agent)
            gap = pre_b - agent_b
            dist = float(np.linalg.norm(gap))
            return pre_b if dist <= max_lead else agent_b + gap * (max_lead / dist)
        ring = self.ring
        nring = len(ring)
        ia = int(np.argmin(np.linalg.norm(ring - agent_b, axis=-1)))
        ib = int(np.argmin(np.linalg.norm(ring - pre_b, axis=-1)))
        fwd = (self.ring_s[ib] - self.ring_s[ia]) % self.ring_total
        ring_w = geo.local_to_world(ring, pose)
        blocked = np.any((ring_w < 1.0) | (ring_w > 511.0), axis=-1)

        def path(direction):
            idx = [(ia + direction * k) % nring for k in range(nring)]
            out = []
            for i in idx:
                out.append(i)
                if i == ib:
                    break
            return out

        pf, pb = path(1), path(-1)
        lf = fwd if not blocked[pf].any() else np.inf
        lb = (self.ring_total - fwd) if not blocked[pb].any() else np.inf
        p = pf if lf <= lb else pb
        # farthest ring point along the path within the lookahead that is reachable in a straight line
        target = ring[p[0]]
        travelled = 0.0
        for i0, i1 in zip(p[:-1], p[1:]):
            travelled += float(np.linalg.norm(ring[i1] - ring[i0]))
            if travelled > lookahead:
                break
            if seg_dist_to_tee(agent_b, ring[i1]) >= _R + 1.0:
                target = ring[i1]
            if i1 == ib:
                break
        return target


def evaluate_expert(seeds, max_steps: int = 300, verbose: bool = False) -> dict:
    """Run the expert on env reset seeds; Diffusion Policy's PushT metrics (score, success at max cov >= 0.95)."""
    import os
    import time

    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    import gymnasium as gym

    import envs  # noqa: F401  (registers the ids)
    from pcm_policy.tasks import TASKS

    env = gym.make(TASKS["pusht"].env_id, max_episode_steps=max_steps)
    expert = PushTExpert(env.unwrapped)
    max_cov, lengths = [], []
    t0 = time.perf_counter()
    try:
        for seed in seeds:
            obs, info = env.reset(seed=int(seed))
            expert.reset(seed=int(seed))
            best, n = float(info["coverage"]), 0
            for n in range(1, max_steps + 1):
                obs, _, terminated, truncated, info = env.step(expert.act(obs))
                best = max(best, float(info["coverage"]))
                if terminated or truncated:
                    break
            max_cov.append(best)
            lengths.append(n)
            if verbose:
                print(f"seed {seed}: max coverage {best:.4f} in {n} steps", flush=True)
    finally:
        env.close()
    cov = np.asarray(max_cov)
    return {
        "seeds": [int(s) for s in seeds],
        "max_coverage": cov.tolist(),
        "lengths": lengths,
        "mean_max_coverage": float(cov.mean()),
        "score": float(np.mean(np.clip(cov / geo.SUCCESS_THRESHOLD, 0.0, 1.0))),
        "success_rate": float(np.mean(cov >= geo.SUCCESS_THRESHOLD)),
        "wall_time_s": time.perf_counter() - t0,
    }


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Evaluate the scripted PushT expert on reset seeds [start, stop).")
    parser.add_argument("--start", type=int, default=100000)
    parser.add_argument("--stop", type=int, default=100050)
    args = parser.parse_args()
    res = evaluate_expert(range(args.start, args.stop), verbose=True)
    print(f"episodes {len(res['seeds'])}  mean max coverage {res['mean_max_coverage']:.4f}  "
          f"score {res['score']:.4f}  success {res['success_rate']:.2%}  "
          f"mean length {np.mean(res['lengths']):.1f}  wall {res['wall_time_s']:.1f}s")
