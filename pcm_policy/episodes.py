"""Closed-loop episodes: the env an episode runs in, one episode's result, and the summary over episodes.

Shared by `pcm eval`, `pcm bench` and `pcm demo`. PushT (Diffusion Policy's convention): score = mean over
episodes of clip(max coverage / 0.95, 0, 1); success = max coverage >= 0.95. robomimic: score = success rate.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gymnasium as gym
import numpy as np

PUSHT_SUCCESS_COVERAGE = 0.95


@dataclass
class EpisodeResult:
    """One finished episode: its index, reset seed, success, max coverage (PushT only, else None), env steps."""

    episode: int
    seed: int
    success: bool
    max_coverage: float | None
    steps: int

    def score(self, task: str) -> float:
        """PushT: clip(max coverage / 0.95, 0, 1); any other task: 1.0 on success, else 0.0."""
        if task == "pusht" and self.max_coverage is not None:
            return float(np.clip(self.max_coverage / PUSHT_SUCCESS_COVERAGE, 0.0, 1.0))
        return float(self.success)


def make_env(env_id: str, max_steps: int, render: bool = False, video_prefix: Path | None = None,
             fps: int = 10, wrap: Callable[[gym.Env], gym.Env] | None = None) -> gym.Env:
    """A registered env (`envs` ids) with a `max_steps` time limit and episode statistics in `info`
    (`episode_success`, `episode_max_coverage`, `episode_steps`); with `video_prefix`, its first episode is
    recorded to `<video_prefix>_*.mp4` at `fps`. `wrap` is applied last (e.g. a MultiStepWrapper)."""
    import envs  # noqa: F401  (registers the ids)
    from envs.recording import EpisodeStats, VideoRecorder

    kwargs = {"render_mode": "rgb_array"} if render else {"render_mode": None}
    env = gym.make(env_id, max_episode_steps=max_steps, disable_env_checker=True, **kwargs)
    if video_prefix is not None:
        env = VideoRecorder(env, video_prefix, fps=fps, max_episodes=1)
    env = EpisodeStats(env)
    return wrap(env) if wrap is not None else env


def summarize(results: list[EpisodeResult], task: str) -> dict[str, Any]:
    """episodes, success_rate, score (means in [0, 1]), total steps, [first, last] seed, and for PushT
    mean_max_coverage. An empty list gives zero rates."""
    n = len(results)
    out = {
        "episodes": n,
        "success_rate": float(np.mean([r.success for r in results])) if n else 0.0,
        "score": float(np.mean([r.score(task) for r in results])) if n else 0.0,
        "steps": int(sum(r.steps for r in results)),
        "seed_range": [results[0].seed, results[-1].seed] if n else [],
    }
    covs = [r.max_coverage for r in results if r.max_coverage is not None]
    if covs:
        out["mean_max_coverage"] = float(np.mean(covs))
    return out
