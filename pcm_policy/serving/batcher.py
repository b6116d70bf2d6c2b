"""The inference worker: requests from different connections that are pending together are sampled in ONE call.

Connection handlers (asyncio) submit checked requests to a thread-safe queue and await their reply; one worker
thread takes the oldest request, adds every other request already waiting (up to `max_batch`), and runs them as
one batch. A request is only queued once its whole frame has arrived and passed its checks, so a slow or silent
client never holds a batch back: it simply is not in it. While the worker computes, the event loop keeps
receiving and checking frames.

Deadlines come from the real-time controller's clock (`pcm_policy.control.clock`): each request's stopwatch starts
when its frame arrives, and the batch's `should_stop` fires once any of its requests has been waiting and
computing longer than the deadline, so queueing counts against the budget.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from pcm_policy.control.clock import Stopwatch, past_deadline
from pcm_policy.latency import latency_summary

_STOP = object()


class InferenceError(RuntimeError):
    """The batched call failed; the one-line message is sent to every client of the batch."""


@dataclass(frozen=True)
class Reply:
    """One request's chunk and what it cost.

    Attributes:
        actions: (Ta, Da) float32 in env units.
        rounds: the sampler's sequential rounds.
        exact: converged by the base model's own test before the deadline.
        infer_ms: wall time of the batched call, ms.
        encode_ms: of which the observation encoding, ms.
        queue_ms: time from the frame's arrival to the start of its batch, ms.
        batch_size: requests sampled together in that call.
    """

    actions: np.ndarray
    rounds: int
    exact: bool
    infer_ms: float
    encode_ms: float
    queue_ms: float
    batch_size: int


@dataclass
class _Request:
    history: dict[str, np.ndarray]
    noise: Any
    stopwatch: Stopwatch
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


def _resolve(future: asyncio.Future, outcome: Reply | BaseException) -> None:
    if future.done():  # the client went away while its chunk was computed
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _deliver(request: _Request, outcome: Reply | BaseException) -> None:
    try:
        request.loop.call_soon_threadsafe(_resolve, request.future, outcome)
    except RuntimeError:  # its event loop has closed (server shutdown): nobody waits for it any more
        pass


class Batcher:
    """One inference worker thread fed by a queue.

    Args:
        infer: `ServedPolicy.infer`-like: (histories, noises, should_stop) -> a result with `actions` (B, Ta, Da),
            `rounds`, `exact`, `encode_ms`.
        deadline_s: compute time a request may take from its arrival before the sampler is asked to stop (s).
        max_batch: the most requests sampled in one call.
        window_ms: after the first request of a batch, wait up to this long for more while the batch holds fewer
            requests than `peers()` (0: take only what is pending). Robots that send within a few ms of each other
            then share one call instead of two; a lone robot never waits.
        peers: how many clients could send now (the server's open connections); None: unbounded.

    Attributes:
        batches: how many batches of each size were run.
        requests: requests served; `inexact` of them not exact; `deadline_misses` finished after the deadline.
    """

    def __init__(self, infer: Callable, deadline_s: float, max_batch: int = 16, window_ms: float = 0.0,
                 peers: Callable[[], int] | None = None):
        self.infer, self.deadline_s, self.max_batch = infer, deadline_s, max_batch
        self.window_s = window_ms / 1e3
        self.peers = peers or (lambda: max_batch)
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="pcm-serve-inference", daemon=True)
        self.batches: Counter[int] = Counter()
        self.requests = self.inexact = self.deadline_misses = 0
        self._latencies_ms: deque[float] = deque(maxlen=100_000)  # arrival to reply, for the shutdown summary

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    async def submit(self, history: dict[str, np.ndarray], noise: Any, stopwatch: Stopwatch) -> Reply:
        """Queue one request and wait for its chunk.

        Args:
            history: key -> (To, ...) arrays.
            noise: its noise (`ServedPolicy.draw_noise`).
            stopwatch: seconds since its frame arrived (`MeasuredClock.start()`).

        Returns:
            Its `Reply`.

        Raises:
            InferenceError: the batched call failed (one line).
        """
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(_Request(history, noise, stopwatch, loop, future))
        return await future

    def close(self, timeout: float = 30.0) -> None:
        """Let the worker finish its current batch and stop (requests still queued are not served)."""
        self._queue.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def summary(self) -> dict[str, Any]:
        """Counts so far: `requests`, `inexact`, `deadline_misses`, `batches` {batch size: calls}, and the
        latency from arrival to reply (`latency_ms_p50/p99/mean`, the last 100,000 requests)."""
        return {"requests": self.requests, "inexact": self.inexact, "deadline_misses": self.deadline_misses,
                "batches": dict(sorted(self.batches.items())), **latency_summary(self._latencies_ms)}

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stopping = [first], False
            gather_until = time.perf_counter() + self.window_s
            while len(batch) < self.max_batch:
                # what is pending now; within the window also what arrives, while other robots may still send
                wait = gather_until - time.perf_counter() if len(batch) < self.peers() else 0.0
                try:
                    item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            batch = [r for r in batch if not r.future.done()]  # clients that left while queued
            if batch:
                self._run(batch)
            if stopping:
                return

    def _run(self, batch: list[_Request]) -> None:
        queued_ms = [r.stopwatch() * 1e3 for r in batch]
        t0 = time.perf_counter()
        try:
            result = self.infer([r.history for r in batch], [r.noise for r in batch],
                                lambda: any(past_deadline(r.stopwatch(), self.deadline_s) for r in batch))
        except Exception as e:  # never lose the worker: every client of the batch gets the one line
            message = str(e).splitlines()[0] if str(e) else ""
            error = InferenceError(f"inference failed: {type(e).__name__}: {message}"[:300])
            for r in batch:
                _deliver(r, error)
            return
        infer_ms = (time.perf_counter() - t0) * 1e3
        self.batches[len(batch)] += 1
        for i, r in enumerate(batch):
            reply = Reply(result.actions[i], result.rounds, result.exact, infer_ms, result.encode_ms, queued_ms[i],
                          len(batch))
            elapsed = r.stopwatch()
            self.requests += 1
            self.inexact += not result.exact
            self.deadline_misses += past_deadline(elapsed, self.deadline_s)
            self._latencies_ms.append(elapsed * 1e3)
            _deliver(r, reply)
