"""Chunk clocks: the one time source a chunk's deadline check and its latency record both read.

A chunk clock starts a stopwatch when a chunk is requested; the sampler's `should_stop` and the controller's
latency accounting read that same stopwatch, so "the sampler was stopped at the deadline" and "the chunk is
recorded as a deadline miss" never disagree.

- `MeasuredClock`: elapsed time of a monotonic `now()` (by default `time.perf_counter`, seconds); tests pass a
  fake `now` that a slow fake denoiser advances.
- `FixedLatencyClock`: every chunk takes exactly `latency_s` (reproducible simulated runs): its stopwatch reads
  `latency_s` from the moment the chunk starts, so a chunk whose fixed latency exceeds its deadline is stopped at
  the first check (after one iteration) and recorded as a miss, whatever the machine's real speed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Protocol

Stopwatch = Callable[[], float]  # seconds elapsed since the chunk started


class ChunkClock(Protocol):
    """A time source for chunks: `start()` begins one chunk and returns its stopwatch."""

    def start(self) -> Stopwatch:
        """Start timing one chunk; returns its stopwatch (seconds elapsed, float)."""


@dataclass(frozen=True)
class MeasuredClock:
    """Measured chunk time.

    Attributes:
        now: a monotonic clock in seconds (default `time.perf_counter`).
    """

    now: Callable[[], float] = time.perf_counter

    def start(self) -> Stopwatch:
        """Read `now()` once; the stopwatch returns the seconds elapsed since."""
        t0 = self.now()
        return lambda: self.now() - t0


@dataclass(frozen=True)
class FixedLatencyClock:
    """Every chunk takes `latency_s` seconds, from its first reading on.

    Attributes:
        latency_s: the fixed chunk latency in seconds (>= 0).

    Raises:
        ValueError: `latency_s` is negative or NaN.
    """

    latency_s: float

    def __post_init__(self):
        if not self.latency_s >= 0:
            raise ValueError(f"fixed latency must be >= 0 s, got {self.latency_s}")

    def start(self) -> Stopwatch:
        """A stopwatch that always reads `latency_s` seconds."""
        return lambda: self.latency_s


def past_deadline(elapsed_s: float, deadline_s: float | None) -> bool:
    """True when a chunk that has run `elapsed_s` seconds is past its deadline (None = no deadline)."""
    return deadline_s is not None and elapsed_s > deadline_s
