"""PushT with a low-dim observation, on top of gym-pusht's simulator.

Observation (`observation="keypoints"`, the default; 20 float32): the 9 block keypoints of Diffusion Policy
(world px, flattened) followed by the agent position. With `observation="agent_pos+environment_state"` (18
float32): the agent position, then gym-pusht's `environment_state` (the T's 8 corners, world px, flattened) -
lerobot's state-based PushT policies condition on exactly these, in this order. With `observation="agent_pos+image"`
(Diffusion Policy's image PushT, gym-pusht's `pixels_agent_pos`): a dict of `obs`, the agent position (2 float32),
and `image`, the policy-sized frame as one channel-first camera (1, 3, image_size, image_size) uint8 - the frame
the collector stores in `data/img`. Action: absolute target
position of the agent (px). 10 Hz control, 10 physics substeps.
`info` carries `is_success` (coverage > 0.95, gym-pusht's test), `coverage`, `state` (agent_x, agent_y,
block_x, block_y, block_angle) and `n_contacts`.

`reset(options={"reset_to_state": [ax, ay, bx, by, theta]})` places the block origin exactly at (bx, by)
(gym-pusht's legacy placement is undone, see pusht_geometry.legacy_reset_offset).
"""
from __future__ import annotations

import os
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs import pusht_geometry as geo

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

# Bounds of the observation: the agent target is in [0, 512] but the PD-controlled agent may overshoot a
# little, and keypoints of a block pressed against a wall may poke past it; keep a margin.
OBS_LOW, OBS_HIGH = -64.0, 576.0


class PushTLowDimEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    OBSERVATIONS = {"keypoints": geo.LOWDIM_OBS_DIM, "agent_pos+environment_state": 18, "agent_pos+image": 2}

    def __init__(self, render_mode: str | None = "rgb_array", render_size: int = 256, image_size: int = 96,
                 legacy_reset: bool = False, observation: str = "keypoints"):
        from gym_pusht.envs.pusht import PushTEnv  # lazy: pygame/pymunk only when an env is made

        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be 'rgb_array' or None, got {render_mode!r}")
        if observation not in self.OBSERVATIONS:
            raise ValueError(f"observation must be one of {sorted(self.OBSERVATIONS)}, got {observation!r}")
        self.observation = observation
        self.render_mode = render_mode
        self.legacy_reset = legacy_reset
        self.sim = PushTEnv(
            obs_type="state", render_mode="rgb_array",
            observation_width=image_size, observation_height=image_size,
            visualization_width=render_size, visualization_height=render_size,
        )
        self.observation_space = spaces.Box(OBS_LOW, OBS_HIGH, shape=(self.OBSERVATIONS[observation],),
                                            dtype=np.float32)
        if observation == "agent_pos+image":
            self.observation_space = spaces.Dict({
                "obs": self.observation_space,
                "image": spaces.Box(0, 255, shape=(1, 3, image_size, image_size), dtype=np.uint8)})
        self.action_space = spaces.Box(0.0, 512.0, shape=(2,), dtype=np.float32)
        self._state: np.ndarray | None = None

    # --- simulator access (used by the scripted expert) -------------------------------------------------
    @property
    def agent(self):
        return self.sim.agent

    @property
    def block(self):
        return self.sim.block

    @property
    def space(self):
        return self.sim.space

    @property
    def goal_pose(self) -> np.ndarray:
        return np.asarray(self.sim.goal_pose, dtype=np.float64)

    def get_state(self) -> np.ndarray:
        """Current (agent_x, agent_y, block_x, block_y, block_angle in [0, 2 pi)) as float64."""
        return np.asarray(self.sim.get_obs(), dtype=np.float64)

    def _obs(self, state: np.ndarray) -> np.ndarray | dict[str, np.ndarray]:
        if self.observation == "keypoints":
            return geo.lowdim_obs_from_state(state).astype(np.float32)
        if self.observation == "agent_pos+image":
            return {"obs": state[:2].astype(np.float32),
                    "image": np.ascontiguousarray(self.render_image().transpose(2, 0, 1)[None])}
        corners = self.sim.get_keypoints(self.sim._block_shapes).reshape(-1)  # gym-pusht's environment_state
        return np.concatenate([state[:2], corners]).astype(np.float32)

    def _info(self, state: np.ndarray, sim_info: dict, coverage: float, is_success: bool) -> dict[str, Any]:
        return {
            "is_success": bool(is_success),
            "coverage": float(coverage),
            "state": state.copy(),
            "n_contacts": int(sim_info.get("n_contacts", 0)),
        }

    # --- gymnasium API -----------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        sim_options = None
        if options is not None and options.get("reset_to_state") is not None:
            target = np.asarray(options["reset_to_state"], dtype=np.float64)
            if target.shape != (5,):
                raise ValueError(f"reset_to_state must have 5 values, got shape {target.shape}")
            sim_options = {"reset_to_state": target if self.legacy_reset else geo.to_legacy_reset_state(target)}
        _, sim_info = self.sim.reset(seed=seed, options=sim_options)
        state = self.get_state()
        cov = float(self.sim._get_coverage())
        self.sim.n_contact_points = 0
        sim_info = dict(sim_info, n_contacts=0)
        return self._obs(state), self._info(state, sim_info, cov, False)

    def step(self, action):
        action = np.asarray(action, dtype=np.float64).reshape(2)
        _, reward, terminated, truncated, sim_info = self.sim.step(action)
        state = self.get_state()
        info = self._info(state, sim_info, sim_info["coverage"], sim_info["is_success"])
        return self._obs(state), float(reward), bool(terminated), bool(truncated), info

    def render(self):
        """RGB frame (render_size x render_size x 3 uint8) with the last action marked."""
        if self.render_mode is None:
            return None
        return self.sim.render()

    def render_image(self) -> np.ndarray:
        """The policy-sized image (image_size x image_size x 3 uint8), as stored in `data/img`."""
        return self.sim._render(visualize=False)

    def close(self):
        self.sim.close()
