"""The robot side of closed-loop episodes: a chunk agent whose actions come from a policy server.

`RemoteAgent` stands in for `pcm_policy.rollout.vectorized.ChunkAgent` in `rollout_policy`: it takes the vector
env's observation histories (N, To, ...) and returns (N, Ta, Da) actions, one server connection per env (one
connection is one robot), the N requests in flight together so that the server can batch them. Each request
carries the env's whole history, so episode resets need no message and no state is kept on the server between
chunks. With a `seed`, connection i's first request restarts its noise generator at `seed + i`, so the envs do not
share one noise stream (every connection of a server starts at the server's own seed otherwise). It records the
round trip of every request and what the server reported.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pcm_policy.errors import PcmError
from pcm_policy.serving.client import PolicyClient
from pcm_policy.serving.frames import LOW_DIM_KEY
from pcm_policy.serving.timing import RequestLog


class RemoteAgent:
    """Batched chunk requests to a policy server, one connection per env.

    Args:
        url: the server's `ws://host:port`.
        n_connections: connections to open (the vector env's size).
        api_key: the server's key (None: none).
        timeout: seconds to wait for each reply.
        seed: connection i's noise starts at `seed + i` (None: at the server's seed).

    Attributes:
        metadata: the server's metadata (from the first connection).
        log: every request's round trip and what the server reported.

    Raises:
        PcmError: a connection fails (see `PolicyClient`).
    """

    def __init__(self, url: str, n_connections: int, api_key: str | None = None, timeout: float = 30.0,
                 seed: int | None = None):
        self.clients: list[PolicyClient] = []
        self._first_seeds = None if seed is None else {i: seed + i for i in range(n_connections)}
        try:
            for _ in range(n_connections):
                self.clients.append(PolicyClient(url, api_key, timeout))
        except PcmError:
            self.close()
            raise
        self.metadata = self.clients[0].metadata
        self.cameras = [k for k in self.metadata["observation"] if k != LOW_DIM_KEY]
        self._pool = ThreadPoolExecutor(max_workers=n_connections, thread_name_prefix="pcm-remote")
        self.log = RequestLog()

    def _frame(self, obs: np.ndarray | dict[str, np.ndarray], row: int) -> dict[str, Any]:
        if not isinstance(obs, dict):
            frame: dict[str, Any] = {LOW_DIM_KEY: np.asarray(obs[row], dtype=np.float32)}
        else:
            frame = {LOW_DIM_KEY: np.asarray(obs["obs"][row], dtype=np.float32)}
            for c, key in enumerate(self.cameras):  # the env's camera axis, in the policy's camera order
                frame[key] = np.ascontiguousarray(obs["image"][row][:, c])
        if self._first_seeds is not None and row in self._first_seeds:
            frame["seed"] = self._first_seeds.pop(row)
        return frame

    def _request(self, client: PolicyClient, frame: dict[str, np.ndarray]) -> tuple[dict[str, Any], float]:
        t0 = time.perf_counter()
        reply = client.infer(frame)
        return reply, (time.perf_counter() - t0) * 1e3

    def __call__(self, obs: np.ndarray | dict[str, np.ndarray]) -> np.ndarray:
        """(N, To, Do) histories (an image env's: {"obs", "image" (N, To, cameras, 3, H, W)}) -> (N, Ta, Da) float32.

        Raises:
            ServerError: the server refused a request (its one line).
            PcmError: more rows than connections, or a connection failed.
        """
        n = len(obs["obs"] if isinstance(obs, dict) else obs)
        if n > len(self.clients):
            raise PcmError(f"{n} observation histories for {len(self.clients)} server connections")
        futures = [self._pool.submit(self._request, self.clients[i], self._frame(obs, i)) for i in range(n)]
        actions = []
        for future in futures:
            reply, round_trip = future.result()
            self.log.record(round_trip, reply)
            actions.append(np.asarray(reply["actions"], dtype=np.float32))
        return np.stack(actions)

    def summary(self) -> dict[str, Any]:
        """Per-request statistics so far (`RequestLog.summary`): the round trip as `latency_ms_*`, as the robot
        sees it."""
        return self.log.summary()

    def close(self) -> None:
        """Close every connection."""
        for client in self.clients:
            client.close()
        if hasattr(self, "_pool"):
            self._pool.shutdown(wait=False)
