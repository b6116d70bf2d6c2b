"""Picard Consistency Training of a PCM for a trained base policy (PCM, arXiv 2503.19731): `pcm train-pcm`.

1. Collect: run full-window base-model Picard on observation histories and store every iterate X^0..X^K and the
   fixed point X* (`pcm_policy.pcm.trajectories`: resumable shards).
2. Train: draw a trajectory and an iterate k, take ONE Picard step with the PCM weights and regress it onto
   X*, weighted by alpha(k) = 1/sqrt(Var(k)) (`pcm_policy.pcm.loss`); Adam, parameter EMA 0.999.
   `mode=lora` trains a low-rank delta on the frozen base, `mode=full` a full copy.
3. Evaluate on held-out observations: Picard rounds to converge with the base alone, and with the PCM and
   model switching (output space, and weight space for LoRA), before and after training (`pcm_policy.pcm.held_out`).

Under torchrun the collection is split by batch over the processes, and the PCM network is wrapped in
DistributedDataParallel with each process training on its rows of the same global batch (pcm_policy.distributed);
rank 0 alone evaluates and writes checkpoints and metrics.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from pcm_policy import checkpoint as ckpt_io
from pcm_policy import distributed
from pcm_policy.atomic import atomic_write_text
from pcm_policy.errors import CheckpointError, ConfigError
from pcm_policy.observations import ObservationSource
from pcm_policy.options import check_choice, check_int, check_number
from pcm_policy.pcm.attach import build_pcm_network, pcm_denoiser
from pcm_policy.pcm.held_out import evaluate_iterations
from pcm_policy.pcm.loss import SLOT_WEIGHTINGS, pct_loss, slot_weights
from pcm_policy.pcm.trajectories import TrajectorySet, collect
from pcm_policy.policy import observation_count
from pcm_policy.runtime import seed_everything
from pcm_policy.sampler_config import SCHEDULERS, STARTS, SamplerConfig
from pcm_policy.sampling.schedule import StepCoefficients

MODES = ("lora", "full")


@dataclass(frozen=True)
class PctSettings:
    """What a PCT run trains and how: the keys of `configs/train_pcm.yaml` other than the base, the observation
    source and the runtime.

    Attributes:
        mode: `lora` (a low-rank delta on the frozen base) or `full` (a full copy).
        lora_rank: LoRA rank r.
        lora_alpha: LoRA scaling numerator (None = rank, scale 1).
        scheduler: `ddpm` or `ddim`: the base sampler whose Picard trajectory the PCM learns.
        steps: its sampling steps S.
        start: Picard's X^0 for collection and evaluation (`x_T`, `noise_sum`, `x0_chain`).
        collect_batch: observations per collection shard.
        collect_tol: convergence tolerance of the collected fixed points X*.
        collect_max_iters: cap on collection rounds (None: until converged).
        max_k: train on iterates k < max_k only (None: all).
        slot_weighting: loss weights over the window's slots: `uniform`, `linear` (toward the last slots), `final`
            (the output slot alone); see `pcm_policy.pcm.loss.slot_weights`.
        epochs: passes over the trajectories.
        batch_size: global batch (divisible by the torchrun processes).
        lr: Adam learning rate.
        ema_decay: parameter EMA decay in [0, 1].
        checkpoint_every: epochs between checkpoints.
        eval_tol: tolerance of the held-out round counts.
        eval_window: Picard window of the held-out counts (None: all S steps).
        eval_accel: acceleration settings (accel, memory, damping, ...) for extra `+aa` held-out rows; None: none.
        stiffness: switching stiffness of the held-out PCM rows (None: the samplers' default).

    Raises:
        ConfigError: a value of the wrong type or range, naming its key.
    """

    mode: str = "lora"
    lora_rank: int = 64
    lora_alpha: float | None = None
    scheduler: str = "ddim"
    steps: int = 10
    start: str = "x_T"
    collect_batch: int = 256
    collect_tol: float = 1e-3
    collect_max_iters: int | None = None
    max_k: int | None = 1
    slot_weighting: str = "uniform"
    epochs: int = 20
    batch_size: int = 32
    lr: float = 5e-4
    ema_decay: float = 0.999
    checkpoint_every: int = 5
    eval_tol: float = 0.1
    eval_window: int | None = None
    eval_accel: dict | None = field(default=None, hash=False)
    stiffness: float | None = None

    def __post_init__(self):
        check_choice("mode", self.mode, MODES)
        check_int("lora_rank", self.lora_rank, 1)
        check_number("lora_alpha", self.lora_alpha, 0, low_open=True, null=True)
        check_choice("scheduler", self.scheduler, SCHEDULERS)
        check_int("steps", self.steps, 1)
        check_choice("start", self.start, STARTS)
        check_int("collect_batch", self.collect_batch, 1)
        check_number("collect_tol", self.collect_tol, 0)
        check_int("collect_max_iters", self.collect_max_iters, 1, null=True)
        check_int("max_k", self.max_k, 1, null=True)
        check_choice("slot_weighting", self.slot_weighting, SLOT_WEIGHTINGS)
        check_int("epochs", self.epochs, 1)
        distributed.require_divisible(check_int("batch_size", self.batch_size, 1), "batch_size")
        check_number("lr", self.lr, 0, low_open=True)
        check_number("ema_decay", self.ema_decay, 0, 1)
        check_int("checkpoint_every", self.checkpoint_every, 1)
        check_number("eval_tol", self.eval_tol, 0)
        check_int("eval_window", self.eval_window, 1, self.steps, null=True,
                  why=f" (steps={self.steps}; null = all steps)")
        check_number("stiffness", self.stiffness, 0, low_open=True, null=True)
        if self.eval_accel:
            self.sampler.with_acceleration(self.eval_accel, "eval_accel")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> "PctSettings":
        """Read the PCT keys of a `train_pcm` config (absent ones take their defaults).

        Raises:
            ConfigError: see the class.
        """
        known = [f for f in cls.__dataclass_fields__ if f in cfg]
        return cls(**{k: cfg[k] for k in known})

    @property
    def sampler(self) -> SamplerConfig:
        """The base Picard sampler (schedule and start) the PCM is trained for."""
        return SamplerConfig(name="picard", scheduler=self.scheduler, steps=self.steps, start=self.start)


def train_pcm(settings: PctSettings, base: Path, observations: ObservationSource, output_dir: Path, seed: int,
              device: torch.device, env_id: str | None = None) -> dict[str, Any]:
    """Collect, train, evaluate (see the module docstring); resumes from `output_dir`.

    Args:
        settings: what to train and how.
        base: the base checkpoint directory (its weights are frozen; the PCM records their fingerprint).
        observations: where the training and held-out observation histories come from.
        output_dir: the run directory (trajectories, checkpoints, metrics.json, pct_loss.png).
        seed: the run's seed.
        device: where to train (under torchrun on CUDA: cuda:LOCAL_RANK).
        env_id: the env the base policy runs in (closed-loop observations only; `Card.env_id`).

    Returns:
        The metrics also written to `output_dir/metrics.json` (iterations before/after, losses, timings in s);
        on ranks other than 0 of a torchrun job {"rank": r}.

    Raises:
        ConfigError: collected data from other settings, or an epoch's last batch smaller than the processes.
        CheckpointError: an unusable base checkpoint, or `output_dir` holding a PCM for another base or mode.
        DatasetError: the observation dataset is missing or corrupt.
    """
    with distributed.session(device) as ctx:
        return _train_pcm(settings, base, observations, Path(output_dir), seed, env_id, ctx)


def _train_pcm(s: PctSettings, base_ckpt: Path, source: ObservationSource, out: Path, seed: int,
               env_id: str | None, ctx: distributed.Dist) -> dict[str, Any]:
    device = ctx.device
    seed_everything(seed)
    policy, base_card = ckpt_io.load_policy(base_ckpt, device)
    for p in policy.model.parameters():
        p.requires_grad_(False)
    fingerprint = ckpt_io.weights_fingerprint(*policy.trained_modules())
    sampler = s.sampler
    t0 = time.perf_counter()

    train_obs, eval_obs = source.sets(base_ckpt, seed, policy, env_id, out / "observations.safetensors")
    last = observation_count(train_obs) % s.batch_size
    if 0 < last < ctx.world_size:  # every process needs at least one row of every batch
        raise ConfigError(f"trajectories: the last batch of an epoch has {last} trajectories "
                          f"({observation_count(train_obs)} % batch_size={s.batch_size}), fewer than the "
                          f"{ctx.world_size} processes")
    shards = collect(policy, sampler, train_obs, out, fingerprint, s.collect_batch, s.collect_tol,
                     s.collect_max_iters, seed, source.kind, ctx)
    trajectories = TrajectorySet(shards)
    collect_s = time.perf_counter() - t0
    alpha = trajectories.alpha().to(device)
    coeffs = StepCoefficients.from_scheduler(policy.scheduler_for(sampler), device, torch.float32)
    slot_weight = slot_weights(s.slot_weighting, s.steps + 1).to(device)

    net = build_pcm_network(policy.model, s.mode, s.lora_rank, s.lora_alpha).to(device)
    eval_kw = dict(tol=s.eval_tol, window=s.eval_window, stiffness=s.stiffness, seed=seed + 1, accel=s.eval_accel)
    before = evaluate_iterations(policy, net, sampler, eval_obs, **eval_kw) if ctx.is_main else None
    train_net = ctx.wrap(net)  # DDP (or net itself); wrapped before the EMA copies the (broadcast) weights

    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=s.lr)
    ema = EMAModel(params, decay=s.ema_decay)
    steps_per_epoch = max(1, math.ceil(len(trajectories) / s.batch_size))
    total = steps_per_epoch * s.epochs
    card = {"kind": "pcm", "mode": s.mode, "lora_rank": s.lora_rank, "lora_alpha": s.lora_alpha,
            "base": str(base_ckpt), "base_fingerprint": fingerprint, "task": base_card["task"],
            "env_id": env_id or base_card.get("env_id"), "scheduler": s.scheduler, "steps": s.steps,
            "start": sampler.start, "observations": source.kind,
            "slot_weighting": s.slot_weighting, "policy": base_card["policy"]}

    step, epoch_losses = 0, []
    latest = ckpt_io.latest_checkpoint(out)
    if latest is not None:
        step, epoch_losses = _resume(latest, card, net, optimizer, ema)
    pcm = pcm_denoiser(train_net, "pcm")
    bar = tqdm(total=total, initial=step, desc=f"PCT ({s.mode})", unit="step", dynamic_ncols=True,
               disable=not ctx.is_main)
    net.train()
    while step < total:
        epoch = step // steps_per_epoch
        perm = torch.randperm(len(trajectories), generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        losses = []
        for b in range(step % steps_per_epoch, steps_per_epoch):
            idx = perm[b * s.batch_size:(b + 1) * s.batch_size]
            g = torch.Generator().manual_seed(seed * 104_729 + step)
            xk, k, xstar, noise, cond = trajectories.batch(idx, g, device, s.max_k)
            if ctx.enabled:  # this rank's rows of the global batch (every rank draws the same k for each row)
                rows = ctx.shard(len(idx))
                xk, k, xstar, noise, cond = xk[:, rows], k[rows], xstar[:, rows], noise[:, rows], cond[rows]
            weight = ctx.loss_weight(len(idx))  # 1.0 unless an epoch's last batch splits unevenly
            loss = pct_loss(pcm, coeffs, xk, k, xstar, coeffs.noise_terms(noise), cond, alpha=alpha,
                            slot_weight=slot_weight)
            optimizer.zero_grad(set_to_none=True)
            (loss * weight).backward()
            optimizer.step()
            ema.step(params)
            step += 1
            losses.append(ctx.mean([float(loss.detach()) * weight])[0])  # the whole batch's loss
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.4f}")
        epoch_losses.append(float(np.mean(losses)) if losses else float("nan"))
        if ctx.is_main and ((epoch + 1) % s.checkpoint_every == 0 or step >= total):
            _save(out, step, card, net, optimizer, ema, params, epoch_losses)
    bar.close()

    ema.copy_to(params)  # evaluate (and ship) the EMA weights
    net.eval()
    if not ctx.is_main:
        return {"rank": ctx.rank}
    after = evaluate_iterations(policy, net, sampler, eval_obs, **eval_kw)
    metrics = {"command": "train-pcm", "task": base_card["task"], "mode": s.mode, "base": str(base_ckpt),
               "trajectories": len(trajectories), "epochs": s.epochs, "steps": total,
               "loss_per_epoch": epoch_losses, "collect_s": round(collect_s, 1),
               "wall_s": round(time.perf_counter() - t0, 1), "eval_tol": s.eval_tol, "before": before, "after": after,
               "iteration_speedup_vs_picard": after["picard"]["iterations_mean"] / max(after["pcm"]["iterations_mean"], 1e-9),
               "checkpoint": str(ckpt_io.latest_checkpoint(out)), "device": str(device),
               "processes": ctx.world_size}
    if "pcm_lora" in after:
        metrics["lora_iteration_speedup_vs_picard"] = after["picard"]["iterations_mean"] / max(after["pcm_lora"]["iterations_mean"], 1e-9)
    _plot(out, epoch_losses)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def _pcm_weights(net: torch.nn.Module, mode: str) -> dict[str, torch.Tensor]:
    state = net.state_dict()
    if mode == "lora":
        state = {k: v for k, v in state.items() if ".lora_A." in f".{k}" or ".lora_B." in f".{k}"}
    return {f"model.{k}": v.detach().clone() for k, v in state.items()}


def _save(out: Path, step: int, card, net, optimizer, ema: EMAModel, params, epoch_losses) -> None:
    ema.store(params)
    ema.copy_to(params)
    weights = _pcm_weights(net, card["mode"])
    ema.restore(params)
    state = {"step": step, "optimizer": optimizer.state_dict(), "ema": ema.state_dict(),
             "online": [p.detach().cpu().clone() for p in params],
             "epoch_losses": torch.tensor(epoch_losses, dtype=torch.float64)}  # float64: exact on resume
    ckpt_io.save_checkpoint(ckpt_io.step_dir(out, step), card, weights, train_state=state)
    ckpt_io.prune_checkpoints(out, 2)


def _resume(latest: Path, card, net, optimizer, ema) -> tuple[int, list[float]]:
    old = ckpt_io.read_card(latest)
    if old.get("base_fingerprint") != card["base_fingerprint"] or old.get("mode") != card["mode"] \
            or old.get("lora_rank") != card["lora_rank"]:
        raise CheckpointError(f"{latest}: output_dir holds a PCM for another base or mode; use a new output_dir")
    state = ckpt_io.read_train_state(latest)
    if state is None:
        raise CheckpointError(f"{latest}: no train state; cannot resume")
    params = [p for p in net.parameters() if p.requires_grad]
    with torch.no_grad():
        for p, v in zip(params, state["online"]):
            p.copy_(v)
    optimizer.load_state_dict(state["optimizer"])
    ema.load_state_dict(state["ema"])
    if distributed.is_main():
        print(f"resuming PCT from {latest} (step {state['step']})")
    return int(state["step"]), [float(x) for x in state["epoch_losses"].tolist()]


def _plot(out: Path, epoch_losses: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(epoch_losses) + 1), epoch_losses, "o-")
    ax.set_xlabel("epoch")
    ax.set_ylabel("PCT loss (alpha-weighted)")
    ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out / "pct_loss.png", dpi=100)
    plt.close(fig)
