"""`pcm train-pcm`: Picard Consistency Training of a PCM for a trained base policy (PCM, arXiv 2503.19731).

1. Collect: run full-window base-model Picard on observations from the base's training set and store every
   iterate X^0..X^K and the fixed point X* (one safetensors shard per batch of observations, written
   atomically, so an interrupted collection resumes at the next missing shard).
2. Train: draw a trajectory and an iterate k, take ONE Picard step with the PCM weights and regress it onto
   X*, weighted by alpha(k) = 1/sqrt(Var(k)) (pcm_policy.pcm.loss); Adam, parameter EMA 0.999.
   `mode=lora` trains a low-rank delta on the frozen base, `mode=full` a full copy.
3. Evaluate on held-out observations: Picard iterations to converge with the base alone, and with the PCM
   and model switching (output space, and weight space for LoRA), before and after training.

Under torchrun the collection is split by batch over the processes, and the PCM network is wrapped in
DistributedDataParallel with each process training on its rows of the same global batch (pcm_policy.distributed);
rank 0 alone evaluates and writes checkpoints and metrics.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file
from tqdm.auto import tqdm

from pcm_policy import checkpoint as ckpt_io
from pcm_policy import distributed
from pcm_policy.atomic import atomic_path, atomic_write_text
from pcm_policy.errors import CheckpointError, ConfigError
from pcm_policy.pcm.attach import build_pcm_network, pcm_denoiser
from pcm_policy.pcm.loss import iterate_variances, pct_loss
from pcm_policy.pcm.trajectories import collect_picard_trajectory
from pcm_policy.runtime import resolve_device, seed_everything
from pcm_policy.chunk_sampler import ChunkSampler
from pcm_policy.sampler_config import SamplerConfig
from pcm_policy.sampling.schedule import StepCoefficients


# ---- observations ----------------------------------------------------------------------------------------
def observation_sets(base_ckpt: Path, cfg: Mapping[str, Any], policy=None, out: Path | None = None,
                     base_card: Mapping[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The observations PCT collects trajectories from, and the held-out ones it is evaluated on.

    `observations=dataset`: windows of the base policy's dataset (held out: its validation episodes).
    `observations=closed_loop`: histories the base policy planned from in its own closed-loop rollouts
    (`closed_loop.*`; held out: histories from other episodes), recorded once in `out/observations.safetensors`.

    Args:
        base_ckpt: the base checkpoint directory.
        cfg: the `train_pcm` config (observations, trajectories, eval_observations, seed, ...).
        policy: the base policy (closed_loop only).
        out: the run directory (closed_loop only).
        base_card: the base checkpoint's card (closed_loop only: its env_id).

    Returns:
        (training observations (trajectories, To, Do), held-out observations (eval_observations, To, Do)),
        float32 in env units, drawn with `cfg["seed"]` (fewer rows if fewer are available).

    Raises:
        CheckpointError: the base checkpoint has no run config (which dataset it was trained on).
        DatasetError: the base's dataset is missing, corrupt or inconsistent.
        ConfigError: closed_loop with a base that names no env.
    """
    if cfg.get("observations", "dataset") == "closed_loop":
        train_obs, held_out = _closed_loop_observations(policy, cfg, out, base_card)
    else:
        from pcm_policy.data.windows import checkpoint_observations

        train_obs, val_obs = checkpoint_observations(base_ckpt, cfg.get("dataset_path"))
        held_out = val_obs if len(val_obs) else train_obs[-cfg["eval_observations"]:]
    g = torch.Generator().manual_seed(cfg["seed"])
    pick = torch.randperm(len(train_obs), generator=g)[: cfg["trajectories"]]
    pick_eval = torch.randperm(len(held_out), generator=g)[: cfg["eval_observations"]]
    return train_obs[pick], held_out[pick_eval]


def _closed_loop_observations(policy, cfg, out: Path, base_card) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    from pcm_policy.pcm.visited import visited_observations

    loop = cfg["closed_loop"]
    path = out / "observations.safetensors"
    if path.is_file():
        saved = load_file(str(path))
        return saved["train"], saved["held_out"]
    roll = lambda episodes, seed: visited_observations(  # noqa: E731
        policy, base_card.get("env_id"), loop["max_steps"], episodes, seed, loop["sampler"], loop["n_envs"])
    train_obs = roll(loop["episodes"], loop["seed_start"])
    held_out = roll(loop["eval_episodes"], loop["seed_start"] + loop["episodes"])
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"train": train_obs.contiguous(), "held_out": held_out.contiguous()}, str(tmp))
    return train_obs, held_out


# ---- collection ------------------------------------------------------------------------------------------
def collect(policy, sampler: SamplerConfig, observations: torch.Tensor, out: Path, cfg, fingerprint: str,
            ctx: distributed.Dist = distributed.Dist()) -> list[Path]:
    """Collect the base-model Picard trajectories of `observations`, one shard per batch (resumable).

    Each shard `out/trajectories/batch_XXXX.safetensors` holds iterates (K+1, S+1, b, H, Da) float16, fixed_point
    (S+1, b, H, Da) float32, noise (S, b, H, Da) and cond (b, To*Do); shards already on disk are kept. Under
    torchrun rank r collects batches r, r+N, r+2N, ... (a shard depends only on its batch and seed).

    Args:
        policy: the base policy.
        sampler: the Picard config (scheduler, steps, start) of the schedule the PCM is trained for.
        observations: (N, To, Do) float32 in env units.
        out: the run directory.
        cfg: the `train_pcm` config (collect_batch, collect_tol, collect_max_iters, seed, observations).
        fingerprint: the base weights' fingerprint, recorded in `trajectories/meta.json`.
        ctx: this process's place in a torchrun job.

    Returns:
        The paths of all shards, in batch order.

    Raises:
        ConfigError: `trajectories/` was collected with other settings or another base.
    """
    traj_dir = out / "trajectories"
    meta = {"base_fingerprint": fingerprint, "scheduler": sampler.scheduler, "steps": sampler.steps,
            "tol": cfg["collect_tol"], "trajectories": len(observations), "batch": cfg["collect_batch"], "seed": cfg["seed"],
            "observations": cfg.get("observations", "dataset"), "start": sampler.start}
    meta_path = traj_dir / "meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()) != meta:
        raise ConfigError(f"{traj_dir}: trajectories were collected with other settings or another base; "
                          "use a new output_dir")
    if ctx.is_main:
        traj_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(meta_path, json.dumps(meta, indent=2))
    ctx.barrier()  # the directory exists before any rank writes into it
    scheduler = policy.scheduler_for(sampler)
    batches = list(torch.split(torch.arange(len(observations)), cfg["collect_batch"]))
    shards = [traj_dir / f"batch_{b:04d}.safetensors" for b in range(len(batches))]
    mine = range(ctx.rank, len(batches), ctx.world_size)
    bar = tqdm(total=len(mine), desc="collect Picard trajectories", unit="batch", dynamic_ncols=True,
               disable=not ctx.is_main)
    for b in mine:
        rows, shard = batches[b], shards[b]
        if not shard.is_file():
            obs = observations[rows].to(policy.device)
            cond = policy.global_cond(obs)
            x_T, noise = policy.make_noise(len(rows), sampler, torch.Generator().manual_seed(cfg["seed"] * 100_003 + b))
            iterates, fixed = collect_picard_trajectory(policy.denoiser, scheduler, x_T, noise, cond,
                                                        tol=cfg["collect_tol"], max_iters=cfg.get("collect_max_iters"),
                                                        start=sampler.start)
            with atomic_path(shard) as tmp:
                save_file({"iterates": iterates.half().cpu().contiguous(), "fixed_point": fixed.float().cpu().contiguous(),
                           "noise": noise.cpu().contiguous(), "cond": cond.cpu().contiguous()}, str(tmp))
        bar.update(1)
    bar.close()
    ctx.barrier()  # every shard is on disk before any rank reads them
    return shards


class TrajectorySet:
    """All collected trajectories in memory: per trajectory its iterates, X*, noise and condition.

    Args:
        shards: the files written by `collect`.
    """

    def __init__(self, shards: list[Path]):
        from safetensors.torch import load_file

        self.iterates, self.fixed, self.noise, self.cond = [], [], [], []
        for shard in shards:
            d = load_file(str(shard))
            for j in range(d["fixed_point"].shape[1]):
                self.iterates.append(d["iterates"][:, :, j])  # (K+1, S+1, H, Da)
                self.fixed.append(d["fixed_point"][:, j])
                self.noise.append(d["noise"][:, j])
                self.cond.append(d["cond"][j])

    def __len__(self) -> int:
        return len(self.fixed)

    def alpha(self) -> torch.Tensor:
        """PCT's iterate weights alpha(k) = 1/sqrt(Var(k)) (see `iterate_variances`), float32 (K_max+1,).

        Var is floored at 1e-6 Var(0) so nearly converged iterates do not dominate.
        """
        var = iterate_variances([it[:, :, None] for it in self.iterates], [x[:, None] for x in self.fixed])
        var = var.clamp(min=float(var[0]) * 1e-6)
        return (1.0 / var.sqrt()).float()

    def batch(self, idx: torch.Tensor, generator: torch.Generator, device, max_k: int | None = None):
        """A training batch with a random iterate k per trajectory, k uniform in [0, min(K_i, max_k) - 1].

        Args:
            idx: trajectory indices (b,) long.
            generator: CPU RNG for the k draws.
            device: where the batch goes.
            max_k: limits training to the first iterates (with a stiff switching schedule only the PCM steps
                taken from the first iterates are ever used at inference); None: all.

        Returns:
            (X^k (S+1, b, H, Da) float32, k (b,) long, X* (S+1, b, H, Da), noise (S, b, H, Da), cond (b, To*Do)).
        """
        ks, xk = [], []
        for i in idx.tolist():
            K = self.iterates[i].shape[0] - 1
            if max_k is not None:
                K = min(K, max_k)
            k = int(torch.randint(0, max(K, 1), (1,), generator=generator))
            ks.append(k)
            xk.append(self.iterates[i][k].float())
        stack = lambda items: torch.stack(items, dim=1).to(device)  # noqa: E731
        return (stack(xk), torch.tensor(ks, device=device), stack([self.fixed[i] for i in idx.tolist()]),
                stack([self.noise[i] for i in idx.tolist()]), torch.stack([self.cond[i] for i in idx.tolist()]).to(device))


# ---- held-out evaluation -----------------------------------------------------------------------------------
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
        observations: (N, To, Do) float32 in env units.
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
    for i in range(len(observations)):
        cond = policy.global_cond(observations[i:i + 1].to(policy.device))
        x_T, noise = policy.make_noise(1, sampler, torch.Generator().manual_seed(seed + i))
        ref, _ = reference.sample(x_T, noise, cond)
        for name, chunk_sampler in samplers.items():
            x0, stats = chunk_sampler.sample(x_T, noise, cond)
            rows[name].append((stats.iterations, stats.evaluations, float((x0 - ref).abs().max())))
    return {name: {"iterations_mean": float(np.mean([r[0] for r in v])), "evaluations_mean": float(np.mean([r[1] for r in v])),
                   "max_abs_err_vs_sequential": float(np.max([r[2] for r in v])),
                   "abs_err_p99_vs_sequential": float(np.percentile([r[2] for r in v], 99)), "observations": len(v)}
            for name, v in rows.items()}


# ---- training ----------------------------------------------------------------------------------------------
def train_pcm(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """`pcm train-pcm`: collect, train, evaluate (see the module docstring); resumes from `output_dir`.

    Args:
        cfg: the composed `train_pcm` config (base, output_dir, mode, scheduler, steps, epochs, lr, ...).

    Returns:
        The metrics also written to `output_dir/metrics.json` (iterations before/after, losses, timings in s);
        on ranks other than 0 of a torchrun job {"rank": r}.

    Raises:
        ConfigError: no base, a batch size the processes cannot share, or collected data from other settings.
        CheckpointError: an unusable base checkpoint, or `output_dir` holding a PCM for another base or mode.
    """
    from pcm_policy.validation import validate_train_pcm

    validate_train_pcm(cfg)  # every option, against the base checkpoint, before any work
    if not cfg.get("base"):
        raise ConfigError("base: no base checkpoint given (base=<run or checkpoint dir>)")
    device = resolve_device(cfg.get("device"))
    distributed.require_divisible(cfg["batch_size"], "batch_size")
    with distributed.session(device) as ctx:
        return _train_pcm(cfg, ctx)


def _train_pcm(cfg: Mapping[str, Any], ctx: distributed.Dist) -> dict[str, Any]:
    from pcm_policy.checkpoint import load_policy, resolve_checkpoint

    device = ctx.device  # cuda:LOCAL_RANK under torchrun on CUDA
    seed_everything(cfg["seed"])
    out = Path(cfg["output_dir"])
    base_ckpt = resolve_checkpoint(cfg["base"])
    policy, base_card = load_policy(base_ckpt, device)
    for p in policy.model.parameters():
        p.requires_grad_(False)
    fingerprint = ckpt_io.weights_fingerprint(policy.model)
    sampler = SamplerConfig(name="picard", scheduler=cfg["scheduler"], steps=cfg["steps"], start=cfg.get("start", "x_T"))
    t0 = time.perf_counter()

    train_obs, eval_obs = observation_sets(base_ckpt, cfg, policy, out, base_card)
    last = len(train_obs) % cfg["batch_size"]
    if 0 < last < ctx.world_size:  # every process needs at least one row of every batch
        raise ConfigError(f"trajectories: the last batch of an epoch has {last} trajectories ({len(train_obs)} % "
                          f"batch_size={cfg['batch_size']}), fewer than the {ctx.world_size} processes")
    trajectories = TrajectorySet(collect(policy, sampler, train_obs, out, cfg, fingerprint, ctx))
    collect_s = time.perf_counter() - t0
    alpha = trajectories.alpha().to(device)
    coeffs = StepCoefficients.from_scheduler(policy.scheduler_for(sampler), device, torch.float32)

    net = build_pcm_network(policy.model, cfg["mode"], cfg["lora_rank"], cfg.get("lora_alpha")).to(device)
    eval_kw = dict(tol=cfg["eval_tol"], window=cfg.get("eval_window"), stiffness=cfg.get("stiffness"), seed=cfg["seed"] + 1,
                   accel=cfg.get("eval_accel"))
    before = evaluate_iterations(policy, net, sampler, eval_obs, **eval_kw) if ctx.is_main else None
    train_net = ctx.wrap(net)  # DDP (or net itself); wrapped before the EMA copies the (broadcast) weights

    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg["lr"])
    ema = EMAModel(params, decay=cfg["ema_decay"])
    steps_per_epoch = max(1, math.ceil(len(trajectories) / cfg["batch_size"]))
    total = steps_per_epoch * cfg["epochs"]
    card = {"kind": "pcm", "mode": cfg["mode"], "lora_rank": cfg["lora_rank"], "lora_alpha": cfg.get("lora_alpha"),
            "base": str(base_ckpt), "base_fingerprint": fingerprint, "task": base_card["task"],
            "env_id": base_card.get("env_id"), "scheduler": cfg["scheduler"], "steps": cfg["steps"],
            "start": sampler.start, "observations": cfg.get("observations", "dataset"),
            "policy": base_card["policy"]}

    step, epoch_losses = 0, []
    latest = ckpt_io.latest_checkpoint(out)
    if latest is not None:
        step, epoch_losses = _resume(latest, card, net, optimizer, ema)
    pcm = pcm_denoiser(train_net, "pcm")
    bar = tqdm(total=total, initial=step, desc=f"PCT ({cfg['mode']})", unit="step", dynamic_ncols=True,
               disable=not ctx.is_main)
    net.train()
    while step < total:
        epoch = step // steps_per_epoch
        perm = torch.randperm(len(trajectories), generator=torch.Generator().manual_seed(cfg["seed"] * 7919 + epoch))
        losses = []
        for b in range(step % steps_per_epoch, steps_per_epoch):
            idx = perm[b * cfg["batch_size"]:(b + 1) * cfg["batch_size"]]
            g = torch.Generator().manual_seed(cfg["seed"] * 104_729 + step)
            xk, k, xstar, noise, cond = trajectories.batch(idx, g, device, cfg.get("max_k"))
            if ctx.enabled:  # this rank's rows of the global batch (every rank draws the same k for each row)
                rows = ctx.shard(len(idx))
                xk, k, xstar, noise, cond = xk[:, rows], k[rows], xstar[:, rows], noise[:, rows], cond[rows]
            weight = ctx.loss_weight(len(idx))  # 1.0 unless an epoch's last batch splits unevenly
            loss = pct_loss(pcm, coeffs, xk, k, xstar, coeffs.noise_terms(noise), cond, alpha=alpha)
            optimizer.zero_grad(set_to_none=True)
            (loss * weight).backward()
            optimizer.step()
            ema.step(params)
            step += 1
            losses.append(ctx.mean([float(loss.detach()) * weight])[0])  # the whole batch's loss
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.4f}")
        epoch_losses.append(float(np.mean(losses)) if losses else float("nan"))
        if ctx.is_main and ((epoch + 1) % cfg["checkpoint_every"] == 0 or step >= total):
            _save(out, step, card, net, optimizer, ema, params, epoch_losses)
    bar.close()

    ema.copy_to(params)  # evaluate (and ship) the EMA weights
    net.eval()
    if not ctx.is_main:
        return {"rank": ctx.rank}
    after = evaluate_iterations(policy, net, sampler, eval_obs, **eval_kw)
    metrics = {"command": "train-pcm", "task": base_card["task"], "mode": cfg["mode"], "base": str(base_ckpt),
               "trajectories": len(trajectories), "epochs": cfg["epochs"], "steps": total,
               "loss_per_epoch": epoch_losses, "collect_s": round(collect_s, 1),
               "wall_s": round(time.perf_counter() - t0, 1), "eval_tol": cfg["eval_tol"], "before": before, "after": after,
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
