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
from pcm_policy.errors import ConfigError, PcmError
from pcm_policy.model.unet import ConditionalUnet1D
from pcm_policy.chunk_sampler import ChunkSampler
from pcm_policy.sampler_config import SamplerConfig


@dataclass
class PolicyConfig:
    """The policy's shape, saved in its checkpoint card.

    Attributes:
        obs_dim: Do, the low-dim observation size (PushT 20, Lift 19, Can 23).
        action_dim: Da, the action size (PushT 2 px targets; robomimic 7, or 10 with rot6d absolute actions).
        horizon: H, actions predicted per chunk; divisible by 2^(len(down_dims) - 1).
        n_obs_steps: To, observations in the history the chunk is conditioned on.
        n_action_steps: Ta, actions executed per chunk (the actions [To-1, To-1+Ta) of the chunk).
        down_dims: UNet channel widths per level.
        diffusion_step_embed_dim: size of the sinusoidal timestep embedding.
        kernel_size: temporal convolution kernel size.
        n_groups: GroupNorm groups.
        noise_scheduler: keyword arguments of the training `DDPMScheduler` (DDPM-100, squaredcos_cap_v2,
            epsilon prediction, clip_sample, fixed_small by default).
        film_scale: FiLM conditioning with a scale and a bias (this project's design); False = a bias only
            (imported Diffusion Policy `cond_predict_scale=False` / lerobot `use_film_scale_modulation=False`).
        final_n_groups: GroupNorm groups of the UNet's final conv block; None = `n_groups` (imported Diffusion
            Policy and lerobot networks use 8 there).

    Raises:
        PcmError: To or Ta < 1, To - 1 + Ta > H, or H not divisible by 2^(len(down_dims) - 1).
    """

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
    film_scale: bool = True
    final_n_groups: int | None = None

    # Fields a card leaves out when they hold their default, so the cards of this project's own policies (and
    # the comparisons of cards on resume and train.init_from) are what they were before the fields existed.
    _OPTIONAL_DEFAULTS = {"film_scale": True, "final_n_groups": None}

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
        """Build from a `policy=` mapping (unknown keys are ignored, missing ones take their defaults).

        Args:
            cfg: the policy keys (horizon, n_obs_steps, ..., noise_scheduler).
            obs_dim: Do, from the dataset.
            action_dim: Da, from the dataset.

        Raises:
            PcmError: an inconsistent shape (see the class).
        """
        keys = set(cls.__dataclass_fields__) - {"obs_dim", "action_dim"}
        return cls(obs_dim=obs_dim, action_dim=action_dim, **{k: cfg[k] for k in keys if k in cfg})

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain JSON-ready values (down_dims as a list), for the checkpoint card; `film_scale` and
        `final_n_groups` only when they differ from their defaults."""
        d = asdict(self)
        d["down_dims"] = list(self.down_dims)
        for key, default in self._OPTIONAL_DEFAULTS.items():
            if d[key] == default:
                del d[key]
        return d


@dataclass
class ChunkResult:
    """One predicted chunk (see the field comments for shapes; actions in env units, e.g. PushT px)."""

    action: torch.Tensor  # (B, n_action_steps, Da): the actions to execute, unnormalized
    action_pred: torch.Tensor  # (B, horizon, Da): the whole predicted chunk, unnormalized
    stats: Any  # SamplerStats: iterations, evaluations, converged


class DiffusionPolicy(nn.Module):
    """Diffusion Policy (Chi et al. 2023): an observation history -> a chunk of H actions, by denoising.

    Args:
        config: the policy's shape and noise schedule.
        normalizer: fitted min/max normalizer with fields "obs" and "action" (env units <-> [-1, 1]).
    """

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
            film_scale=config.film_scale,
            final_n_groups=config.final_n_groups,
        )
        self.noise_scheduler = DDPMScheduler(**config.noise_scheduler)
        self._samplers: dict[tuple[SamplerConfig, int | None, torch.device], ChunkSampler] = {}
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
        """The device of the network's parameters."""
        return next(self.model.parameters()).device

    # ---- training ------------------------------------------------------------------------------------
    def global_cond(self, obs: torch.Tensor) -> torch.Tensor:
        """The network's condition: the normalized, flattened observation history.

        Args:
            obs: observation history (B, >= To, Do) float in env units; the first To steps are used.

        Returns:
            (B, To*Do) in normalized units, on `obs`'s device.

        Raises:
            PcmError: `obs` is not (B, >= To, Do).
        """
        To = self.config.n_obs_steps
        if obs.ndim != 3 or obs.shape[1] < To or obs.shape[2] != self.config.obs_dim:
            raise PcmError(f"observation history has shape {tuple(obs.shape)}, expected (B, >={To}, {self.config.obs_dim})")
        nobs = self.normalizer.normalize("obs", obs[:, :To])
        return nobs.reshape(obs.shape[0], -1)

    def loss_noise(self, shape, generator: torch.Generator | None = None, device=None):
        """The noise and timesteps `compute_loss` trains on.

        Args:
            shape: the normalized action batch's shape (B, H, Da).
            generator: RNG for both draws (on `device`); None uses torch's global RNG.
            device: where to draw them.

        Returns:
            (noise of `shape`, standard normal float32; timesteps (B,) long, uniform in [0, num_train_timesteps)).
        """
        noise = torch.randn(shape, device=device, generator=generator)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (shape[0],), device=device,
                                  generator=generator)
        return noise, timesteps

    def compute_loss(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None,
                     noise: tuple[torch.Tensor, torch.Tensor] | None = None, model: nn.Module | None = None
                     ) -> torch.Tensor:
        """Diffusion Policy's objective: predict the noise (or the sample) added to a normalized action chunk.

        The DDPM loss (Ho et al. 2020, eq. 14): MSE between the prediction at `add_noise(x0, noise, t)` and the
        noise (epsilon prediction) or x0 (sample prediction).

        Args:
            batch: {"obs": (B, >= To, Do), "action": (B, H, Da)}, float in env units.
            generator: RNG for the noise and timesteps when `noise` is None.
            noise: (noise (B, H, Da), timesteps (B,) long) to use instead of drawing them (distributed training
                draws them for the global batch and hands each rank its rows).
            model: the network to call (e.g. a DDP wrapper of `self.model`); None = `self.model`.

        Returns:
            The scalar mean squared error (in normalized units).

        Raises:
            PcmError: an observation history of the wrong shape, or a prediction type other than epsilon/sample.
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
        """The base network as a denoiser.

        Args:
            x: noisy normalized actions, (N, H, Da) float.
            t: diffusion timesteps, (N,) long, one per row.
            cond: `global_cond` rows, (N, To*Do), or None.

        Returns:
            The prediction (eps for epsilon prediction), (N, H, Da).
        """
        return self.model(x, t, cond)

    def sampler(self, config: SamplerConfig | Mapping[str, Any] | ChunkSampler | None = None,
                pcm: Callable | None = None) -> ChunkSampler:
        """The `ChunkSampler` for `config` on this policy's network (and `pcm`, for the switching samplers).

        Built once per (config, pcm, device) and cached, so per-chunk calls pay no set-up.

        Args:
            config: a `SamplerConfig` or mapping (None: the defaults, sequential DDPM-100); a `ChunkSampler`
                is returned as it is.
            pcm: the PCM denoiser (see `ChunkSampler`); ignored by the non-switching samplers.

        Raises:
            ConfigError: an invalid config, or a switching sampler without `pcm`.
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
        """The inference scheduler (diffusers, `set_timesteps` done) of a sampler config's schedule.

        Raises:
            ConfigError: an invalid sampler config.
        """
        return self._schedule_sampler(sampler).scheduler

    def make_noise(self, batch_size: int, sampler: SamplerConfig | Mapping[str, Any] | ChunkSampler,
                   generator: torch.Generator | None = None):
        """Initial noise x_T (B, H, Da) and per-step noise (S, B, H, Da), standard normal, drawn once before sampling.

        Args:
            batch_size: B.
            sampler: a `ChunkSampler` or a config (only its schedule matters: S steps).
            generator: a CPU `torch.Generator` (see `ChunkSampler.make_noise`).

        Raises:
            ConfigError: an invalid sampler config.
        """
        return self._schedule_sampler(sampler).make_noise(batch_size, generator)

    def _schedule_sampler(self, sampler: SamplerConfig | Mapping[str, Any] | ChunkSampler) -> ChunkSampler:
        """`sampler` itself, or the cached sequential sampler of a config's schedule (no PCM needed)."""
        if isinstance(sampler, ChunkSampler):
            return sampler
        cfg = SamplerConfig.from_mapping(sampler)
        return self.sampler(SamplerConfig(name="sequential", scheduler=cfg.scheduler, steps=cfg.steps))

    @torch.no_grad()
    def predict_chunk(
        self,
        obs_history: torch.Tensor,
        sampler: SamplerConfig | Mapping[str, Any] | ChunkSampler | None = None,
        generator: torch.Generator | None = None,
        noise: tuple[torch.Tensor, torch.Tensor] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> ChunkResult:
        """Sample one action chunk per observation history.

        A chunk that did not converge (stopped early) is clamped to the normalized range of the training actions
        (`normalized_action_range`) before unnormalizing.

        Args:
            obs_history: (B, To, Do) or (To, Do), float, in env units.
            sampler: a `ChunkSampler` (see `DiffusionPolicy.sampler`) or a config (its cached sampler is used;
                a config naming a PCM sampler needs a `ChunkSampler` built with the PCM).
            generator: RNG for the noise when `noise` is None.
            noise: (x_T (B, H, Da), per-step noise (S, B, H, Da)) to use instead of drawing it.
            should_stop: anytime stop, checked between Picard rounds (see `ChunkSampler.sample`).

        Returns:
            `ChunkResult`: `action` (B, Ta, Da) and `action_pred` (B, H, Da) in env units, and the sampler stats.

        Raises:
            PcmError: a non-finite observation or a history of the wrong shape.
            ConfigError: an invalid sampler config, or a PCM sampler given as a config.
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
            low, high = (t.to(naction) for t in self.normalized_action_range())
            naction = torch.minimum(torch.maximum(naction, low), high)
        action_pred = self.normalizer.unnormalize("action", naction)
        start = self.config.n_obs_steps - 1
        action = action_pred[:, start:start + self.config.n_action_steps]
        return ChunkResult(action=action, action_pred=action_pred, stats=stats)

    # ---- persistence ---------------------------------------------------------------------------------
    def weights(self) -> dict[str, torch.Tensor]:
        """Everything needed to rebuild the policy's outputs: network weights and normalizer statistics.

        Returns:
            {"model.<name>": tensor, "normalizer.<field>.<stat>": tensor}, contiguous CPU tensors (safetensors-ready).
        """
        state = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        state.update(self.normalizer.state_dict())
        return state

    def load_weights(self, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load what `weights` returned: the network (strictly) and a new normalizer.

        Args:
            state: {"model.*", "normalizer.*"} tensors.
            source: the file named in error messages.

        Raises:
            PcmError: the network weights do not fit this policy's shape.
            ValueError: malformed normalizer entries.
        """
        model_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        try:
            self.model.load_state_dict(model_state, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise PcmError(f"{source}: network weights do not match the configured policy shape "
                           f"({' '.join(first[1:2]).strip() or first[0]})") from None
        self.normalizer = Normalizer.from_state_dict({k: v for k, v in state.items() if k.startswith("normalizer.")})
        self._check_clip_range()
