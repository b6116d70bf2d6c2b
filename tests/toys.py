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
        ang = t.double()[:, None] / 1000.0 * (torch.arange(4, dtype=torch.float64, device=x.device) + 1) * math.pi
        c = cond if cond is not None else torch.zeros(n, C, dtype=torch.float64, device=x.device)
        h = torch.tanh(self.l1(torch.cat([x.reshape(n, -1), torch.sin(ang), torch.cos(ang), c], 1)))
        return self.gain * torch.tanh(self.l2(h)).reshape(x.shape)
