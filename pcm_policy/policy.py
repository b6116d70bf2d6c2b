"""DiffusionPolicy: normalizer + FiLM UNet + DDPM noise schedule, turning observation histories into action chunks.

The policy owns everything that must travel with its weights (the normalizer, the network shape, the noise
schedule). Sampling is delegated to a `ChunkSampler` (built once per sampler config and PCM, then cached), which
runs the pure samplers of `pcm_policy.sampling`: they only ever see a denoiser callable and the step coefficients.
"""
from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn

from pcm_policy.backends.denoisers import BackendCache, NetworkShape, build_denoisers
from pcm_policy.chunk_sampler import ChunkSampler
from pcm_policy.data.normalizer import Normalizer
from pcm_policy.data.sequence_sampler import check_window
from pcm_policy.errors import ConfigError, PcmError
from pcm_policy.model.unet import ConditionalUnet1D
from pcm_policy.model.vision import VisionEncoder, VisionEncoderConfig, build_vision_encoder
from pcm_policy.options import check_choice, check_flag, check_int, check_number, show
from pcm_policy.sampler_config import SamplerConfig


# The DDPM noise-schedule keys the samplers reproduce exactly (pcm_policy.sampling.schedule): "sigmoid" betas
# exist for DDPM only (DDIM rejects them), and only fixed_small DDPM variance is implemented.
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "sample")  # what DiffusionPolicy.compute_loss trains
NOISE_SCHEDULER_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
                        "clip_sample", "clip_sample_range", "variance_type")


@dataclass
class PolicyConfig:
    """The policy's shape and noise schedule, saved in its checkpoint card; validated on construction.

    Attributes:
        obs_dim: Do, the low-dim observation size (PushT 20, Lift 19, Can 23).
        action_dim: Da, the action size (PushT 2 px targets; robomimic 7, or 10 with rot6d absolute actions).
        horizon: H, actions predicted per chunk; divisible by 2^(len(down_dims) - 1).
        n_obs_steps: To, observations in the history the chunk is conditioned on.
        n_action_steps: Ta, actions executed per chunk (the actions [To-1, To-1+Ta) of the chunk).
        down_dims: UNet channel widths per level (each divisible by n_groups).
        diffusion_step_embed_dim: size of the sinusoidal timestep embedding (even).
        kernel_size: temporal convolution kernel size (odd).
        n_groups: GroupNorm groups.
        noise_scheduler: keyword arguments of the training `DDPMScheduler` (DDPM-100, squaredcos_cap_v2,
            epsilon prediction, clip_sample, fixed_small by default); only `NOISE_SCHEDULER_KEYS`.
        film_scale: FiLM conditioning with a scale and a bias (this project's design); False = a bias only
            (imported Diffusion Policy `cond_predict_scale=False` / lerobot `use_film_scale_modulation=False`).
        final_n_groups: GroupNorm groups of the UNet's final conv block; None = `n_groups` (imported Diffusion
            Policy and lerobot networks use 8 there); it must divide down_dims[0].
        vision: the image encoder's keys (`pcm_policy.model.vision.VisionEncoderConfig`) of an image policy; None
            for a low-dim policy.
        camera_keys: the cameras an image policy sees, in the order of the observation's camera axis (PushT:
            `img`); one shared encoder encodes them all. Empty for a low-dim policy.

    Raises:
        ConfigError: a field of the wrong type or range, or shapes the UNet cannot take, naming `policy.<key>`.
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
    vision: dict[str, Any] | None = None
    camera_keys: tuple[str, ...] = ()

    # Fields a card leaves out when they hold their default, so the cards of this project's own policies (and
    # the comparisons of cards on resume and train.init_from) are what they were before the fields existed.
    _OPTIONAL_DEFAULTS = {"film_scale": True, "final_n_groups": None, "vision": None, "camera_keys": []}

    def __post_init__(self):
        _check_policy(asdict(self), "policy")
        self.down_dims = tuple(int(d) for d in self.down_dims)
        self.noise_scheduler = dict(self.noise_scheduler)
        self.camera_keys = tuple(str(k) for k in self.camera_keys)
        if self.vision is not None:
            self.vision = VisionEncoderConfig.from_mapping(self.vision).to_dict()

    @property
    def vision_config(self) -> VisionEncoderConfig | None:
        """The image encoder's config (None for a low-dim policy)."""
        return None if self.vision is None else VisionEncoderConfig.from_mapping(self.vision)

    @property
    def step_cond_dim(self) -> int:
        """Condition features per observation step: Do, plus F per camera for an image policy."""
        vision = self.vision_config
        return self.obs_dim + (len(self.camera_keys) * vision.feature_dim if vision else 0)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any], obs_dim: int, action_dim: int, key: str = "policy"
                     ) -> "PolicyConfig":
        """Build from a `policy=` mapping (keys that are not fields, e.g. `name`, are ignored; missing ones take
        their defaults).

        Args:
            cfg: the policy keys (horizon, n_obs_steps, ..., noise_scheduler).
            obs_dim: Do, from the dataset.
            action_dim: Da, from the dataset.
            key: the group's config key, for messages.

        Raises:
            ConfigError: a bad value or an inconsistent shape (see the class), naming `<key>.<field>`.
        """
        fields = {f: v for f, v in cls.__dataclass_fields__.items() if f not in ("obs_dim", "action_dim")}
        values = {k: cfg[k] for k in fields if k in cfg}
        defaults = asdict(cls(obs_dim=1, action_dim=1))
        _check_policy({**defaults, **values, "obs_dim": obs_dim, "action_dim": action_dim}, key)
        return cls(obs_dim=obs_dim, action_dim=action_dim, **values)

    @property
    def num_train_timesteps(self) -> int:
        """T, the training timesteps of the noise schedule (100 when the schedule leaves it out)."""
        return int(self.noise_scheduler.get("num_train_timesteps", 100))

    def build_network(self) -> ConditionalUnet1D:
        """A freshly initialised action head of this shape (conditioned on To x `step_cond_dim` features), on the
        current default device (e.g. inside `torch.device("meta")` no memory is spent on weights)."""
        return ConditionalUnet1D(
            input_dim=self.action_dim, global_cond_dim=self.step_cond_dim * self.n_obs_steps, down_dims=self.down_dims,
            diffusion_step_embed_dim=self.diffusion_step_embed_dim, kernel_size=self.kernel_size,
            n_groups=self.n_groups, film_scale=self.film_scale, final_n_groups=self.final_n_groups)

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain JSON-ready values (down_dims as a list), for the checkpoint card; `film_scale` and
        `final_n_groups` only when they differ from their defaults."""
        d = asdict(self)
        d["down_dims"] = list(self.down_dims)
        d["camera_keys"] = list(self.camera_keys)
        for key, default in self._OPTIONAL_DEFAULTS.items():
            if d[key] == default:
                del d[key]
        return d


def _check_policy(values: Mapping[str, Any], key: str) -> None:
    """Every field of a policy config (all present in `values`), named `<key>.<field>` in messages."""
    def k(name):
        return f"{key}.{name}"

    check_int(k("obs_dim"), values["obs_dim"], 1)
    check_int(k("action_dim"), values["action_dim"], 1)
    check_window(values["horizon"], values["n_obs_steps"], values["n_action_steps"], key)
    horizon = values["horizon"]
    dims = values["down_dims"]
    if isinstance(dims, str) or not isinstance(dims, (list, tuple)) or not dims:
        raise ConfigError(f"{k('down_dims')}={show(dims)}: expected a non-empty list of channel counts")
    groups = check_int(k("n_groups"), values["n_groups"], 1)
    for d in dims:
        if not isinstance(d, numbers.Integral) or isinstance(d, bool) or d < 1:
            raise ConfigError(f"{k('down_dims')}={list(dims)}: entries must be positive integers")
        if d % groups:
            raise ConfigError(f"{k('n_groups')}={groups}: must divide every entry of {k('down_dims')}={list(dims)} "
                              "(GroupNorm)")
    levels = 2 ** (len(dims) - 1)
    if horizon % levels:
        raise ConfigError(f"{k('horizon')}={horizon}: must be divisible by {levels} (2^(len(down_dims)-1): the "
                          "UNet halves the horizon at each level)")
    embed = check_int(k("diffusion_step_embed_dim"), values["diffusion_step_embed_dim"], 4)
    if embed % 2:
        raise ConfigError(f"{k('diffusion_step_embed_dim')}={embed}: must be even (sin/cos halves)")
    kernel = check_int(k("kernel_size"), values["kernel_size"], 1)
    if kernel % 2 == 0:
        raise ConfigError(f"{k('kernel_size')}={kernel}: must be odd (same-length convolutions)")
    ns = k("noise_scheduler")
    sched = values["noise_scheduler"]
    if not isinstance(sched, Mapping):
        raise ConfigError(f"{ns}: expected a mapping")
    unknown = sorted(set(sched) - set(NOISE_SCHEDULER_KEYS))
    if unknown:
        raise ConfigError(f"{ns}.{unknown[0]}: not supported by the samplers "
                          f"(supported: {', '.join(NOISE_SCHEDULER_KEYS)})")
    if "num_train_timesteps" in sched:
        check_int(f"{ns}.num_train_timesteps", sched["num_train_timesteps"], 1)
    if "beta_schedule" in sched:
        check_choice(f"{ns}.beta_schedule", sched["beta_schedule"], BETA_SCHEDULES)
    start = end = None
    if "beta_start" in sched:
        start = check_number(f"{ns}.beta_start", sched["beta_start"], 0, 1, low_open=True, high_open=True)
    if "beta_end" in sched:
        end = check_number(f"{ns}.beta_end", sched["beta_end"], 0, 1, low_open=True, high_open=True)
    if start is not None and end is not None and end < start:
        raise ConfigError(f"{ns}.beta_end={end}: must be >= {ns}.beta_start={start}")
    if "prediction_type" in sched:
        check_choice(f"{ns}.prediction_type", sched["prediction_type"], PREDICTION_TYPES)
    if "clip_sample" in sched:
        check_flag(f"{ns}.clip_sample", sched["clip_sample"])
    if "clip_sample_range" in sched:
        check_number(f"{ns}.clip_sample_range", sched["clip_sample_range"], 0, low_open=True)
    if "variance_type" in sched:
        check_choice(f"{ns}.variance_type", sched["variance_type"], ("fixed_small",))
    check_flag(k("film_scale"), values["film_scale"])
    final = check_int(k("final_n_groups"), values["final_n_groups"], 1, null=True)
    if final is not None and dims[0] % final:
        raise ConfigError(f"{k('final_n_groups')}={final}: must divide {k('down_dims')}.0={dims[0]} (GroupNorm)")
    cameras = values.get("camera_keys") or ()
    if isinstance(cameras, str) or not isinstance(cameras, (list, tuple)) or not all(
            isinstance(c, str) and c for c in cameras) or len(set(cameras)) != len(cameras):
        raise ConfigError(f"{k('camera_keys')}={show(cameras)}: expected a list of distinct camera names")
    vision = values.get("vision")
    if vision is not None:
        if not isinstance(vision, (Mapping, VisionEncoderConfig)):
            raise ConfigError(f"{k('vision')}={show(vision)}: expected a mapping of encoder keys or null")
        VisionEncoderConfig.from_mapping(vision)
    if (vision is None) != (not cameras):
        raise ConfigError(f"{k('camera_keys')}={show(list(cameras))} with {k('vision')}="
                          f"{'null' if vision is None else '{...}'}: an image policy needs both an encoder and its "
                          "cameras, a low-dim policy neither")


def check_clip_range(noise_scheduler: Mapping[str, Any], normalizer_mode: str | None = None,
                     action_range: tuple[float, float] | None = None) -> None:
    """clip_sample clips every x0 estimate to [-r, r] in normalized units; unless that covers the training
    actions it silently caps sampled actions (at mean +- r std with a gaussian normalizer, at +-r raw units with
    identity), so such a combination is refused - before any data is read when only the normalizer mode is known
    (a `limits` normalizer maps the actions to [-1, 1]; any other mode needs an explicit clip_sample_range), and
    again once the normalized range of the training actions is known.

    Args:
        noise_scheduler: the policy's `noise_scheduler` keys (clip_sample defaults to true, range to 1).
        normalizer_mode: `dataset.normalizer` (`limits`, `gaussian`, `identity`), or None when unknown.
        action_range: (lowest, highest) normalized training action, or None when not fitted yet.

    Raises:
        ConfigError: naming `dataset.normalizer` and `policy.noise_scheduler.clip_sample`.
    """
    if not noise_scheduler.get("clip_sample", True):
        return
    r = float(noise_scheduler.get("clip_sample_range", 1.0))
    if normalizer_mode not in (None, "limits") and "clip_sample_range" not in noise_scheduler:
        capped = "mean +- 1 std" if normalizer_mode == "gaussian" else "[-1, 1] in raw action units"
        raise ConfigError(f"dataset.normalizer={normalizer_mode} with policy.noise_scheduler.clip_sample=true would "
                          f"cap sampled actions at {capped}; set policy.noise_scheduler.clip_sample=false or "
                          "dataset.normalizer=limits")
    if action_range is not None:
        lo, hi = action_range
        if lo < -r * (1 + 1e-4) or hi > r * (1 + 1e-4):
            raise ConfigError(f"dataset.normalizer with policy.noise_scheduler.clip_sample=true: the normalizer "
                              f"maps the training actions to [{lo:.3g}, {hi:.3g}] but clip_sample clips sampled "
                              f"actions to [{-r:g}, {r:g}]; use dataset.normalizer=limits or "
                              "policy.noise_scheduler.clip_sample=false")


def split_observation(observation) -> tuple[Any, Any]:
    """(low-dim history, images or None) of an observation given as a tensor/array or a mapping with `obs` and
    `image` (an image dataset item's or an image env's keys).

    Raises:
        PcmError: a mapping without `obs`.
    """
    if isinstance(observation, Mapping):
        if "obs" not in observation:
            raise PcmError(f"observation mapping has keys {sorted(observation)}: expected 'obs' (and 'image')")
        return observation["obs"], observation.get("image")
    return observation, None


def select_observations(observations, rows):
    """Rows `rows` (an index tensor, array or slice) of a set of observation histories: a tensor (n, To, Do), or
    for an image policy a mapping {"obs": (n, To, Do), "image": (n, To, cameras, 3, H, W)} (each entry indexed)."""
    if isinstance(observations, Mapping):
        return {k: v[rows] for k, v in observations.items()}
    return observations[rows]


def observation_count(observations) -> int:
    """n, the histories in a set of observation histories (a tensor or an `obs`/`image` mapping)."""
    return len(split_observation(observations)[0])


def concat_observations(parts: list) -> Any:
    """Sets of observation histories (all tensors, or all `obs`/`image` mappings) joined along the first axis."""
    if parts and isinstance(parts[0], Mapping):
        return {k: torch.cat([torch.as_tensor(p[k]) for p in parts]) for k in parts[0]}
    return torch.cat([torch.as_tensor(p) for p in parts])


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
        self.model = config.build_network()
        # An image policy's encoder, run once per chunk into the global condition (never per denoising row)
        self.encoder: VisionEncoder | None = (build_vision_encoder(config.vision_config)
                                              if config.vision is not None else None)
        self.noise_scheduler = DDPMScheduler(**config.noise_scheduler)
        self._samplers: dict[tuple[SamplerConfig, int | None, torch.device, str, int], ChunkSampler] = {}
        self._backends = BackendCache()  # onnx sessions and auto routers, shared by the samplers
        self._check_clip_range()

    def normalized_action_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dim (low, high) of the training actions in normalized units, float32 (Da,) on the CPU
        ([-1, 1], the limits normalizer's range, for a normalizer saved without min/max statistics)."""
        p = self.normalizer.params["action"]
        if "min" not in p or "max" not in p:
            return -torch.ones_like(p["scale"]), torch.ones_like(p["scale"])
        return (p["min"] * p["scale"] + p["offset"]), (p["max"] * p["scale"] + p["offset"])

    def _check_clip_range(self) -> None:
        """`check_clip_range` against the normalized range of the training actions (when an action field is
        fitted)."""
        if "action" not in self.normalizer:
            return
        low, high = self.normalized_action_range()
        check_clip_range(dict(self.noise_scheduler.config), action_range=(float(low.min()), float(high.max())))

    @property
    def device(self) -> torch.device:
        """The device of the network's parameters."""
        return next(self.model.parameters()).device

    @property
    def uses_images(self) -> bool:
        """Whether the policy sees camera images (then every observation carries an `image` history)."""
        return self.encoder is not None

    def trained_modules(self) -> list[nn.Module]:
        """What `pcm train` optimises (and averages in its EMA): the action head, and the image encoder of an image
        policy (trained end to end, as Diffusion Policy does)."""
        return [self.model] + ([self.encoder] if self.encoder is not None else [])

    def trained_parameters(self) -> list[nn.Parameter]:
        """The parameters of `trained_modules`, in a fixed order (optimizer and EMA state follow it)."""
        return [p for m in self.trained_modules() for p in m.parameters()]

    # ---- training ------------------------------------------------------------------------------------
    def global_cond(self, obs: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """The network's condition: per observation step the normalized low-dim observation, then (an image
        policy) each camera's encoder features (lerobot's order), flattened over the To steps.

        Args:
            obs: observation history (B, >= To, Do) float in env units; the first To steps are used.
            images: an image policy's camera history (B, >= To, cameras, 3, H, W), uint8 0..255 or float in [0, 1],
                on any device; ignored (may be None) for a low-dim policy.

        Returns:
            (B, To * (Do + cameras * F)) in normalized units, on `obs`'s device.

        Raises:
            PcmError: `obs` is not (B, >= To, Do); an image policy without images, or images of another batch,
                history, camera count, size, channel order, dtype or range.
        """
        To = self.config.n_obs_steps
        if obs.ndim != 3 or obs.shape[1] < To or obs.shape[2] != self.config.obs_dim:
            raise PcmError(f"observation history has shape {tuple(obs.shape)}, expected (B, >={To}, {self.config.obs_dim})")
        nobs = self.normalizer.normalize("obs", obs[:, :To])
        if self.encoder is not None:
            cameras = len(self.config.camera_keys)
            if images is None:
                raise PcmError(f"this image policy needs camera images ({', '.join(self.config.camera_keys)}) with "
                               "its observation")
            B = obs.shape[0]
            if images.ndim != 6 or images.shape[0] != B or images.shape[1] < To or images.shape[2] != cameras:
                raise PcmError(f"observation images have shape {tuple(images.shape)}, expected "
                               f"({B}, >={To}, {cameras}, 3, H, W)")
            features = self.encoder.encode_steps(images[:, :To].to(obs.device))
            nobs = torch.cat([nobs, features], dim=-1)
        return nobs.reshape(obs.shape[0], -1)

    def encode(self, observation) -> torch.Tensor:
        """`global_cond` of an observation given as a history tensor (low-dim) or a mapping with `obs` and, for an
        image policy, `image` (a dataset item's or an image env's keys); computed once per chunk.

        Raises:
            PcmError: as `global_cond`; a non-finite low-dim observation.
        """
        obs, images = split_observation(observation)
        obs = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        if images is not None:
            images = torch.as_tensor(images, device=self.device)
        if obs.ndim == 2:
            obs = obs[None]
            images = images[None] if images is not None else None
        if not torch.isfinite(obs).all():
            raise PcmError("observation history contains NaN/inf")
        return self.global_cond(obs, images)

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
            batch: {"obs": (B, >= To, Do), "action": (B, H, Da)}, float in env units; an image policy's also
                "image" (B, >= To, cameras, 3, H, W).
            generator: RNG for the noise and timesteps when `noise` is None.
            noise: (noise (B, H, Da), timesteps (B,) long) to use instead of drawing them (distributed training
                draws them for the global batch and hands each rank its rows).
            model: the network to call (e.g. a DDP wrapper of `self.model`); None = `self.model`.

        Returns:
            The scalar mean squared error (in normalized units).

        Raises:
            PcmError: an observation history of the wrong shape, or a prediction type other than epsilon/sample.
        """
        cond = self.global_cond(batch["obs"], batch.get("image"))
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
                pcm: Callable | nn.Module | None = None, backend: str = "torch") -> ChunkSampler:
        """The `ChunkSampler` for `config` on this policy's network (and `pcm`, for the switching samplers), its
        denoisers running on `backend`.

        Built once per (config, pcm, device, backend, threads) and cached, so per-chunk calls pay no set-up; the
        onnx graphs are written from the weights as they are at that moment (`pcm_policy.backends`).

        Args:
            config: a `SamplerConfig` or mapping (None: the defaults, sequential DDPM-100); a `ChunkSampler`
                is returned as it is.
            pcm: the PCM of a switching sampler: its network (`pcm_policy.pcm.attach.load_pcm`; a LoRA PCM runs
                at scale 1 for `pcm`, with the scale for `pcm_lora`), or on the torch backend a denoiser callable
                (see `ChunkSampler`); ignored by the non-switching samplers.
            backend: `torch`, `onnx` (onnxruntime on the CPU) or `auto` (per call, the one measured faster for its
                number of rows; calibrated here, `ChunkSampler.calibration`).

        Raises:
            ConfigError: an invalid config or backend, a switching sampler without `pcm`, onnx on CUDA or without
                onnxruntime, a PCM callable for onnx/auto, or a full PCM for `pcm_lora`.
        """
        if isinstance(config, ChunkSampler):
            return config
        cfg = SamplerConfig.from_mapping(config or {})
        threads = torch.get_num_threads() if backend != "torch" else 0
        key = (cfg, None if pcm is None or not cfg.needs_pcm else id(pcm), self.device, backend, threads)
        if key not in self._samplers:
            ChunkSampler.check(cfg, self.config.num_train_timesteps, pcm)
            shape = NetworkShape((self.config.horizon, self.config.action_dim),
                                 self.config.step_cond_dim * self.config.n_obs_steps, self.config.num_train_timesteps)
            fixed_shape = cfg.fixed_shape if cfg.fixed_shape is not None else self.device.type == "cuda"
            denoisers = build_denoisers(self.denoiser, self.model, pcm, cfg, backend, shape, self.device,
                                        self._backends, fixed_shape)
            self._samplers[key] = ChunkSampler(cfg, self.noise_scheduler.config, denoisers.base, denoisers.pcm,
                                               sample_shape=(self.config.horizon, self.config.action_dim),
                                               device=self.device, backend=denoisers.backend,
                                               calibration=denoisers.calibration)
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
            obs_history: (B, To, Do) or (To, Do), float, in env units; for an image policy a mapping
                {"obs": that, "image": (B, To, cameras, 3, H, W) or (To, cameras, 3, H, W)} (`encode`).
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
        cond = self.encode(obs_history)
        x_T, step_noise = noise if noise is not None else sampler.make_noise(cond.shape[0], generator)
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
            {"model.<name>": tensor, "encoder.<name>": tensor (an image policy), "normalizer.<field>.<stat>": tensor},
            contiguous CPU tensors (safetensors-ready).
        """
        state = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        if self.encoder is not None:
            state.update({f"encoder.{k}": v.detach().cpu().contiguous() for k, v in self.encoder.state_dict().items()})
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
        encoder_state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        if self.encoder is None and encoder_state:
            raise PcmError(f"{source}: image-encoder weights (encoder.{next(iter(encoder_state))}) for a policy "
                           "without cameras")
        try:
            self.model.load_state_dict(model_state, strict=True)
            if self.encoder is not None:
                self.encoder.load_state_dict(encoder_state, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise PcmError(f"{source}: network weights do not match the configured policy shape "
                           f"({' '.join(first[1:2]).strip() or first[0]})") from None
        self.normalizer = Normalizer.from_state_dict({k: v for k, v in state.items() if k.startswith("normalizer.")})
        self._check_clip_range()
