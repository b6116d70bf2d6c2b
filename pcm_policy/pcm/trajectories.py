"""PCT's training data: every full-window base-model Picard iterate X^0..X^K and the fixed point X*.

`collect_picard_trajectory` records one batch (a pure function over a denoiser); `collect` runs it over many
observations into resumable shards on disk; `TrajectorySet` holds them in memory and draws training batches.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from pcm_policy import distributed
from pcm_policy.atomic import atomic_path, atomic_write_text
from pcm_policy.errors import ConfigError
from pcm_policy.pcm.loss import iterate_variances
from pcm_policy.policy import observation_count, select_observations
from pcm_policy.sampler_config import SamplerConfig
from pcm_policy.sampling.picard import picard_loop, prepare, single_model_map, tile_cond
from pcm_policy.sampling.schedule import StepCoefficients


@torch.no_grad()
def collect_picard_trajectory(denoiser, scheduler, x_T, noise, cond=None, tol: float = 1e-3, max_iters=None, *,
                              start="x_T", coeffs: StepCoefficients | None = None):
    """Run full-window base Picard from X^0 and record all iterates: the PCT data (PCM, arXiv 2503.19731).

    Args:
        denoiser: the base model, `eps = denoiser(x, t, cond)`.
        scheduler: the diffusers DDPM/DDIM scheduler (`set_timesteps` done); may be None when `coeffs` is given.
        x_T: initial noise, (B, H, Da) float, normalized action units.
        noise: the standard-normal draws z_j, (S, B, H, Da).
        cond: the condition, (B, C) or None.
        tol: convergence tolerance (see `picard_loop`); tighter than sampling's 0.1 by default because X* is a
            training target.
        max_iters: cap on rounds (None: until converged, at most S).
        start: X^0 (`"x_T"`: every slot = x_T; `"noise_sum"` / `"x0_chain"`: the chunk's DDPM noise carried
            along, see `pcm_policy.sampling.start`); a PCM trained on these iterates learns its step from that
            start, so sample with the same one.
        coeffs: precomputed `StepCoefficients` of `scheduler`.

    Returns:
        (iterates, fixed_point): iterates (K+1, S+1, B, H, Da) = X^0..X^K (X^K the final state), fixed_point
        (S+1, B, H, Da) = X^K, which with a small `tol` is the sequential trajectory (slot S = the sequential
        sample); x_T's dtype and device.

    Raises:
        ValueError: see `sample_picard`.
    """
    coeffs, nt, cond = prepare(scheduler, x_T, noise, cond, coeffs)
    S = coeffs.num_steps
    out = []
    map_fn = single_model_map(denoiser, coeffs, tile_cond(cond, S))
    Y, _ = picard_loop(map_fn, coeffs, x_T, nt, window=S, tol=tol, max_iters=max_iters, start=start,
                       callback=lambda Y: out.append(Y.clone()))
    iterates = torch.stack(out)
    return iterates, iterates[-1].clone()


def collect(policy, sampler: SamplerConfig, observations: torch.Tensor, out: Path, fingerprint: str, batch: int,
            tol: float, max_iters: int | None, seed: int, source: str = "dataset",
            ctx: distributed.Dist = distributed.Dist()) -> list[Path]:
    """Collect the base-model Picard trajectories of `observations`, one shard per batch (resumable).

    Each shard `out/trajectories/batch_XXXX.safetensors` holds iterates (K+1, S+1, b, H, Da) float16, fixed_point
    (S+1, b, H, Da) float32, noise (S, b, H, Da) and cond (b, To*Do); shards already on disk are kept. Under
    torchrun rank r collects batches r, r+N, r+2N, ... (a shard depends only on its batch and seed).

    Args:
        policy: the base policy.
        sampler: the Picard config (scheduler, steps, start) of the schedule the PCM is trained for.
        observations: (N, To, Do) float32 in env units (an image policy's: with their frames,
            `pcm_policy.observations`).
        out: the run directory.
        fingerprint: the base weights' fingerprint, recorded in `trajectories/meta.json`.
        batch: observations per shard (one batched Picard run each).
        tol: convergence tolerance of the collected fixed points X* (tighter than sampling's: a training target).
        max_iters: cap on Picard rounds (None: until converged).
        seed: shard b draws its noise with seed * 100_003 + b.
        source: where the observations came from (`dataset` / `closed_loop`), recorded in the metadata.
        ctx: this process's place in a torchrun job.

    Returns:
        The paths of all shards, in batch order.

    Raises:
        ConfigError: `trajectories/` was collected with other settings or another base.
    """
    traj_dir = out / "trajectories"
    meta = {"base_fingerprint": fingerprint, "scheduler": sampler.scheduler, "steps": sampler.steps,
            "tol": tol, "trajectories": len(observations), "batch": batch, "seed": seed,
            "observations": source, "start": sampler.start}
    meta_path = traj_dir / "meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()) != meta:
        raise ConfigError(f"{traj_dir}: trajectories were collected with other settings or another base; "
                          "use a new output_dir")
    if ctx.is_main:
        traj_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(meta_path, json.dumps(meta, indent=2))
    ctx.barrier()  # the directory exists before any rank writes into it
    scheduler = policy.scheduler_for(sampler)
    batches = list(torch.split(torch.arange(observation_count(observations)), batch))
    shards = [traj_dir / f"batch_{b:04d}.safetensors" for b in range(len(batches))]
    mine = range(ctx.rank, len(batches), ctx.world_size)
    bar = tqdm(total=len(mine), desc="collect Picard trajectories", unit="batch", dynamic_ncols=True,
               disable=not ctx.is_main)
    for b in mine:
        rows, shard = batches[b], shards[b]
        if not shard.is_file():
            cond = policy.encode(select_observations(observations, rows))  # (an image policy: its encoder, once)
            x_T, noise = policy.make_noise(len(rows), sampler, torch.Generator().manual_seed(seed * 100_003 + b))
            iterates, fixed = collect_picard_trajectory(policy.denoiser, scheduler, x_T, noise, cond,
                                                        tol=tol, max_iters=max_iters,
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
