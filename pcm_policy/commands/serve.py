"""`pcm serve`: a policy as a server on openpi's websocket protocol (`configs/serve.yaml`, docs/serving.md).

Any checkpoint `pcm eval` runs (ours, imported, image policies) with any sampler; requests from different
connections that arrive together are sampled in one call under the budget. It prints one line once it listens
(`... listening on ws://HOST:PORT`) and one when SIGINT/SIGTERM has shut it down.
"""
from __future__ import annotations

import logging
import socket
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping

from pcm_policy.auto_sampler import AutoSettings, check_auto, is_auto
from pcm_policy.backends import check_backend
from pcm_policy.checkpoint import Card
from pcm_policy.errors import CheckpointError, ConfigError, PcmError
from pcm_policy.options import integer, lookup, number, text
from pcm_policy.pcm.attach import check_sampler
from pcm_policy.runtime import RuntimeOptions, set_threads
from pcm_policy.sampler_config import SamplerConfig
from pcm_policy.serving.client import api_key_from_env
from pcm_policy.serving.served import load_served_policy
from pcm_policy.serving.server import LOG, PolicyServer, check_exposure, serve_until_signal
from pcm_policy.tasks import TASKS, TaskOptions


@dataclass(frozen=True)
class Config:
    """A checked `pcm serve` config (see `configs/serve.yaml` for each key).

    Attributes:
        checkpoint: the base policy's card.
        sampler: the sampler config, or `sampler=auto`'s settings (the fastest exact sampler, chosen at start);
            `pcm_checkpoint` its PCM (switching samplers only).
        backend: the sampler's backend (None: torch for a fixed sampler, `sampler=auto`'s own backends).
        control_hz: the robots' control rate (None: the task's); `budget_ms`, `margin_ms`: the per-request budget.
        host, port: where to listen.
        seed: every connection's first noise seed.
        max_batch: the most requests per sampler call; `max_connections` the most open connections.
        batch_window_ms: how long a batch waits for other connected robots after its first request (0: only what
            is pending).
        max_frame_bytes: the request frame size limit (None: derived from the policy's observation).
        runtime: device, threads, determinism.
        api_key: the key clients must send (from `PCM_SERVE_API_KEY`; never printed).
    """

    checkpoint: Card
    sampler: SamplerConfig | AutoSettings
    pcm_checkpoint: str | None
    backend: str | None
    control_hz: float | None
    budget_ms: float | None
    margin_ms: float
    host: str
    port: int
    seed: int
    max_batch: int
    max_connections: int
    batch_window_ms: float
    max_frame_bytes: int | None
    runtime: RuntimeOptions
    api_key: str | None = field(default=None, repr=False)

    @classmethod
    def from_hydra(cls, cfg: Mapping[str, Any]) -> "Config":
        """Check every option, the checkpoint's card, the sampler against it, and that the address can be bound,
        before any weights load.

        Raises:
            ConfigError: a key of the wrong type or range, a sampler the checkpoint cannot run, an unavailable
                backend, a non-loopback host without `PCM_SERVE_API_KEY`, or an address that cannot be bound.
            CheckpointError: an unreadable or PCM checkpoint, a policy for no registered task or env, or an
                absolute-action policy.
        """
        runtime = RuntimeOptions.from_mapping(cfg)
        card = Card.open_base("checkpoint", lookup(cfg, "checkpoint", None))
        card.check_closed_loop()
        if card.task not in TASKS:
            raise CheckpointError(f"checkpoint={card.given}: a policy for task {card.task!r}, which is not registered "
                                  f"here ({', '.join(TASKS)})")
        task = TaskOptions.from_mapping({"name": card.task})
        card.check_env_gives_cameras(task.env_for(card.observation_kind, card.observation_parts))
        backend = lookup(cfg, "backend", None)  # null: torch, or sampler=auto's own backends
        backend = None if backend is None else check_backend(backend, runtime.device)
        group = lookup(cfg, "sampler")
        pcm = text(cfg, "pcm", null=True)
        pcm_option = dict(pcm_key="pcm", pcm_path=pcm) if pcm is not None else {}
        if is_auto(group):
            sampler = check_auto(group, "sampler", card.num_train_timesteps, card.path, device=runtime.device,
                                 backend=backend, **pcm_option)
            pcm = None
        else:
            sampler = check_sampler(group, "sampler", card.num_train_timesteps, card.path, **pcm_option)
            if pcm is None:
                pcm = group.get("pcm_checkpoint") if sampler.needs_pcm else None
        host, port = text(cfg, "host"), integer(cfg, "port", 0, 65535)
        api_key = api_key_from_env()
        check_exposure(host, api_key)
        _check_bindable(host, port)
        max_mb = number(cfg, "max_frame_mb", 0, low_open=True, null=True)
        return cls(card, sampler, pcm, backend, control_hz=number(cfg, "control_hz", 0, low_open=True, null=True),
                   budget_ms=number(cfg, "budget_ms", 0, null=True), margin_ms=number(cfg, "margin_ms", 0),
                   host=host, port=port, seed=integer(cfg, "seed", 0), max_batch=integer(cfg, "max_batch", 1),
                   max_connections=integer(cfg, "max_connections", 1),
                   batch_window_ms=number(cfg, "batch_window_ms", 0, 1000),
                   max_frame_bytes=None if max_mb is None else int(max_mb * (1 << 20)), runtime=runtime,
                   api_key=api_key)


def _check_bindable(host: str, port: int) -> None:
    """The address resolves and the port is free now (the server binds it once the policy has loaded).

    Raises:
        ConfigError: naming `host` or `port`.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"host={host}: cannot resolve ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's server binds
        try:
            probe.bind(address)
        except OSError as e:
            raise ConfigError(f"port={port}: cannot listen on {host}:{port} ({e.strerror})") from None


def _log_to_stderr() -> None:
    """Server events as one `pcm serve:` line each on stderr."""
    if not any(getattr(h, "_pcm_serve", False) for h in LOG.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("pcm serve: %(message)s"))
        handler._pcm_serve = True  # type: ignore[attr-defined]
        LOG.addHandler(handler)
        LOG.setLevel(logging.INFO)
        LOG.propagate = False


def run(config: Config) -> dict[str, Any]:
    """Load the policy and its sampler, warm them up, serve until SIGINT/SIGTERM.

    Returns:
        The server's summary (`PolicyServer.summary`): connections, bad frames, requests, batches by size, latency.

    Raises:
        CheckpointError: the weights or the PCM do not load.
        PcmError: the address cannot be bound any more.
    """
    served = load_served_policy(config.checkpoint, config.sampler, config.pcm_checkpoint, config.backend,
                                config.runtime.device, config.control_hz, config.budget_ms, config.margin_ms)
    served.warm_up()
    server = PolicyServer(served, config.host, config.port, config.api_key, config.seed, config.max_batch,
                          config.max_frame_bytes, config.max_connections, config.batch_window_ms)
    _log_to_stderr()
    # sampler=auto leaves torch's threads at the count it chose; a fixed sampler runs at `threads`
    threads = set_threads(None if served.auto is not None else config.runtime.threads)

    def ready(url: str) -> None:
        key = "API key required" if config.api_key else "no API key (loopback only)"
        print(f"pcm serve: {config.checkpoint.given} ({served.sampler.label}, backend {served.backend}, "
              f"{threads} thread{'s' if threads != 1 else ''}, budget {served.budget_ms:g} ms, {key}) listening on "
              f"{url}", flush=True)

    try:
        summary = serve_until_signal(server, ready)
    except OSError as e:
        raise PcmError(f"port={config.port}: cannot listen on {config.host}:{config.port} ({e.strerror})") from None
    print(f"pcm serve: stopped; {summary['requests']} chunks for {summary['connections']} connections, batches "
          f"{{size: calls}} {summary['batches']}, {summary['inexact']} inexact, {summary['deadline_misses']} past "
          f"the deadline, {summary['bad_frames']} frames refused", flush=True)
    return summary
