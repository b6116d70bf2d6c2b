"""Picard Consistency Training pieces: differentiable Picard map, trajectory collection, PCT loss."""

import copy

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from pcm_policy.pcm import collect_picard_trajectory, iterate_variances, pct_loss
from pcm_policy.sampling import StepCoefficients, picard_step, sample_sequential

from tests.toys import C, DA, H, Toy



def setup(kind="ddpm", S=20, B=2, clip=True):
    kw = dict(num_train_timesteps=1000, clip_sample=clip)
    sch = DDPMScheduler(**kw) if kind == "ddpm" else DDIMScheduler(**kw)
    sch.set_timesteps(S)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(B, H, DA, generator=g, dtype=torch.float64)
    noise = torch.randn(S, B, H, DA, generator=g, dtype=torch.float64)
    cond = torch.randn(B, C, generator=g, dtype=torch.float64)
    return sch, x_T, noise, cond


@torch.no_grad()
def sequential_trajectory(den, coeffs, x_T, nt, cond):
    ys = [x_T]
    for j in range(coeffs.num_steps):
        eps = den(ys[-1], coeffs.timesteps[j].expand(x_T.shape[0]), cond)
        ys.append(coeffs.step_no_noise(ys[-1], eps, j) + nt[j])
    return torch.stack(ys)


def test_collect_trajectory_fixed_point_is_sequential():
    for kind, S in [("ddpm", 20), ("ddim", 10)]:
        sch, x_T, noise, cond = setup(kind, S)
        den = Toy(seed=1, gain=1.0, hidden=16)
        iterates, xstar = collect_picard_trajectory(den, sch, x_T, noise, cond, tol=0.0)
        K = iterates.shape[0] - 1
        assert iterates.shape == (K + 1, S + 1, 2, H, DA) and 1 <= K <= S
        assert torch.equal(iterates[-1], xstar)
        assert torch.equal(iterates[0], x_T.expand(S + 1, *x_T.shape))  # X^0: every slot = x_T
        coeffs = StepCoefficients.from_scheduler(sch, x_T.device, x_T.dtype)
        nt = coeffs.noise_terms(noise)
        traj = sequential_trajectory(den, coeffs, x_T, nt, cond)
        torch.testing.assert_close(xstar, traj, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(xstar[-1], sample_sequential(den, sch, x_T, noise, cond), atol=1e-10, rtol=1e-10)
        # each recorded iterate is one full-window Picard map of the previous one (anchor at 0 until slot 1 ...)
        torch.testing.assert_close(picard_step(den, coeffs, iterates[0], nt, cond), iterates[1], atol=1e-12, rtol=0)
        # X* is a fixed point of the map
        torch.testing.assert_close(picard_step(den, coeffs, xstar, nt, cond), xstar, atol=1e-10, rtol=1e-10)


def test_picard_step_is_differentiable():
    sch, x_T, noise, cond = setup("ddpm", 10)
    den = Toy(seed=2, gain=1.0, hidden=16)
    coeffs = StepCoefficients.from_scheduler(sch, x_T.device, x_T.dtype)
    nt = coeffs.noise_terms(noise)
    Y = torch.randn(11, 2, H, DA, dtype=torch.float64)
    Y[0] = x_T
    phi = picard_step(den, coeffs, Y, nt, cond)
    assert phi.shape == Y.shape and torch.equal(phi[0], Y[0])
    phi.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in den.parameters())
    # gradient w.r.t. the inputs too (gradcheck on a tiny problem)
    small = Toy(seed=3, gain=1.0, hidden=16)
    Yg = Y.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y: picard_step(small, coeffs, y, nt, cond), (Yg,), eps=1e-6, atol=1e-5)


def test_pct_loss_gradients_and_weighting():
    sch, x_T, noise, cond = setup("ddpm", 12, B=3)
    base = Toy(seed=4, gain=1.0, hidden=16)
    iterates, xstar = collect_picard_trajectory(base, sch, x_T, noise, cond, tol=1e-6)
    coeffs = StepCoefficients.from_scheduler(sch, x_T.device, x_T.dtype)
    nt = coeffs.noise_terms(noise)
    var = iterate_variances([iterates], [xstar])
    assert var.shape[0] == iterates.shape[0] and var[-1] == 0 and (var[:-1] > 0).all()
    alpha = 1.0 / var.clamp_min(1e-12).sqrt()
    pcm = copy.deepcopy(base)
    k = torch.tensor([0, 1, 2])  # per-sample k
    Xk = iterates[k, :, torch.arange(3)].transpose(0, 1)  # (S+1, B, ...) with sample b taken at k_b
    loss = pct_loss(pcm, coeffs, Xk, k, xstar, nt, cond, alpha)
    assert loss.ndim == 0 and loss.item() > 0
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pcm.parameters())
    assert all(p.grad is None for p in base.parameters())
    # alpha semantics: tensor indexed by k == explicit per-sample weights == callable
    l2 = pct_loss(pcm, coeffs, Xk, k, xstar, nt, cond, lambda kk: alpha[kk])
    torch.testing.assert_close(l2, loss.detach())
    # the loss takes the PCM step through the UNCLIPPED map: it equals the explicit unclipped Picard step,
    # and differs from the clipped one where clipping is active (the toy's x0 predictions leave [-1, 1])
    l_unclipped = (picard_step(pcm, coeffs.unclipped(), Xk, nt, cond) - xstar).pow(2).transpose(0, 1).reshape(3, -1).mean(1)
    torch.testing.assert_close(pct_loss(pcm, coeffs, Xk, k, xstar, nt, cond), l_unclipped.mean().detach())
    assert coeffs.clip_range is not None and coeffs.unclipped().clip_range is None
    # unweighted loss at the fixed point with the base weights is ~0 (X* is base's fixed point) where nothing clips
    sch_nc, *_ = setup("ddpm", 12, B=3, clip=False)
    _, xstar_nc = collect_picard_trajectory(base, sch_nc, x_T, noise, cond, tol=1e-8)
    coeffs_nc = StepCoefficients.from_scheduler(sch_nc, x_T.device, x_T.dtype)
    l0 = pct_loss(base, coeffs_nc, xstar_nc, 0, xstar_nc, coeffs_nc.noise_terms(noise), cond)
    assert l0.item() < 1e-10
    # a few optimisation steps reduce the loss
    opt = torch.optim.Adam(pcm.parameters(), lr=1e-2)
    first = None
    for _ in range(20):
        opt.zero_grad()
        l = pct_loss(pcm, coeffs, Xk, k, xstar, nt, cond, alpha)
        first = l.item() if first is None else first
        l.backward()
        opt.step()
    assert l.item() < first


def test_slot_weights_aim_the_loss_at_chosen_slots():
    from pcm_policy.pcm.loss import slot_weights

    for name in ("uniform", "linear", "final"):
        w = slot_weights(name, 11)
        assert w.shape == (11,) and abs(w.mean().item() - 1) < 1e-6
    assert slot_weights("linear", 11)[0] == 0 and slot_weights("linear", 11)[-1] > slot_weights("linear", 11)[5]
    assert slot_weights("final", 11)[:-1].abs().sum() == 0
    sch, x_T, noise, cond = setup("ddim", 10, B=2)
    base = Toy(seed=4, gain=1.0, hidden=16)
    iterates, xstar = collect_picard_trajectory(base, sch, x_T, noise, cond, tol=1e-6)
    coeffs = StepCoefficients.from_scheduler(sch, x_T.device, x_T.dtype)
    nt = coeffs.noise_terms(noise)
    pcm = copy.deepcopy(base)
    Xk = iterates[0]
    sq = (picard_step(pcm, coeffs.unclipped(), Xk, nt, cond) - xstar).pow(2).detach()  # (S+1, B, H, Da)
    per_slot = sq.reshape(sq.shape[0], -1).mean(1)
    assert per_slot[-1] > 0
    # weights of mean 1 over S+1 slots: 'final' is exactly the output slot's mean squared error, 'linear' the
    # index-weighted average of the slots' errors
    final = pct_loss(pcm, coeffs, Xk, 0, xstar, nt, cond, slot_weight=slot_weights("final", 11))
    torch.testing.assert_close(final.detach(), per_slot[-1])
    linear = pct_loss(pcm, coeffs, Xk, 0, xstar, nt, cond, slot_weight=slot_weights("linear", 11))
    torch.testing.assert_close(linear.detach(), (slot_weights("linear", 11).double() * per_slot).mean())
