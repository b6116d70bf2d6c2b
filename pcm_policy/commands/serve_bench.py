"""`pcm serve-bench`: round trips, protocol overhead and batching of `pcm serve` with 1 and N robots
(`configs/serve_bench.yaml`).

The server runs in a child process (its own interpreter, as in deployment) on 127.0.0.1 at a free port, with the
same keys as `pcm serve`; the robots are threads of this process, each with its own connection, sending one
observation step per control period (`pcm_policy.serving.load`). Writes `metrics.json` and prints a table.
"""
from __future__ import annotations

import json
import multiprocessing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pcm_policy.atomic import atomic_write_text
from pcm_policy.commands import serve
from pcm_policy.errors import PcmError
from pcm_policy.observations import check_dataset, sample_observations
from pcm_policy.options import check_int, check_list, integer, lookup, number, output_dir
from pcm_policy.serving.load import run_clients
from pcm_policy.serving.served import load_served_policy
from pcm_policy.serving.server import PolicyServer, serve_until_signal

START_TIMEOUT_S = 300  # loading torch and the policy in the child


@dataclass(frozen=True)
class Config:
    """A checked `pcm serve-bench` config.

    Attributes:
        serve: the server's config (`pcm serve`'s, on 127.0.0.1 at a free port).
        clients: robots per run, e.g. [1, 4].
        rate_hz: requests per second per robot (None: the server's control rate).
        requests: requests per robot and run; `max_seconds` the wall-clock limit of a run.
        observations: observation steps the robots cycle through.
        output_dir: where metrics.json goes.
    """

    serve: serve.Config
    clients: list[int]
    rate_hz: float | None
    requests: int
    max_seconds: float
    observations: int
    output_dir: Path

    @classmethod
    def from_hydra(cls, cfg: Mapping[str, Any]) -> "Config":
        """Check every option (the server's as `pcm serve` does) before anything starts.

        Raises:
            ConfigError, CheckpointError: as `pcm serve`; bad `clients`, `rate_hz`, `requests`, `max_seconds`.
        """
        server = serve.Config.from_hydra({**cfg, "host": "127.0.0.1", "port": 0})
        clients = [check_int(f"clients.{i}", c, 1, 64) for i, c in
                   enumerate(check_list("clients", lookup(cfg, "clients"), "[1, 4]"))]
        return cls(server, clients, number(cfg, "rate_hz", 0, low_open=True, null=True), integer(cfg, "requests", 2),
                   number(cfg, "max_seconds", 0, low_open=True), integer(cfg, "observations", 1), output_dir(cfg))


def _serve_child(config: serve.Config, conn) -> None:
    """The server process: load, warm up, report the URL, serve until SIGTERM, report the server's summary."""
    try:
        config.runtime.apply()
        served = load_served_policy(config.checkpoint, config.sampler, config.pcm_checkpoint, config.backend,
                                    config.runtime.device, config.control_hz, config.budget_ms, config.margin_ms)
        served.warm_up()
        server = PolicyServer(served, config.host, config.port, None, config.seed, config.max_batch,
                              config.max_frame_bytes, config.max_connections, config.batch_window_ms)
        conn.send(("summary", serve_until_signal(server, lambda url: conn.send(("url", (url, served.metadata()))))))
    except Exception as e:  # the parent reports it as one line
        conn.send(("error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))


def _steps(config: Config, observation: Mapping[str, Any]) -> tuple[list[dict[str, np.ndarray]], str]:
    """The observation steps the robots send: the last step of histories from the checkpoint's dataset, or
    synthetic ones (zeros, grey frames of the announced shapes) for a checkpoint that records none."""
    cameras = [k for k in observation if k != "obs"]
    try:
        check_dataset(config.serve.checkpoint.path)
    except PcmError:
        step = {"obs": np.zeros(observation["obs"]["shape"], np.float32),
                **{c: np.full(observation[c]["shape"], 128, np.uint8) for c in cameras}}
        return [step], "synthetic (the checkpoint records no dataset)"
    histories = sample_observations(config.serve.checkpoint.path, config.observations, config.serve.seed)
    obs = histories["obs"] if isinstance(histories, dict) else histories
    steps = []
    for i in range(len(obs)):
        step = {"obs": obs[i, -1].numpy().astype(np.float32)}
        for k, camera in enumerate(cameras):
            step[camera] = histories["image"][i, -1, k].numpy()
        steps.append(step)
    return steps, f"{len(steps)} from the checkpoint's dataset"


def run(config: Config) -> dict[str, Any]:
    """Start the server, run each client count, stop the server; print the table, write metrics.json.

    Returns:
        {"checkpoint", "sampler", "backend", "threads", "observations", "runs": [`run_clients`' summary per
        client count], "server": the server's own summary}.

    Raises:
        PcmError: the server did not start (its one-line reason).
    """
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_serve_child, args=(config.serve, child), daemon=True)
    process.start()
    try:
        if not parent.poll(START_TIMEOUT_S):
            raise PcmError(f"the server did not start within {START_TIMEOUT_S} s")
        kind, value = parent.recv()
        if kind != "url":
            raise PcmError(f"the server did not start: {value}")
        url, metadata = value
        steps, source = _steps(config, metadata["observation"])
        rate = config.rate_hz or metadata["control_hz"]
        runs = [run_clients(url, steps, n, rate, config.requests, config.max_seconds) for n in config.clients]
    finally:
        process.terminate()  # SIGTERM: the server shuts down cleanly and reports its summary
        server_summary = parent.recv()[1] if parent.poll(30) else {}
        process.join(30)
    report = {"command": "serve-bench", "checkpoint": config.serve.checkpoint.given, "sampler": metadata["sampler"],
              "backend": metadata["backend"], "threads": config.serve.runtime.threads, "observations": source,
              "runs": runs, "server": server_summary}
    config.output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config.output_dir / "metrics.json", json.dumps(report, indent=2))
    print(f"pcm serve-bench: {report['checkpoint']} ({report['sampler']}, backend {report['backend']}, "
          f"{report['threads']} server thread(s)) on 127.0.0.1, {rate:g} Hz per robot; observations: {source}")
    print("\n".join(table(runs)))
    print(f"metrics: {config.output_dir / 'metrics.json'}")
    return report


def table(runs: list[dict[str, Any]]) -> list[str]:
    """The runs as markdown table lines: robots, the slowest robot's rate, round trip, the server's infer and queue
    time, the protocol overhead (round trip minus infer_ms), exact chunks, batch sizes seen."""
    lines = ["| robots | slowest robot Hz | round trip p50 / p99 ms | infer p50 ms | queue p50 ms | "
             "overhead p50 / p99 ms | exact | batch sizes {size: requests} |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        ms = {k: r.get(k, float("nan")) for k in ("latency_ms_p50", "latency_ms_p99", "infer_ms_p50", "queue_ms_p50",
                                                   "overhead_ms_p50", "overhead_ms_p99")}
        lines.append(f"| {r['clients']} | {r['client_rate_hz_min']:.1f} | {ms['latency_ms_p50']:.1f} / "
                     f"{ms['latency_ms_p99']:.1f} | {ms['infer_ms_p50']:.1f} | {ms['queue_ms_p50']:.1f} | "
                     f"{ms['overhead_ms_p50']:.2f} / {ms['overhead_ms_p99']:.2f} | {r.get('exact_fraction', 0):.0%} | "
                     f"{r.get('batch_sizes', {})} |" + (f" errors: {'; '.join(r['errors'])}" if r["errors"] else ""))
    return lines
