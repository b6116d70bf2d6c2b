"""One interface over the scripted demonstrators: `make_expert(task, env).act(obs) -> action`.

Call it right after `env.reset(...)`: the experts read the simulator state of `env.unwrapped`. The task registry
(`pcm_policy.tasks`) names this factory as every task's expert.
"""
from __future__ import annotations

import gymnasium as gym
import numpy as np

from pcm_policy.tasks import get_task


class _RobomimicAdapter:
    def __init__(self, robosuite_env: str, env: gym.Env):
        from envs.robomimic_expert import make_expert as make_osc_expert

        self.sim_env = env.unwrapped
        self.expert = make_osc_expert(robosuite_env)
        self.expert.reset(self.sim_env)

    def act(self, obs=None) -> np.ndarray:
        return np.clip(self.expert.act(self.sim_env), -1.0, 1.0)


def make_expert(task: str, env: gym.Env):
    """The scripted expert of registered task `task` for `env` (just reset).

    Raises:
        ConfigError: an unknown task.
    """
    spec = get_task(task, key="task")
    if spec.robosuite_env is not None:
        return _RobomimicAdapter(spec.robosuite_env, env)
    from envs.pusht_expert import PushTExpert

    return PushTExpert(env.unwrapped)
