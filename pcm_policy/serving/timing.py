"""What a robot measures about its requests to a policy server: round trips, and what the server reported."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from pcm_policy.latency import latency_summary


def _summary_as(name: str, values: list[float]) -> dict[str, float]:
    """`latency_summary` with its keys renamed `<name>_p50/p99/mean`."""
    return {k.replace("latency_ms", name): v for k, v in latency_summary(values).items()}


@dataclass
class RequestLog:
    """Per request: the round trip (client side) and the reply's `server_timing` `infer_ms` and `queue_ms`,
    `batch_size`, `rounds` and `exact`."""

    round_trip_ms: list[float] = field(default_factory=list)
    infer_ms: list[float] = field(default_factory=list)
    queue_ms: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)
    exact: list[bool] = field(default_factory=list)

    def record(self, round_trip_ms: float, reply: dict[str, Any]) -> None:
        """Add one request: its round trip in ms and the server's reply map."""
        self.round_trip_ms.append(round_trip_ms)
        self.infer_ms.append(float(reply["server_timing"]["infer_ms"]))
        self.queue_ms.append(float(reply["server_timing"]["queue_ms"]))
        self.batch_sizes.append(int(reply["batch_size"]))
        self.rounds.append(int(reply["rounds"]))
        self.exact.append(bool(reply["exact"]))

    @classmethod
    def merged(cls, logs: Iterable["RequestLog"]) -> "RequestLog":
        """One log of every request of `logs`."""
        out = cls()
        for log in logs:
            for name in ("round_trip_ms", "infer_ms", "queue_ms", "batch_sizes", "rounds", "exact"):
                getattr(out, name).extend(getattr(log, name))
        return out

    def summary(self) -> dict[str, Any]:
        """{"chunks", round trip `latency_ms_p50/p99/mean`, the server's `infer_ms_p50/p99/mean` and
        `queue_ms_p50/p99/mean` (waiting for the worker), `overhead_ms_p50/p99/mean` (round trip minus infer_ms: the
        protocol's cost, plus the queueing), "iterations_mean", "exact_fraction", "batch_sizes" {size: requests}},
        times in ms; {} before the first request."""
        if not self.round_trip_ms:
            return {}
        overhead = [r - i for r, i in zip(self.round_trip_ms, self.infer_ms)]
        sizes, counts = np.unique(self.batch_sizes, return_counts=True)
        return {"chunks": len(self.round_trip_ms), **latency_summary(self.round_trip_ms),
                **_summary_as("infer_ms", self.infer_ms), **_summary_as("queue_ms", self.queue_ms),
                **_summary_as("overhead_ms", overhead),
                "iterations_mean": float(np.mean(self.rounds)), "exact_fraction": float(np.mean(self.exact)),
                "batch_sizes": {int(s): int(c) for s, c in zip(sizes, counts)}}
