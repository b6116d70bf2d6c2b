"""Anderson acceleration of the Picard trajectory iteration, triangular as in ParaTAA.

Source: D. G. Anderson, "Iterative procedures for nonlinear integral equations" (J. ACM 1965), in the form of
Walker & Ni (SIAM J. Numer. Anal. 2011, "Anderson acceleration for fixed-point iterations", eq. 2.1-2.3 with
damping); triangular Anderson acceleration: Tang et al., "Accelerating Parallel Sampling of Diffusion Models"
(ParaTAA, ICML 2024, arXiv 2402.09970, section 4).

For the fixed-point problem Y = Phi(Y) over the unconverged slots, with iterates Y^k, residuals
R^k = Phi(Y^k) - Y^k and the differences of the last p <= m history entries
dY = [Y^{k-p+1} - Y^{k-p}, ..., Y^k - Y^{k-1}], dR likewise, one damped Anderson step is

    gamma   = argmin_g || R^k - dR g ||^2
    Y^{k+1} = Y^k + beta R^k - (dY + beta dR) gamma.

`triangular=True` (ParaTAA): slot j of the trajectory depends only on earlier slots, so each slot j gets its
own gamma_j, fitted on the residuals of the unconverged slots a'+1..j only (a' = the new anchor).
`triangular=False`: one gamma for the whole unconverged suffix (plain AA).  Every trajectory of the batch
has its own fit (they are independent fixed-point problems).

How it composes with `pcm_policy.sampling.picard.picard_loop` (which owns exactness): the loop records
every base-phase iteration (`AndersonMixer.record`), sets the slots up to the new anchor a' from the
Picard map exactly as plain Picard does, and asks `AndersonMixer.mix` for the slots after a' inside the
window only.  So the first k slots are exact after k base rounds (worst case S rounds), and the stop is decided
by the base map's own convergence test alone.  A slot falls back to the plain Picard value when it has no usable
history pair, when its fit is degenerate (zero or non-finite normal equations) or when the mixed value is not
finite.  Windows: an entry keeps only the slots its window covered; a history column is used for slot j only if
both its entries covered a'+1..j (triangular) or the whole mixed range (plain).

Measured (PushT base, tol 0.1, full window, 32 observations; scripts/measure_rounds.py): DDPM-100 Picard 24.0 ->
triangular m=2, beta=0.5: 12.3 rounds from the noise_sum start, 8.6 from x0_chain (deviation from sequential
p99 3.8e-3); DDIM-10 Picard 6.00 -> 4.91 with beta=1 (beta=0.5: 5.94), but its chunks end further from
sequential (p99 2.1e-2 against 3.1e-3), so compare at matched deviation.  Small memory (1-2) does best.

Cost: the normal equations are (m x m) per slot and trajectory, solved in float64 with a small ridge
(relative to the Gram's trace); no host synchronisation.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AndersonConfig:
    """Settings of the Anderson step (module docstring: Walker & Ni 2011 eq. 2.1-2.3; ParaTAA section 4).

    Attributes:
        memory: m, history columns (differences; m+1 iterates kept), an integer in 1..10.
        damping: beta in (0, 1].
        triangular: ParaTAA's per-slot fit; False: one fit over the unconverged suffix.
        ridge: Tikhonov term of the normal equations relative to the mean diagonal of the Gram matrix, in
            (0, 1) (> 0 keeps them solvable).

    Raises:
        ValueError: a setting out of its range.
    """

    memory: int = 2
    damping: float = 0.5
    triangular: bool = True
    ridge: float = 1e-8

    def __post_init__(self):
        if isinstance(self.memory, bool) or not isinstance(self.memory, int) or not 1 <= self.memory <= 10:
            raise ValueError(f"anderson.memory={self.memory!r}: must be an integer in 1..10")
        if not 0.0 < float(self.damping) <= 1.0:
            raise ValueError(f"anderson.damping={self.damping!r}: must be in (0, 1]")
        if not 0.0 < float(self.ridge) < 1.0:
            raise ValueError(f"anderson.ridge={self.ridge!r}: must be in (0, 1)")


@dataclass
class _Entry:
    lo: int  # first slot covered
    Y: torch.Tensor  # (n, B, D) iterate on slots lo .. lo+n-1
    R: torch.Tensor  # (n, B, D) residual Phi(Y) - Y there

    @property
    def hi(self) -> int:
        return self.lo + self.Y.shape[0] - 1

    def on(self, s0: int, s1: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Y, R) on slots s0..s1 (zeros where not covered) and the coverage mask (n,) bool."""
        n = s1 - s0 + 1
        lo, hi = max(self.lo, s0), min(self.hi, s1)
        if lo == s0 and hi == s1:
            sl = slice(s0 - self.lo, s1 - self.lo + 1)
            return self.Y[sl], self.R[sl], self.Y.new_ones(n, dtype=torch.bool)
        Y, R = (self.Y.new_zeros((n, *self.Y.shape[1:])) for _ in range(2))
        mask = self.Y.new_zeros(n, dtype=torch.bool)
        if lo <= hi:
            dst, src = slice(lo - s0, hi - s0 + 1), slice(lo - self.lo, hi - self.lo + 1)
            Y[dst], R[dst], mask[dst] = self.Y[src], self.R[src], True
        return Y, R, mask


class AndersonMixer:
    """History of (Y^k, R^k) over the slots each base iteration covered, and the Anderson step on a slot range.

    Args:
        config: the `AndersonConfig`; the last `config.memory + 1` iterates are kept.
    """

    def __init__(self, config: AndersonConfig):
        self.config = config
        self._hist: deque[_Entry] = deque(maxlen=config.memory + 1)

    def reset(self) -> None:
        """Forget the history (the loop calls it when the base phase starts)."""
        self._hist.clear()

    def record(self, lo: int, old: torch.Tensor, new: torch.Tensor) -> None:
        """Store one base iteration (copied: `old` may be a view the loop overwrites).

        Args:
            lo: the trajectory slot of row 0.
            old: the iterate Y^k on slots lo..lo+n-1, shape (n, B, H, Da).
            new: Phi(Y^k) on the same slots, same shape; the residual R^k = new - old is stored.
        """
        n, B = old.shape[:2]
        Y = old.reshape(n, B, -1).clone()  # old is a view of the trajectory, which the loop overwrites
        self._hist.append(_Entry(lo, Y, new.reshape(n, B, -1) - Y))

    def mix(self, s0: int, s1: int, picard: torch.Tensor) -> torch.Tensor:
        """The damped Anderson step on slots s0..s1 (module docstring), per trajectory and, if triangular, per slot.

        Args:
            s0: first slot to mix (inclusive), inside the last recorded window.
            s1: last slot to mix (inclusive), inside the last recorded window.
            picard: the plain Picard values Phi(Y) on those slots, shape (n, B, H, Da), n = s1 - s0 + 1; the
                fallback wherever the fit is unusable, and the whole result with fewer than 2 history entries.

        Returns:
            The mixed values, shaped and typed like `picard` (the fit is solved in float64).

        Raises:
            AssertionError: s0..s1 is not inside the last recorded window.
        """
        entries = list(self._hist)
        if len(entries) < 2:
            return picard
        cfg = self.config
        cur = entries[-1]
        assert cur.lo <= s0 and s1 <= cur.hi, "mix() works inside the last recorded window"
        Ys, Rs, cover = (torch.stack(v) for v in zip(*[e.on(s0, s1) for e in entries]))  # (q+1, n, B, D), (q+1, n)
        Yk, Rk = Ys[-1], Rs[-1]
        dY, dR = Ys[1:] - Ys[:-1], Rs[1:] - Rs[:-1]  # (p, n, B, D)
        pair = cover[1:] & cover[:-1]  # (p, n): both entries of column c cover slot j
        if cfg.triangular:  # slot j may use column c only if the pair covers every slot s0..j it is fitted on
            valid = torch.cumprod(pair.to(torch.int32), dim=1).bool()
        else:
            valid = pair.all(dim=1, keepdim=True).expand_as(pair)
        valid = valid.transpose(0, 1)  # (n, p)
        dR64, R64 = dR.double(), Rk.double()
        gram = torch.einsum("pnbd,qnbd->nbpq", dR64, dR64)  # (n, B, p, p)
        rhs = torch.einsum("pnbd,nbd->nbp", dR64, R64)  # (n, B, p)
        if cfg.triangular:
            gram, rhs = torch.cumsum(gram, dim=0), torch.cumsum(rhs, dim=0)
        else:
            gram, rhs = gram.sum(0, keepdim=True).expand_as(gram), rhs.sum(0, keepdim=True).expand_as(rhs)
        gamma, ok = _solve_masked(gram, rhs, valid[:, None, :], cfg.ridge)  # (n, B, p), (n, B)
        step = (dY + cfg.damping * dR).permute(1, 2, 0, 3)  # (n, B, p, D)
        mixed = Yk + cfg.damping * Rk - torch.einsum("nbpd,nbp->nbd", step, gamma.to(step.dtype))
        ok = ok & torch.isfinite(mixed).all(dim=-1)
        return torch.where(ok[..., None], mixed, picard.reshape(mixed.shape)).reshape(picard.shape)


def _solve_masked(gram, rhs, valid, ridge):
    """Solve `(G + ridge * tr(G)/p I) gamma = h` over the valid columns only (invalid ones get gamma = 0).

    gram (..., p, p), rhs (..., p), valid (..., p) bool (broadcast).  Returns gamma (..., p) and ok (...) bool:
    False where no column is valid, the Gram is zero or not finite, or the solve failed.
    """
    valid = valid.expand(rhs.shape)
    both = valid[..., :, None] & valid[..., None, :]
    G = torch.where(both, gram, torch.zeros((), dtype=gram.dtype, device=gram.device))
    h = torch.where(valid, rhs, torch.zeros((), dtype=rhs.dtype, device=rhs.device))
    n_valid = valid.sum(-1)
    trace = torch.diagonal(G, dim1=-2, dim2=-1).sum(-1)
    ok = (n_valid > 0) & torch.isfinite(trace) & (trace > 0) & torch.isfinite(h).all(-1)
    reg = torch.where(ok, ridge * trace / n_valid.clamp(min=1), torch.ones_like(trace))
    diag = torch.where(valid, reg[..., None], torch.ones_like(h))  # invalid columns: identity rows, h = 0
    G = torch.where(ok[..., None, None], G, torch.zeros_like(G)) + torch.diag_embed(diag)
    h = torch.where(ok[..., None], h, torch.zeros_like(h))
    gamma, info = torch.linalg.solve_ex(G, h.unsqueeze(-1))
    gamma = gamma.squeeze(-1)
    ok = ok & (info == 0) & torch.isfinite(gamma).all(-1)
    return torch.where(ok[..., None], gamma, torch.zeros_like(gamma)), ok
