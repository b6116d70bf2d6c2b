"""Multi-process training under torchrun: torch.distributed + DistributedDataParallel.

`torchrun --nproc_per_node=N -m pcm_policy.cli train ...` starts N processes and sets RANK, WORLD_SIZE and
LOCAL_RANK (and MASTER_ADDR/MASTER_PORT). Without those variables `init` returns a single-process context
whose helpers do nothing, so a plain `pcm train` runs exactly as before.

How the training loops use it: every rank builds the same global batch from the seeded schedule and draws the
same random numbers for it, then keeps only its own rows (`shard`). DDP averages the gradients over ranks, so
the update equals the single-process update on the whole batch. Rank 0 alone writes files; all ranks keep
identical weights, optimizer state and EMA.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pcm_policy.errors import ConfigError


def world_size() -> int:
    """Processes in this job according to the environment torchrun sets (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """True in a single process and on rank 0 of a torchrun job (reads the environment: usable anywhere)."""
    return int(os.environ.get("RANK", "0")) == 0


def require_divisible(batch_size: int, key: str) -> None:
    """Each rank takes an equal share of every global batch; checked before any process group is set up.

    Args:
        batch_size: the global batch size.
        key: the config key named in the error.

    Raises:
        ConfigError: `batch_size` is not divisible by WORLD_SIZE.
    """
    n = world_size()
    if n > 1 and int(batch_size) % n != 0:
        raise ConfigError(f"{key}={batch_size} is not divisible by the {n} processes (WORLD_SIZE={n}); "
                          f"each process takes an equal share of the global batch")


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; the single-process default makes every method a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # True when `init` created the process group (then `cleanup` destroys it)

    @property
    def enabled(self) -> bool:
        """True in a job of more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the only rank that writes files)."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (a no-op in a single process)."""
        if self.enabled:
            dist.barrier()

    def shard(self, n: int) -> slice:
        """This rank's contiguous rows of a global batch of n rows (split as torch.tensor_split does)."""
        q, r = divmod(n, self.world_size)
        start = self.rank * q + min(self.rank, r)
        return slice(start, start + q + (self.rank < r))

    def loss_weight(self, n: int) -> float:
        """Factor on this rank's mean loss so that DDP's gradient average is the gradient of the mean over all
        n rows even when the shards are unequal (exactly 1.0 when they are equal, and in a single process)."""
        rows = self.shard(n)
        return (rows.stop - rows.start) * self.world_size / n

    def mean(self, values: list[float]) -> list[float]:
        """Average of each value over ranks (one all-reduce), e.g. the logged loss and a stop flag."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world_size).tolist()

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """DDP around `module` (its parameters are broadcast from rank 0); the module itself when single."""
        if not self.enabled:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)


def init(device: torch.device) -> Dist:
    """Join the torchrun job (gloo on CPU, nccl on CUDA with device cuda:LOCAL_RANK), or a single process.

    Args:
        device: the requested device; on CUDA under torchrun it becomes cuda:LOCAL_RANK.

    Returns:
        This process's `Dist`.

    Raises:
        ConfigError: LOCAL_RANK has no CUDA device.
    """
    n = world_size()
    if n <= 1:
        return Dist(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local_rank}: only {torch.cuda.device_count()} CUDA device(s) present "
                              "(use --nproc_per_node <= the GPU count, or device=cpu)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:  # env:// rendezvous: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE from torchrun
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank, world_size=n, local_rank=local_rank, device=device, owns_group=owns)


def cleanup(ctx: Dist, ok: bool = True) -> None:
    """Barrier (after a clean finish, so no rank exits while rank 0 still writes), then destroy the group."""
    if ctx.owns_group and dist.is_initialized():
        if ok:
            dist.barrier()
        dist.destroy_process_group()


@contextmanager
def session(device: torch.device) -> Iterator[Dist]:
    """`init` on entry, `cleanup` on exit (with the final barrier only after a clean finish); yields the `Dist`.

    Raises:
        ConfigError: as `init`.
    """
    ctx = init(device)
    ok = False
    try:
        yield ctx
        ok = True
    finally:
        cleanup(ctx, ok)
