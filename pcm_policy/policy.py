"""DiffusionPolicy: normalizer + FiLM UNet + DDPM noise schedule, turning observation histories into action chunks.

The policy owns everything that must travel with its weights (the normalizer, the network shape, the noise
schedule). Sampling is delegated to a `ChunkSampler` (built once per sampler config and PCM, then cached), which
runs the pure samplers of `pcm_policy.sampling`: they only ever see a denoiser callable and the step coefficients.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn

from pcm_policy.data.normalizer import Normalizer
from pcm_policy.errors import PcmError
from pcm_policy.model.unet import ConditionalUnet1D
from pcm_policy.chunk_sampler import ChunkSampler
from pcm_policy.sampler_config import SamplerConfig


@dataclass
class PolicyConfig:
    obs_dim: int
    action_dim: int
    horizon: int = 16
    n_obs_steps: int = 2
    n_action_steps: int = 8
    down_dims: tuple[int, ...] = (64, 128, 256)
    diffusion_step_embed_dim: int = 256
    kernel_size: int = 5
    n_groups: int = 8
    noise_scheduler: dict[str, Any] = field(default_factory=lambda: dict(
        num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
        clip_sample=True, variance_type="fixed_small",
    ))

    def __post_init__(self):
        self.down_dims = tuple(int(d) for d in self.down_dims)
        self.noise_scheduler = dict(self.noise_scheduler)
        if self.n_obs_steps < 1 or self.n_action_steps < 1:
            raise PcmError("policy: n_obs_steps and n_action_steps must be >= 1")
        if self.n_obs_steps - 1 + self.n_action_steps > self.horizon:
            raise PcmError(f"policy: n_obs_steps-1+n_action_steps ({self.n_obs_steps - 1 + self.n_action_steps}) "
                           f"exceeds horizon ({self.horizon})")
        if self.horizon % (2 ** (len(self.down_dims) - 1)) != 0:
            raise PcmError(f"policy.horizon={self.horizon} must be divisible by 2^(len(down_dims)-1)")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any], obs_dim: int, action_dim: int) -> "PolicyConfig":
        keys = set(cls.__dataclass_fields__) - {"obs_dim", "action_dim"}
        return cls(obs_dim=obs_dim, action_dim=action_dim, **{k: cfg[k] for k in keys if k in cfg})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["down_dims"] = list(self.down_dims)
        return d


@dataclass
class ChunkResult:
    action: torch.Tensor  # (B, n_action_steps, Da): the actions to execute, unnormalized
    action_pred: torch.Tensor  # (B, horizon, Da): the whole predicted chunk, unnormalized
    stats: Any  # SamplerStats: iterations, evaluations, converged


class DiffusionPolicy(nn.Module):
    def __init__(self, config: PolicyConfig, normalizer: Normalizer):
        super().__init__()
        self.config = config
        self.normalizer = normalizer
        self.model = ConditionalUnet1D(
            input_dim=config.action_dim,
            global_cond_dim=config.obs_dim * config.n_obs_steps,
            down_dims=config.down_dims,
            diffusion_step_embed_dim=config.diffusion_step_embed_dim,
            kernel_size=config.kernel_size,
            n_groups=config.n_groups,
        )
        self.noise_scheduler = DDPMScheduler(**config.noise_scheduler)
        self._samplers: dict[tuple[SamplerConfig, int | None, torch.device], ChunkSampler] = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- training ------------------------------------------------------------------------------------
    def global_cond(self, obs: torch.Tensor) -> torch.Tensor:
        """Normalized, flattened observation history (B, To, Do) -> (B, To*Do)."""
        To = self.config.n_obs_steps
        if obs.ndim != 3 or obs.shape[1] < To or obs.shape[2] != self.config.obs_dim:
            raise PcmError(f"observation history has shape {tuple(obs.shape)}, expected (B, >={To}, {self.config.obs_dim})")
        nobs = self.normalizer.normalize("obs", obs[:, :To])
        return nobs.reshape(obs.shape[0], -1)

    def loss_noise(self, shape, generator: torch.Generator | None = None, device=None):
        """The noise (shape of the action batch) and one timestep per row that `compute_loss` trains on."""
        noise = torch.randn(shape, device=device, generator=generator)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (shape[0],), device=device,
                                  generator=generator)
        return noise, timesteps

    def compute_loss(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None,
                     noise: tuple[torch.Tensor, torch.Tensor] | None = None, model: nn.Module | None = None
                     ) -> torch.Tensor:
        """Diffusion Policy's objective: predict the noise (or the sample) added to a normalized action chunk.

        `noise` = (noise, timesteps) given instead of drawn from `generator` (distributed training draws them for
        the global batch and hands each rank its rows); `model` is the network to call (a DDP wrapper of
        self.model), by default self.model.
        """
        cond = self.global_cond(batch["obs"])
        trajectory = self.normalizer.normalize("action", batch["action"])
        if noise is None:
            noise = self.loss_noise(trajectory.shape, generator, trajectory.device)
        noise, timesteps = noise
        noisy = self.noise_scheduler.add_noise(trajectory, noise, timesteps)
        pred = (self.model if model is None else model)(noisy, timesteps, cond)
        target = {"epsilon": noise, "sample": trajectory}.get(self.noise_scheduler.config.prediction_type)
        if target is None:
            raise PcmError(f"policy.noise_scheduler.prediction_type={self.noise_scheduler.config.prediction_type!r} "
                           "is not supported (epsilon or sample)")
        return F.mse_loss(pred, target)

    # ---- sampling ------------------------------------------------------------------------------------
    def denoiser(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """The base network: x (N, H, Da) noisy normalized actions, t (N,) long timesteps, cond (N, To*Do)."""
        return self.model(x, t, cond)

    def sampler(self, config: SamplerConfig | Mapping[str, Any] | ChunkSampler | None = None,
                pcm: Callable | None = None) -> ChunkSampler:
        """The `ChunkSampler` for `config` on this policy's network (and `pcm`, for the switching samplers).

        Built once per (config, pcm, device) and cached, so per-chunk calls pay no set-up. A `ChunkSampler`
        passed in is returned as it is. Raises ConfigError for an invalid config or a missing PCM.
        """
        if isinstance(config, ChunkSampler):
            return config
        cfg = SamplerConfig.from_mapping(config or {})
        key = (cfg, None if pcm is None or not cfg.needs_pcm else id(pcm), self.device)
        if key not in self._samplers:
            self._samplers[key] = ChunkSampler(cfg, self.noise_scheduler.config, self.denoiser, pcm,
                                               sample_shape=(self.config.horizon, self.config.action_dim),
                                               device=self.device)
        return self._samplers[key]

    def scheduler_for(self, sampler: SamplerConfig | Mapping[str, Any] | ChunkSampler):
        """The inference scheduler (diffusers, `set_timesteps` done) of a sampler config's schedule."""
        if isinstance(sampler, ChunkSampler):
            return sampler.scheduler
        cfg = SamplerConfig.from_mapping(sampler)
        return self.sampler(SamplerConfig(name="sequential", scheduler=cfg.scheduler, steps=cfg.steps)).scheduler

    def make_noise(self, batch_size: int, sampler: SamplerConfig | Mapping[str, Any] | ChunkSampler,
                   generator: torch.Generator | None = None):
        """Initial noise x_T (B, H, Da) and per-step noise (S, B, H, Da), drawn once before sampling."""
        if not isinstance(sampler, ChunkSampler):
            cfg = SamplerConfig.from_mapping(sampler)
            sampler = self.sampler(SamplerConfig(name="sequential", scheduler=cfg.scheduler, steps=cfg.steps))
        return sampler.make_noise(batch_size, generator)

    @torch.no_grad()
    def predict_chunk(
        self,
        obs_history: torch.Tensor,
        sampler: SamplerConfig | Mapping[str, Any] | ChunkSampler | None = None,
        generator: torch.Generator | None = None,
        noise: tuple[torch.Tensor, torch.Tensor] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> ChunkResult:
        """Observation history (B, To, Do) or (To, Do) float -> `ChunkResult` (actions in env units).

        `sampler`: a `ChunkSampler` (see `DiffusionPolicy.sampler`) or a config (its cached sampler is used; a
        config naming a PCM sampler needs a ChunkSampler built with the PCM). `noise` = (x_T (B, H, Da), per-step
        noise (S, B, H, Da)), drawn from `generator` when None. Raises PcmError for a non-finite observation or
        a history of the wrong shape.
        """
        sampler = self.sampler(sampler)
        obs = torch.as_tensor(obs_history, dtype=torch.float32, device=self.device)
        if obs.ndim == 2:
            obs = obs[None]
        if not torch.isfinite(obs).all():
            raise PcmError("observation history contains NaN/inf")
        cond = self.global_cond(obs)
        x_T, step_noise = noise if noise is not None else sampler.make_noise(obs.shape[0], generator)
        naction, stats = sampler.sample(x_T, step_noise, cond, should_stop=should_stop)
        if not stats.converged:
            # An early-stopped Picard estimate can lie far outside the data (early iterates are partial sums);
            # keep it inside the normalized action range the policy was trained on.
            naction = naction.clamp(-1.0, 1.0)
        action_pred = self.normalizer.unnormalize("action", naction)
        start = self.config.n_obs_steps - 1
        action = action_pred[:, start:start + self.config.n_action_steps]
        return ChunkResult(action=action, action_pred=action_pred, stats=stats)

    # ---- persistence ---------------------------------------------------------------------------------
    def weights(self) -> dict[str, torch.Tensor]:
        """Everything needed to rebuild the policy's outputs: network weights and normalizer statistics."""
        state = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        state.update(self.normalizer.state_dict())
        return state

    def load_weights(self, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
        model_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        try:
            self.model.load_state_dict(model_state, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise PcmError(f"{source}: network weights do not match the configured policy shape "
                           f"({' '.join(first[1:2]).strip() or first[0]})") from None
        self.normalizer = Normalizer.from_state_dict({k: v for k, v in state.items() if k.startswith("normalizer.")})
