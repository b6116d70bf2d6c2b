"""Gymnasium side of pcm-policy: env registration, wrappers and scripted demonstrators.

Nothing here knows about diffusion. Importing this package registers the env ids below; the simulators
themselves are imported lazily, when an env is made.
"""
import gymnasium as gym

PUSHT_ID = "pcm/PushT-v0"
LIFT_ID = "pcm/Lift-v0"
CAN_ID = "pcm/PickPlaceCan-v0"


def _register(env_id: str, entry_point: str, max_episode_steps: int, **kwargs) -> None:
    if env_id not in gym.registry:
        gym.register(id=env_id, entry_point=entry_point, max_episode_steps=max_episode_steps, kwargs=kwargs)


_register(PUSHT_ID, "envs.pusht:PushTLowDimEnv", max_episode_steps=300)
_register(LIFT_ID, "envs.robomimic_env:RobomimicLowDimEnv", max_episode_steps=400, task="Lift")
_register(CAN_ID, "envs.robomimic_env:RobomimicLowDimEnv", max_episode_steps=400, task="PickPlaceCan")
