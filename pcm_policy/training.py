"""`pcm train`: fit a DiffusionPolicy on a demonstration dataset (AdamW, cosine LR with warm-up, EMA).

Batches are drawn by a deterministic schedule (a seeded permutation per epoch), so a resumed run sees exactly
the batches the uninterrupted run would have seen. Checkpoints are atomic directories; re-running the same
command resumes from the latest one.

Under torchrun (`torchrun --nproc_per_node=N -m pcm_policy.cli train ...`) the model is wrapped in
DistributedDataParallel and each process trains on its share of the same global batch (see
pcm_policy.distributed); rank 0 alone writes checkpoints, logs, plots and metrics.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from pcm_policy import checkpoint as ckpt_io
from pcm_policy import distributed
from pcm_policy.atomic import atomic_write_text
from pcm_policy.config import resolve_path
from pcm_policy.data.windows import Windows, build_dataset
from pcm_policy.errors import CheckpointError, ConfigError, PcmError
from pcm_policy.policy import DiffusionPolicy, PolicyConfig
from pcm_policy.runtime import resolve_device, seed_everything


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Indices of the global batch for `step`: epochs are seeded permutations, the last partial batch dropped.

    Args:
        n: number of training windows.
        batch_size: global batch size.
        seed: the run's seed; epoch e uses the permutation seeded with `seed * 1_000_003 + e`.
        step: 0-based optimizer step.

    Returns:
        int64 indices into the windows, shape (batch_size,); with n < batch_size the epoch's permutation is
        repeated to fill the batch.
    """
    per_epoch = max(n // batch_size, 1)
    epoch, offset = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    if n < batch_size:  # tiny datasets: sample with replacement to fill a batch
        return perm[torch.arange(batch_size) % n]
    return perm[offset * batch_size:(offset + 1) * batch_size]


def policy_card(cfg: Mapping[str, Any], policy_config: PolicyConfig, kind: str = "base") -> dict[str, Any]:
    """The card (`policy.yaml`) of a checkpoint trained with `cfg`.

    Args:
        cfg: the composed run config (reads `task.name`, `task.env_id`, `dataset.path`, `dataset.abs_action`).
        policy_config: the network shape and noise schedule, stored as the card's `policy` section.
        kind: `base` (a Diffusion Policy) or `pcm`.

    Returns:
        {"kind", "task", "env_id", "dataset", "abs_action", "policy"}.
    """
    task = cfg["task"]
    return {"kind": kind, "task": task["name"], "env_id": task.get("env_id"), "dataset": cfg["dataset"].get("path"),
            "abs_action": bool(cfg["dataset"].get("abs_action", False)), "policy": policy_config.to_dict()}


class _StopRequested(Exception):
    pass


def train(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Train a DiffusionPolicy as `cfg` (`configs/train.yaml`) says, resuming from the latest checkpoint in
    `output_dir` if there is one.

    Every option is checked first (`pcm_policy.validation`); a refusal raises a PcmError and writes nothing.
    Writes under `output_dir`: `checkpoints/step_*` (every `train.checkpoint_every` steps, at the end and on
    SIGINT; the newest `train.keep_checkpoints` kept), `log.jsonl` (train loss every `train.log_every` steps,
    EMA validation loss at each checkpoint), `loss.png` and `metrics.json`.

    Args:
        cfg: the composed `train` config.

    Returns:
        The run's metrics (`metrics.json`): command, task, steps, resumed_from, final_loss and val_loss (the
        diffusion objective's MSE in normalized units; None without logged steps / validation windows),
        train_windows, episodes, wall_s (s), checkpoint, device, processes; on ranks other than 0 of a torchrun
        job only {"rank": r}.

    Raises:
        ConfigError: an invalid option, or a non-finite training loss (an output folder this run created is
            removed when it holds no checkpoint).
        DatasetError: the dataset is missing, corrupt or incomplete.
        CheckpointError: `output_dir` holds a checkpoint of another task or policy shape, or one without a
            train state.
        SystemExit: status 130 after SIGINT, once the current step's checkpoint is saved.
    """
    from pcm_policy.validation import validate_train

    validate_train(cfg)  # (with train.batch_size divisible by the torchrun processes)
    device = resolve_device(cfg.get("device"))
    with distributed.session(device) as ctx:
        return _train(cfg, ctx)


def _train(cfg: Mapping[str, Any], ctx: distributed.Dist) -> dict[str, Any]:
    tcfg = cfg["train"]
    out = Path(cfg["output_dir"])
    device = ctx.device  # cuda:LOCAL_RANK under torchrun on CUDA
    seed_everything(cfg["seed"])

    dataset = build_dataset(cfg)
    val_dataset = dataset.get_validation_dataset()
    train_windows = Windows.from_dataset(dataset)
    val_windows = Windows.from_dataset(val_dataset) if len(val_dataset) else None
    policy_config = PolicyConfig.from_mapping(cfg["policy"], obs_dim=dataset.obs_dim, action_dim=dataset.action_dim)
    policy = DiffusionPolicy(policy_config, dataset.get_normalizer(cfg["dataset"].get("normalizer", "limits"))).to(device)
    card = policy_card(cfg, policy_config)
    latest = ckpt_io.latest_checkpoint(out)
    init_from = tcfg.get("init_from")
    if init_from and latest is None:  # a resumed run already holds its own weights
        _init_weights(init_from, card, policy)
    model = ctx.wrap(policy.model)  # DDP (or the network itself): the forward pass whose gradients are averaged

    steps = int(tcfg["steps"])
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=tcfg["lr"], betas=tuple(tcfg["betas"]),
                                  weight_decay=tcfg["weight_decay"])
    lr_schedule = get_scheduler(tcfg["lr_scheduler"], optimizer, num_warmup_steps=min(tcfg["warmup_steps"], steps // 10),
                                num_training_steps=steps)
    ema = EMAModel(policy.model.parameters(), decay=tcfg["ema_max_decay"], use_ema_warmup=True,
                   power=tcfg["ema_power"], inv_gamma=1.0)

    start_step = 0
    if latest is not None:
        start_step = _resume(latest, cfg, card, policy, optimizer, lr_schedule, ema)
        if ctx.is_main:
            print(f"resuming from {latest} (step {start_step})")

    log_path = out / "log.jsonl"
    created = not out.exists()  # a run refused before its first checkpoint removes the folder it made
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    history: list[dict[str, Any]] = []
    stop = {"flag": False}

    def request_stop(signum, frame):  # SIGINT: finish the current step, save, exit cleanly
        stop["flag"] = True

    previous_handler = signal.signal(signal.SIGINT, request_stop)
    t0 = time.perf_counter()
    step = start_step
    bar = tqdm(total=steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True, disable=not ctx.is_main)
    try:
        policy.train()
        with open(log_path, "a") if ctx.is_main else contextlib.nullcontext() as log:
            while step < steps:
                idx = batch_indices(len(train_windows), tcfg["batch_size"], cfg["seed"], step)
                # Every rank draws the noise of the whole global batch and keeps its own rows, so each row is
                # trained on exactly the noise and timestep it gets in a single process.
                gen = torch.Generator(device=device).manual_seed(cfg["seed"] * 7919 + step)
                noise, timesteps = policy.loss_noise((len(idx), *train_windows.action.shape[1:]), gen, device)
                rows = ctx.shard(len(idx))
                batch = {"obs": train_windows.obs[idx[rows]].to(device),
                         "action": train_windows.action[idx[rows]].to(device)}
                loss = policy.compute_loss(batch, noise=(noise[rows], timesteps[rows]), model=model)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                lr_schedule.step()
                ema.step(policy.model.parameters())
                step += 1
                # The whole batch's loss, and whether any rank got SIGINT, so all ranks stop at the same step.
                loss_value, stop_any = ctx.mean([float(loss.detach()), float(stop["flag"])])
                stop["flag"] = stop_any > 0
                if not math.isfinite(loss_value):
                    raise ConfigError(f"train: loss became {loss_value} at step {step} (lower train.lr?)")
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}")
                if ctx.is_main and (step % tcfg["log_every"] == 0 or step == steps):
                    record = {"step": step, "loss": loss_value, "lr": lr_schedule.get_last_lr()[0],
                              "wall_s": round(time.perf_counter() - t0, 3)}
                    history.append(record)
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                if ctx.is_main and (step % tcfg["checkpoint_every"] == 0 or step == steps or stop["flag"]):
                    val = _val_loss(policy, ema, val_windows, cfg["seed"], device)
                    if val is not None:
                        log.write(json.dumps({"step": step, "val_loss": val}) + "\n")
                        log.flush()
                    _save(out, step, cfg, card, policy, optimizer, lr_schedule, ema, tcfg["keep_checkpoints"])
                if stop["flag"]:
                    raise _StopRequested
    except _StopRequested:
        bar.close()
        if ctx.is_main:
            print(f"interrupted: checkpoint saved at step {step} in {out / 'checkpoints'}; re-run to resume")
        raise SystemExit(130)
    except PcmError:  # e.g. the loss became NaN: nothing resumable was made, so leave no folder behind
        if ctx.is_main and created and ckpt_io.latest_checkpoint(out) is None:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        bar.close()
        signal.signal(signal.SIGINT, previous_handler)

    if not ctx.is_main:
        return {"rank": ctx.rank}
    final = ckpt_io.latest_checkpoint(out)
    metrics = {"command": "train", "task": card["task"], "steps": steps, "resumed_from": start_step,
               "final_loss": history[-1]["loss"] if history else None,
               "val_loss": _val_loss(policy, ema, val_windows, cfg["seed"], device),
               "train_windows": len(train_windows), "episodes": dataset.n_episodes,
               "wall_s": round(time.perf_counter() - t0, 2), "checkpoint": str(final), "device": str(device),
               "processes": ctx.world_size, "init_from": init_from}
    _plot_loss(out, log_path)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


@torch.no_grad()
def _val_loss(policy: DiffusionPolicy, ema: EMAModel, windows: Windows | None, seed: int, device) -> float | None:
    if windows is None or len(windows) == 0:
        return None
    ema.store(policy.model.parameters())
    ema.copy_to(policy.model.parameters())
    try:
        n = min(len(windows), 1024)
        batch = {"obs": windows.obs[:n].to(device), "action": windows.action[:n].to(device)}
        return float(policy.compute_loss(batch, generator=torch.Generator(device=device).manual_seed(seed)))
    finally:
        ema.restore(policy.model.parameters())


def _ema_weights(policy: DiffusionPolicy, ema: EMAModel) -> dict[str, torch.Tensor]:
    ema.store(policy.model.parameters())
    ema.copy_to(policy.model.parameters())
    try:
        return {k: v.clone() for k, v in policy.weights().items()}
    finally:
        ema.restore(policy.model.parameters())


def _save(out: Path, step: int, cfg, card, policy, optimizer, lr_schedule, ema, keep: int) -> None:
    train_state = {
        "step": step,
        "model": {k: v.detach().cpu() for k, v in policy.model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "lr_schedule": lr_schedule.state_dict(),
        "ema": ema.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    ckpt_io.save_checkpoint(ckpt_io.step_dir(out, step), card, _ema_weights(policy, ema), config=cfg,
                            train_state=train_state)
    ckpt_io.prune_checkpoints(out, keep)


def _init_weights(init_from: str, card: Mapping[str, Any], policy: DiffusionPolicy) -> None:
    """Start from another run's network weights (fine-tuning); the normalizer stays the one fitted on this
    run's dataset, so actions outside the old range remain reachable under clip_sample. Task and network shape
    were checked by validate_train; the observation and action sizes are known only once the data is read."""
    ckpt = ckpt_io.resolve_checkpoint(resolve_path(init_from))
    old = ckpt_io.read_card(ckpt)["policy"]
    for dim in ("obs_dim", "action_dim"):
        if old.get(dim) != card["policy"][dim]:
            raise CheckpointError(f"train.init_from={init_from}: checkpoint {ckpt} has {dim}={old.get(dim)}, "
                                  f"this run's dataset {card['policy'][dim]}")
    state = ckpt_io.read_weights(ckpt / ckpt_io.POLICY_WEIGHTS)
    # copy_ casts, so fp16 exported weights start an fp32 run
    policy.model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})


def _resume(latest: Path, cfg, card, policy, optimizer, lr_schedule, ema) -> int:
    old_card = ckpt_io.read_card(latest)
    if old_card.get("task") != card["task"] or old_card.get("policy") != card["policy"]:
        raise CheckpointError(f"{latest}: existing checkpoint in output_dir was made with another task or policy "
                              f"shape ({old_card.get('task')}); use a new output_dir")
    state = ckpt_io.read_train_state(latest)
    if state is None:
        raise CheckpointError(f"{latest}: no {ckpt_io.TRAIN_STATE}; cannot resume training from it")
    optimizer.load_state_dict(state["optimizer"])
    lr_schedule.load_state_dict(state["lr_schedule"])
    ema.load_state_dict(state["ema"])
    torch.set_rng_state(state["torch_rng"])
    # The saved normalizer wins over the one just fitted; then the online (non-EMA) weights continue training.
    policy.load_weights(ckpt_io.read_weights(latest / ckpt_io.POLICY_WEIGHTS), source=str(latest))
    policy.model.load_state_dict(state["model"])
    return int(state["step"])


def _plot_loss(out: Path, log_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train loss")
    if val_rows:
        ax.plot([r["step"] for r in val_rows], [r["val_loss"] for r in val_rows], "o-", label="val loss (EMA)")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)
