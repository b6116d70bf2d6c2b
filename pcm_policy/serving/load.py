"""Timed request loops against a policy server: N robots, each sending one control step per period.

Each client (a thread with its own connection) starts with a `reset` request, then sends one observation step at
`rate_hz`, as a robot would (a late reply makes the next request go out at once, never two at a time); it stops
after `requests` requests or `max_seconds`, whichever comes first. Round trips are measured on the client; the
server reports its `infer_ms`, `batch_size`, `rounds` and `exact`. `pcm serve-bench` runs this.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pcm_policy.serving.client import PolicyClient
from pcm_policy.serving.timing import RequestLog


@dataclass
class ClientLog:
    """What one client saw.

    Attributes:
        requests: per request, the round trip and what the server reported.
        elapsed_s: from the first request to the last reply, s.
        error: the one-line reason the client stopped early (None: it ran to its end).
    """

    requests: RequestLog = field(default_factory=RequestLog)
    elapsed_s: float = 0.0
    error: str | None = None

    @property
    def rate_hz(self) -> float:
        """Requests served per second over the run (the first request excluded: it starts the clock)."""
        return (len(self.requests.round_trip_ms) - 1) / self.elapsed_s if self.elapsed_s > 0 else 0.0


def _client(url: str, api_key: str | None, steps: list[dict[str, np.ndarray]], rate_hz: float, requests: int,
            deadline: float, log: ClientLog, start: threading.Barrier) -> None:
    period = 1.0 / rate_hz
    try:
        with PolicyClient(url, api_key) as client:
            start.wait(timeout=60)
            t0 = next_tick = time.perf_counter()
            for i in range(requests):
                if time.perf_counter() > deadline:
                    break
                time.sleep(max(0.0, next_tick - time.perf_counter()))
                frame = dict(steps[i % len(steps)], reset=(i == 0))
                sent = time.perf_counter()
                reply = client.infer(frame)
                log.requests.record((time.perf_counter() - sent) * 1e3, reply)
                next_tick = max(next_tick + period, sent)  # behind schedule: send the next one at once
            log.elapsed_s = time.perf_counter() - t0
    except Exception as e:  # the run reports it; other clients go on
        log.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def run_clients(url: str, steps: list[dict[str, np.ndarray]], clients: int, rate_hz: float, requests: int,
                max_seconds: float, api_key: str | None = None) -> dict[str, Any]:
    """`clients` robots at `rate_hz` against the server at `url`, together.

    Args:
        url: `ws://host:port`.
        steps: observation steps (key -> one step) the clients cycle through (client c starts at step c).
        clients: concurrent connections.
        rate_hz: requests per second per client (the control rate).
        requests: requests per client.
        max_seconds: wall-clock limit of the whole run, s.
        api_key: the server's key.

    Returns:
        {"clients", "rate_hz", "client_rate_hz_min" (the slowest client's achieved rate), `RequestLog.summary`'s
        keys over every request ("chunks", round trip, infer and overhead ms, "batch_sizes", ...), "late" (round
        trips over one period), "errors" (one line per client that stopped early)}.
    """
    logs = [ClientLog() for _ in range(clients)]
    start = threading.Barrier(clients)
    deadline = time.perf_counter() + max_seconds
    threads = [threading.Thread(target=_client, args=(url, api_key, steps[c:] + steps[:c], rate_hz, requests,
                                                      deadline, logs[c], start), daemon=True)
               for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max_seconds + 60)
    merged = RequestLog.merged(log.requests for log in logs)
    return {"clients": clients, "rate_hz": rate_hz, "client_rate_hz_min": min(log.rate_hz for log in logs),
            **merged.summary(), "late": int(sum(r > 1e3 / rate_hz for r in merged.round_trip_ms)),
            "errors": [log.error for log in logs if log.error]}
