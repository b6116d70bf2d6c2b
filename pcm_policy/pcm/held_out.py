"""How many Picard rounds a PCM saves: held-out observations sampled with Picard and with the PCM's switching
samplers, against the sequential sample of the same schedule (`pcm train-pcm` reports it before and after PCT)."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from pcm_policy.chunk_sampler import ChunkSampler
from pcm_policy.pcm.attach import pcm_denoiser
from pcm_policy.policy import observation_count, select_observations
from pcm_policy.sampler_config import SamplerConfig


@torch.no_grad()
def evaluate_iterations(policy, net, sampler: SamplerConfig, observations: torch.Tensor, tol: float, window,
                        stiffness, seed: int, accel: Mapping[str, Any] | None = None) -> dict[str, dict[str, float]]:
    """How many Picard rounds the PCM saves on held-out observations (batch 1, fresh noise per observation).

    For Picard, PCM (output space) and, for a LoRA PCM, PCM-LoRA (weight space): rounds and evaluations to
    converge, and the largest action deviation from the sequential sample (normalized units).

    Args:
        policy: the base policy.
        net: the PCM network (full copy or LoRA).
        sampler: the schedule (scheduler, steps, start) the PCM is trained for.
        observations: (N, To, Do) float32 in env units (an image policy's: with their frames).
        tol: convergence tolerance of the Picard rows.
        window: Picard window (None: all S steps).
        stiffness: switching stiffness of the PCM rows (None: the samplers' default).
        seed: noise seed of observation 0 (observation i uses seed + i).
        accel: SamplerConfig keys (accel, memory, damping, ...): each row again as a `+aa` row.

    Returns:
        {row name: {iterations_mean, evaluations_mean, max_abs_err_vs_sequential, abs_err_p99_vs_sequential,
        observations}}.
    """
    is_lora = any(".lora_A." in k for k in net.state_dict())
    common = dict(scheduler=sampler.scheduler, steps=sampler.steps, tol=tol, window=window, start=sampler.start)
    variants = [common] + ([{**common, **dict(accel)}] if accel else [])
    build = lambda config, pcm=None: ChunkSampler(config, policy.noise_scheduler.config, policy.denoiser, pcm,  # noqa: E731
                                                  device=policy.device)
    reference = build(SamplerConfig(name="sequential", scheduler=sampler.scheduler, steps=sampler.steps))
    samplers = {}
    for variant in variants:
        for name, pcm in (("picard", None), ("pcm", pcm_denoiser(net, "pcm")),
                          ("pcm_lora", pcm_denoiser(net, "pcm_lora") if is_lora else None)):
            if name == "pcm_lora" and pcm is None:
                continue
            config = SamplerConfig(name=name, stiffness=stiffness if name != "picard" else None, **variant)
            samplers[name + ("+aa" if config.accel == "anderson" else "")] = build(config, pcm)
    rows: dict[str, list[tuple[int, int, float]]] = {name: [] for name in samplers}
    for i in range(observation_count(observations)):
        cond = policy.encode(select_observations(observations, slice(i, i + 1)))
        x_T, noise = policy.make_noise(1, sampler, torch.Generator().manual_seed(seed + i))
        ref, _ = reference.sample(x_T, noise, cond)
        for name, chunk_sampler in samplers.items():
            x0, stats = chunk_sampler.sample(x_T, noise, cond)
            rows[name].append((stats.iterations, stats.evaluations, float((x0 - ref).abs().max())))
    return {name: {"iterations_mean": float(np.mean([r[0] for r in v])), "evaluations_mean": float(np.mean([r[1] for r in v])),
                   "max_abs_err_vs_sequential": float(np.max([r[2] for r in v])),
                   "abs_err_p99_vs_sequential": float(np.percentile([r[2] for r in v], 99)), "observations": len(v)}
            for name, v in rows.items()}
