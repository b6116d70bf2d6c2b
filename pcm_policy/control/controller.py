"""The real-time controller: obs history, action queue, per-chunk deadline, anytime sampling.

Timing model (Diffusion Policy conventions: To observations, chunk of H actions, Ta executed per chunk).
When only `replan_steps` queued actions are left, the controller asks for the next chunk from the current
observation history. The chunk's action for control step s is `action_pred[To-1 + (s - s_request)]`. While it
is being computed, the queued actions keep playing; once it is ready (after d = ceil(latency / period)
control steps) it replaces the rest of the queue, so each chunk plays about Ta actions.

Each request gets a deadline: min(budget, time until the queue runs dry) minus a margin. The sampler checks
it between iterations (`should_stop`) and returns its current estimate when it expires; the controller then
records the chunk as not exact. If the queue runs dry before the chunk is ready, the robot holds its last
action for the missing steps (counted as `late_steps`). The controller knows nothing about how the sampler
iterates: it only passes a stop callback and reads the returned stats.

Two ways to run an episode:
- `run_simulated`: the env is advanced by ceil(latency / period) control steps with queued actions while a
  chunk is computed; no waiting, for evaluation. The latency comes from the chunk clock (pcm_policy.control.clock):
  measured, or fixed (`fixed_latency_ms`) for reproducible runs; the deadline check reads the same clock.
- `run_realtime`: a worker thread computes chunks while the loop steps the env every control period, as on
  a real robot. The worker plans from a read-only copy of the observation history taken when the chunk is
  requested, so the loop can keep appending observations while it computes.
A non-finite observation is rejected (the history keeps the last good one) and the last safe action is held.
"""
from __future__ import annotations

import math
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from pcm_policy.control.clock import ChunkClock, FixedLatencyClock, MeasuredClock, past_deadline
from pcm_policy.latency import latency_summary


@dataclass
class ControllerConfig:
    """Timing of the controller.

    Attributes:
        control_hz: control frequency in Hz (PushT 10, robomimic 20).
        budget_ms: per-chunk compute budget in ms (None: one control period).
        margin_ms: ms kept free before the deadline for the hand-over.
        replan_steps: queued actions left when the next chunk is requested (None: Ta // 2).
        fixed_latency_ms: every chunk takes exactly this long in ms (None: measured).
    """

    control_hz: float = 10.0
    budget_ms: float | None = None  # per-chunk compute budget; None = one control period
    margin_ms: float = 5.0  # kept free before the deadline for the hand-over
    replan_steps: int | None = None  # queued actions left when the next chunk is requested; None = Ta // 2
    # Every chunk takes exactly this long (reproducible runs): latency records and deadline checks both read it.
    # For run_simulated; run_realtime still hands a chunk over when the worker has really finished it.
    fixed_latency_ms: float | None = None

    @property
    def period_s(self) -> float:
        """The control period in seconds, 1 / control_hz."""
        return 1.0 / self.control_hz


@dataclass
class ChunkRecord:
    """What one chunk cost and whether it was on time.

    Attributes:
        step: control step at which the chunk was requested.
        latency_ms: its compute time in ms, read from the chunk clock.
        deadline_ms: its compute budget in ms; None for an episode's first chunk (the robot waits at rest).
        iterations: sequential network rounds (`SamplerStats.iterations`).
        evaluations: step evaluations per trajectory (`SamplerStats.evaluations`).
        exact: the sampler converged (its output equals its sequential reference within tolerance).
        deadline_missed: latency_ms > deadline_ms.
        late_steps: control steps the robot held its last action waiting for this chunk.
    """

    step: int  # control step at which the chunk was requested
    latency_ms: float
    deadline_ms: float | None  # None for an episode's first chunk (the robot waits at rest)
    iterations: int
    evaluations: int
    exact: bool  # the sampler converged (its output equals its sequential reference within tolerance)
    deadline_missed: bool
    late_steps: int = 0  # control steps the robot held its last action waiting for this chunk


@dataclass
class EpisodeLog:
    """One controller episode.

    Attributes:
        chunks: every chunk's record, in request order.
        steps: env (control) steps taken.
        rejected_observations: non-finite observations not added to the history.
        held_steps: control steps on which the queue was empty and the last action was held.
        success: the task was solved at some step (`info["is_success"]`).
        max_coverage: PushT only (else None): the largest `info["coverage"]` seen, in [0, 1].
    """

    chunks: list[ChunkRecord] = field(default_factory=list)
    steps: int = 0
    rejected_observations: int = 0
    held_steps: int = 0
    success: bool = False
    max_coverage: float | None = None

    def summary(self) -> dict[str, Any]:
        """Counts of the episode, and latency p50/p99/mean (ms) over its chunks when it has any.

        Returns:
            {"steps", "chunks", "success", "max_coverage", "latency_ms_p50", "latency_ms_p99",
            "latency_ms_mean", "deadline_misses", "late_steps", "inexact_chunks", "rejected_observations"}.
        """
        return {"steps": self.steps, "chunks": len(self.chunks), "success": self.success,
                "max_coverage": self.max_coverage, **latency_summary([c.latency_ms for c in self.chunks]),
                "deadline_misses": sum(c.deadline_missed for c in self.chunks),
                "late_steps": sum(c.late_steps for c in self.chunks),
                "inexact_chunks": sum(not c.exact for c in self.chunks),
                "rejected_observations": self.rejected_observations}


def _step_observation(obs) -> np.ndarray | dict[str, np.ndarray]:
    """One env observation as the history keeps it: float32 (Do,), or an image env's dict with `obs` as float32."""
    if isinstance(obs, dict):
        return {k: np.asarray(v, dtype=np.float32) if k == "obs" else np.asarray(v) for k, v in obs.items()}
    return np.asarray(obs, dtype=np.float32)


def _finite(obs) -> bool:
    """Whether the low-dim part of an observation is finite (camera frames are uint8)."""
    return bool(np.all(np.isfinite(obs["obs"] if isinstance(obs, dict) else obs)))


class Controller:
    """Runs a policy at control frequency: observation history, action queue, per-chunk deadlines.

    `policy` needs `config` (n_obs_steps, n_action_steps, horizon) and `predict_chunk(obs (1, To, Do) float32,
    sampler, generator=, should_stop=)` returning `.action_pred` (1, H, Da) and `.stats` (iterations,
    evaluations, converged); an image env's observation - a dict of `obs` (Do,) and `image` (cameras, 3, H, W) -
    is kept as such and passed as {"obs": (1, To, Do), "image": (1, To, cameras, 3, H, W)}. `clock` is the time
    source of chunk latencies and deadlines: a `now()` function in seconds (default `time.perf_counter`) or a
    `ChunkClock`; `config.fixed_latency_ms` replaces it with a `FixedLatencyClock`.

    Args:
        policy: the policy (see above), e.g. a `DiffusionPolicy`.
        sampler: passed to `policy.predict_chunk` (a `ChunkSampler` or a sampler config).
        config: the timing settings (None: `ControllerConfig()`).
        seed: seed of the noise generator (one generator for the controller's life).
        clock: the chunk time source (see above).

    Raises:
        ValueError: a negative `config.fixed_latency_ms`.
    """

    def __init__(self, policy, sampler, config: ControllerConfig | None = None, seed: int = 0,
                 clock: Callable[[], float] | ChunkClock = time.perf_counter):
        self.policy = policy
        self.sampler = sampler
        self.config = config or ControllerConfig()
        if self.config.fixed_latency_ms is not None:
            self.clock: ChunkClock = FixedLatencyClock(self.config.fixed_latency_ms / 1e3)
        else:
            self.clock = clock if hasattr(clock, "start") else MeasuredClock(clock)
        self.generator = torch.Generator().manual_seed(seed)
        pc = policy.config
        self.n_obs_steps, self.n_action_steps, self.horizon = pc.n_obs_steps, pc.n_action_steps, pc.horizon
        self.replan_steps = self.config.replan_steps if self.config.replan_steps is not None else self.n_action_steps // 2
        # A chunk must cover the steps it plays plus those that pass while the next one is computed.
        self.cover = min(self.n_action_steps + self.replan_steps, self.horizon - self.n_obs_steps + 1)
        self.history: deque = deque(maxlen=self.n_obs_steps)
        self.last_action: np.ndarray | None = None

    # ---- observation history ---------------------------------------------------------------------------
    def reset(self, obs: np.ndarray) -> None:
        """Start an episode: the history becomes To copies of `obs` and no action is held.

        Args:
            obs: the first observation (Do,), env units.

        Raises:
            ValueError: `obs` is not finite.
        """
        obs = _step_observation(obs)
        if not _finite(obs):
            raise ValueError("first observation of the episode is not finite")
        self.history.clear()
        self.history.extend([obs] * self.n_obs_steps)
        self.last_action = None

    def observe(self, obs: np.ndarray, log: EpisodeLog) -> None:
        """Append an observation (Do,) to the history; a non-finite one is dropped and counted in `log`."""
        obs = _step_observation(obs)
        if _finite(obs):
            self.history.append(obs)
        else:
            log.rejected_observations += 1  # keep planning from the last good history

    def history_snapshot(self) -> np.ndarray | dict[str, np.ndarray]:
        """A read-only copy of the observation history, (To, Do) float32, oldest first (an image env's: a dict of
        that and the camera history (To, cameras, 3, H, W))."""
        if not isinstance(self.history[0], dict):
            obs = np.stack(self.history)
            obs.flags.writeable = False
            return obs
        snapshot = {k: np.stack([h[k] for h in self.history]) for k in self.history[0]}
        for value in snapshot.values():
            value.flags.writeable = False
        return snapshot

    # ---- one chunk ---------------------------------------------------------------------------------------
    def _budget_s(self, queued: int) -> float:
        budget = self.config.period_s if self.config.budget_ms is None else self.config.budget_ms / 1e3
        return max(0.0, min(budget, queued * self.config.period_s) - self.config.margin_ms / 1e3)

    def plan(self, step: int, deadline_s: float | None, history: np.ndarray | None = None
             ) -> tuple[np.ndarray, ChunkRecord]:
        """Compute one chunk, stopping the sampler at its deadline.

        The sampler is asked to stop once the chunk clock reads past the deadline; the record's latency is read
        from the same clock.

        Args:
            step: the control step the chunk is requested at.
            deadline_s: the compute budget in seconds (None: no deadline).
            history: the observation history (To, Do) to plan from (default: a snapshot of the current one).

        Returns:
            (actions (cover, Da) float32 in env units for control steps step..step+cover-1, its `ChunkRecord`).
        """
        history = self.history_snapshot() if history is None else history
        if isinstance(history, dict):  # copies: the snapshot is read-only
            obs = {"obs": torch.tensor(history["obs"], dtype=torch.float32)[None],
                   "image": torch.tensor(history["image"])[None]}
        else:
            obs = torch.tensor(history, dtype=torch.float32)[None]
        elapsed = self.clock.start()
        should_stop = None if deadline_s is None else (lambda: past_deadline(elapsed(), deadline_s))
        chunk = self.policy.predict_chunk(obs, self.sampler, generator=self.generator, should_stop=should_stop)
        latency = elapsed()
        first = self.n_obs_steps - 1
        actions = chunk.action_pred[0, first:first + self.cover].cpu().numpy()
        record = ChunkRecord(step=step, latency_ms=latency * 1e3,
                             deadline_ms=None if deadline_s is None else deadline_s * 1e3,
                             iterations=int(chunk.stats.iterations), evaluations=int(chunk.stats.evaluations),
                             exact=bool(chunk.stats.converged), deadline_missed=past_deadline(latency, deadline_s))
        return actions, record

    # ---- simulated clock ---------------------------------------------------------------------------------
    def run_simulated(self, env, max_steps: int, seed: int | None = None, options: dict | None = None) -> EpisodeLog:
        """One episode; the env advances ceil(latency / period) steps with queued actions while a chunk computes.

        Args:
            env: a gymnasium env (`reset`/`step`; `info` may carry `is_success` and `coverage`).
            max_steps: time limit in control steps.
            seed: the env's reset seed.
            options: the env's reset options.

        Returns:
            The episode's `EpisodeLog`; it ends at success, termination, truncation or `max_steps`.
        """
        log, queue = self._start(env, seed, options)
        pending: tuple[int, int, np.ndarray] | None = None  # (ready_step, request_step, actions)
        step = 0
        while step < max_steps and not log.success:
            if pending is None and len(queue) <= self.replan_steps:
                actions, record = self.plan(step, self._budget_s(len(queue)))
                delay = max(1, math.ceil(record.latency_ms / 1e3 / self.config.period_s - 1e-9))
                record.late_steps = max(0, delay - len(queue))
                log.chunks.append(record)
                pending = (step + delay, step, actions)
            if pending is not None and step >= pending[0]:
                _, requested, actions = pending
                queue = deque(actions[step - requested:])
                pending = None
            done = self._execute(env, queue, log)
            step += 1
            if done:
                break
        return log

    def _start(self, env, seed, options) -> tuple[EpisodeLog, deque]:
        """Reset the env and plan the first chunk with no deadline (the robot starts at rest)."""
        log = EpisodeLog()
        obs, info = env.reset(seed=seed, options=options)
        self.reset(obs)
        self._track(info, log)
        actions, record = self.plan(0, None)
        log.chunks.append(record)
        return log, deque(actions[: self.n_action_steps])

    def _execute(self, env, queue: deque, log: EpisodeLog) -> bool:
        if queue:
            self.last_action = queue.popleft()
        else:
            log.held_steps += 1  # queue ran dry: hold the last safe action
        obs, _, terminated, truncated, info = env.step(self.last_action)
        log.steps += 1
        self.observe(obs, log)
        self._track(info, log)
        return bool(terminated or truncated)

    @staticmethod
    def _track(info: dict, log: EpisodeLog) -> None:
        log.success = log.success or bool(info.get("is_success", False))
        if "coverage" in info:
            log.max_coverage = max(log.max_coverage or 0.0, float(info["coverage"]))

    # ---- real-time clock ---------------------------------------------------------------------------------
    def run_realtime(self, env, max_steps: int, seed: int | None = None, options: dict | None = None) -> EpisodeLog:
        """One episode in wall-clock time: env steps every period, a worker thread computes the next chunk.

        Args:
            env, max_steps, seed, options: as in `run_simulated`.

        Returns:
            The episode's `EpisodeLog`.
        """
        log, queue = self._start(env, seed, options)
        pending: tuple[Future, int, int] | None = None  # (future, request_step, actions queued at request)
        period = self.config.period_s
        with ThreadPoolExecutor(max_workers=1) as pool:
            next_tick = time.perf_counter()
            for step in range(max_steps):
                if pending is None and len(queue) <= self.replan_steps:
                    # The worker gets the history as of now; the loop keeps appending to self.history meanwhile.
                    future = pool.submit(self.plan, step, self._budget_s(len(queue)), self.history_snapshot())
                    pending = (future, step, len(queue))
                if pending is not None and pending[0].done():
                    future, requested, queued = pending
                    actions, record = future.result()
                    record.late_steps = max(0, step - requested - queued)
                    log.chunks.append(record)
                    queue = deque(actions[step - requested:])
                    pending = None
                if self._execute(env, queue, log) or log.success:
                    break
                next_tick += period
                time.sleep(max(0.0, next_tick - time.perf_counter()))
            if pending is not None:
                pending[0].result()
        return log


def records_as_dicts(records: list[ChunkRecord]) -> list[dict[str, Any]]:
    """The records as plain dicts (JSON-ready), one per chunk."""
    return [asdict(r) for r in records]
