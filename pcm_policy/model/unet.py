"""FiLM-conditioned temporal 1-D UNet, the Diffusion Policy action head (Chi et al. 2023).

Input is an action sequence (N, H, Da) at diffusion timesteps t (N,) (one per row, so a whole Picard window
can be evaluated in one call), conditioned on a global vector (observation history, flattened). Every residual
block receives the timestep embedding concatenated with the global condition and applies it as a FiLM
(per-channel scale and bias, or bias only) to its first convolution's output.

Two switches exist for networks trained elsewhere (`pcm_policy.interop`), both defaulting to this project's own
design: `film_scale=False` is Diffusion Policy's `cond_predict_scale=False` / lerobot's
`use_film_scale_modulation=False` (the condition only shifts the features), and `final_n_groups` is the GroupNorm
group count of the final conv block, which both of those implementations fix at 8 whatever `n_groups` says.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


class SinusoidalPosEmb(nn.Module):
    """Transformer-style sinusoidal embedding of diffusion timesteps (Vaswani et al. 2017, section 3.5).

    Args:
        dim: embedding size (even, >= 4): dim/2 sines then dim/2 cosines.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Embed timesteps t (N,) (any numeric dtype) -> (N, dim) float32."""
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
        angles = t.float()[:, None] * freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Conv1dBlock(nn.Sequential):
    """Conv1d -> GroupNorm -> Mish."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, n_groups: int):
        super().__init__(
            nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, out_channels),
            nn.Mish(),
        )


class ConditionalResidualBlock1D(nn.Module):
    """Two `Conv1dBlock`s with FiLM conditioning after the first, plus a residual connection.

    FiLM: a per-channel scale and bias predicted from `cond` (the first `out_channels` outputs of
    `cond_encoder.1` are the scale, the rest the bias), or a bias only with `film_scale=False`. The residual is a
    1x1 conv when the channel count changes.

    Args:
        in_channels: input channels.
        out_channels: output channels (divisible by n_groups).
        cond_dim: size of the condition vector (timestep embedding + global condition).
        kernel_size: temporal kernel size (odd keeps the length).
        n_groups: GroupNorm groups.
        film_scale: predict a scale as well as a bias (`cond_encoder.1` then has 2 * out_channels outputs).
    """

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, kernel_size: int, n_groups: int,
                 film_scale: bool = True):
        super().__init__()
        self.out_channels = out_channels
        self.film_scale = film_scale
        self.conv1 = Conv1dBlock(in_channels, out_channels, kernel_size, n_groups)
        self.conv2 = Conv1dBlock(out_channels, out_channels, kernel_size, n_groups)
        # FiLM: predict a per-channel scale and bias (or only a bias) from the condition.
        self.cond_encoder = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, out_channels * (2 if film_scale else 1)))
        self.residual = nn.Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (N, in_channels, H), cond (N, cond_dim) -> (N, out_channels, H)."""
        out = self.conv1(x)
        if self.film_scale:
            scale, bias = self.cond_encoder(cond).unsqueeze(-1).chunk(2, dim=1)
            out = scale * out + bias
        else:
            out = out + self.cond_encoder(cond).unsqueeze(-1)
        out = self.conv2(out)
        return out + self.residual(x)


class ConditionalUnet1D(nn.Module):
    """The temporal UNet denoiser (Diffusion Policy's `ConditionalUnet1D` design; see the module docstring).

    Args:
        input_dim: Da, action channels in and out.
        global_cond_dim: size of the global condition (To*Do); 0 with no condition.
        down_dims: channels per level; the horizon must be divisible by 2^(len(down_dims) - 1).
        diffusion_step_embed_dim: size of the sinusoidal timestep embedding.
        kernel_size: temporal kernel size.
        n_groups: GroupNorm groups (each of down_dims divisible by it).
        film_scale: FiLM with a scale and a bias (True, this project's design) or a bias only.
        final_n_groups: GroupNorm groups of the final conv block; None = `n_groups` (Diffusion Policy and lerobot
            use 8 there whatever `n_groups` is).
    """

    def __init__(
        self,
        input_dim: int,
        global_cond_dim: int,
        down_dims: Sequence[int] = (256, 512, 1024),
        diffusion_step_embed_dim: int = 256,
        kernel_size: int = 5,
        n_groups: int = 8,
        film_scale: bool = True,
        final_n_groups: int | None = None,
    ):
        super().__init__()
        dsed = diffusion_step_embed_dim
        self.diffusion_step_encoder = nn.Sequential(
            SinusoidalPosEmb(dsed), nn.Linear(dsed, dsed * 4), nn.Mish(), nn.Linear(dsed * 4, dsed)
        )
        cond_dim = dsed + global_cond_dim
        dims = [input_dim, *down_dims]
        pairs = list(zip(dims[:-1], dims[1:]))

        def block(i: int, o: int) -> ConditionalResidualBlock1D:
            return ConditionalResidualBlock1D(i, o, cond_dim, kernel_size, n_groups, film_scale)

        self.down_modules = nn.ModuleList()
        for level, (dim_in, dim_out) in enumerate(pairs):
            last = level == len(pairs) - 1
            self.down_modules.append(nn.ModuleList([
                block(dim_in, dim_out),
                block(dim_out, dim_out),
                nn.Conv1d(dim_out, dim_out, 3, stride=2, padding=1) if not last else nn.Identity(),
            ]))
        mid = down_dims[-1]
        self.mid_modules = nn.ModuleList([block(mid, mid), block(mid, mid)])
        self.up_modules = nn.ModuleList()
        # Every up level undoes one downsampling (there is one fewer up level than down levels).
        for dim_in, dim_out in reversed(pairs[1:]):
            self.up_modules.append(nn.ModuleList([
                block(dim_out * 2, dim_in),
                block(dim_in, dim_in),
                nn.ConvTranspose1d(dim_in, dim_in, 4, stride=2, padding=1),
            ]))
        start = down_dims[0]
        final_groups = n_groups if final_n_groups is None else final_n_groups
        self.final_conv = nn.Sequential(Conv1dBlock(start, start, kernel_size, final_groups),
                                        nn.Conv1d(start, input_dim, 1))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, global_cond: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the network output (eps, or x0 for sample prediction) for a batch of noisy action chunks.

        Args:
            sample: noisy normalized actions, (N, H, Da) float.
            timestep: diffusion timesteps, (N,) long (one per row) or a scalar for all rows.
            global_cond: (N, global_cond_dim) or None.

        Returns:
            (N, H, Da), in the network's float dtype.
        """
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], device=sample.device)
        if timestep.ndim == 0:
            timestep = timestep[None]
        timestep = timestep.expand(sample.shape[0])
        cond = self.diffusion_step_encoder(timestep)
        if global_cond is not None:
            cond = torch.cat([cond, global_cond], dim=-1)

        x = sample.transpose(1, 2)  # (N, Da, H): convolve over time
        skips = []
        for res1, res2, down in self.down_modules:
            x = res2(res1(x, cond), cond)
            skips.append(x)
            x = down(x)
        for res in self.mid_modules:
            x = res(x, cond)
        for res1, res2, up in self.up_modules:
            x = torch.cat([x, skips.pop()], dim=1)
            x = res2(res1(x, cond), cond)
            x = up(x)
        return self.final_conv(x).transpose(1, 2)
