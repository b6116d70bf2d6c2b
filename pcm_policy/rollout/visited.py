"""Observation histories the controller actually meets: closed-loop rollouts of the base policy.

Dataset windows come from the expert's state distribution; a policy's own rollouts drift from it, and the PCM is
asked to denoise at exactly those drifted states. `visited_observations` rolls the base policy out in its env
(vectorised, like `pcm eval`) and records every observation history it planned from, so PCT can be trained and
evaluated on them (`pcm train-pcm observations=closed_loop`, via `pcm_policy.observations`). Seeds default to 200000+, disjoint from the test
seeds 100000..100049 used by `pcm eval` and the bench.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from pcm_policy.errors import ConfigError
from pcm_policy.rollout.vectorized import ChunkAgent, rollout_policy


class _RecordingAgent:
    """Wraps a chunk agent (obs (N, To, Do) -> actions (N, Ta, Da)) and keeps every observation batch it sees (an
    image env's: the low-dim history as float32 and the camera history as given)."""

    def __init__(self, agent):
        self.agent = agent
        self.seen: list[np.ndarray | dict[str, np.ndarray]] = []

    def __call__(self, obs: np.ndarray | dict[str, np.ndarray]) -> np.ndarray:
        if isinstance(obs, dict):
            self.seen.append({k: np.array(v, dtype=np.float32 if k == "obs" else None, copy=True)
                              for k, v in obs.items()})
        else:
            self.seen.append(np.array(obs, dtype=np.float32, copy=True))
        return self.agent(obs)


def visited_observations(policy, env_id: str, max_steps: int, episodes: int, seed_start: int,
                         sampler: Mapping[str, Any], n_envs: int = 8, progress: bool = True) -> torch.Tensor:
    """The observation histories the base policy planned from in its own closed-loop rollouts.

    Args:
        policy: the base `DiffusionPolicy`.
        env_id: the env to roll out in (the base checkpoint's `env_id`).
        max_steps: time limit per episode, in control steps.
        episodes: number of episodes (reset seeds seed_start, seed_start+1, ...).
        seed_start: the first reset seed (the default config uses 200000+, disjoint from the test seeds).
        sampler: the `sampler=` config the rollouts use (a non-PCM sampler).
        n_envs: vectorised envs.
        progress: show a progress bar.

    Returns:
        (N, To, Do) float32 in env units: one history per env and chunk request, non-finite ones dropped (an image
        env's: {"obs": that, "image": (N, To, cameras, 3, H, W) uint8}).

    Raises:
        ConfigError: `env_id` is empty (the checkpoint names no env to roll out in), or an invalid sampler config.
    """
    if not env_id:
        raise ConfigError("observations=closed_loop: the base checkpoint names no env_id to roll out in")
    agent = _RecordingAgent(ChunkAgent(policy, policy.sampler(sampler), seed=seed_start))
    c = policy.config
    rollout_policy(agent, env_id, episodes, n_envs, c.n_obs_steps, c.n_action_steps, max_steps, seed_start,
                   progress=progress)
    if isinstance(agent.seen[0], dict):
        seen = {k: np.concatenate([s[k] for s in agent.seen], axis=0) for k in agent.seen[0]}
    else:
        seen = {"obs": np.concatenate(agent.seen, axis=0)}
    keep = np.isfinite(seen["obs"]).all(axis=(1, 2))  # a finished env may report a stale/invalid history
    kept = {k: torch.from_numpy(v[keep]) for k, v in seen.items()}
    return kept if len(kept) > 1 else kept["obs"]
