"""One interface over the scripted demonstrators: `make_expert(task, env).act(obs) -> action`.

Call it right after `env.reset(...)`: the experts read the simulator state of `env.unwrapped`.
"""
from __future__ import annotations

import gymnasium as gym
import numpy as np


class _RobomimicAdapter:
    def __init__(self, task: str, env: gym.Env):
        from envs.robomimic_expert import make_expert as make_osc_expert

        self.sim_env = env.unwrapped
        self.expert = make_osc_expert(task)
        self.expert.reset(self.sim_env)

    def act(self, obs=None) -> np.ndarray:
        return np.clip(self.expert.act(self.sim_env), -1.0, 1.0)


def make_expert(task: str, env: gym.Env):
    if task == "pusht":
        from envs.pusht_expert import PushTExpert

        return PushTExpert(env.unwrapped)
    if task in ("lift", "can"):
        return _RobomimicAdapter({"lift": "Lift", "can": "PickPlaceCan"}[task], env)
    raise ValueError(f"no scripted expert for task {task!r} (pusht, lift, can)")
