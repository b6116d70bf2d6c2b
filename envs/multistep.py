"""Observation-history / action-chunk wrapper (Diffusion Policy's MultiStepWrapper, gymnasium 5-tuple API).

- observations are the last `n_obs_steps` observations stacked on a new leading axis; right after reset the
  history is padded by repeating the first observation;
- `step(actions)` takes (n_action_steps, *action_shape) (any number of rows >= 1 is accepted) and executes
  the actions one by one, stopping early when the env terminates, truncates or reports
  `info["is_success"]`; the executed steps' rewards are aggregated (max by default);
- the returned info is the last step's info plus `step_rewards` (list), `step_infos` (list of per-step
  infos) and `n_executed` (int).

Generic: works with any env whose observation space is a Box or a Dict of Boxes.
"""
from __future__ import annotations

from collections import deque
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

_AGGREGATORS = {"max": np.max, "min": np.min, "sum": np.sum, "mean": np.mean}


def _stack_box(space: spaces.Box, n: int) -> spaces.Box:
    low = np.repeat(space.low[None], n, axis=0)
    high = np.repeat(space.high[None], n, axis=0)
    return spaces.Box(low=low, high=high, dtype=space.dtype)


def _stack_space(space: spaces.Space, n: int) -> spaces.Space:
    if isinstance(space, spaces.Box):
        return _stack_box(space, n)
    if isinstance(space, spaces.Dict):
        return spaces.Dict({k: _stack_space(v, n) for k, v in space.spaces.items()})
    raise TypeError(f"MultiStepWrapper supports Box and Dict spaces, got {type(space).__name__}")


def _stack_obs(history: list) -> Any:
    first = history[0]
    if isinstance(first, dict):
        return {k: _stack_obs([h[k] for h in history]) for k in first}
    return np.stack([np.asarray(h) for h in history], axis=0)


class MultiStepWrapper(gym.Wrapper):
    def __init__(self, env: gym.Env, n_obs_steps: int, n_action_steps: int, max_episode_steps: int | None = None,
                 reward_agg: str = "max"):
        super().__init__(env)
        if n_obs_steps < 1 or n_action_steps < 1:
            raise ValueError("n_obs_steps and n_action_steps must be >= 1")
        if reward_agg not in _AGGREGATORS:
            raise ValueError(f"reward_agg must be one of {sorted(_AGGREGATORS)}, got {reward_agg!r}")
        self.n_obs_steps = int(n_obs_steps)
        self.n_action_steps = int(n_action_steps)
        self.max_episode_steps = max_episode_steps
        self.reward_agg = reward_agg
        self.observation_space = _stack_space(env.observation_space, self.n_obs_steps)
        self.action_space = _stack_space(env.action_space, self.n_action_steps)
        self._obs: deque = deque(maxlen=self.n_obs_steps)
        self._elapsed = 0
        self._done = False

    def _get_obs(self):
        return _stack_obs(list(self._obs))

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        self._obs.clear()
        for _ in range(self.n_obs_steps):
            self._obs.append(obs)
        self._elapsed = 0
        self._done = False
        return self._get_obs(), info

    def step(self, actions):
        actions = np.asarray(actions)
        if actions.ndim < 1 or actions.shape[0] < 1:
            raise ValueError(f"actions must have a leading time axis, got shape {actions.shape}")
        rewards: list[float] = []
        infos: list[dict] = []
        terminated = truncated = False
        info: dict = {}
        for act in actions:  # normally n_action_steps rows; fewer or more are executed as given
            obs, reward, terminated, truncated, info = self.env.step(act)
            self._obs.append(obs)
            rewards.append(float(reward))
            infos.append(info)
            self._elapsed += 1
            if self.max_episode_steps is not None and self._elapsed >= self.max_episode_steps:
                truncated = True
            if terminated or truncated or bool(info.get("is_success", False)):
                break
        self._done = bool(terminated or truncated)
        out_info = dict(info)
        out_info["step_rewards"] = rewards
        out_info["step_infos"] = infos
        out_info["n_executed"] = len(rewards)
        reward = float(_AGGREGATORS[self.reward_agg](rewards))
        return self._get_obs(), reward, bool(terminated), bool(truncated), out_info

    @property
    def elapsed_steps(self) -> int:
        return self._elapsed
