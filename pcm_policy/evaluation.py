"""`pcm eval`: closed-loop rollouts on Diffusion Policy's test seeds, with videos and aggregate metrics.

A trained policy is evaluated on gymnasium vector envs (sync by default, async on request), each env wrapped
in a MultiStepWrapper so that one batched `predict_chunk` call serves every env per control chunk. Episodes
run in waves of `n_envs`; an env that finished (success, termination or time limit) is ignored until the wave
ends. The scripted experts (`policy=expert`) act from simulator state, step by step, one env at a time.

PushT: score = mean over episodes of clip(max coverage / 0.95, 0, 1); success = max coverage >= 0.95.
robomimic: score = success rate.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

from pcm_policy.atomic import atomic_write_text
from pcm_policy.episodes import EpisodeResult, make_env, summarize
from pcm_policy.errors import ConfigError
from pcm_policy.latency import latency_summary


def _latency_summary(latencies_ms: list[float], iterations: list[int], evaluations: list[int], exact: list[bool]) -> dict:
    if not latencies_ms:
        return {}
    return {"chunks": len(latencies_ms), **latency_summary(latencies_ms),
            "iterations_mean": float(np.mean(iterations)), "evaluations_mean": float(np.mean(evaluations)), "exact_fraction": float(np.mean(exact))}


class ChunkAgent:
    """Batched policy calls: (N, To, Do) observation histories -> (N, Ta, Da) actions, with timing.

    `agent(obs)` takes a float array (N, To, Do) in env units and returns float32 actions (N, Ta, Da) in env
    units (`DiffusionPolicy.predict_chunk`, which raises PcmError for a non-finite observation), recording each
    call's statistics.

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

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        chunk = self.policy.predict_chunk(torch.as_tensor(obs, dtype=torch.float32), self.sampler, generator=self.generator)
        self.latencies_ms.append((time.perf_counter() - t0) * 1e3)
        self.iterations.append(int(chunk.stats.iterations))
        self.evaluations.append(int(chunk.stats.evaluations))
        self.exact.append(bool(chunk.stats.converged))
        return chunk.action.cpu().numpy()


def rollout_policy(agent: Callable[[np.ndarray], np.ndarray], env_id: str, episodes: int, n_envs: int,
                   n_obs_steps: int, n_action_steps: int, max_steps: int, seed_start: int = 100000,
                   vector: str = "sync", video_dir: Path | None = None, n_videos: int = 0, fps: int = 10,
                   progress: bool = True) -> list[EpisodeResult]:
    """Run `episodes` closed-loop episodes of a chunking agent on a vector of `n_envs` envs, in waves.

    Episode i is reset with seed `seed_start + i`; an env stops counting at termination, truncation (the time
    limit) or its first success.

    Args:
        agent: `agent(obs)` maps observation histories (n, n_obs_steps, Do) in env units to actions
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
    from envs.multistep import MultiStepWrapper

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
                actions[active] = agent(obs[active])
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


def rollout_expert(task: str, env_id: str, episodes: int, max_steps: int, seed_start: int = 100000,
                   video_dir: Path | None = None, n_videos: int = 0, fps: int = 10, progress: bool = True) -> list[EpisodeResult]:
    """Run the scripted expert of `task` (acting from simulator state) for `episodes` episodes, one env at a time.

    Args:
        task: `pusht`, `lift` or `can` (`envs.experts.make_expert`).
        env_id: a gymnasium id registered by `envs`.
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
    from envs.experts import make_expert

    results = []
    bar = tqdm(total=episodes, desc=f"expert {env_id}", unit="ep", disable=not progress, dynamic_ncols=True)
    for ep in range(episodes):
        video = video_dir / f"episode_{ep}" if (video_dir is not None and ep < n_videos) else None
        env = make_env(env_id, max_steps, render=video is not None, video_prefix=video, fps=fps)
        try:
            obs, info = env.reset(seed=seed_start + ep)
            expert = make_expert(task, env)
            while True:
                obs, _, terminated, truncated, info = env.step(expert.act(obs))
                if terminated or truncated or info["episode_success"]:
                    break
            results.append(EpisodeResult(ep, seed_start + ep, bool(info["episode_success"]),
                                         info.get("episode_max_coverage") if task == "pusht" else None,
                                         int(info["episode_steps"])))
        finally:
            env.close()
        bar.update(1)
        bar.set_postfix(success=f"{np.mean([r.success for r in results]):.2f}")
    bar.close()
    return results


def evaluate(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """`pcm eval`: closed-loop evaluation of a checkpoint with a sampler (or of the scripted expert).

    Every option is checked first (`validate_eval`), before any env starts. Writes `metrics.json` and
    `episodes.jsonl` (one `EpisodeResult` per line) under `output_dir`, and videos under `output_dir/videos`.

    Args:
        cfg: the composed `eval` config.

    Returns:
        The metrics: `summarize`'s keys (success rate, Wilson interval, score, ...), `task`, `wall_s` (s), the
        policy and, for a checkpoint, the sampler label, device, threads, and per-chunk statistics: `chunks`,
        `latency_ms_p50`/`_p99`/`_mean` (ms), `iterations_mean`, `evaluations_mean`, `exact_fraction`; `videos`
        lists the mp4 files.

    Raises:
        ConfigError: an invalid option, or no checkpoint for `policy=checkpoint`.
        CheckpointError: the checkpoint (or the sampler's PCM) is missing, corrupt, for another task or does
            not fit.
    """
    from pcm_policy.checkpoint import load_policy
    from pcm_policy.runtime import resolve_device
    from pcm_policy.validation import validate_eval

    validate_eval(cfg)  # every option, against the checkpoint, before any env starts
    task = cfg["task"]
    out = Path(cfg["output_dir"])
    video_dir = out / "videos" if cfg.get("videos", 0) > 0 else None
    fps = int(task.get("control_hz", 10))
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if cfg["policy"]["name"] == "expert":
        results = rollout_expert(task["name"], task["env_id"], cfg["episodes"], task["max_steps"], cfg["seed_start"],
                                 video_dir, cfg.get("videos", 0), fps)
        extra["policy"] = "expert"
    else:
        if not cfg.get("checkpoint"):
            raise ConfigError("checkpoint: no checkpoint given (checkpoint=<run or checkpoint dir>, or policy=expert)")
        device = resolve_device(cfg.get("device"))
        policy, card = load_policy(cfg["checkpoint"], device, expect_task=task["name"])
        from pcm_policy.pcm.attach import load_sampler

        sampler = load_sampler(policy, cfg["sampler"], device)
        agent = ChunkAgent(policy, sampler, seed=cfg["seed_start"])
        results = rollout_policy(agent, task["env_id"], cfg["episodes"], cfg["n_envs"], policy.config.n_obs_steps,
                                 policy.config.n_action_steps, task["max_steps"], cfg["seed_start"], cfg["vector"],
                                 video_dir, cfg.get("videos", 0), fps)
        extra = {"policy": str(cfg["checkpoint"]), "sampler": sampler.label, "device": str(device),
                 "threads": torch.get_num_threads(),
                 **_latency_summary(agent.latencies_ms, agent.iterations, agent.evaluations, agent.exact)}
    metrics = {"command": "eval", "task": task["name"], **summarize(results, task["name"]),
               "wall_s": round(time.perf_counter() - t0, 2), **extra}
    if video_dir is not None and video_dir.exists():
        metrics["videos"] = sorted(str(p) for p in video_dir.glob("*.mp4"))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "episodes.jsonl", "".join(json.dumps(asdict(r)) + "\n" for r in results))
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return metrics
