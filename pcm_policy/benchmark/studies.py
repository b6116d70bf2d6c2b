"""The bench's studies beyond latency: closed-loop episodes per row under the real-time controller, and the
early-stop study (anytime quality of every iterative sampler capped at 1, 2, 3 rounds against DDIM with as many
steps)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from pcm_policy.benchmark.rows import Row, time_row
from pcm_policy.chunk_sampler import ChunkSampler
from pcm_policy.control import Controller, ControllerConfig
from pcm_policy.rollout.results import summarize
from pcm_policy.sampler_config import SamplerConfig, schedule_name


@dataclass(frozen=True)
class EpisodeSettings:
    """Where and how the studies' closed-loop episodes run.

    Attributes:
        task: the task name (its scoring).
        env_id: the env.
        max_steps: time limit per episode, in control steps.
        control_hz: the control frequency (Hz).
        budget_ms: the per-chunk deadline (None: one control period).
        seed: the controller's noise seed.
        seed_start: the first episode's reset seed.
    """

    task: str
    env_id: str
    max_steps: int
    control_hz: float
    budget_ms: float | None
    seed: int
    seed_start: int


def run_episodes(policy, sampler: ChunkSampler, settings: EpisodeSettings, episodes: int, desc: str
                 ) -> dict[str, Any]:
    """Closed-loop episodes under the real-time controller (simulated clock).

    Returns:
        {"success_rate", "score", "episodes"}.
    """
    # gymnasium and the simulators load only when episodes are asked for (the bench's default runs none)
    from pcm_policy.rollout.controlled import run_controller_episodes

    ctrl = Controller(policy, sampler, ControllerConfig(control_hz=settings.control_hz, budget_ms=settings.budget_ms),
                      seed=settings.seed)
    run = run_controller_episodes(ctrl, settings.env_id, settings.max_steps, episodes, settings.seed_start,
                                  desc=f"closed loop {desc}")
    s = summarize(run.results, settings.task)
    return {"success_rate": s["success_rate"], "score": s["score"], "episodes": s["episodes"]}


def closed_loop_rows(policy, rows: list[Row], results: list[dict], settings: EpisodeSettings, episodes: int,
                     schedules: Sequence[str] | None) -> None:
    """Add success/score over `episodes` episodes to the result of every eager row of `schedules` (None: all)."""
    for row, result in zip(rows, results):
        if row.graph:  # same outputs as the eager row; closed-loop figures would repeat it
            continue
        if schedules is not None and row.schedule not in schedules:
            continue
        result.update(run_episodes(policy, row.sampler, settings, episodes, row.name))


def early_stop_study(policy, rows: list[Row], conds: torch.Tensor, references: dict[str, torch.Tensor],
                     chunks: int, seed: int, settings: EpisodeSettings, episodes: int,
                     schedules: Sequence[str] | None) -> list[dict]:
    """Anytime quality: each iterative sampler capped at 1, 2, 3 sequential rounds against DDIM with as many steps.

    Args:
        policy: the base policy.
        rows: the bench rows.
        conds: (n, C) the observations' global conditions (`EncodedObservations.conds`).
        references: schedule -> its sequential chunks.
        chunks: chunks per capped sampler (at most those of the reference).
        seed: the noise seed of chunk 0.
        settings: where closed-loop episodes run.
        episodes: closed-loop episodes per capped sampler (0: none).
        schedules: schedules whose capped samplers run episodes (None: all).

    Returns:
        One entry per (cap, sampler): mean abs action error against the sequential sampler of the row's schedule
        (normalized units) and, with episodes, closed-loop success/score.
    """
    study, ddim_loop = [], {}
    # the DDIM comparison rows run on the backend of the schedule's own sequential row
    ref_backend = {r.schedule: r.sampler.backend for r in rows if r.config.name == "sequential" and not r.graph}
    for schedule, ref_all in references.items():
        n = min(len(ref_all), chunks)
        ref = ref_all[:n]
        closed = episodes > 0 and (schedules is None or schedule in schedules)
        for cap in (1, 2, 3):
            for row in rows:
                if row.schedule != schedule or row.config.name == "sequential" or row.graph:
                    continue
                x0 = time_row(policy, row, conds[:n], seed, 0, max_iters=cap, progress=False).x0
                entry = {"rounds": cap, "sampler": row.name, "reference": f"sequential/{schedule}",
                         "mean_abs_err": float((x0 - ref).abs().mean())}
                if closed:
                    # the PCM network rebuilds the row's PCM denoiser on its backend; a torch row built from a
                    # denoiser callable alone reuses that
                    pcm = row.pcm if row.pcm is not None else row.sampler.pcm
                    capped = policy.sampler(dataclasses.replace(row.config, max_iters=cap), pcm=pcm,
                                            backend=row.sampler.backend)
                    entry.update(run_episodes(policy, capped, settings, episodes, f"{row.name} <= {cap} rounds"))
                study.append(entry)
            backend = ref_backend.get(schedule, "torch")
            ddim = Row(policy.sampler(SamplerConfig(name="sequential", scheduler="ddim", steps=cap), backend=backend),
                       schedule_name("ddim", cap))
            x0 = time_row(policy, ddim, conds[:n], seed, 0, progress=False).x0
            entry = {"rounds": cap, "sampler": f"sequential/{ddim.schedule}", "reference": f"sequential/{schedule}",
                     "mean_abs_err": float((x0 - ref).abs().mean())}
            if closed:
                if cap not in ddim_loop:  # the same sampler whatever the reference: run its episodes once
                    ddim_loop[cap] = run_episodes(policy, ddim.sampler, settings, episodes, ddim.name)
                entry.update(ddim_loop[cap])
            study.append(entry)
    return study
