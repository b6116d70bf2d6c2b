"""Rollouts of a task's scripted expert, acting from simulator state, step by step, one env at a time."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pcm_policy.rollout.env import make_env
from pcm_policy.rollout.results import EpisodeResult
from pcm_policy.tasks import Task, resolve_entry_point


def rollout_expert(task: Task, env_id: str, episodes: int, max_steps: int, seed_start: int = 100000,
                   video_dir: Path | None = None, n_videos: int = 0, fps: int = 10, progress: bool = True
                   ) -> list[EpisodeResult]:
    """Run the task's scripted expert (`task.expert`, acting from simulator state) for `episodes` episodes.

    Args:
        task: the registered task.
        env_id: a gymnasium id registered by `envs` (the task's, or an override).
        episodes: number of episodes; episode i is reset with seed `seed_start + i`.
        max_steps: time limit in env (control) steps.
        seed_start: seed of episode 0.
        video_dir: where videos go; None records none.
        n_videos: the first `n_videos` episodes are recorded.
        fps: video frame rate in Hz.
        progress: show a tqdm bar.

    Returns:
        One `EpisodeResult` per episode, in order (an episode ends at termination, truncation or success).
    """
    make_expert = resolve_entry_point(task.expert)
    results = []
    bar = tqdm(total=episodes, desc=f"expert {env_id}", unit="ep", disable=not progress, dynamic_ncols=True)
    for ep in range(episodes):
        video = video_dir / f"episode_{ep}" if (video_dir is not None and ep < n_videos) else None
        env = make_env(env_id, max_steps, render=video is not None, video_prefix=video, fps=fps)
        try:
            obs, info = env.reset(seed=seed_start + ep)
            expert = make_expert(task.name, env)
            while True:
                obs, _, terminated, truncated, info = env.step(expert.act(obs))
                if terminated or truncated or info["episode_success"]:
                    break
            coverage = info.get("episode_max_coverage") if task.score == "coverage" else None
            results.append(EpisodeResult(ep, seed_start + ep, bool(info["episode_success"]), coverage,
                                         int(info["episode_steps"])))
        finally:
            env.close()
        bar.update(1)
        bar.set_postfix(success=f"{np.mean([r.success for r in results]):.2f}")
    bar.close()
    return results
