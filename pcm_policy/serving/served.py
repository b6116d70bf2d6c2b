"""The policy behind a server: a checkpoint and its sampler, the metadata it announces, one batched chunk call.

`ServedPolicy.infer` samples the chunks of several connections in ONE call of the sampler: their histories are
stacked into a batch, each row's noise comes from its own connection's generator, and the sampler stops at the
batch's deadline through the `should_stop` callback the caller passes (the anytime path of the real-time
controller: the current estimate is returned and marked not exact). It reads only the sampler's stats; it knows
nothing of how the sampler iterates.

`build_sampler` is the one place the served sampler is built, and so the one place its `backend` goes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from pcm_policy.auto_sampler import AutoSettings, calibration_observations, choose_sampler
from pcm_policy.checkpoint import Card, load_policy, weights_fingerprint
from pcm_policy.pcm.attach import load_sampler
from pcm_policy.sampler_config import SamplerConfig
from pcm_policy.serving.frames import LOW_DIM_KEY, ObservationSpec
from pcm_policy.tasks import TaskOptions, get_task

# what the metadata says of `sampler=auto`'s choice (`AutoChoice.chosen`)
AUTO_KEYS = ("sampler", "tol", "backend", "threads", "p50_ms", "p99_ms", "max_dev")


def build_sampler(policy, sampler: SamplerConfig, pcm_checkpoint: str | None, backend: str, device=None):
    """The served policy's `ChunkSampler` (its PCM loaded for a switching sampler) on `backend`.

    Args:
        policy: the base `DiffusionPolicy`.
        sampler: the `sampler=` config.
        pcm_checkpoint: the PCM a switching sampler needs (None for the others).
        backend: `torch`, `onnx` or `auto`, checked (`pcm_policy.backends.check_backend`).
        device: where the PCM goes (None: the policy's device).

    Returns:
        The `ChunkSampler`.

    Raises:
        ConfigError: a sampler the PCM does not suit.
        CheckpointError: the PCM does not load or was trained for another base.
    """
    return load_sampler(policy, sampler, device, pcm_checkpoint, backend=backend)


@dataclass(frozen=True)
class BatchResult:
    """The chunks of one batched call.

    Attributes:
        actions: (B, Ta, Da) float32, env units: the actions to execute, row i for request i.
        rounds: the sampler's sequential rounds (`SamplerStats.iterations`), shared by the batch.
        exact: the sampler converged by the base model's own test before the deadline (the whole batch).
        encode_ms: ms spent encoding the observations (normalization and, for an image policy, its encoder).
    """

    actions: np.ndarray
    rounds: int
    exact: bool
    encode_ms: float


class ServedPolicy:
    """A loaded policy and sampler as a server serves them.

    Args:
        policy: the `DiffusionPolicy`.
        sampler: its `ChunkSampler`.
        card: the checkpoint's card (task, observation layout).
        control_hz: the control rate robots run it at (Hz).
        budget_ms: the per-request compute budget in ms (None: one control period).
        margin_ms: ms kept free before the deadline for the reply.
        backend: the backend the sampler runs on (for the metadata).
        auto: `sampler=auto`'s choice (`AutoChoice`: the timing table and the chosen candidate), None otherwise.

    Attributes:
        spec: the observation keys and history length a request may carry.
        deadline_s: the compute time a request may take, from its arrival, before the sampler is stopped (s).
        fingerprint: the hash of the policy's weights (`weights_fingerprint`).
    """

    def __init__(self, policy, sampler, card: Card, control_hz: float, budget_ms: float | None = None,
                 margin_ms: float = 5.0, backend: str = "torch", auto=None):
        self.policy, self.sampler, self.card, self.backend, self.auto = policy, sampler, card, backend, auto
        self.control_hz = float(control_hz)
        self.budget_ms = 1e3 / self.control_hz if budget_ms is None else float(budget_ms)
        self.deadline_s = max(0.0, self.budget_ms - margin_ms) / 1e3
        self.spec = ObservationSpec.of_policy(policy.config)
        self.fingerprint = weights_fingerprint(*policy.trained_modules())

    def metadata(self) -> dict[str, Any]:
        """What the server sends on connect (plain msgpack values).

        Returns:
            {"observation": {key: {"shape", "dtype"}} per control step, "action": {"shape": [Ta, Da], "dtype",
            "low", "high"} (the training actions' range, env units), "n_obs_steps", "control_hz", "budget_ms",
            "sampler" (label), "backend", "policy": {"task", "name", "fingerprint", "observation_kind"},
            "auto" (`sampler=auto` only: the chosen candidate's sampler, tol, backend, threads, p50/p99 ms, max_dev),
            "request_keys": the optional control keys}.
        """
        c = self.policy.config
        low, high = self.policy.normalized_action_range()
        bounds = self.policy.normalizer.unnormalize("action", torch.stack([low, high]))
        task = get_task(self.card.task, "checkpoint")
        return {
            "observation": self.spec.metadata(),
            "action": {"shape": [c.n_action_steps, c.action_dim], "dtype": "float32",
                       "low": [float(v) for v in bounds[0]], "high": [float(v) for v in bounds[1]]},
            "n_obs_steps": c.n_obs_steps, "control_hz": self.control_hz, "budget_ms": self.budget_ms,
            "sampler": self.sampler.label, "backend": self.backend,
            "policy": {"task": task.name, "name": self.card.given, "fingerprint": self.fingerprint,
                       "observation_kind": task.layout(self.card.observation_kind).kind},
            **({} if self.auto is None else {"auto": {k: self.auto.chosen[k] for k in AUTO_KEYS}}),
            "request_keys": {"reset": "bool: a new episode (the history is refilled with this step)",
                             "seed": "int: restart this connection's noise generator before this request"},
        }

    def draw_noise(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One request's noise, drawn as `DiffusionPolicy.predict_chunk` draws it for one history.

        Returns:
            (x_T (1, H, Da), per-step noise (S, 1, H, Da)).
        """
        return self.sampler.make_noise(1, generator)

    @torch.no_grad()
    def infer(self, histories: list[dict[str, np.ndarray]], noises: list[tuple[torch.Tensor, torch.Tensor]],
              should_stop: Callable[[], bool] | None = None) -> BatchResult:
        """Sample one chunk per history in one batched call.

        Equal, row by row, to `DiffusionPolicy.predict_chunk` on that history with that noise (to float rounding
        across batch sizes; a Picard batch keeps iterating until every row passes).

        Args:
            histories: per request, key -> (To, ...) arrays (`Session.observe`).
            noises: per request, `draw_noise`'s pair.
            should_stop: checked between the sampler's rounds; True returns the current estimate.

        Returns:
            The `BatchResult`.

        Raises:
            PcmError: observations the policy refuses (the frames were checked before: a bug).
        """
        t0 = time.perf_counter()
        obs = torch.from_numpy(np.stack([h[LOW_DIM_KEY] for h in histories]))
        observation: Any = obs
        if self.spec.cameras:  # (B, To, cameras, 3, H, W), as the envs give them
            observation = {"obs": obs, "image": torch.from_numpy(np.stack(
                [np.stack([h[c] for c in self.spec.cameras], axis=1) for h in histories]))}
        cond = self.policy.encode(observation)
        encode_ms = (time.perf_counter() - t0) * 1e3
        x_T = torch.cat([n[0] for n in noises])
        step_noise = torch.cat([n[1] for n in noises], dim=1)
        naction, stats = self.sampler.sample(x_T, step_noise, cond, should_stop=should_stop)
        if not stats.converged:  # as predict_chunk: keep an early-stopped estimate inside the training range
            low, high = (t.to(naction) for t in self.policy.normalized_action_range())
            naction = torch.minimum(torch.maximum(naction, low), high)
        c = self.policy.config
        first = c.n_obs_steps - 1
        actions = self.policy.normalizer.unnormalize("action", naction)[:, first:first + c.n_action_steps]
        return BatchResult(actions.cpu().numpy().astype(np.float32), int(stats.iterations), bool(stats.converged),
                           encode_ms)

    def example_history(self) -> dict[str, np.ndarray]:
        """A valid history (To, ...) per key: the low-dim observation at the centre of the normalized range (0),
        grey frames; for warm-up and load tests."""
        mid = self.policy.normalizer.unnormalize("obs", torch.zeros(self.policy.config.obs_dim))
        mid = mid.numpy().astype(np.float32)
        To = self.spec.n_obs_steps
        out = {LOW_DIM_KEY: np.repeat(mid[None], To, axis=0)}
        for key in self.spec.keys[1:]:
            out[key.name] = np.full((To, *key.shape), 128, dtype=np.uint8)
        return out

    def warm_up(self, calls: int = 2) -> None:
        """Run `calls` chunks on `example_history` (first calls pay one-off allocation costs)."""
        generator = torch.Generator().manual_seed(0)
        for _ in range(calls):
            self.infer([self.example_history()], [self.draw_noise(generator)])


def load_served_policy(card: Card, sampler: SamplerConfig | AutoSettings, pcm_checkpoint: str | None,
                       backend: str | None, device: torch.device | str = "cpu", control_hz: float | None = None,
                       budget_ms: float | None = None, margin_ms: float = 5.0, echo: bool = True) -> ServedPolicy:
    """Load a checked checkpoint and its sampler for serving.

    Args:
        card: the base policy's card (checked by `pcm serve`'s config).
        sampler: the `sampler=` config, `pcm_checkpoint` its PCM (switching samplers); or `sampler=auto`'s settings:
            the fastest exact sampler is chosen here by timing (`pcm_policy.auto_sampler.choose_sampler`, at batch 1
            on observations from the checkpoint's dataset or its own rollouts, within the per-request budget).
        backend: `torch`, `onnx` or `auto`, checked (`pcm_policy.backends.check_backend`); None: torch (a fixed
            sampler; `sampler=auto` brings its own).
        device: where the policy runs.
        control_hz: the robots' control rate (None: the card's task's).
        budget_ms, margin_ms: see `ServedPolicy`.
        echo: print `sampler=auto`'s timing table.

    Raises:
        CheckpointError: weights or PCM that do not load.
        ConfigError: `sampler=auto` finds no observations to time on.
    """
    policy, _ = load_policy(card.path, device, expect_task=card.task)
    task = TaskOptions.from_mapping({"name": card.task})
    hz = task.control_hz if control_hz is None else control_hz
    auto = None
    if isinstance(sampler, AutoSettings):
        observations = calibration_observations(policy, card.path, task.env_for(card.observation_kind,
                                                card.observation_parts), task.max_steps, sampler.chunks, sampler.seed)
        budget = 1e3 / hz if budget_ms is None else budget_ms
        chunk_sampler, auto = choose_sampler(policy, sampler, observations, budget, device, echo=echo)
    else:
        chunk_sampler = build_sampler(policy, sampler, pcm_checkpoint, backend or "torch", device)
    return ServedPolicy(policy, chunk_sampler, card, hz, budget_ms, margin_ms, chunk_sampler.backend, auto)
