"""Anderson-accelerated Picard and the noise-carrying starts: exact (equal to diffusers' sequential loop with the
same noise as tol -> 0), bounded (<= S base rounds), and faster than plain Picard where Picard is slow."""

import copy

import pytest
import torch
from torch import nn

from pcm_policy.model.lora import add_lora, lora_parameters, scaled_denoiser
from pcm_policy.pcm import collect_picard_trajectory
from pcm_policy.sampling import (START_MODES, AndersonConfig, StepCoefficients, picard_loop, sample_lora_switched,
                                 sample_picard, sample_sequential, sample_switched)
from pcm_policy.sampling.anderson import AndersonMixer
from pcm_policy.sampling.picard import single_model_map, tile_cond, prepare
from pcm_policy.sampling.start import initial_trajectory

from tests.toys import DA, H, Toy, diffusers_reference, draw, make_scheduler

CONFIGS = [(k, S, p, c) for k, S in [("ddpm", 100), ("ddim", 10)] for p in ("epsilon", "sample") for c in (False, True)]
# (start, Anderson config): every start and both fits are covered without the full product
VARIANTS = [("x_T", AndersonConfig(memory=5, damping=0.5, triangular=True)),
            ("noise_sum", AndersonConfig(memory=3, damping=1.0, triangular=False)),
            ("x0_chain", AndersonConfig(memory=2, damping=1.0, triangular=True))]


def _id(c):
    return f"{c[0]}{c[1]}-{c[2]}-{'clip' if c[3] else 'noclip'}"


def _vid(v):
    return f"{v[0]}-m{v[1].memory}-b{v[1].damping}-{'tri' if v[1].triangular else 'plain'}"


class NarrowGaussianToy(nn.Module):
    """Exact eps-predictor for N(0, var I) data plus a small MLP: DDPM-100 Picard needs ~20 rounds at tol 0.1."""

    def __init__(self, scheduler, var=0.01, seed=5):
        super().__init__()
        self.ac, self.var = scheduler.alphas_cumprod.double(), var
        self.mlp = Toy(seed=seed, gain=0.1)

    def forward(self, x, t, cond=None):
        a = self.ac[t].reshape(-1, 1, 1)
        return (1 - a).sqrt() * x / (a * self.var + (1 - a)) + self.mlp(x, t, cond)


class Jagged(nn.Module):
    """Adversarial denoiser: piecewise constant in x (a sign pattern), so secant models of the map are useless."""

    def __init__(self):
        super().__init__()
        self.toy = Toy(seed=4)

    def forward(self, x, t, cond=None):
        return 3.0 * torch.sign(torch.sin(40.0 * x + t.double().reshape(-1, 1, 1) / 7.0)) + self.toy(x, t, cond)


# ---- exactness -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
@pytest.mark.parametrize("variant", VARIANTS, ids=_vid)
@pytest.mark.parametrize("window,B", [(None, 2), (7, 3), (1, 1)])
def test_anderson_picard_exact(cfg, variant, window, B):
    kind, S, pred, clip = cfg
    start, aa = variant
    sch = make_scheduler(kind, S, pred, clip)
    den = Toy(seed=1)
    x_T, noise, cond = draw(S, B, seed=2)
    ref = diffusers_reference(den, sch, x_T, cond, 2)
    out, st = sample_picard(den, sch, x_T, noise, cond, window=window, tol=0.0, anderson=aa, start=start)
    assert st.converged and 1 <= st.iterations <= S
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    out, st = sample_picard(den, sch, x_T, noise, cond, window=window, tol=1e-9, anderson=aa, start=start)
    assert st.converged and st.iterations <= S
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
@pytest.mark.parametrize("variant", VARIANTS[:2], ids=_vid)
@pytest.mark.parametrize("window,B", [(None, 2), (5, 1)])
def test_anderson_output_switching_exact(cfg, variant, window, B):
    kind, S, pred, clip = cfg
    start, aa = variant
    sch = make_scheduler(kind, S, pred, clip)
    base, bad_pcm = Toy(seed=1), Toy(seed=99, gain=5.0)
    x_T, noise, cond = draw(S, B, seed=3)
    ref = diffusers_reference(base, sch, x_T, cond, 3)
    out, st = sample_switched(base, bad_pcm, sch, x_T, noise, cond, stiffness=S / 3, window=window, tol=0.0,
                              anderson=aa, start=start)
    pcm_rounds = sum(lam > 0 for lam in st.lambdas)
    assert st.converged and st.lambdas[-1] == 0.0 and pcm_rounds == 3
    assert st.iterations <= S + pcm_rounds
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
@pytest.mark.parametrize("variant", VARIANTS[::2], ids=_vid)
@pytest.mark.parametrize("window,B", [(None, 2), (6, 1)])
def test_anderson_lora_switching_exact(cfg, variant, window, B):
    kind, S, pred, clip = cfg
    start, aa = variant
    sch = make_scheduler(kind, S, pred, clip)
    base = Toy(seed=1)
    lora = add_lora(copy.deepcopy(base), rank=2)
    with torch.no_grad():
        for p in lora_parameters(lora):
            p.copy_(torch.randn_like(p))  # a PCM that differs a lot from the base
    x_T, noise, cond = draw(S, B, seed=4)
    ref = diffusers_reference(base, sch, x_T, cond, 4)
    out, st = sample_lora_switched(scaled_denoiser(lora), sch, x_T, noise, cond, window=window, tol=0.0,
                                   anderson=aa, start=start)
    assert st.converged and st.lambdas[:2] == [1.0, 0.0] and st.iterations <= S + 1
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind,S", [("ddpm", 100), ("ddim", 10)])
def test_mixing_is_active(kind, S):
    """The exactness tests above would pass with the mixer switched off: check that it changes the iterates."""
    sch = make_scheduler(kind, S, clip=True)
    den = NarrowGaussianToy(sch)
    x_T, noise, cond = draw(S, 2, seed=1)
    plain, _ = sample_picard(den, sch, x_T, noise, cond, tol=0.0, max_iters=4)
    mixed, _ = sample_picard(den, sch, x_T, noise, cond, tol=0.0, max_iters=4, anderson=AndersonConfig())
    first, _ = sample_picard(den, sch, x_T, noise, cond, tol=0.0, max_iters=1, anderson=AndersonConfig())
    assert (plain - mixed).abs().max() > 1e-4
    # one round has no history pair yet: it is the plain Picard round
    torch.testing.assert_close(first, sample_picard(den, sch, x_T, noise, cond, tol=0.0, max_iters=1)[0])


# ---- bounds and speed ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,S", [("ddpm", 100), ("ddim", 10)])
@pytest.mark.parametrize("aa", [AndersonConfig(memory=10, damping=1.0, triangular=True),
                                AndersonConfig(memory=10, damping=1.0, triangular=False)], ids=["tri", "plain"])
def test_worst_case_bound_on_adversarial_toy(kind, S, aa):
    sch = make_scheduler(kind, S, clip=True)
    den = Jagged()
    x_T, noise, cond = draw(S, 2, seed=7)
    ref = sample_sequential(den, sch, x_T, noise, cond)
    for tol in (0.0, 1e-3, 0.1):
        out, st = sample_picard(den, sch, x_T, noise, cond, tol=tol, anderson=aa, start="noise_sum")
        assert st.converged and st.iterations <= S
        assert torch.isfinite(out).all()
        if tol == 0.0:
            torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    out, st = sample_switched(Toy(seed=1), den, sch, x_T, noise, cond, stiffness=S / 4, tol=0.0, anderson=aa)
    assert st.converged and st.iterations <= S + sum(lam > 0 for lam in st.lambdas)
    torch.testing.assert_close(out, sample_sequential(Toy(seed=1), sch, x_T, noise, cond), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("triangular", [True, False])
def test_anderson_cuts_rounds_on_ddpm100(triangular):
    """On a toy where DDPM-100 Picard needs ~20 rounds at tol 0.1, AA needs clearly fewer, still close to sequential."""
    S = 100
    sch = make_scheduler("ddpm", S, clip=True)
    den = NarrowGaussianToy(sch)
    aa = AndersonConfig(memory=5, damping=1.0 if triangular else 0.5, triangular=triangular)
    picard, accel = [], []
    for seed in range(3):
        x_T, noise, cond = draw(S, 2, seed=seed)
        ref = sample_sequential(den, sch, x_T, noise, cond)
        _, st = sample_picard(den, sch, x_T, noise, cond, tol=0.1, start="noise_sum")
        picard.append(st.iterations)
        out, st = sample_picard(den, sch, x_T, noise, cond, tol=0.1, start="noise_sum", anderson=aa)
        assert st.converged and (out - ref).abs().max() < 0.05
        accel.append(st.iterations)
    assert min(picard) >= 15
    assert sum(accel) <= 0.8 * sum(picard), (accel, picard)


def test_one_host_sync_per_iteration(monkeypatch):
    """The Anderson step adds no host synchronisation: only the loop's one ``.item()`` per iteration remains."""
    S = 100
    sch = make_scheduler("ddpm", S, clip=True)
    den = NarrowGaussianToy(sch)
    x_T, noise, cond = draw(S, 2, seed=1)
    coeffs, nt, cond = prepare(sch, x_T, noise, cond)
    map_fn = single_model_map(den, coeffs, tile_cond(cond, S))
    syncs = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=orig, _n=name: (syncs.append(_n), _o(self, *a))[1])
    for aa in (AndersonConfig(triangular=True), AndersonConfig(triangular=False)):
        syncs.clear()
        _, st = picard_loop(map_fn, coeffs, x_T, nt, tol=0.1, anderson=aa, start="noise_sum")
        assert st.converged and syncs == ["item"] * st.iterations


# ---- the mixer itself ------------------------------------------------------------------------------------------

def _history(mixer, n_iter=4, lo=1, n=6, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_iter):
        old = torch.randn(n, B, H, DA, generator=g, dtype=torch.float64)
        mixer.record(lo, old, old + 0.1 * torch.randn(n, B, H, DA, generator=g, dtype=torch.float64))


def test_triangular_fit_ignores_later_slots():
    """Triangular: slot j's mix uses residuals of slots s0..j only; plain AA couples all slots."""
    outs = {}
    for tri in (True, False):
        for perturb in (False, True):
            m = AndersonMixer(AndersonConfig(memory=3, damping=1.0, triangular=tri))
            _history(m)
            if perturb:  # change the last slot's residual in the latest entry
                m._hist[-1].R[-1] += 1.0
            picard = m._hist[-1].Y + m._hist[-1].R
            outs[tri, perturb] = m.mix(1, 6, picard.reshape(6, 2, H, DA))
    torch.testing.assert_close(outs[True, False][:-1], outs[True, True][:-1], atol=0, rtol=0)
    assert (outs[False, False][:-1] - outs[False, True][:-1]).abs().max() > 1e-6


def test_mixer_falls_back_to_picard():
    picard = torch.full((6, 2, H, DA), 7.0, dtype=torch.float64)
    m = AndersonMixer(AndersonConfig(memory=3))
    _history(m, n_iter=1)
    assert m.mix(1, 6, picard) is picard  # no history pair yet
    # zero residual differences (a degenerate fit) -> plain Picard, not the damped step Y + beta R
    m = AndersonMixer(AndersonConfig(memory=3, damping=0.5))
    Y = torch.randn(6, 2, H, DA, dtype=torch.float64)
    for k in range(3):
        m.record(1, Y + k, Y + k)
    torch.testing.assert_close(m.mix(1, 6, picard), picard)
    # a non-finite history entry -> plain Picard where it matters, finite everywhere
    m = AndersonMixer(AndersonConfig(memory=3))
    _history(m)
    m._hist[-2].R[2, 0] = float("nan")
    out = m.mix(1, 6, picard)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[2:, 0], picard[2:, 0])


def test_mixer_windows_use_only_covering_entries():
    """An entry that did not cover slot j contributes no column to slot j's fit (zero columns -> plain Picard)."""
    m = AndersonMixer(AndersonConfig(memory=3, triangular=True))
    g = torch.Generator().manual_seed(1)
    for lo in (1, 2, 3):  # windows of 4 slots sliding by one: slots 1-4, 2-5, 3-6
        old = torch.randn(4, 1, H, DA, generator=g, dtype=torch.float64)
        m.record(lo, old, old + 0.1 * torch.randn(4, 1, H, DA, generator=g, dtype=torch.float64))
    picard = torch.zeros(3, 1, H, DA, dtype=torch.float64)
    out = m.mix(4, 6, picard)  # slot 4: 3 entries cover it; slot 5: 2; slot 6: only the last -> Picard
    torch.testing.assert_close(out[2], picard[2], atol=0, rtol=0)
    assert out[0].abs().max() > 0 and out[1].abs().max() > 0


@pytest.mark.parametrize("kw", [dict(memory=0), dict(memory=11), dict(memory=2.5), dict(damping=0.0),
                                dict(damping=1.5), dict(ridge=0.0)])
def test_anderson_config_rejects_bad_values(kw):
    with pytest.raises(ValueError):
        AndersonConfig(**kw)


def test_bad_start_and_anderson_rejected():
    S = 10
    sch = make_scheduler("ddim", S)
    x_T, noise, cond = draw(S, 1)
    calls = []
    den = lambda x, t, c: (calls.append(1), torch.zeros_like(x))[1]  # noqa: E731
    with pytest.raises(ValueError, match="start"):
        sample_picard(den, sch, x_T, noise, cond, start="zeros")
    with pytest.raises(ValueError, match="start"):
        sample_picard(den, sch, x_T, noise, cond, start=torch.zeros(S, 1, H, DA, dtype=torch.float64))
    with pytest.raises(ValueError, match="anderson"):
        sample_picard(den, sch, x_T, noise, cond, anderson={"memory": 3})
    assert not calls  # refused before any network call


# ---- starts ----------------------------------------------------------------------------------------------------

def _x0(kind, S, start, B=2, seed=0, pred="epsilon"):
    sch = make_scheduler(kind, S, pred, clip=True)
    x_T, noise, cond = draw(S, B, seed=seed)
    coeffs, nt, _ = prepare(sch, x_T, noise, None)
    return sch, coeffs, x_T, noise, nt, initial_trajectory(coeffs, x_T, nt, start)


def test_noise_sum_start():
    sch, coeffs, x_T, noise, nt, Y = _x0("ddpm", 100, "noise_sum")
    assert Y.shape == (101, *x_T.shape) and torch.equal(Y[0], x_T)
    torch.testing.assert_close(Y[37], x_T + nt[:37].sum(0))
    assert (Y[37] - x_T).abs().max() > 0.1  # DDPM noise is carried
    _, _, x_T, _, _, Y = _x0("ddim", 10, "noise_sum")  # DDIM has no noise: the same as the x_T start
    torch.testing.assert_close(Y, x_T.expand(11, *x_T.shape))


@pytest.mark.parametrize("kind,S,pred", [("ddpm", 100, "epsilon"), ("ddim", 10, "epsilon"), ("ddpm", 20, "sample"),
                                         ("ddim", 10, "sample")])
def test_x0_chain_start_is_the_sequential_chain_of_a_zero_x0_predictor(kind, S, pred):
    sch, coeffs, x_T, noise, nt, Y = _x0(kind, S, "x0_chain", pred=pred)
    ac = sch.alphas_cumprod.double()
    if pred == "epsilon":  # x0 = 0  <=>  eps = y / sqrt(1 - abar_t)
        zero_x0 = lambda x, t, c: x / (1 - ac[t]).sqrt().reshape(-1, 1, 1)  # noqa: E731
    else:
        zero_x0 = lambda x, t, c: torch.zeros_like(x)  # noqa: E731
    # (atol: the chain uses diffusers' float32 coefficient arithmetic, the eps above float64 alphas)
    torch.testing.assert_close(Y[S], sample_sequential(zero_x0, sch, x_T, noise), atol=1e-8, rtol=1e-8)
    if kind == "ddpm":
        torch.testing.assert_close(Y[S], torch.zeros_like(x_T))  # the chain ends on the x0 guess


def test_start_is_x0_of_the_loop_and_of_collected_trajectories():
    S = 100
    sch = make_scheduler("ddpm", S, clip=True)
    den = Toy(seed=1)
    x_T, noise, cond = draw(S, 2, seed=5)
    ref = sample_sequential(den, sch, x_T, noise, cond)
    coeffs = StepCoefficients.from_scheduler(sch, x_T.device, x_T.dtype)
    for start in START_MODES:
        X0 = initial_trajectory(coeffs, x_T, coeffs.noise_terms(noise), start)
        its, fixed = collect_picard_trajectory(den, sch, x_T, noise, cond, tol=0.0, start=start)
        torch.testing.assert_close(its[0], X0, atol=0, rtol=0)
        torch.testing.assert_close(fixed[S], ref, atol=1e-10, rtol=1e-10)
        its2, _ = collect_picard_trajectory(den, None, x_T, noise, cond, tol=0.0, start=start, coeffs=coeffs)
        assert torch.equal(its, its2)
    # a tensor start is used as given (slot 0 forced to x_T)
    warm = fixed.clone()
    warm[0] = 0.0
    its, _ = collect_picard_trajectory(den, sch, x_T, noise, cond, tol=1e-9, start=warm)
    assert torch.equal(its[0, 0], x_T) and torch.equal(its[0, 1:], fixed[1:])


def test_precomputed_coeffs_give_the_same_samples():
    S = 10
    sch = make_scheduler("ddim", S, clip=True)
    base = Toy(seed=1)
    x_T, noise, cond = draw(S, 2, seed=6)
    coeffs32 = StepCoefficients.from_scheduler(sch, x_T.device, torch.float32)  # converted to x_T's dtype
    coeffs = StepCoefficients.from_scheduler(sch, x_T.device, x_T.dtype)
    aa = AndersonConfig()
    a, _ = sample_picard(base, sch, x_T, noise, cond, tol=0.0, anderson=aa)
    b, _ = sample_picard(base, None, x_T, noise, cond, tol=0.0, anderson=aa, coeffs=coeffs32)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    a, _ = sample_switched(base, Toy(seed=2), sch, x_T, noise, cond, tol=0.0, anderson=aa)
    b, _ = sample_switched(base, Toy(seed=2), None, x_T, noise, cond, tol=0.0, anderson=aa, coeffs=coeffs)
    assert torch.equal(a, b)
    lora = scaled_denoiser(add_lora(Toy(seed=1), rank=2))
    a, _ = sample_lora_switched(lora, sch, x_T, noise, cond, tol=0.0, anderson=aa)
    b, _ = sample_lora_switched(lora, None, x_T, noise, cond, tol=0.0, anderson=aa, coeffs=coeffs)
    assert torch.equal(a, b)
