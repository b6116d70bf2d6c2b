"""Gymnasium side of pcm-policy: env registration, wrappers and scripted demonstrators.

Nothing here knows about diffusion. Importing this package registers, from the task registry
(`pcm_policy.tasks`), one env id per observation layout of every task; the simulators themselves are imported
lazily, when an env is made.
"""
import gymnasium as gym

from pcm_policy.tasks import TASKS

for _task in TASKS.values():
    for _layout in _task.observations:
        if _layout.env_id not in gym.registry:
            gym.register(id=_layout.env_id, entry_point=_task.entry_point, max_episode_steps=_task.max_steps,
                         kwargs=dict(_layout.env_kwargs))
