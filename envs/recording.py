"""Wrappers that observe an episode without changing it: running episode statistics and video capture."""
from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np


class EpisodeStats(gym.Wrapper):
    """Adds `episode_success`, `episode_steps` and (for envs reporting coverage) `episode_max_coverage` so far.

    A chunked policy only sees the info of the last step of each chunk; these running values make the
    per-episode maximum coverage and "ever succeeded" exact anyway.
    """

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self._max_cov = float(info["coverage"]) if "coverage" in info else None
        self._success = bool(info.get("is_success", False))
        self._steps = 0
        return obs, self._add(info)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._steps += 1
        if "coverage" in info:
            self._max_cov = max(self._max_cov or 0.0, float(info["coverage"]))
        self._success = self._success or bool(info.get("is_success", False))
        return obs, reward, terminated, truncated, self._add(info)

    def _add(self, info: dict) -> dict:
        out = dict(info, episode_success=self._success, episode_steps=self._steps)
        if self._max_cov is not None:
            out["episode_max_coverage"] = self._max_cov
        return out


class VideoRecorder(gym.Wrapper):
    """Records the first `max_episodes` episodes to `<prefix>_<k>.mp4` (written at reset and at close)."""

    def __init__(self, env: gym.Env, prefix: str | Path, fps: int = 10, max_episodes: int = 1):
        super().__init__(env)
        self.prefix = Path(prefix)
        self.fps = fps
        self.max_episodes = max_episodes
        self._frames: list[np.ndarray] = []
        self._episode = -1
        self.paths: list[Path] = []

    def _capture(self) -> None:
        if self._episode < self.max_episodes:
            frame = self.env.render()
            if frame is not None:
                self._frames.append(np.asarray(frame, dtype=np.uint8))

    def _flush(self) -> None:
        if self._frames:
            import imageio.v2 as imageio

            path = self.prefix.parent / f"{self.prefix.name}_{self._episode}.mp4"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.stem}.tmp.mp4")
            imageio.mimsave(tmp, self._frames, fps=self.fps, macro_block_size=1)
            tmp.replace(path)
            self.paths.append(path)
        self._frames = []

    def reset(self, **kwargs):
        self._flush()
        self._episode += 1
        out = self.env.reset(**kwargs)
        self._capture()
        return out

    def step(self, action):
        out = self.env.step(action)
        self._capture()
        return out

    def close(self):
        self._flush()
        super().close()
