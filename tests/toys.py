"""Shared test doubles for the sampler tests: small float64 denoisers (smooth, cheap, deterministic given a seed),
diffusers schedulers, the noise of a batch, diffusers' own sequential loop as the independent reference, and a
recorder of denoiser calls."""
import math

import torch
from diffusers import DDIMParallelScheduler, DDIMScheduler, DDPMParallelScheduler, DDPMScheduler
from torch import nn

H, DA, C = 4, 2, 3  # horizon, action dim, condition dim


class Toy(nn.Module):
    """A tiny float64 MLP denoiser with a sinusoidal timestep embedding and optional conditioning."""

    def __init__(self, seed=0, gain=2.0, hidden=32, cond_dim=C):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1 = nn.Linear(H * DA + 8 + cond_dim, hidden).double()
        self.l2 = nn.Linear(hidden, H * DA).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
        self.gain, self.cond_dim = gain, cond_dim

    def forward(self, x, t, cond=None):
        n = x.shape[0]
        # on the input's device: the CUDA-graph test runs this toy on a GPU
        ang = t.double()[:, None] / 1000.0 * (torch.arange(4, dtype=torch.float64, device=x.device) + 1) * math.pi
        c = cond if cond is not None else torch.zeros(n, self.cond_dim, dtype=torch.float64, device=x.device)
        h = torch.tanh(self.l1(torch.cat([x.reshape(n, -1), torch.sin(ang), torch.cos(ang), c], 1)))
        return self.gain * torch.tanh(self.l2(h)).reshape(x.shape)


class GaussianToy(nn.Module):
    """The exact eps-predictor for Gaussian data x0 ~ N(mu(cond), data_std^2 I), mu(cond) = cond @ W:

        eps(x_t, t, cond) = sqrt(1 - abar_t) (x_t - sqrt(abar_t) mu) / (abar_t data_std^2 + 1 - abar_t),

    written as coef_x[t] * x + coef_mu[t] * mu with the two per-timestep tables as trainable parameters (1000
    entries each, one per training timestep). A copy is a PCM that PCT can fit exactly: for each sampling step
    it has the two degrees of freedom one Picard step from X^0 needs to land on the (affine) fixed point.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, seed=0, data_std=0.5):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("W", torch.randn(C, H * DA, generator=g, dtype=torch.float64) * 0.5)
        abar = alphas_cumprod.double()
        coef_x = (1 - abar).sqrt() / (abar * data_std**2 + 1 - abar)
        self.coef_x = nn.Parameter(coef_x)
        self.coef_mu = nn.Parameter(-abar.sqrt() * coef_x)

    def forward(self, x, t, cond):
        mu = (cond @ self.W).reshape(x.shape)
        return self.coef_x[t].reshape(-1, 1, 1) * x + self.coef_mu[t].reshape(-1, 1, 1) * mu


class PerturbedGaussianToy(nn.Module):
    """Smooth, realistic toy: the exact eps-predictor for N(0, 0.25 I) data plus a small MLP perturbation."""

    def __init__(self, scheduler, seed=5):
        super().__init__()
        self.ac = scheduler.alphas_cumprod.double()
        self.mlp = Toy(seed=seed, gain=0.1)

    def forward(self, x, t, cond=None):
        a = self.ac[t].reshape(-1, 1, 1)
        return (1 - a).sqrt() * x / (a * 0.25 + (1 - a)) + self.mlp(x, t, cond)


def make_scheduler(kind, steps, pred="epsilon", clip=False, parallel=False):
    """A diffusers DDPM or DDIM scheduler (T = 1000, squaredcos_cap_v2) with `set_timesteps(steps)` done."""
    kw = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=pred, clip_sample=clip)
    if kind == "ddpm":
        s = (DDPMParallelScheduler if parallel else DDPMScheduler)(**kw)
    else:
        s = (DDIMParallelScheduler if parallel else DDIMScheduler)(**kw, set_alpha_to_one=True)
    s.set_timesteps(steps)
    return s


def draw(S, B, seed=0):
    """x_T (B, H, DA), per-step noise z_j (S, B, H, DA) drawn from generators seeded 1000*seed+j (the reference
    replays them), cond (B, C); float64."""
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(B, H, DA, generator=g, dtype=torch.float64)
    noise = torch.stack([torch.randn(B, H, DA, generator=torch.Generator().manual_seed(1000 * seed + j),
                                     dtype=torch.float64) for j in range(S)])
    return x_T, noise, torch.randn(B, C, generator=g, dtype=torch.float64)


@torch.no_grad()
def diffusers_reference(denoiser, scheduler, x_T, cond, seed=0):
    """Independent sequential loop through diffusers' own `step`. DDPM draws its noise from a generator seeded
    exactly as `draw` seeded noise[j], so both sides use the same z_j; DDIM (eta=0) draws nothing."""
    y = x_T
    for j, t in enumerate(scheduler.timesteps):
        eps = denoiser(y, t.expand(y.shape[0]), cond)
        if isinstance(scheduler, (DDPMScheduler, DDPMParallelScheduler)):
            y = scheduler.step(eps, t, y, generator=torch.Generator().manual_seed(1000 * seed + j)).prev_sample
        else:
            y = scheduler.step(eps, t, y, eta=0.0).prev_sample
    return y


class Recorder:
    """Wraps a denoiser and records each call's shapes (x, t, cond), extra arguments (e.g. a LoRA scale) and count."""

    def __init__(self, fn):
        self.fn, self.shapes, self.extra, self.calls = fn, [], [], 0

    def __call__(self, x, t, cond, *extra):
        self.shapes.append((tuple(x.shape), tuple(t.shape), None if cond is None else tuple(cond.shape)))
        self.extra.append(extra)
        self.calls += 1
        return self.fn(x, t, cond, *extra)
