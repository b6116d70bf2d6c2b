"""A toy Picard Consistency Training run that demonstrably cuts Picard iterations, and stays exact.

Base: the exact denoiser of conditional Gaussian data (tests.toys.GaussianToy), DDIM-10 without clipping. PCT as
`pcm train-pcm` runs it with its default `max_k: 1`: collect full-window base Picard trajectories, then regress
ONE Picard step of the PCM from X^0 onto the fixed point X* (pcm_policy.pcm.pct_loss, alpha(k) = 1/sqrt(Var(k))),
Adam. The trained PCM with model switching (one PCM step, then base) must need clearly fewer iterations than
base Picard on held-out draws, while a "PCM" equal to the base gains nothing, and the switched output must
still be the base model's sequential sample.
"""
import copy

import pytest
import torch
from diffusers import DDIMScheduler

from pcm_policy.pcm import collect_picard_trajectory, iterate_variances, pct_loss
from pcm_policy.sampling import StepCoefficients, sample_picard, sample_sequential, sample_switched
from tests.toys import C, DA, H, GaussianToy

S = 10
N_TRAIN, N_EVAL = 64, 16


def draw(n, generator):
    """x_T (n, H, Da), per-step noise (S, n, H, Da) (unused by DDIM, eta = 0), cond (n, C); float64."""
    return (torch.randn(n, H, DA, generator=generator, dtype=torch.float64),
            torch.randn(S, n, H, DA, generator=generator, dtype=torch.float64),
            torch.randn(n, C, generator=generator, dtype=torch.float64))


@pytest.fixture(scope="module")
def toy_pct():
    torch.manual_seed(0)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    scheduler.set_timesteps(S)
    base = GaussianToy(scheduler.alphas_cumprod, seed=0)
    g = torch.Generator().manual_seed(0)
    x_T, noise, cond = draw(N_TRAIN, g)
    iterates, xstar = collect_picard_trajectory(base, scheduler, x_T, noise, cond, tol=1e-4)
    coeffs = StepCoefficients.from_scheduler(scheduler, x_T.device, x_T.dtype)
    noise_terms = coeffs.noise_terms(noise)
    alpha = 1.0 / iterate_variances([iterates], [xstar]).clamp_min(1e-12).sqrt()

    pcm = copy.deepcopy(base)  # PCT starts from the base weights
    opt = torch.optim.Adam(pcm.parameters(), lr=1e-2)
    batches = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(300):
        b = torch.randint(0, N_TRAIN, (32,), generator=batches)
        k = torch.zeros(32, dtype=torch.long)  # max_k = 1: the one PCM step of the default switching schedule
        loss = pct_loss(pcm, coeffs, iterates[k, :, b].transpose(0, 1), k, xstar[:, b], noise_terms[:, b], cond[b],
                        alpha)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return scheduler, base, pcm, losses, draw(N_EVAL, g)


def _iterations(sample, held_out):
    x_T, noise, cond = held_out
    return torch.tensor([sample(x_T[i:i + 1], noise[:, i:i + 1], cond[i:i + 1])[1].iterations
                         for i in range(len(x_T))], dtype=torch.float64)


def test_pct_loss_falls_on_the_toy(toy_pct):
    *_, losses, _ = toy_pct
    assert losses[-1] < 1e-3 * losses[0]


def test_trained_pcm_needs_fewer_iterations_than_picard(toy_pct):
    scheduler, base, pcm, _, held_out = toy_pct
    picard = _iterations(lambda x, n, c: sample_picard(base, scheduler, x, n, c, tol=0.1), held_out)
    untrained = _iterations(lambda x, n, c: sample_switched(base, copy.deepcopy(base), scheduler, x, n, c, tol=0.1),
                            held_out)
    trained = _iterations(lambda x, n, c: sample_switched(base, pcm, scheduler, x, n, c, tol=0.1), held_out)
    assert torch.equal(untrained, picard)  # a PCM equal to the base gains nothing (measured: 5.06 iterations)
    assert trained.mean() <= picard.mean() - 2  # measured: 5.06 -> 2.50
    assert (trained <= picard).all()


def test_trained_pcm_switching_is_exact(toy_pct):
    scheduler, base, pcm, _, (x_T, noise, cond) = toy_pct
    ref = sample_sequential(base, scheduler, x_T, noise, cond)
    out, stats = sample_switched(base, pcm, scheduler, x_T, noise, cond, tol=0.0)
    assert stats.converged
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
