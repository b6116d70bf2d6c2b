"""Closed-loop episodes under the controller (simulated clock): the one loop `pcm demo` and `pcm bench` share."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from pcm_policy.control.controller import ChunkRecord, Controller
from pcm_policy.rollout.env import make_env
from pcm_policy.rollout.results import EpisodeResult


@dataclass
class ControllerEpisodes:
    """Per-episode results, every chunk record in episode order, and the first episode's video (if recorded)."""

    results: list[EpisodeResult] = field(default_factory=list)
    chunks: list[ChunkRecord] = field(default_factory=list)
    video: Path | None = None


def run_controller_episodes(controller: Controller, env_id: str, max_steps: int, episodes: int, seed_start: int,
                            video_prefix: Path | None = None, desc: str = "closed loop",
                            progress: bool = True) -> ControllerEpisodes:
    """Closed-loop episodes with `controller.run_simulated`, one fresh env each.

    Args:
        controller: the controller (its policy, sampler and timing).
        env_id: a gymnasium id registered by `envs`.
        max_steps: time limit per episode, in control steps.
        episodes: number of episodes; reset seeds seed_start, seed_start+1, ...
        seed_start: the first reset seed.
        video_prefix: record the first episode to `<video_prefix>_0.mp4` at the control frequency; None: no video.
        desc: progress-bar label.
        progress: show a progress bar.

    Returns:
        `ControllerEpisodes`: per-episode results, all chunk records, the video path (or None).
    """
    run = ControllerEpisodes()
    for ep in tqdm(range(episodes), desc=desc, unit="ep", disable=not progress, leave=False):
        prefix = video_prefix if ep == 0 else None
        env = make_env(env_id, max_steps, render=prefix is not None, video_prefix=prefix,
                       fps=int(controller.config.control_hz))
        try:
            log = controller.run_simulated(env, max_steps, seed=seed_start + ep)
        finally:
            env.close()
        run.results.append(EpisodeResult(ep, seed_start + ep, log.success, log.max_coverage, log.steps))
        run.chunks += log.chunks
    if video_prefix is not None:
        run.video = next(iter(sorted(video_prefix.parent.glob(f"{video_prefix.name}_*.mp4"))), None)
    return run
