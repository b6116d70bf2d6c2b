"""The env an episode runs in: a registered env with a time limit, episode statistics and optional video."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import gymnasium as gym

import envs  # noqa: F401  (registers the pcm/* ids)
from envs.recording import EpisodeStats, VideoRecorder
from pcm_policy.errors import ConfigError


def make_env(env_id: str, max_steps: int, render: bool = False, video_prefix: Path | None = None,
             fps: int = 10, wrap: Callable[[gym.Env], gym.Env] | None = None) -> gym.Env:
    """A registered env with a time limit and episode statistics in `info`.

    Args:
        env_id: a gymnasium id registered by `envs` (e.g. `pcm/PushT-v0`).
        max_steps: time limit in env (control) steps.
        render: build the env with `render_mode="rgb_array"` (needed for videos).
        video_prefix: record the first episode to `<video_prefix>_*.mp4`; None records nothing.
        fps: frame rate of the video in Hz (the control frequency).
        wrap: applied last (e.g. a MultiStepWrapper); None adds nothing.

    Returns:
        The env; its `info` carries `episode_success`, `episode_max_coverage` and `episode_steps`.

    Raises:
        gymnasium.error.Error: `env_id` is not registered.
    """
    kwargs = {"render_mode": "rgb_array"} if render else {"render_mode": None}
    env = gym.make(env_id, max_episode_steps=max_steps, disable_env_checker=True, **kwargs)
    if video_prefix is not None:
        env = VideoRecorder(env, video_prefix, fps=fps, max_episodes=1)
    env = EpisodeStats(env)
    return wrap(env) if wrap is not None else env


def check_registered(env_id: str, key: str = "task.env_id") -> None:
    """Refuse an env id no env is registered under (before any env is made).

    Raises:
        ConfigError: naming `key` and listing the pcm ids.
    """
    if env_id not in gym.registry:
        raise ConfigError(f"{key}={env_id!r}: not a registered gymnasium env "
                          f"(pcm ids: {', '.join(k for k in gym.registry if k.startswith('pcm/'))})")
