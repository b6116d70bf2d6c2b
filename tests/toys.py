"""Small float64 denoisers for sampler tests: smooth, cheap, deterministic given a seed."""
import math

import torch
from torch import nn

H, DA, C = 4, 2, 3  # horizon, action dim, condition dim


class Toy(nn.Module):
    def __init__(self, seed=0, gain=2.0, hidden=32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1 = nn.Linear(H * DA + 8 + C, hidden).double()
        self.l2 = nn.Linear(hidden, H * DA).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
        self.gain = gain

    def forward(self, x, t, cond=None):
        n = x.shape[0]
        # on the input's device: the CUDA-graph test runs this toy on a GPU
        ang = t.double()[:, None] / 1000.0 * (torch.arange(4, dtype=torch.float64, device=x.device) + 1) * math.pi
        c = cond if cond is not None else torch.zeros(n, C, dtype=torch.float64, device=x.device)
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
