"""`backend=auto`: each denoiser call runs on the backend measured faster for its number of rows, on this machine.

Why per row count: a batch-1 call is overhead-bound (onnxruntime's lean graph wins) while a wide Picard round is
compute-bound (torch's oneDNN kernels can win), so the fastest backend of a sampler depends on the rows of each
call (DESIGN.md section 6). A `BackendRouter` holds one denoiser on both backends and a table of measured row
counts; a row count is decided by the table when its measured neighbours agree (a single crossover is assumed:
below it onnxruntime wins, above it torch), and measured otherwise - by bisection between disagreeing
neighbours. `calibrate` does this at build time for the row counts a sampler will call at batch 1
(`rows_per_call`); a call with a row count nobody decided yet (a larger batch) measures it then, once.

A measurement runs each backend `repeats` times on random inputs of that row count (interleaved, after one
warm-up call each) and keeps the fastest time of each: a few ms at batch 1, about a second for 100 rows.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch

from pcm_policy.sampler_config import SamplerConfig

BACKEND_NAMES = ("torch", "onnx")


@dataclass(frozen=True)
class RowTiming:
    """One measured row count: the fastest call of each backend, in ms (wall clock, this process's threads)."""

    rows: int
    torch_ms: float
    onnx_ms: float

    @property
    def chosen(self) -> str:
        """The faster backend (torch on a tie)."""
        return "onnx" if self.onnx_ms < self.torch_ms else "torch"


def rows_per_call(config: SamplerConfig, fixed_shape: bool, batch: int = 1) -> list[int]:
    """The row counts of the network calls a sampler makes for `batch` chunks.

    Sequential: `batch`; the Picard family: `window * batch` (`fixed_shape`) or every `k * batch`, k = 1..window
    (the window shrinks at the end of the trajectory). Output-space switching calls both networks on the same rows.
    """
    if config.name == "sequential":
        return [batch]
    window = config.window or config.steps
    return [window * batch] if fixed_shape else [k * batch for k in range(1, window + 1)]


def _time_ms(fn: Callable, args: tuple) -> float:
    start = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - start) * 1e3


class BackendRouter:
    """One denoiser on both backends; each call goes to the faster one for its number of rows (module docstring).

    Args:
        torch_fn: the torch implementation, `eps = torch_fn(x, t, cond, *extra)`.
        onnx_fn: the onnxruntime implementation, same signature.
        example: `example(rows)` -> the arguments of a representative call with that many rows (x, t, cond, *extra).
        repeats: timed calls per backend and row count.

    Attributes:
        measured: row count -> `RowTiming`, every measurement so far.
    """

    def __init__(self, torch_fn: Callable, onnx_fn: Callable, example: Callable[[int], tuple], repeats: int = 3):
        self.implementations = {"torch": torch_fn, "onnx": onnx_fn}
        self.example = example
        self.repeats = repeats
        self.measured: dict[int, RowTiming] = {}

    @torch.no_grad()
    def measure(self, rows: int) -> RowTiming:
        """Time both backends at `rows` (see the module docstring) and record it."""
        args = self.example(rows)
        best = {}
        for name, fn in self.implementations.items():
            fn(*args)  # warm-up: an onnx binding or torch's allocator for this shape
            best[name] = float("inf")
        for _ in range(self.repeats):
            for name, fn in self.implementations.items():  # interleaved: a load spike hits both
                best[name] = min(best[name], _time_ms(fn, args))
        timing = RowTiming(rows, round(best["torch"], 4), round(best["onnx"], 4))
        self.measured[rows] = timing
        return timing

    def choice(self, rows: int) -> str:
        """The backend for calls of `rows` rows: from the table, or measured (bisection) when undecided."""
        while True:
            timing = self.measured.get(rows)
            if timing is not None:
                return timing.chosen
            below = max((r for r in self.measured if r < rows), default=None)
            above = min((r for r in self.measured if r > rows), default=None)
            low = None if below is None else self.measured[below].chosen
            high = None if above is None else self.measured[above].chosen
            if low is not None and low == high:
                return low
            if above is None and low == "torch":  # beyond a torch win: still compute-bound
                return "torch"
            if below is None and high == "onnx":  # below an onnx win: still overhead-bound
                return "onnx"
            self.measure(rows if below is None or above is None else (below + above) // 2)

    def calibrate(self, rows: Iterable[int]) -> None:
        """Decide every row count of `rows`, measuring the fewest (the extremes, then bisection)."""
        wanted = sorted(set(int(r) for r in rows))
        for r in (wanted[0], wanted[-1]) if wanted else ():
            if r not in self.measured:
                self.measure(r)
        for r in wanted:
            self.choice(r)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, *extra) -> torch.Tensor:
        """`eps = denoiser(x, t, cond, *extra)` on the faster backend for x's rows."""
        return self.implementations[self.choice(x.shape[0])](x, t, cond, *extra)

    def table(self) -> list[dict]:
        """The measurements, by row count: {rows, torch_ms, onnx_ms, chosen}."""
        return [{**asdict(self.measured[r]), "chosen": self.measured[r].chosen} for r in sorted(self.measured)]

    def rule(self) -> str:
        """The decision in words, e.g. `onnx up to 34 rows, torch from 35` (from the measured points)."""
        table = self.table()
        if not table:
            return "not calibrated"
        onnx = [p["rows"] for p in table if p["chosen"] == "onnx"]
        torch_rows = [p["rows"] for p in table if p["chosen"] == "torch"]
        if not torch_rows:
            return f"onnx at every measured row count (1-{table[-1]['rows']})"
        if not onnx:
            return f"torch at every measured row count (1-{table[-1]['rows']})"
        return f"onnx up to {max(onnx)} rows, torch from {min(torch_rows)}"


@dataclass
class Calibration:
    """What `auto` measured for one sampler: per denoiser (`base`, `pcm`) its router's table and rule.

    The routers are shared by a policy's samplers and learn row counts lazily, so the table is read when asked.

    Attributes:
        routers: denoiser role -> its `BackendRouter` (empty on CUDA).
        threads: the intra-op threads both backends ran with.
        note: why nothing was measured (e.g. on CUDA), else empty.
    """

    routers: dict[str, BackendRouter] = field(default_factory=dict)
    threads: int = 1
    note: str = ""

    def to_dict(self) -> dict:
        """JSON-ready: {threads, note, denoisers: {role: {rule, table: [{rows, torch_ms, onnx_ms, chosen}]}}}."""
        return {"threads": self.threads, "note": self.note,
                "denoisers": {role: {"rule": r.rule(), "table": r.table()} for role, r in self.routers.items()}}

    def summary(self) -> str:
        """One line, e.g. `auto (1 thread): base onnx up to 34 rows, torch from 35`."""
        if not self.routers:
            return f"auto: {self.note}"
        rules = "; ".join(f"{role} {r.rule()}" for role, r in self.routers.items())
        return f"auto ({self.threads} thread{'s' if self.threads != 1 else ''}): {rules}"
