"""Gymnasium side of pcm-policy: env registration, wrappers and scripted demonstrators.

Nothing here knows about diffusion. Importing this package registers every task's env id from the task registry
(`pcm_policy.tasks`); the simulators themselves are imported lazily, when an env is made.
"""
import gymnasium as gym

from pcm_policy.tasks import TASKS

for _task in TASKS.values():
    if _task.env_id not in gym.registry:
        gym.register(id=_task.env_id, entry_point=_task.entry_point, max_episode_steps=_task.max_steps,
                     kwargs=dict(_task.env_kwargs))
