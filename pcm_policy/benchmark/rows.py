"""Bench rows: one `ChunkSampler` per (schedule, algorithm, acceleration, backend), eager or CUDA-graph replayed,
and the timed loop that samples every row on the same observations and noise.

Rows, for each sampling schedule (DDPM-100, DDIM-10, DDIM-16) and each backend (torch, onnx, auto): sequential,
Picard, PCM (output-space switching) and PCM-LoRA (weight-space switching), the PCM rows only where a PCM trained for
that schedule is given, and each iterative row again with the schedule's acceleration settings (a `+aa` row). The
torch sequential row of every schedule is always built first: it is the reference every deviation is measured
against and the baseline of every speed-up.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from pcm_policy.benchmark.flops import flops_per_row
from pcm_policy.chunk_sampler import ChunkSampler
from pcm_policy.pcm.attach import load_pcm, pcm_denoiser
from pcm_policy.policy import observation_count, select_observations
from pcm_policy.paths import resolve_path
from pcm_policy.sampler_config import SamplerConfig, parse_schedule
from pcm_policy.sampling.cuda_graph import GraphedDenoiser


@dataclass
class Row:
    """One bench row.

    Attributes:
        sampler: the row's sampler (its `backend` says where its denoisers run).
        schedule: the schedule name, e.g. `ddim10`.
        pcm_path: the PCM checkpoint of a switching row (None otherwise).
        graph: the row's denoisers are CUDA-graph replayed.
        pcm: the PCM network of a switching row (None otherwise), to build variants of the row on its backend.
        flops_row: FLOPs of one network row of the row's network (`flops_per_row`; a weight-space switching row
            counts its LoRA adapters, an output-space switching row the base network's), 0 when not counted.
    """

    sampler: ChunkSampler
    schedule: str
    pcm_path: str | None = None
    graph: bool = False
    pcm: Any = None
    flops_row: int = 0

    @property
    def config(self) -> SamplerConfig:
        """The row's sampler config."""
        return self.sampler.config

    @property
    def name(self) -> str:
        """Label for tables and progress bars, e.g. `pcm_lora+graph/ddim10`."""
        return f"{self.config.variant}{'+graph' if self.graph else ''}/{self.schedule}"

    @property
    def backend(self) -> str:
        """Where the row's denoisers run: `torch`, `onnx` or `auto` (`ChunkSampler.backend`)."""
        return self.sampler.backend

    @property
    def is_reference(self) -> bool:
        """The eager torch sequential row: the chunks every row of its schedule is compared with."""
        return self.config.name == "sequential" and not self.graph and self.backend == "torch"




def build_rows(policy, schedules: list[str], tols: Sequence[float], window: int | None, stiffness: float | None,
               pcms: Mapping[str, str], lora_pcms: Mapping[str, str], accelerated: Mapping[str, Mapping[str, Any]],
               device, backends: Sequence[str] = ("torch",)) -> tuple[list[Row], list[str]]:
    """The bench rows for every schedule and backend: the torch sequential row (the reference, always), then per
    backend its sequential row and every iterative row at every tolerance.

    Args:
        policy: the base policy.
        schedules: schedule names, e.g. [ddpm100, ddim10].
        tols: the iterative rows' tolerances (a sweep: each iterative sampler once per tol, in this order).
        window: the Picard window (None: all steps).
        stiffness: the switching stiffness (None: the samplers' default).
        pcms: schedule -> PCM checkpoint for the output-space switching rows.
        lora_pcms: schedule -> LoRA PCM checkpoint for the weight-space switching rows.
        accelerated: schedule -> acceleration settings (accel, memory, damping, triangular, start) of its `+aa`
            rows; a schedule without settings gets none.
        device: where PCMs are loaded.
        backends: where every row's denoisers run (`torch`, `onnx`, `auto`; `DiffusionPolicy.sampler`), in this
            order.

    Returns:
        (rows, skipped): the rows, and one reason per PCM row that could not be built (no checkpoint given, a
        PCM for another schedule, a full PCM for weight-space switching).

    Raises:
        ConfigError: an invalid schedule name, sampler setting or backend.
        CheckpointError: a PCM checkpoint that is missing, corrupt or for another base.
    """
    rows, skipped = [], []
    base_flops = flops_per_row(policy)
    for schedule in schedules:
        kind, steps = parse_schedule(schedule)
        plain = SamplerConfig(name="picard", scheduler=kind, steps=steps, window=window)
        accelerated_variant = ([plain.with_acceleration(accelerated[schedule], f"accelerated.{schedule}")]
                               if accelerated.get(schedule) else [])
        variants = [dataclasses.replace(v, tol=t) for v in [plain] + accelerated_variant for t in tols]
        sequential = SamplerConfig(name="sequential", scheduler=kind, steps=steps)
        switching = []  # (config, PCM network, path, FLOPs per row) of every switching row of the schedule
        for name, paths in (("pcm", pcms), ("pcm_lora", lora_pcms)):
            path = paths.get(schedule)
            if not path:
                skipped.append(f"{name}/{schedule}: no PCM checkpoint given ({name}.{schedule}=...)")
                continue
            net, card = load_pcm(resolve_path(path), policy, device)
            if (card["scheduler"], card["steps"]) != (kind, steps):
                skipped.append(f"{name}/{schedule}: {path} was trained for {card['scheduler']}{card['steps']}")
                continue
            if name == "pcm_lora" and card["mode"] != "lora":
                skipped.append(f"{name}/{schedule}: {path} is a full PCM (weight-space switching needs LoRA)")
                continue
            flops = flops_per_row(policy, pcm_denoiser(net, name), (1.0,)) if name == "pcm_lora" else base_flops
            for variant in variants:  # a PCM starts from the X^0 it was trained from
                config = dataclasses.replace(variant, name=name, stiffness=stiffness, start=card.get("start", "x_T"))
                switching.append((config, net, str(path), flops))
        if "torch" not in backends:
            rows.append(Row(policy.sampler(sequential), schedule, flops_row=base_flops))
        for backend in backends:
            rows.append(Row(policy.sampler(sequential, backend=backend), schedule, flops_row=base_flops))
            rows += [Row(policy.sampler(v, backend=backend), schedule, flops_row=base_flops) for v in variants]
            rows += [Row(policy.sampler(config, pcm=net, backend=backend), schedule, path, pcm=net, flops_row=flops)
                     for config, net, path, flops in switching]
    return rows, skipped


def graphed_rows(policy, rows: list[Row]) -> list[Row]:
    """CUDA-graph variants of every row, each denoiser captured once per input shape and replayed.

    The sequential rows are the honest baseline: their batch-1 calls have one fixed shape, so a graphed sequential
    sampler replays one graph per step; the Picard rows use fixed-shape (padded) windows.

    Args:
        policy: the base policy (its training noise schedule).
        rows: the eager rows.

    Returns:
        One graphed `Row` per row.
    """
    out = []
    for row in rows:
        s = row.sampler
        config = dataclasses.replace(row.config, fixed_shape=True)
        graphed = ChunkSampler(config, policy.noise_scheduler.config, GraphedDenoiser(s.base),
                               GraphedDenoiser(s.pcm) if s.pcm else None, s.sample_shape, s.device)
        out.append(Row(graphed, row.schedule, row.pcm_path, graph=True, pcm=row.pcm, flops_row=row.flops_row))
    return out


@dataclass
class RowTiming:
    """What one row produced over the observations (numpy arrays of length n, except x0).

    Attributes:
        x0: the chunks, (n, H, Da) normalized actions on the CPU.
        latencies: wall time per chunk, ms.
        iterations: sequential rounds per chunk.
        evaluations: step evaluations per trajectory per chunk.
        converged: whether each chunk passed its convergence test.
        network_rows: rows passed to networks per chunk, padding included (the compute cost).
    """

    x0: torch.Tensor
    latencies: np.ndarray
    iterations: np.ndarray
    evaluations: np.ndarray
    converged: np.ndarray
    network_rows: np.ndarray

    @classmethod
    def concat(cls, parts: Sequence["RowTiming"]) -> "RowTiming":
        """The timings of consecutive chunk ranges as one."""
        return cls(torch.cat([p.x0 for p in parts]),
                   *(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(cls)[1:]))


@dataclass
class EncodedObservations:
    """The network conditions of the bench's observations and what encoding each one cost.

    Attributes:
        conds: (n, C) global conditions (`DiffusionPolicy.global_cond`), on the policy's device.
        encode_ms: wall time of each observation's encoding at batch 1, ms (n,): normalization and, for an image
            policy, the vision encoder - paid once per chunk, never per Picard row.
    """

    conds: torch.Tensor
    encode_ms: np.ndarray


@torch.no_grad()
def encode_observations(policy, observations, warmup: int = 2, progress: bool = True) -> EncodedObservations:
    """Encode every observation history once, at batch 1 as the controller does, timing each.

    Args:
        policy: the base policy.
        observations: (n, To, Do) float32 in env units, or an image policy's {"obs", "image"} mapping.
        warmup: untimed encodings of observation 0 first.
        progress: show a progress bar.

    Raises:
        PcmError: a non-finite observation, or images the encoder refuses.
    """
    n = observation_count(observations)
    conds, times = [], []
    for i in tqdm(range(-warmup, n), desc="encode observations", unit="obs", disable=not progress, leave=False,
                  dynamic_ncols=True):
        one = select_observations(observations, slice(max(i, 0), max(i, 0) + 1))
        t0 = time.perf_counter()
        cond = policy.encode(one)
        if cond.is_cuda:
            torch.cuda.synchronize()
        if i >= 0:
            times.append((time.perf_counter() - t0) * 1e3)
            conds.append(cond)
    return EncodedObservations(torch.cat(conds), np.asarray(times))


@torch.no_grad()
def time_row(policy, row: Row, conds: torch.Tensor, noise_seed: int, warmup: int, max_iters=None,
             progress: bool = True) -> RowTiming:
    """Latency, stats and outputs of `row` over all observations' conditions (batch 1, same noise per chunk index):
    the denoising alone (the observation was encoded once before, `encode_observations`).

    Args:
        policy: the base policy.
        row: the row to time.
        conds: (n, C) the observations' global conditions (`EncodedObservations.conds`).
        noise_seed: chunk i uses the noise of seed noise_seed + i.
        warmup: untimed chunks run first (on observation 0).
        max_iters: caps the Picard rounds (early-stop study); None: the config's.
        progress: show a progress bar.

    Returns:
        The row's `RowTiming`.
    """
    sampler = row.sampler
    outputs, latencies, iterations, evaluations, converged, network_rows = [], [], [], [], [], []
    bar = tqdm(range(-warmup, len(conds)), desc=f"{row.name} [{row.backend}]", unit="chunk", disable=not progress,
               dynamic_ncols=True, leave=False)
    for i in bar:
        j = max(i, 0)
        x_T, noise = sampler.make_noise(1, torch.Generator().manual_seed(noise_seed + j))
        t0 = time.perf_counter()
        x0, stats = sampler.sample(x_T, noise, conds[j:j + 1], max_iters=max_iters)
        if x0.is_cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if i < 0:
            continue
        latencies.append(dt * 1e3)
        iterations.append(stats.iterations)
        evaluations.append(stats.evaluations)
        converged.append(stats.converged)
        network_rows.append(stats.network_rows)
        outputs.append(x0.cpu())
    return RowTiming(torch.cat(outputs), np.asarray(latencies), np.asarray(iterations), np.asarray(evaluations),
                     np.asarray(converged), np.asarray(network_rows))


def time_rows(policy, rows: Sequence[Row], conds: torch.Tensor, counts: Sequence[int], noise_seed: int, warmup: int,
              interleave: bool = True) -> list[RowTiming]:
    """`time_row` for every row, row i over the first `counts[i]` conditions.

    Interleaved (the default), chunk j of every row is timed before chunk j + 1 of any, after each row's warm-up:
    on a shared machine a burst of load then hits every row alike, so the rows' ratios hold within a run. Otherwise
    each row runs all its chunks in turn.

    Args:
        policy: the base policy.
        rows: the rows.
        conds: (n, C) the observations' global conditions.
        counts: chunks per row (each <= n).
        noise_seed: chunk i uses the noise of noise_seed + i, in every row.
        warmup: untimed chunks per row first (on observation 0).
        interleave: time chunk by chunk across the rows.

    Returns:
        One `RowTiming` per row, in row order.
    """
    if not interleave:
        return [time_row(policy, row, conds[:n], noise_seed, warmup) for row, n in zip(rows, counts)]
    for row in tqdm(rows, desc="warm-up", unit="row", leave=False, dynamic_ncols=True, disable=warmup == 0):
        for _ in range(warmup):
            time_row(policy, row, conds[:1], noise_seed, 0, progress=False)
    parts: list[list[RowTiming]] = [[] for _ in rows]
    for j in tqdm(range(max(counts, default=0)), desc="chunks (every row, interleaved)", unit="chunk", leave=False,
                  dynamic_ncols=True):
        for row, n, done in zip(rows, counts, parts):
            if j < n:
                done.append(time_row(policy, row, conds[j:j + 1], noise_seed + j, 0, progress=False))
    return [RowTiming.concat(p) for p in parts]
