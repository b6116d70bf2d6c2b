"""Vectorised closed-loop rollouts of a chunking policy (`pcm eval`, and PCT's closed-loop observations).

The policy runs on gymnasium vector envs (sync by default, async on request), each env wrapped in a
MultiStepWrapper so that one batched `predict_chunk` call serves every env per control chunk. Episodes run in
waves of `n_envs`; an env that finished (success, termination or time limit) is ignored until the wave ends.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

from envs.multistep import MultiStepWrapper
from pcm_policy.errors import ConfigError
from pcm_policy.latency import latency_summary
from pcm_policy.rollout.env import make_env
from pcm_policy.rollout.results import EpisodeResult


class ChunkAgent:
    """Batched policy calls: (N, To, Do) observation histories -> (N, Ta, Da) actions, with timing.

    `agent(obs)` takes a float array (N, To, Do) in env units - for an image policy a dict of that (`obs`) and
    its camera history (`image`, (N, To, cameras, 3, H, W) uint8) - and returns float32 actions (N, Ta, Da) in env
    units (`DiffusionPolicy.predict_chunk`, which raises PcmError for a non-finite observation), recording each
    call's statistics (the image encoding is part of each call's latency).

    Args:
        policy: the `DiffusionPolicy`.
        sampler: what `predict_chunk` samples with (a `ChunkSampler` or a sampler config).
        seed: seeds the CPU generator the chunks' noise is drawn from.

    Attributes:
        latencies_ms: wall time of each call in ms (sampling, normalization and host copies included).
        iterations: `SamplerStats.iterations` of each call.
        evaluations: `SamplerStats.evaluations` of each call.
        exact: whether each call's chunk converged.
    """

    def __init__(self, policy, sampler, seed: int):
        self.policy = policy
        self.sampler = sampler
        self.generator = torch.Generator().manual_seed(seed)
        self.latencies_ms: list[float] = []
        self.iterations: list[int] = []
        self.evaluations: list[int] = []
        self.exact: list[bool] = []

    def __call__(self, obs: np.ndarray | dict[str, np.ndarray]) -> np.ndarray:
        t0 = time.perf_counter()
        if not isinstance(obs, dict):
            obs = torch.as_tensor(obs, dtype=torch.float32)
        chunk = self.policy.predict_chunk(obs, self.sampler, generator=self.generator)
        self.latencies_ms.append((time.perf_counter() - t0) * 1e3)
        self.iterations.append(int(chunk.stats.iterations))
        self.evaluations.append(int(chunk.stats.evaluations))
        self.exact.append(bool(chunk.stats.converged))
        return chunk.action.cpu().numpy()

    def summary(self) -> dict[str, Any]:
        """Per-chunk statistics of every call so far: `chunks`, `latency_ms_p50`/`_p99`/`_mean` (ms),
        `iterations_mean`, `evaluations_mean`, `exact_fraction`; empty before the first call."""
        if not self.latencies_ms:
            return {}
        return {"chunks": len(self.latencies_ms), **latency_summary(self.latencies_ms),
                "iterations_mean": float(np.mean(self.iterations)), "evaluations_mean": float(np.mean(self.evaluations)),
                "exact_fraction": float(np.mean(self.exact))}


def take_rows(obs: np.ndarray | dict[str, np.ndarray], rows: np.ndarray) -> np.ndarray | dict[str, np.ndarray]:
    """Rows `rows` of a vector env's observation: an array, or each entry of a dict observation (image envs)."""
    if isinstance(obs, dict):
        return {k: v[rows] for k, v in obs.items()}
    return obs[rows]


def rollout_policy(agent: Callable[[np.ndarray], np.ndarray], env_id: str, episodes: int, n_envs: int,
                   n_obs_steps: int, n_action_steps: int, max_steps: int, seed_start: int = 100000,
                   vector: str = "sync", video_dir: Path | None = None, n_videos: int = 0, fps: int = 10,
                   progress: bool = True) -> list[EpisodeResult]:
    """Run `episodes` closed-loop episodes of a chunking agent on a vector of `n_envs` envs, in waves.

    Episode i is reset with seed `seed_start + i`; an env stops counting at termination, truncation (the time
    limit) or its first success.

    Args:
        agent: `agent(obs)` maps observation histories (n, n_obs_steps, Do) in env units (for an image env, a dict
            of them and the camera histories) to actions
            (n, n_action_steps, Da) in env units (e.g. a `ChunkAgent`); called once per control chunk with the
            still-running envs' rows.
        env_id: a gymnasium id registered by `envs`.
        episodes: number of episodes.
        n_envs: envs run in parallel, clamped to [1, episodes].
        n_obs_steps: To, the observation history the MultiStepWrapper returns.
        n_action_steps: Ta, the actions executed per chunk.
        max_steps: time limit in env (control) steps.
        seed_start: seed of episode 0 (Diffusion Policy's test seeds start at 100000).
        vector: `sync` (one process) or `async` (a process per env).
        video_dir: where videos go; None records none.
        n_videos: the first episode of each of the first `n_videos` envs is recorded.
        fps: video frame rate in Hz (the control frequency).
        progress: show a tqdm bar.

    Returns:
        One `EpisodeResult` per episode, in episode order.

    Raises:
        ConfigError: `vector` is neither `sync` nor `async`.
    """
    n_envs = max(1, min(n_envs, episodes))

    def env_fn(i: int):
        # Only the first episode of the first `n_videos` envs is recorded (VideoRecorder: max_episodes=1).
        video = video_dir / f"episode_env{i}" if (video_dir is not None and i < n_videos) else None
        return lambda: make_env(env_id, max_steps, render=video is not None, video_prefix=video, fps=fps,
                                wrap=lambda e: MultiStepWrapper(e, n_obs_steps, n_action_steps, max_steps))

    if vector not in ("sync", "async"):
        raise ConfigError(f"vector={vector!r}: expected sync or async")
    cls = gym.vector.SyncVectorEnv if vector == "sync" else gym.vector.AsyncVectorEnv
    vec = cls([env_fn(i) for i in range(n_envs)])
    results: list[EpisodeResult] = []
    bar = tqdm(total=episodes, desc=f"eval {env_id}", unit="ep", disable=not progress, dynamic_ncols=True)
    try:
        for wave_start in range(0, episodes, n_envs):
            ids = list(range(wave_start, min(wave_start + n_envs, episodes)))
            seeds = [seed_start + i for i in ids] + [seed_start + ids[-1]] * (n_envs - len(ids))
            obs, info = vec.reset(seed=seeds)
            done = np.arange(n_envs) >= len(ids)
            last = [dict(success=False, cov=None, steps=0) for _ in range(n_envs)]
            while not done.all():
                actions = np.zeros((n_envs, n_action_steps, *vec.single_action_space.shape[1:]), dtype=np.float32)
                active = np.flatnonzero(~done)
                actions[active] = agent(take_rows(obs, active))
                obs, _, terminated, truncated, info = vec.step(actions)
                for i in active:
                    cov = info.get("episode_max_coverage")
                    last[i] = dict(success=bool(info["episode_success"][i]),
                                   cov=float(cov[i]) if cov is not None else None,
                                   steps=int(info["episode_steps"][i]))
                    if terminated[i] or truncated[i] or last[i]["success"]:
                        done[i] = True
            for k, i in enumerate(ids):
                results.append(EpisodeResult(i, seeds[k], last[k]["success"], last[k]["cov"], last[k]["steps"]))
                bar.update(1)
            bar.set_postfix(success=f"{np.mean([r.success for r in results]):.2f}")
    finally:
        bar.close()
        vec.close()
    return results
