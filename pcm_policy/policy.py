"""DiffusionPolicy: normalizer + FiLM UNet + DDPM noise schedule, turning observation histories into action chunks.

The policy owns everything that must travel with its weights (the normalizer, the network shape, the noise
schedule). Sampling is delegated to the pure samplers in `pcm_policy.sampling` through a `SamplerConfig`;
they only ever see a denoiser callable and a scheduler.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn

from pcm_policy.data.normalizer import Normalizer
from pcm_policy.errors import ConfigError, PcmError
from pcm_policy.model.unet import ConditionalUnet1D
from pcm_policy.sampler_config import SamplerConfig, build_scheduler, run_sampler


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
        self.pcm: Callable | None = None  # attached by pcm_policy.pcm (full copy or LoRA on self.model)
        self._schedulers: dict[tuple[str, int], Any] = {}
        self._check_clip_range()

    def normalized_action_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dim (low, high) of the training actions in normalized units, float32 (Da,) on the CPU
        ([-1, 1], the limits normalizer's range, for a normalizer saved without min/max statistics)."""
        p = self.normalizer.params["action"]
        if "min" not in p or "max" not in p:
            return -torch.ones_like(p["scale"]), torch.ones_like(p["scale"])
        return (p["min"] * p["scale"] + p["offset"]), (p["max"] * p["scale"] + p["offset"])

    def _check_clip_range(self) -> None:
        """clip_sample clips every x0 estimate to [-r, r] in normalized units; unless that covers the training
        actions it silently caps sampled actions (at mean +- r std with a gaussian normalizer, at +-r raw units
        with identity), so the combination is refused. Raises ConfigError naming both keys."""
        sched = self.noise_scheduler.config
        if not sched.clip_sample or "action" not in self.normalizer:
            return
        r = float(sched.clip_sample_range)
        low, high = self.normalized_action_range()
        lo, hi = float(low.min()), float(high.max())
        if lo < -r * (1 + 1e-4) or hi > r * (1 + 1e-4):
            raise ConfigError(f"dataset.normalizer with policy.noise_scheduler.clip_sample=true: the normalizer "
                              f"maps the training actions to [{lo:.3g}, {hi:.3g}] but clip_sample clips sampled "
                              f"actions to [{-r:g}, {r:g}]; use dataset.normalizer=limits or "
                              "policy.noise_scheduler.clip_sample=false")

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
        return self.model(x, t, cond)

    def scheduler_for(self, sampler: SamplerConfig):
        key = (sampler.scheduler, sampler.steps)
        if key not in self._schedulers:
            self._schedulers[key] = build_scheduler(self.noise_scheduler.config, sampler.scheduler, sampler.steps)
        return self._schedulers[key]

    def make_noise(self, batch_size: int, sampler: SamplerConfig, generator: torch.Generator | None = None):
        """Initial noise x_T (B, H, Da) and per-step noise (S, B, H, Da), drawn once before sampling."""
        S = len(self.scheduler_for(sampler).timesteps)
        shape = (batch_size, self.config.horizon, self.config.action_dim)
        x_T = torch.randn(shape, generator=generator)
        noise = torch.randn((S, *shape), generator=generator)
        return x_T.to(self.device), noise.to(self.device)

    @torch.no_grad()
    def predict_chunk(
        self,
        obs_history: torch.Tensor,
        sampler: SamplerConfig | Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
        noise: tuple[torch.Tensor, torch.Tensor] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> ChunkResult:
        """Observation history (B, To, Do) or (To, Do) -> action chunk. `noise` = (x_T, per-step noise)."""
        sampler = SamplerConfig.from_mapping(sampler or {})
        obs = torch.as_tensor(obs_history, dtype=torch.float32, device=self.device)
        if obs.ndim == 2:
            obs = obs[None]
        if not torch.isfinite(obs).all():
            raise PcmError("observation history contains NaN/inf")
        cond = self.global_cond(obs)
        x_T, step_noise = noise if noise is not None else self.make_noise(obs.shape[0], sampler, generator)
        naction, stats = run_sampler(sampler, self.scheduler_for(sampler), x_T, step_noise, cond,
                                     base=self.denoiser, pcm=self.pcm, should_stop=should_stop)
        if not stats.converged:
            # An early-stopped Picard estimate can lie far outside the data (early iterates are partial sums);
            # keep it inside the normalized action range the policy was trained on.
            low, high = (t.to(naction) for t in self.normalized_action_range())
            naction = torch.minimum(torch.maximum(naction, low), high)
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
        self._check_clip_range()
