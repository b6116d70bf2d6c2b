"""`pcm eval`: closed-loop rollouts on Diffusion Policy's test seeds (100000 + i), with videos and aggregate metrics
(`configs/eval.yaml`). A trained checkpoint runs with any sampler (`policy=checkpoint`), the task's scripted
expert acts from simulator state (`policy=expert`), or the actions come from a policy server (`server=ws://HOST:PORT`,
`pcm serve`; one connection per env, the key from `PCM_SERVE_API_KEY`), with the round trips reported."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from pcm_policy.atomic import atomic_write_text
from pcm_policy.auto_sampler import AutoSettings, calibration_observations, check_auto, choose_sampler, is_auto
from pcm_policy.backends import check_backend
from pcm_policy.checkpoint import Card, load_policy
from pcm_policy.errors import ConfigError
from pcm_policy.options import choice, integer, lookup, output_dir
from pcm_policy.pcm.attach import check_sampler, load_sampler
from pcm_policy.rollout.env import check_registered
from pcm_policy.rollout.expert import rollout_expert
from pcm_policy.rollout.results import summarize
from pcm_policy.rollout.vectorized import ChunkAgent, rollout_policy
from pcm_policy.runtime import RuntimeOptions
from pcm_policy.sampler_config import SamplerConfig
from pcm_policy.serving.client import PolicyClient, api_key_from_env, check_url
from pcm_policy.serving.remote import RemoteAgent
from pcm_policy.tasks import TaskOptions


@dataclass(frozen=True)
class Config:
    """A checked `pcm eval` config.

    Attributes:
        task: the task and env the episodes run in.
        checkpoint: the base policy's card (None for `policy=expert`).
        sampler: the sampler config, or `sampler=auto`'s settings (the fastest exact sampler, chosen by timing at
            start).
        pcm_checkpoint: the sampler's PCM (None for the other samplers).
        episodes: episodes to run (reset seeds seed_start, seed_start + 1, ...).
        n_envs: envs per vectorised wave.
        vector: `sync` or `async`.
        seed_start: the first reset seed (Diffusion Policy's test seeds start at 100000).
        videos: episodes recorded as mp4.
        runtime: device, threads, determinism.
        output_dir: where metrics.json, episodes.jsonl and videos/ go.
        backend: where the sampler's denoisers run: torch, onnx or auto (`pcm_policy.backends`); `sampler=auto`
            chooses its own among `sampler.backends` (a `backend=` given restricts them to that one).
        server: the policy server the actions come from (None: this process samples them).
        server_metadata: that server's metadata, read when the config is checked.
    """

    task: TaskOptions
    checkpoint: Card | None
    sampler: SamplerConfig | AutoSettings | None
    pcm_checkpoint: str | None
    episodes: int
    n_envs: int
    vector: str
    seed_start: int
    videos: int
    runtime: RuntimeOptions
    output_dir: Path
    backend: str = "torch"
    server: str | None = None
    server_metadata: dict | None = None

    @classmethod
    def from_hydra(cls, cfg: Mapping[str, Any]) -> "Config":
        """Check every option of a composed `eval` config, the checkpoint's card and the sampler against it,
        before any env starts.

        Raises:
            ConfigError: a key of the wrong type or range, an unregistered env, a sampler the checkpoint
                cannot run, or a backend that cannot run here (onnx on CUDA, onnxruntime missing); `server` with
                `checkpoint` or `policy=expert`, or a server whose policy does not suit the task.
            CheckpointError: an unreadable or PCM checkpoint, or one trained for another task.
            PcmError: the server cannot be reached or refuses the key.
        """
        runtime = RuntimeOptions.from_mapping(cfg)
        backend = lookup(cfg, "backend", None)  # null: torch, or sampler=auto's own backends
        backend = None if backend is None else check_backend(backend, runtime.device)
        task = TaskOptions.from_mapping(lookup(cfg, "task"))
        out = output_dir(cfg)
        counts = dict(episodes=integer(cfg, "episodes", 1), n_envs=integer(cfg, "n_envs", 1),
                      vector=choice(cfg, "vector", ("sync", "async")), seed_start=integer(cfg, "seed_start", 0),
                      videos=integer(cfg, "videos", 0))
        server = cfg.get("server")
        if server is not None:
            return cls._for_server(cfg, task, check_url(server), counts, runtime, out)
        if choice(cfg, "policy.name", ("checkpoint", "expert")) == "expert":
            check_registered(task.env_id)
            return cls(task, None, None, None, **counts, runtime=runtime, output_dir=out, backend=backend or "torch")
        card = Card.open_base("checkpoint", lookup(cfg, "checkpoint", None), task=task.name)
        card.check_closed_loop()
        task = dataclasses.replace(task, env_id=task.env_for(card.observation_kind, card.observation_parts))
        check_registered(task.env_id)
        card.check_env_gives_cameras(task.env_id)
        group = lookup(cfg, "sampler")
        if is_auto(group):
            settings = check_auto(group, "sampler", card.num_train_timesteps, card.path, device=runtime.device,
                                  backend=backend)
            return cls(task, card, settings, None, **counts, runtime=runtime, output_dir=out)
        sampler = check_sampler(group, "sampler", card.num_train_timesteps, card.path)
        pcm = group.get("pcm_checkpoint") if sampler.needs_pcm else None
        return cls(task, card, sampler, pcm, **counts, runtime=runtime, output_dir=out, backend=backend or "torch")

    @classmethod
    def _for_server(cls, cfg, task: TaskOptions, server: str, counts: dict, runtime, out) -> "Config":
        """The episodes' env for the policy a server serves (its metadata read over one connection)."""
        policy_name = choice(cfg, "policy.name", ("checkpoint", "expert"))
        if lookup(cfg, "checkpoint", None) is not None or policy_name != "checkpoint":
            raise ConfigError(f"server={server}: the actions come from the server; leave out checkpoint= and "
                              "policy=expert")
        with PolicyClient(server, api_key_from_env()) as client:
            metadata = client.metadata
        policy = metadata.get("policy") or {}
        if policy.get("task") != task.name:
            raise ConfigError(f"server={server}: serves a policy for task {policy.get('task')!r}, not task={task.name}")
        layout = task.spec.layout(policy.get("observation_kind"), "server")
        task = dataclasses.replace(task, env_id=task.env_for(layout.kind, key="server"))
        check_registered(task.env_id)
        cameras = tuple(k for k in metadata["observation"] if k != "obs")
        action_dim = metadata["action"]["shape"][1]
        if cameras != layout.cameras or action_dim != task.spec.action_dim:
            raise ConfigError(f"server={server}: its policy takes cameras {list(cameras)} and {action_dim}-d actions; "
                              f"env {task.env_id} gives cameras {list(layout.cameras)} and takes "
                              f"{task.spec.action_dim}-d actions")
        return cls(task, None, None, None, **counts, runtime=runtime, output_dir=out, server=server,
                   server_metadata=metadata)


def run(config: Config) -> dict[str, Any]:
    """Run the episodes; write `metrics.json`, `episodes.jsonl` (one `EpisodeResult` per line) and videos.

    Returns:
        The metrics: `summarize`'s keys (success rate, Wilson interval, score, ...), `task`, `wall_s` (s), the
        policy and, for a checkpoint, the sampler label, device, threads, and per-chunk statistics (`ChunkAgent.
        summary`); `videos` lists the mp4 files.

    Raises:
        CheckpointError: the checkpoint or its PCM does not load (corrupt weights, a PCM for another base).
    """
    task, out = config.task, config.output_dir
    video_dir = out / "videos" if config.videos > 0 else None
    fps = int(task.control_hz)
    t0 = time.perf_counter()
    if config.server is not None:
        results, extra = _run_remote(config, video_dir, fps)
    elif config.checkpoint is None:
        results = rollout_expert(task.spec, task.env_id, config.episodes, task.max_steps, config.seed_start,
                                 video_dir, config.videos, fps)
        extra: dict[str, Any] = {"policy": "expert"}
    else:
        device = config.runtime.device
        policy, _ = load_policy(config.checkpoint.path, device, expect_task=task.name)
        auto = {}
        if isinstance(config.sampler, AutoSettings):  # timed at batch 1, as one robot's controller calls it
            observations = calibration_observations(policy, config.checkpoint.path, task.env_id, task.max_steps,
                                                    config.sampler.chunks, config.sampler.seed)
            sampler, choice = choose_sampler(policy, config.sampler, observations, 1e3 / task.control_hz, device)
            auto = {"auto": choice.to_dict()}
        else:
            sampler = load_sampler(policy, config.sampler, device, config.pcm_checkpoint, backend=config.backend)
        agent = ChunkAgent(policy, sampler, seed=config.seed_start)
        results = rollout_policy(agent, task.env_id, config.episodes, config.n_envs, policy.config.n_obs_steps,
                                 policy.config.n_action_steps, task.max_steps, config.seed_start, config.vector,
                                 video_dir, config.videos, fps)
        extra = {"policy": config.checkpoint.given, "sampler": sampler.label, "device": str(device),
                 "threads": torch.get_num_threads(), "backend": sampler.backend, **agent.summary(), **auto}
        if sampler.calibration is not None:
            extra["calibration"] = sampler.calibration.to_dict()
            print(sampler.calibration.summary())
    metrics = {"command": "eval", "task": task.name, **summarize(results, task.name),
               "wall_s": round(time.perf_counter() - t0, 2), **extra}
    if video_dir is not None and video_dir.exists():
        metrics["videos"] = sorted(str(p) for p in video_dir.glob("*.mp4"))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "episodes.jsonl", "".join(json.dumps(asdict(r)) + "\n" for r in results))
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    cov = f", mean max coverage {metrics['mean_max_coverage']:.3f}" if "mean_max_coverage" in metrics else ""
    lo, hi = metrics["success_ci95"]
    n = metrics["episodes"]
    print(f"{task.name}: success {metrics['success_rate']:.2f} (95% Wilson interval [{lo:.2f}, {hi:.2f}]), "
          f"score {metrics['score']:.3f} over {n} episode{'s' if n != 1 else ''}{cov}")
    if config.server is not None and "latency_ms_p50" in metrics:
        print(f"server {config.server} ({metrics['sampler']}): round trip p50 {metrics['latency_ms_p50']:.1f} ms, "
              f"p99 {metrics['latency_ms_p99']:.1f} ms over {metrics['chunks']} chunks (server infer p50 "
              f"{metrics['infer_ms_p50']:.1f} ms, exact {metrics['exact_fraction']:.0%})")
    for video in metrics.get("videos", []):
        print(f"video: {video}")
    print(f"metrics: {os.path.join(out, 'metrics.json')}")
    return metrics


def _run_remote(config: Config, video_dir: Path | None, fps: int):
    """The episodes with actions from `config.server`: one connection per env (env i's noise seeded `seed_start + i`),
    the histories sent whole."""
    metadata = config.server_metadata
    agent = RemoteAgent(config.server, config.n_envs, api_key_from_env(), seed=config.seed_start)
    try:
        results = rollout_policy(agent, config.task.env_id, config.episodes, config.n_envs, metadata["n_obs_steps"],
                                 metadata["action"]["shape"][0], config.task.max_steps, config.seed_start,
                                 config.vector, video_dir, config.videos, fps)
    finally:
        agent.close()
    policy = metadata["policy"]
    extra = {"policy": f"server {config.server}", "server": config.server, "sampler": metadata["sampler"],
             "backend": metadata["backend"], "server_policy": policy, **agent.summary()}
    return results, extra
