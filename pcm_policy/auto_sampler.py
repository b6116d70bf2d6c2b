"""`sampler=auto`: the fastest exact way to sample a chunk on this machine, chosen at start by timing.

Rounds do not become milliseconds by themselves: which exact sampler is fastest depends on the machine (a batched
Picard round is compute-bound, a sequential step overhead-bound) and on the runtime each call runs on. So at start
`choose_sampler` times the candidates - sequential, Picard, Picard + Anderson and, where a PCM is given for the
schedule, PCM(+Anderson) - under every backend (torch, onnx, auto routing) on a few real observations with shared
noise, compares each chunk with the torch sequential chunk of the same observation and noise, and keeps the fastest
candidate whose chunks all lie within the deviation bound and whose p99 fits the budget.

Two stages. The screen times every candidate once, at the first thread count: a candidate's tolerances are tried
from the loosest and the walk stops at the first exact one; a candidate whose first chunk is slower than
`PRUNE_FACTOR` x the best exact p50 so far is dropped after that chunk (after its warm-up chunk when that is twice as
slow again); no new candidate starts after `max_seconds`.
The final round times the `FINALISTS` fastest exact candidates (those within `PRUNE_FACTOR` of the best) again at
every thread count asked for, interleaved chunk by chunk (a burst of load on a shared machine hits them all alike),
and the choice is made on it. The cost is bounded by (candidates timed) x (chunks + warmup) chunks for the screen,
capped by `max_seconds`, plus `FINALISTS` x (thread counts) x (chunks + 1) for the final round: on the shipped PushT
policy at 1 thread, 4-15 s for DDIM-10 and 20-30 s for DDPM-100 on this project's shared 2-core machine
(docs/latency-benchmark.md).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from pcm_policy.backends import BACKENDS, check_backend
from pcm_policy.benchmark.measure import chunk_deviations
from pcm_policy.benchmark.rows import Row, RowTiming, encode_observations, time_row
from pcm_policy.checkpoint import RUN_CONFIG, Card
from pcm_policy.chunk_sampler import ChunkSampler
from pcm_policy.errors import ConfigError
from pcm_policy.latency import latency_summary
from pcm_policy.observations import dataset_path, rollout_observations, sample_observations
from pcm_policy.options import (check_choice, check_int, check_list, check_mapping, check_number, check_text, show,
                                unknown_keys)
from pcm_policy.pcm.attach import load_pcm
from pcm_policy.paths import resolve_path
from pcm_policy.policy import observation_count, select_observations
from pcm_policy.runtime import set_threads
from pcm_policy.sampler_config import SCHEDULERS, SamplerConfig, check_steps, schedule_name

# The measured best Anderson settings per scheduler (docs/anderson-and-starts.md; configs/bench.yaml `accelerated`)
ACCELERATION = {"ddpm": {"accel": "anderson", "memory": 2, "damping": 0.5, "triangular": True, "start": "x0_chain"},
                "ddim": {"accel": "anderson", "memory": 2, "damping": 1.0, "triangular": True, "start": "x_T"}}
PRUNE_FACTOR = 2.0  # a candidate whose first chunk is this much slower than the best exact p50 is dropped
FINALISTS = 3  # the fastest exact candidates of the screen (within PRUNE_FACTOR of the best), timed again


@dataclass(frozen=True)
class AutoSettings:
    """The `sampler=auto` group (configs/sampler/auto.yaml): what `choose_sampler` may choose from and how it times.

    Attributes:
        scheduler, steps: the schedule (`ddim`, 10 = DDIM-10); every candidate is exact for this schedule.
        pcm_checkpoint: a PCM trained for the schedule (LoRA: weight-space switching candidates; full: output-space),
            or None.
        backends: the runtimes tried (`torch`, `onnx`, `auto`).
        threads: the intra-op thread counts tried (None: the process's count only).
        tols: the iterative candidates' tolerances, tried from the loosest until one is exact.
        deviation_bound: exact = every calibration chunk within this of the torch sequential chunk (max abs,
            normalized action units).
        chunks: timed chunks per candidate (plus `warmup` untimed).
        warmup: untimed chunks per candidate first.
        budget_ms: the per-chunk budget (None: one control period of the command).
        window: the Picard window (None: all steps).
        accelerated: the `+aa` candidates' settings (None: `ACCELERATION[scheduler]`).
        max_seconds: no new candidate starts after this much calibration time.
        seed: noise of calibration chunk i: seed + i.
    """

    scheduler: str = "ddim"
    steps: int = 10
    pcm_checkpoint: str | None = None
    backends: tuple[str, ...] = BACKENDS
    threads: tuple[int, ...] | None = None
    tols: tuple[float, ...] = (0.1, 0.03, 0.01)
    deviation_bound: float = 0.01
    chunks: int = 4
    warmup: int = 1
    budget_ms: float | None = None
    window: int | None = None
    accelerated: Mapping[str, Any] | None = None
    max_seconds: float = 30.0
    seed: int = 0

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any], key: str = "sampler", device=None) -> "AutoSettings":
        """Check a `sampler=auto` group (`device`: the policy's, for the backends' runtimes; None: not checked).

        Raises:
            ConfigError: an unknown key, or a value of the wrong type or range (naming `<key>.<field>`).
        """
        known = [f.name for f in dataclasses.fields(cls)]
        unknown_keys(key, {k: v for k, v in cfg.items() if k != "name"}, known)
        get = lambda name: cfg.get(name, getattr(cls, name))  # noqa: E731
        scheduler = check_choice(f"{key}.scheduler", get("scheduler"), SCHEDULERS)
        steps = check_int(f"{key}.steps", get("steps"), 1)
        backends = check_backends(f"{key}.backends", get("backends"), device)
        threads = check_list(f"{key}.threads", get("threads"), "[1,2]", null=True)
        if threads is not None:
            threads = [check_int(f"{key}.threads.{i}", n, 1) for i, n in enumerate(threads)]
            if not threads or len(set(threads)) != len(threads):
                raise ConfigError(f"{key}.threads={show(threads)}: expected distinct thread counts, e.g. [1,2], "
                                  "or null")
        tols = check_list(f"{key}.tols", get("tols"), "[0.1,0.03,0.01]")
        tols = sorted({check_number(f"{key}.tols.{i}", t, 0) for i, t in enumerate(tols)}, reverse=True)
        accelerated = check_mapping(f"{key}.accelerated", get("accelerated"), "{accel: anderson, damping: 0.5}")
        settings = cls(
            scheduler=scheduler, steps=steps,
            pcm_checkpoint=check_text(f"{key}.pcm_checkpoint", get("pcm_checkpoint"), null=True) or None,
            backends=tuple(backends), threads=None if threads is None else tuple(threads),
            tols=tuple(tols), deviation_bound=check_number(f"{key}.deviation_bound", get("deviation_bound"), 0,
                                                           low_open=True),
            chunks=check_int(f"{key}.chunks", get("chunks"), 1), warmup=check_int(f"{key}.warmup", get("warmup"), 0),
            budget_ms=check_number(f"{key}.budget_ms", get("budget_ms"), 0, low_open=True, null=True),
            window=check_int(f"{key}.window", get("window"), 1, steps, null=True),
            accelerated=accelerated or None,
            max_seconds=check_number(f"{key}.max_seconds", get("max_seconds"), 0, low_open=True),
            seed=check_int(f"{key}.seed", get("seed"), 0))
        settings.families()  # every candidate's sampler keys (e.g. accelerated.memory)
        return settings

    @property
    def schedule(self) -> str:
        """The schedule name, e.g. `ddim10`."""
        return schedule_name(self.scheduler, self.steps)

    def acceleration(self) -> dict[str, Any]:
        """The `+aa` candidates' settings."""
        return dict(self.accelerated or ACCELERATION[self.scheduler])

    def families(self, pcm: Card | None = None) -> list[list[SamplerConfig]]:
        """The candidates, family by family, each family's configs from the loosest tol: sequential (the first:
        the reference), Picard + Anderson, then with a PCM its switching sampler (LoRA: weight space, full: output
        space) plain and + Anderson from the start it was trained from, then plain Picard.

        Raises:
            ConfigError: an `accelerated` key that is not a sampler acceleration setting.
        """
        sequential = SamplerConfig(name="sequential", scheduler=self.scheduler, steps=self.steps)
        picard = SamplerConfig(name="picard", scheduler=self.scheduler, steps=self.steps, window=self.window)
        plain = [picard, picard.with_acceleration(self.acceleration(), "sampler.accelerated")]
        if pcm is not None:
            name = "pcm_lora" if pcm.data.get("mode") == "lora" else "pcm"
            switched = dataclasses.replace(picard, name=name, start=pcm.pcm_start)
            plain += [switched, switched.with_acceleration({**self.acceleration(), "start": pcm.pcm_start},
                                                           "sampler.accelerated")]
        order = [1] + ([2, 3] if pcm is not None else []) + [0]  # likely fastest first: pruning bites sooner
        return [[sequential]] + [[dataclasses.replace(plain[i], tol=t) for t in self.tols] for i in order]


def is_auto(group: Any) -> bool:
    """Whether a `sampler=` group is `sampler=auto`."""
    return isinstance(group, Mapping) and group.get("name") == "auto"


def check_backends(key: str, value: Any, device: torch.device | None = None) -> list[str]:
    """A non-empty list of distinct backend names (`pcm_policy.backends.BACKENDS`), each usable here.

    Args:
        key: the option's name, for messages.
        value: the option's value.
        device: the device the policy runs on: on CUDA only `torch` is run (callers skip the others with a
            note), so their runtimes are not checked there (None: not checked either).

    Raises:
        ConfigError: one line: not a non-empty list, an unknown name, one listed twice, or onnx/auto where
            onnxruntime or onnx does not import (naming the pip command).
    """
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{key}={show(value)}: expected a non-empty list drawn from {list(BACKENDS)}, "
                          "e.g. [torch,onnx,auto]")
    for name in value:
        if name not in BACKENDS:
            raise ConfigError(f"{key}={show(value)}: {name!r} is not a backend (expected {', '.join(BACKENDS)})")
    if len(set(value)) != len(value):
        raise ConfigError(f"{key}={show(value)}: lists a backend twice")
    if device is not None and torch.device(device).type != "cuda":
        for name in value:
            check_backend(name, device, key=key)
    return list(value)


def check_auto_pcm(settings: AutoSettings, key: str = "sampler.pcm_checkpoint") -> Card | None:
    """The PCM of `sampler=auto`, checked against its schedule before any work (None: no PCM given).

    Raises:
        ConfigError: a PCM trained for another schedule.
        CheckpointError: an unreadable checkpoint or not a PCM.
    """
    if not settings.pcm_checkpoint:
        return None
    card = Card.open_pcm(key, settings.pcm_checkpoint)
    probe = SamplerConfig(name="pcm_lora" if card.data.get("mode") == "lora" else "pcm",
                          scheduler=settings.scheduler, steps=settings.steps)
    card.check_pcm_for(probe)
    return card


def check_auto(group: Mapping[str, Any], key: str, num_train_timesteps: int | None, source=None,
               pcm_key: str | None = None, pcm_path: str | None = None, device=None,
               backend: str | None = None) -> AutoSettings:
    """A `sampler=auto` group checked against the policy it will run on and its PCM (no weights are read).

    Args:
        group: the sampler group (`name: auto`).
        key: its config key (e.g. `sampler`).
        num_train_timesteps: the policy's T (None: unknown, not checked).
        source: the policy's checkpoint, for messages.
        pcm_key, pcm_path: the option naming the PCM and its value when another option than the group's own
            `pcm_checkpoint` gives it (e.g. the demo's `pcm_lora.ddim10`); used when the group names none.
        device: the policy's device (the backends' runtimes are checked for it; None: not checked).
        backend: a command's `backend=` (already checked): the only backend tried (None: the group's `backends`).

    Raises:
        ConfigError: a bad key, more steps than T, a PCM for another schedule, a backend whose runtime does not
            import.
        CheckpointError: the PCM checkpoint is unreadable or not a PCM.
    """
    settings = AutoSettings.from_mapping(group, key, device)
    if backend is not None:
        settings = dataclasses.replace(settings, backends=(backend,))
    if num_train_timesteps is not None:
        check_steps(f"{key}.steps={settings.steps}", settings.steps, num_train_timesteps, source)
    if not settings.pcm_checkpoint and pcm_path:
        settings = dataclasses.replace(settings, pcm_checkpoint=pcm_path)
    else:
        pcm_key = f"{key}.pcm_checkpoint"
    check_auto_pcm(settings, pcm_key)
    return settings


@dataclass
class AutoChoice:
    """What `choose_sampler` measured and chose.

    Attributes:
        candidates: one entry per (stage, sampler, tol, backend, threads) tried: `stage` (`screen` or `final`),
            `sampler` (label), `schedule`, `tol`, `backend`, `threads`, `p50_ms`, `p99_ms`, `rounds`, `max_dev`,
            `p99_dev` (vs the torch sequential chunks, normalized action units), `exact`, `fits_budget`, `status`
            (`timed`, `pruned: ...`, `not timed: ...`).
        chosen: the chosen entry (a copy of one `final` candidate) plus its `config` (the `SamplerConfig` keys).
        budget_ms: the budget the candidates' p99 (plus the observation's encoding) had to fit.
        deviation_bound: the exactness bound.
        chunks: timed chunks per candidate.
        seconds: calibration wall time.
        encode_ms_p99: the observation encoding's p99 (ms), added to each candidate's p99 for the budget.
        notes: what the reader should know (a budget no exact candidate fits, backends not timed on CUDA).
    """

    candidates: list[dict[str, Any]]
    chosen: dict[str, Any]
    budget_ms: float
    deviation_bound: float
    chunks: int
    seconds: float
    encode_ms_p99: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The record for metrics.json (`auto`)."""
        return dataclasses.asdict(self)

    def table(self) -> str:
        """The calibration table as printed: one line per candidate, the chosen one marked."""
        lines = [f"sampler=auto: {len(self.candidates)} timings, {self.chunks} chunks each, budget "
                 f"{self.budget_ms:.0f} ms, exact = max deviation <= {self.deviation_bound:g} from torch sequential "
                 f"({self.seconds:.1f} s)",
                 f"  {'stage':6s} {'sampler':22s} {'tol':>6s} {'backend':>7s} {'thr':>3s} {'p50 ms':>8s} "
                 f"{'p99 ms':>8s} {'rounds':>6s} {'max dev':>8s}  status"]
        for c in self.candidates:
            mark = "*" if c["stage"] == "final" and _same(c, self.chosen) else " "
            timed = c["p50_ms"] is not None
            status = c["status"] if c["status"] != "timed" else (
                ("exact" if c["exact"] else "inexact") + ("" if c["fits_budget"] else ", over budget"))
            lines.append(f"{mark} {c['stage']:6s} {c['sampler']:22s} "
                         f"{'-' if c['tol'] is None else format(c['tol'], 'g'):>6s} "
                         f"{c['backend']:>7s} {c['threads']:>3d} "
                         f"{format(c['p50_ms'], '.1f') if timed else '':>8s} "
                         f"{format(c['p99_ms'], '.1f') if timed else '':>8s} "
                         f"{format(c['rounds'], '.2f') if timed else '':>6s} "
                         f"{format(c['max_dev'], '.1e') if c['max_dev'] is not None else '':>8s}  {status}")
        c = self.chosen
        lines.append(f"chosen: {c['sampler']} tol {c['tol']} on {c['backend']}, {c['threads']} thread(s): "
                     f"p50 {c['p50_ms']:.1f} ms, p99 {c['p99_ms']:.1f} ms, max deviation {c['max_dev']:.1e}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in ("sampler", "tol", "backend", "threads"))


def calibration_observations(policy, checkpoint: Path, env_id: str | None, max_steps: int, n: int, seed: int):
    """n observation histories for the calibration: drawn from the checkpoint's dataset when it records one that
    exists, else met by the policy in closed-loop rollouts (`rollout_observations`; an imported policy).

    Raises:
        ConfigError: neither a dataset nor an env to roll out in.
        DatasetError: the dataset cannot be read.
    """
    if (Path(checkpoint) / RUN_CONFIG).is_file() and dataset_path(checkpoint).exists():
        return sample_observations(checkpoint, n, seed)
    if env_id is None:
        raise ConfigError(f"sampler=auto: {checkpoint} records no dataset and no env was given to draw observations")
    return rollout_observations(policy, env_id, max_steps, n, seed)


class _Calibration:
    """The timing state of one `choose_sampler` call: every entry timed so far and what it was built from."""

    def __init__(self, policy, settings: AutoSettings, conds: torch.Tensor, budget_ms: float, encode_p99: float):
        self.policy, self.settings, self.conds = policy, settings, conds
        self.budget_ms, self.encode_p99 = budget_ms, encode_p99
        self.candidates: list[dict[str, Any]] = []
        self.built: dict[int, tuple[ChunkSampler, SamplerConfig, Any]] = {}  # entry -> (sampler, config, PCM)
        self.reference: torch.Tensor | None = None
        self.t0 = time.perf_counter()

    def position(self, entry: dict[str, Any]) -> int:
        """The index of `entry` (this very dict) in `candidates`."""
        return next(i for i, c in enumerate(self.candidates) if c is entry)

    def out_of_time(self) -> bool:
        return time.perf_counter() - self.t0 > self.settings.max_seconds

    def best_p50(self) -> float | None:
        exact = [c["p50_ms"] for c in self.candidates if c["exact"]]
        return min(exact) if exact else None

    def _entry(self, config: SamplerConfig, backend: str, threads: int, stage: str) -> dict[str, Any]:
        entry = {"stage": stage, "sampler": config.variant, "schedule": config.schedule,
                 "tol": config.tol if config.name != "sequential" else None, "backend": backend, "threads": threads,
                 "p50_ms": None, "p99_ms": None, "rounds": None, "max_dev": None, "p99_dev": None, "exact": False,
                 "fits_budget": False, "status": "timed"}
        self.candidates.append(entry)
        return entry

    def _build(self, config: SamplerConfig, pcm, backend: str, threads: int) -> Row:
        set_threads(threads)  # before building: an onnx session takes torch's thread count
        return Row(self.policy.sampler(config, pcm=pcm, backend=backend), config.schedule)

    def _record(self, entry: dict[str, Any], parts: list[RowTiming], built: tuple) -> None:
        """Fill `entry` from its timed chunks (in observation order); the first entry is the reference."""
        t = RowTiming.concat(parts)
        if self.reference is None:  # the first candidate is torch sequential: the reference
            self.reference = t.x0
        dev = chunk_deviations(t.x0, self.reference)
        lat = latency_summary(t.latencies)
        entry.update(p50_ms=lat["latency_ms_p50"], p99_ms=lat["latency_ms_p99"], rounds=float(t.iterations.mean()),
                     max_dev=float(dev.max()), p99_dev=float(np.percentile(dev, 99)),
                     exact=bool(t.converged.all()) and float(dev.max()) <= self.settings.deviation_bound,
                     fits_budget=lat["latency_ms_p99"] + self.encode_p99 <= self.budget_ms)
        self.built[self.position(entry)] = built

    def screen(self, config: SamplerConfig, pcm, backend: str, threads: int) -> dict[str, Any]:
        """Time one candidate on every calibration chunk; pruned after its first chunk when slower than
        `PRUNE_FACTOR` x the best exact p50 so far, after its warm-up chunk when twice that."""
        s = self.settings
        entry = self._entry(config, backend, threads, "screen")
        if self.out_of_time():
            entry["status"] = f"not timed: calibration past max_seconds={s.max_seconds:g}"
            return entry
        row = self._build(config, pcm, backend, threads)
        best = self.best_p50()
        for k in range(s.warmup):  # the warm-up pays one-off costs: only a far slower one prunes
            warm = time_row(self.policy, row, self.conds[:1], s.seed, 0, progress=False).latencies[0]
            if k == 0 and best is not None and warm > 2 * PRUNE_FACTOR * best:
                entry["status"] = (f"pruned: warm-up chunk {warm:.1f} ms > {2 * PRUNE_FACTOR:g}x the best exact "
                                   f"p50 {best:.1f} ms")
                return entry
        first = time_row(self.policy, row, self.conds[:1], s.seed, 0, progress=False)
        if best is not None and first.latencies[0] > PRUNE_FACTOR * best:
            entry["status"] = (f"pruned: first chunk {first.latencies[0]:.1f} ms > {PRUNE_FACTOR:g}x the best exact "
                               f"p50 {best:.1f} ms")
            return entry
        parts = [first] + ([time_row(self.policy, row, self.conds[1:], s.seed + 1, 0, progress=False)]
                           if len(self.conds) > 1 else [])
        self._record(entry, parts, (row.sampler, config, pcm))
        return entry

    def final(self, finalists: list[int], threads: Sequence[int]) -> list[dict[str, Any]]:
        """The finalists again at every thread count, interleaved chunk by chunk so that a burst of load on this
        shared machine hits them all alike; a warm-up chunk each first. At a thread count the screen did not time,
        a finalist whose warm-up chunk is slower than 2 `PRUNE_FACTOR` x the best exact screen p50 (the warm-up pays
        one-off costs too) is dropped after it."""
        s, runs, best = self.settings, [], self.best_p50()
        for n in threads:
            for i in finalists:
                _, config, pcm = self.built[i]
                row = self._build(config, pcm, self.candidates[i]["backend"], n)
                entry = self._entry(config, row.backend, n, "final")
                warm = time_row(self.policy, row, self.conds[:1], s.seed, 0, progress=False).latencies[0]
                if n != threads[0] and warm > 2 * PRUNE_FACTOR * best:
                    entry["status"] = (f"pruned: warm-up chunk {warm:.1f} ms > {2 * PRUNE_FACTOR:g}x the best exact "
                                       f"p50 {best:.1f} ms")
                    continue
                runs.append((entry, row, (row.sampler, config, pcm), []))
        for j in range(len(self.conds)):
            for entry, row, _, parts in runs:
                set_threads(entry["threads"])
                parts.append(time_row(self.policy, row, self.conds[j:j + 1], s.seed + j, 0, progress=False))
        for entry, _, built, parts in runs:
            self._record(entry, parts, built)
        return [entry for entry, *_ in runs]


def pick_candidate(candidates: Sequence[Mapping[str, Any]]) -> tuple[int, bool]:
    """The rule of `choose_sampler`: among exact candidates, the lowest p50 of those that fit the budget, else the
    lowest p50 of all exact ones. An inexact candidate is never chosen, however fast.

    Args:
        candidates: `AutoChoice.candidates` entries (`exact`, `fits_budget`, `p50_ms`).

    Returns:
        (index of the choice, whether it fits the budget).

    Raises:
        ValueError: no exact candidate (the torch sequential reference always is one).
    """
    exact = [i for i, c in enumerate(candidates) if c["exact"]]
    if not exact:
        raise ValueError("no exact candidate: the torch sequential reference must be among the candidates")
    fitting = [i for i in exact if candidates[i]["fits_budget"]]
    return min(fitting or exact, key=lambda i: candidates[i]["p50_ms"]), bool(fitting)


def choose_sampler(policy, settings: AutoSettings, observations, budget_ms: float, device=None, echo: bool = True
                   ) -> tuple[ChunkSampler, AutoChoice]:
    """Time every exact candidate sampler of a schedule on this machine and return the fastest that fits the
    budget (module docstring).

    Every candidate samples the same `settings.chunks` observations with the same noise at batch 1 (as the
    controller does); its chunks are compared with torch sequential sampling of the same schedule; exact = every
    chunk converged and lies within `settings.deviation_bound` (max abs, normalized action units). The choice is the
    exact candidate with the lowest p50 among those whose p99 plus the observation's encoding fits `budget_ms`; if
    none fits, the fastest exact one (noted). Torch's intra-op thread count is left at the chosen candidate's.

    Args:
        policy: the base `DiffusionPolicy`.
        settings: the candidates and calibration sizes (`AutoSettings`; `budget_ms` there overrides the argument).
        observations: at least `settings.chunks` observation histories ((n, To, Do) env units, or an image
            policy's {"obs", "image"}), e.g. `calibration_observations`.
        budget_ms: the per-chunk budget, ms (usually one control period).
        device: where a PCM is loaded (None: the policy's device).
        echo: print the calibration table.

    Returns:
        (the chosen `ChunkSampler`, `AutoChoice` with the table).

    Raises:
        ConfigError: a PCM for another schedule; fewer observations than `settings.chunks`.
        CheckpointError: the PCM is unreadable or for another base.
    """
    if observation_count(observations) < settings.chunks:
        raise ConfigError(f"sampler.chunks={settings.chunks}: only {observation_count(observations)} observations "
                          "given for the calibration")
    budget_ms = settings.budget_ms or budget_ms
    card = check_auto_pcm(settings)
    backends = list(settings.backends)
    notes = []
    if policy.device.type == "cuda" and backends != ["torch"]:
        notes.append("on CUDA only the torch backend is timed")
        backends = ["torch"]
    threads = list(settings.threads or [torch.get_num_threads()])
    encoded = encode_observations(policy, select_observations(observations, slice(0, settings.chunks)),
                                  progress=False)
    cal = _Calibration(policy, settings, encoded.conds, budget_ms, float(np.percentile(encoded.encode_ms, 99)))
    pcm = None
    if card is not None:
        pcm, _ = load_pcm(resolve_path(settings.pcm_checkpoint), policy, device or policy.device)

    families = settings.families(card)
    reference = families[0][0]
    cal.screen(reference, None, "torch", threads[0])  # first: every deviation is measured against its chunks
    for configs in families:
        for backend in backends:
            for config in configs:
                if config is reference and backend == "torch":
                    break
                entry = cal.screen(config, pcm if config.needs_pcm else None, backend, threads[0])
                if entry["exact"] or entry["status"] != "timed":
                    break  # a tighter tol is slower; a pruned or untimed one would be too
    best = cal.best_p50()
    finalists = sorted((i for i, c in enumerate(cal.candidates) if c["exact"] and c["p50_ms"] <= PRUNE_FACTOR * best),
                       key=lambda i: cal.candidates[i]["p50_ms"])[:FINALISTS]
    final = cal.final(finalists, threads)
    picked, fits = pick_candidate(final)
    if not fits:
        notes.append(f"no exact candidate fits the {budget_ms:.0f} ms budget: chose the fastest exact one")
    index = cal.position(final[picked])
    sampler, config, _ = cal.built[index]
    chosen = {**cal.candidates[index], "config": dataclasses.asdict(config)}
    set_threads(chosen["threads"])
    choice = AutoChoice(cal.candidates, chosen, budget_ms, settings.deviation_bound, settings.chunks,
                        round(time.perf_counter() - cal.t0, 2), cal.encode_p99, notes)
    if echo:
        print(choice.table())
    return sampler, choice
