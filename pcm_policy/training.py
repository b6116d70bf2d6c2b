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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from pcm_policy import checkpoint as ckpt_io
from pcm_policy import distributed
from pcm_policy.atomic import atomic_write_text
from pcm_policy.data.lowdim_dataset import DatasetConfig
from pcm_policy.data.stacked_windows import Windows, load_dataset
from pcm_policy.errors import CheckpointError, ConfigError, PcmError
from pcm_policy.options import check_choice, check_int, check_number, check_text, show, unknown_keys
from pcm_policy.paths import resolve_path
from pcm_policy.policy import DiffusionPolicy, PolicyConfig
from pcm_policy.runtime import seed_everything

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


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


@dataclass(frozen=True)
class TrainSettings:
    """The optimisation keys of `pcm train` (the `train` group, `configs/train/default.yaml`).

    Attributes:
        steps: optimizer steps.
        batch_size: global batch (divisible by the torchrun processes).
        lr: AdamW learning rate.
        betas: AdamW betas, each in [0, 1).
        weight_decay: AdamW weight decay (>= 0).
        lr_scheduler: a diffusers `get_scheduler` name (`LR_SCHEDULERS`).
        warmup_steps: LR warm-up steps (capped at steps / 10).
        ema_power, ema_max_decay: EMA warm-up power and decay cap (diffusers `EMAModel`).
        log_every: steps between log lines.
        checkpoint_every: steps between checkpoints.
        keep_checkpoints: newest checkpoints kept.
        init_from: a base checkpoint of the same task and policy shape to start from (None: random init).

    Raises:
        ConfigError: a value of the wrong type or range, naming `train.<key>`.
    """

    steps: int = 5000
    batch_size: int = 256
    lr: float = 1e-4
    betas: tuple[float, float] = (0.95, 0.999)
    weight_decay: float = 1e-6
    lr_scheduler: str = "cosine"
    warmup_steps: int = 500
    ema_power: float = 0.75
    ema_max_decay: float = 0.9999
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    init_from: str | None = None

    def __post_init__(self):
        check_int("train.steps", self.steps, 1)
        distributed.require_divisible(check_int("train.batch_size", self.batch_size, 1), "train.batch_size")
        check_number("train.lr", self.lr, 0, low_open=True)
        betas = self.betas
        if isinstance(betas, str) or not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise ConfigError(f"train.betas={show(betas)}: expected two numbers in [0, 1)")
        for i, beta in enumerate(betas):
            check_number(f"train.betas.{i}", beta, 0, 1, high_open=True)
        object.__setattr__(self, "betas", tuple(betas))
        check_number("train.weight_decay", self.weight_decay, 0)
        check_choice("train.lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        check_int("train.warmup_steps", self.warmup_steps, 0)
        check_number("train.ema_power", self.ema_power, 0, low_open=True)
        check_number("train.ema_max_decay", self.ema_max_decay, 0, 1)
        check_int("train.log_every", self.log_every, 1)
        check_int("train.checkpoint_every", self.checkpoint_every, 1)
        check_int("train.keep_checkpoints", self.keep_checkpoints, 1)
        check_text("train.init_from", self.init_from, null=True)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> "TrainSettings":
        """Read the `train` group (absent keys take their defaults).

        Raises:
            ConfigError: see the class; an unknown key.
        """
        unknown_keys("train", cfg, list(cls.__dataclass_fields__))
        return cls(**cfg)


def policy_card(task: str, env_id: str | None, dataset: DatasetConfig, policy_config: PolicyConfig,
                kind: str = "base") -> dict[str, Any]:
    """The card (`policy.yaml`) of a checkpoint trained on `dataset` for `task`.

    Returns:
        {"kind", "task", "env_id", "dataset", "abs_action", "policy"}.
    """
    return {"kind": kind, "task": task, "env_id": env_id, "dataset": dataset.path,
            "abs_action": bool(dataset.abs_action), "policy": policy_config.to_dict()}


class _StopRequested(Exception):
    pass


def train(run_config: Mapping[str, Any], settings: TrainSettings, dataset: DatasetConfig,
          policy_options: Mapping[str, Any], task: str, env_id: str | None, seed: int, device: torch.device,
          output_dir: Path) -> dict[str, Any]:
    """Train a DiffusionPolicy, resuming from the latest checkpoint in `output_dir` if there is one.

    Writes under `output_dir`: `checkpoints/step_*` (every `checkpoint_every` steps, at the end and on SIGINT; the
    newest `keep_checkpoints` kept, each with `run_config` as its `config.yaml`), `log.jsonl` (train loss every
    `log_every` steps, EMA validation loss at each checkpoint), `loss.png` and `metrics.json`.

    Args:
        run_config: the whole composed run config, saved with every checkpoint (it names the dataset).
        settings: the optimisation settings.
        dataset: the dataset to train on.
        policy_options: the `policy` group (network shape and noise schedule; checked by `PolicyConfig`).
        task: the task name, written to the card.
        env_id: the env the policy is evaluated in, written to the card.
        seed: the run's seed (batches, noise, the episode split).
        device: where to train (under torchrun on CUDA: cuda:LOCAL_RANK).
        output_dir: the run directory.

    Returns:
        The run's metrics (`metrics.json`): command, task, steps, resumed_from, final_loss and val_loss (the
        diffusion objective's MSE in normalized units; None without logged steps / validation windows),
        train_windows, episodes, wall_s (s), checkpoint, device, processes; on ranks other than 0 of a torchrun
        job only {"rank": r}.

    Raises:
        ConfigError: a non-finite training loss (an output folder this run created is removed when it holds no
            checkpoint), or a clip range that does not cover the fitted actions.
        DatasetError: the dataset is missing, corrupt or incomplete.
        CheckpointError: `output_dir` holds a checkpoint of another task or policy shape, or one without a
            train state; `init_from` has other observation or action sizes.
        SystemExit: status 130 after SIGINT, once the current step's checkpoint is saved.
    """
    with distributed.session(device) as ctx:
        return _train(run_config, settings, dataset, policy_options, task, env_id, seed, Path(output_dir), ctx)


def _train(run_config: Mapping[str, Any], tcfg: TrainSettings, dataset_config: DatasetConfig,
           policy_options: Mapping[str, Any], task: str, env_id: str | None, seed: int, out: Path,
           ctx: distributed.Dist) -> dict[str, Any]:
    device = ctx.device  # cuda:LOCAL_RANK under torchrun on CUDA
    seed_everything(seed)

    if policy_options.get("vision") is not None and ctx.world_size > 1:
        raise ConfigError("policy.vision: image policies train in one process for now (the encoder is not wrapped "
                          "in DistributedDataParallel); run without torchrun")
    dataset = load_dataset(dataset_config, policy_options, seed)
    val_dataset = dataset.get_validation_dataset()
    train_windows = Windows.from_dataset(dataset)
    val_windows = Windows.from_dataset(val_dataset) if len(val_dataset) else None
    policy_config = PolicyConfig.from_mapping(policy_options, obs_dim=dataset.obs_dim, action_dim=dataset.action_dim)
    policy = DiffusionPolicy(policy_config, dataset.get_normalizer(dataset_config.normalizer)).to(device)
    card = policy_card(task, env_id, dataset_config, policy_config)
    latest = ckpt_io.latest_checkpoint(out)
    init_from = tcfg.init_from
    if init_from and latest is None:  # a resumed run already holds its own weights
        _init_weights(init_from, card, policy)
    model = ctx.wrap(policy.model)  # DDP (or the network itself): the forward pass whose gradients are averaged

    steps = tcfg.steps
    optimizer = torch.optim.AdamW(policy.trained_parameters(), lr=tcfg.lr, betas=tcfg.betas,
                                  weight_decay=tcfg.weight_decay)
    lr_schedule = get_scheduler(tcfg.lr_scheduler, optimizer, num_warmup_steps=min(tcfg.warmup_steps, steps // 10),
                                num_training_steps=steps)
    ema = EMAModel(policy.trained_parameters(), decay=tcfg.ema_max_decay, use_ema_warmup=True,
                   power=tcfg.ema_power, inv_gamma=1.0)

    start_step = 0
    if latest is not None:
        start_step = _resume(latest, card, policy, optimizer, lr_schedule, ema)
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
                idx = batch_indices(len(train_windows), tcfg.batch_size, seed, step)
                # Every rank draws the noise of the whole global batch and keeps its own rows, so each row is
                # trained on exactly the noise and timestep it gets in a single process.
                gen = torch.Generator(device=device).manual_seed(seed * 7919 + step)
                noise, timesteps = policy.loss_noise((len(idx), *train_windows.action.shape[1:]), gen, device)
                rows = ctx.shard(len(idx))
                batch = train_windows.batch(idx[rows], device)
                loss = policy.compute_loss(batch, noise=(noise[rows], timesteps[rows]), model=model)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                lr_schedule.step()
                ema.step(policy.trained_parameters())
                step += 1
                # The whole batch's loss, and whether any rank got SIGINT, so all ranks stop at the same step.
                loss_value, stop_any = ctx.mean([float(loss.detach()), float(stop["flag"])])
                stop["flag"] = stop_any > 0
                if not math.isfinite(loss_value):
                    raise ConfigError(f"train: loss became {loss_value} at step {step} (lower train.lr?)")
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}")
                if ctx.is_main and (step % tcfg.log_every == 0 or step == steps):
                    record = {"step": step, "loss": loss_value, "lr": lr_schedule.get_last_lr()[0],
                              "wall_s": round(time.perf_counter() - t0, 3)}
                    history.append(record)
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                if ctx.is_main and (step % tcfg.checkpoint_every == 0 or step == steps or stop["flag"]):
                    val = _val_loss(policy, ema, val_windows, seed, device)
                    if val is not None:
                        log.write(json.dumps({"step": step, "val_loss": val}) + "\n")
                        log.flush()
                    _save(out, step, run_config, card, policy, optimizer, lr_schedule, ema, tcfg.keep_checkpoints)
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
               "val_loss": _val_loss(policy, ema, val_windows, seed, device),
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
    ema.store(policy.trained_parameters())
    ema.copy_to(policy.trained_parameters())
    was_training = policy.training
    policy.eval()  # the image encoder's centre crop: a deterministic validation loss
    try:
        batch = windows.batch(torch.arange(min(len(windows), 1024)), device)
        return float(policy.compute_loss(batch, generator=torch.Generator(device=device).manual_seed(seed)))
    finally:
        policy.train(was_training)
        ema.restore(policy.trained_parameters())


def _ema_weights(policy: DiffusionPolicy, ema: EMAModel) -> dict[str, torch.Tensor]:
    ema.store(policy.trained_parameters())
    ema.copy_to(policy.trained_parameters())
    try:
        return {k: v.clone() for k, v in policy.weights().items()}
    finally:
        ema.restore(policy.trained_parameters())


def _save(out: Path, step: int, run_config, card, policy, optimizer, lr_schedule, ema, keep: int) -> None:
    train_state = {
        "step": step,
        "model": {k: v.detach().cpu() for k, v in policy.model.state_dict().items()},
        **({"encoder": {k: v.detach().cpu() for k, v in policy.encoder.state_dict().items()}}
           if policy.encoder is not None else {}),
        "optimizer": optimizer.state_dict(),
        "lr_schedule": lr_schedule.state_dict(),
        "ema": ema.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    ckpt_io.save_checkpoint(ckpt_io.step_dir(out, step), card, _ema_weights(policy, ema), config=run_config,
                            train_state=train_state)
    ckpt_io.prune_checkpoints(out, keep)


def _init_weights(init_from: str, card: Mapping[str, Any], policy: DiffusionPolicy) -> None:
    """Start from another run's network weights (fine-tuning); the normalizer stays the one fitted on this
    run's dataset, so actions outside the old range remain reachable under clip_sample. Task and network shape
    were checked with the command's options; the observation and action sizes are known only once the data is
    read."""
    ckpt = ckpt_io.resolve_checkpoint(resolve_path(init_from))
    old = ckpt_io.read_card(ckpt)["policy"]
    for dim in ("obs_dim", "action_dim"):
        if old.get(dim) != card["policy"][dim]:
            raise CheckpointError(f"train.init_from={init_from}: checkpoint {ckpt} has {dim}={old.get(dim)}, "
                                  f"this run's dataset {card['policy'][dim]}")
    state = ckpt_io.read_weights(ckpt / ckpt_io.POLICY_WEIGHTS)
    # copy_ casts, so fp16 exported weights start an fp32 run
    policy.model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    if policy.encoder is not None:
        policy.encoder.load_state_dict({k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")})


def _resume(latest: Path, card, policy, optimizer, lr_schedule, ema) -> int:
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
    if policy.encoder is not None:
        policy.encoder.load_state_dict(state["encoder"])
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
