"""Samplers over a denoiser `eps = denoiser(x, t, cond)` and a diffusers DDPM/DDIM scheduler.

- `schedule`: `StepCoefficients` (the vectorised noise-free step m and the noise stds)
- `sequential`: the reference sampler
- `picard`: the windowed Picard loop (ParaDiGMS), `picard_step` (one differentiable map)
- `anderson`: (triangular) Anderson acceleration of the loop's base phase (ParaTAA-like)
- `start`: the Picard start X^0 (x_T, or the chunk's DDPM noise carried along)
- `switching`: the lambda schedule and PCM -> base switching in output / weight space
"""

from .anderson import AndersonConfig
from .picard import SamplerStats, picard_loop, picard_step, sample_picard
from .schedule import StepCoefficients
from .sequential import sample_sequential
from .start import START_MODES
from .switching import sample_lora_switched, sample_switched, switch_lambda

__all__ = [
    "AndersonConfig",
    "START_MODES",
    "SamplerStats",
    "StepCoefficients",
    "picard_loop",
    "picard_step",
    "sample_lora_switched",
    "sample_picard",
    "sample_sequential",
    "sample_switched",
    "switch_lambda",
]

