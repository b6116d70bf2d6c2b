"""`ChunkSampler`: one sampler built once per (policy, sampler config, device), called for every chunk.

It owns what does not change from chunk to chunk - the inference scheduler, its `StepCoefficients` already on
the device, the base and PCM denoisers (a LoRA PCM's scale switch included), the Anderson settings - so that a
chunk costs only its network calls and the loop's own arithmetic (measured by `scripts/measure_overhead.py`).
`DiffusionPolicy.predict_chunk`, the controller, `pcm eval`, `pcm bench` and `pcm demo` all sample through it;
the samplers it dispatches to stay pure functions over a denoiser (`pcm_policy.sampling`).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from pcm_policy import sampling
from pcm_policy.errors import ConfigError
from pcm_policy.sampler_config import SamplerConfig, build_scheduler
from pcm_policy.sampling import SamplerStats, StepCoefficients


class ChunkSampler:
    """A configured sampler bound to a base denoiser (and a PCM for the switching samplers).

    Args:
        config: the `sampler=` config (`SamplerConfig` or a mapping of its keys).
        train_scheduler_config: the policy's training noise-schedule config (`policy.noise_scheduler.config`).
        base: the base denoiser `eps = base(x, t, cond)`, x (N, H, Da) float, t (N,) long, cond (N, C) or None.
        pcm: for `pcm`, a denoiser with the same signature; for `pcm_lora`, `pcm(x, t, cond, scale)` (the base
            weights plus `scale` times the LoRA delta). Ignored by `sequential` and `picard`.
        sample_shape: (H, Da) of one action chunk, for `make_noise`.
        device: where the coefficients live (the denoisers' device).
        dtype: float dtype of the step coefficients (that of x_T).
        backend: the label of the backend the denoisers run on (`torch`, `onnx`, `auto`;
            `pcm_policy.backends`), for tables and reports.
        calibration: for `auto`, what it measured (`pcm_policy.backends.auto.Calibration`); None otherwise.

    Attributes:
        backend, calibration: as given.

    Raises:
        ConfigError: an invalid sampler config, a sampler that needs a PCM gets none, or `sampler.steps`
            exceeds the training timesteps.
    """

    def __init__(self, config: SamplerConfig | Mapping[str, Any], train_scheduler_config: Mapping[str, Any],
                 base: Callable, pcm: Callable | None = None, sample_shape: tuple[int, int] | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, backend: str = "torch",
                 calibration: Any = None):
        self.config = cfg = self.check(config, int(train_scheduler_config["num_train_timesteps"]), pcm)
        self.device = torch.device(device)
        self.scheduler = build_scheduler(train_scheduler_config, cfg.scheduler, cfg.steps)
        self.coeffs = StepCoefficients.from_scheduler(self.scheduler, self.device, dtype)
        self.base = base
        self.pcm = pcm if cfg.needs_pcm else None
        self.sample_shape = None if sample_shape is None else tuple(sample_shape)
        self.fixed_shape = cfg.fixed_shape if cfg.fixed_shape is not None else self.device.type == "cuda"
        self.anderson = cfg.anderson_config()
        self.backend = backend
        self.calibration = calibration

    @staticmethod
    def check(config: SamplerConfig | Mapping[str, Any], num_train_timesteps: int, pcm: Any) -> SamplerConfig:
        """The config checked against the policy's T and the PCM it is given (before any denoiser is built).

        Raises:
            ConfigError: an invalid config, more steps than T, or a switching sampler without a PCM.
        """
        cfg = SamplerConfig.from_mapping(config)
        cfg.check_steps(num_train_timesteps)
        if cfg.needs_pcm and pcm is None:
            raise ConfigError(f"sampler.pcm_checkpoint: sampler={cfg.name} needs a PCM "
                              "(load one with sampler.pcm_checkpoint=<dir>)")
        return cfg

    @property
    def num_steps(self) -> int:
        """S, the number of denoising steps of one chunk."""
        return self.coeffs.num_steps

    @property
    def label(self) -> str:
        """The config's short name for tables, e.g. `pcm_lora/ddim10` (`SamplerConfig.label`)."""
        return self.config.label

    def make_noise(self, batch_size: int, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The noise of `batch_size` chunks, drawn once before sampling.

        Drawn on the CPU from `generator` (so a seed gives the same chunk on every device), then moved to the
        sampler's device.

        Args:
            batch_size: B.
            generator: a CPU `torch.Generator`; None uses torch's global RNG.

        Returns:
            (x_T (B, H, Da), z (S, B, H, Da)), standard normal float32.

        Raises:
            ConfigError: the sampler was built without `sample_shape`.
        """
        if self.sample_shape is None:
            raise ConfigError("ChunkSampler.make_noise: built without sample_shape")
        shape = (batch_size, *self.sample_shape)
        x_T = torch.randn(shape, generator=generator)
        noise = torch.randn((self.num_steps, *shape), generator=generator)
        return x_T.to(self.device), noise.to(self.device)

    @torch.no_grad()
    def sample(self, x_T: torch.Tensor, noise: torch.Tensor, cond: torch.Tensor | None = None,
               should_stop: Callable[[], bool] | None = None, max_iters: int | None = None
               ) -> tuple[torch.Tensor, SamplerStats]:
        """Sample one batch of chunks with the configured algorithm.

        Args:
            x_T: initial noise, shape (B, H, Da) float, normalized action units, on the sampler's device.
            noise: per-step standard-normal noise, shape (S, B, H, Da).
            cond: the denoiser's condition, (B, C) or None.
            should_stop: checked between Picard rounds; True returns the current (anytime) estimate. Ignored
                by `sequential`.
            max_iters: caps the Picard rounds (default: the config's). Ignored by `sequential`.

        Returns:
            (x0 (B, H, Da) in normalized action units, `SamplerStats`).

        Raises:
            ValueError: `noise` has another number of steps than the schedule.
        """
        cfg = self.config
        if cfg.name == "sequential":
            S = self.num_steps
            x0 = sampling.sample_sequential(self.base, self.scheduler, x_T, noise, cond, coeffs=self.coeffs)
            return x0, SamplerStats(iterations=S, evaluations=S, converged=True, network_calls=S,
                                    network_rows=S * x_T.shape[0])
        kwargs: dict[str, Any] = dict(
            cond=cond, window=cfg.window, tol=cfg.tol, max_iters=cfg.max_iters if max_iters is None else max_iters,
            should_stop=should_stop, fixed_shape=self.fixed_shape, coeffs=self.coeffs, anderson=self.anderson,
            start=cfg.start)
        if cfg.name == "picard":
            return sampling.sample_picard(self.base, self.scheduler, x_T, noise, **kwargs)
        if cfg.stiffness is not None:
            kwargs["stiffness"] = cfg.stiffness
        if cfg.name == "pcm":
            return sampling.sample_switched(self.base, self.pcm, self.scheduler, x_T, noise, **kwargs)
        return sampling.sample_lora_switched(self.pcm, self.scheduler, x_T, noise, **kwargs)
