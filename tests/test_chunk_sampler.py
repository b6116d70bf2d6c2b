"""ChunkSampler: built once per (policy, config, PCM), the same outputs as the pure samplers, options checked."""
import numpy as np
import pytest
import torch

from pcm_policy.chunk_sampler import ChunkSampler
from pcm_policy.data.normalizer import Normalizer
from pcm_policy.errors import ConfigError
from pcm_policy.model.lora import add_lora, lora_modules, scaled_denoiser, set_lora_scale
from pcm_policy.policy import DiffusionPolicy, PolicyConfig
from pcm_policy.sampler_config import SamplerConfig
from pcm_policy.sampling import StepCoefficients, sample_picard, sample_sequential


def _policy(seed=0):
    torch.manual_seed(seed)
    cfg = PolicyConfig(obs_dim=3, action_dim=2, down_dims=(8, 16), diffusion_step_embed_dim=16, n_groups=4)
    rng = np.random.default_rng(seed)
    norm = Normalizer.fit({"obs": rng.standard_normal((50, 3)), "action": rng.standard_normal((50, 2))})
    return DiffusionPolicy(cfg, norm).eval()


def test_sampler_is_built_once_and_reused(monkeypatch):
    policy = _policy()
    builds = []
    original = StepCoefficients.from_scheduler.__func__

    def counting(cls, *a, **k):
        builds.append(1)
        return original(cls, *a, **k)

    monkeypatch.setattr(StepCoefficients, "from_scheduler", classmethod(counting))
    cfg = SamplerConfig(name="picard", scheduler="ddim", steps=10)
    obs = torch.randn(1, 2, 3)
    for i in range(5):
        policy.predict_chunk(obs, cfg, generator=torch.Generator().manual_seed(i))
    assert len(builds) == 1  # coefficients built once, not per chunk
    assert policy.sampler(cfg) is policy.sampler(dict(name="picard", scheduler="ddim", steps=10))
    assert policy.sampler(policy.sampler(cfg)) is policy.sampler(cfg)


@pytest.mark.parametrize("name,kind,steps", [("sequential", "ddpm", 20), ("sequential", "ddim", 5), ("picard", "ddpm", 20)])
def test_chunk_sampler_equals_pure_samplers(name, kind, steps):
    policy = _policy(1)
    sampler = policy.sampler(SamplerConfig(name=name, scheduler=kind, steps=steps, tol=0.0))
    cond = policy.global_cond(torch.randn(2, 2, 3))
    x_T, noise = sampler.make_noise(2, torch.Generator().manual_seed(0))
    assert x_T.shape == (2, 16, 2) and noise.shape == (steps, 2, 16, 2)
    got, stats = sampler.sample(x_T, noise, cond)
    scheduler = policy.scheduler_for(sampler)
    if name == "sequential":
        ref = sample_sequential(policy.denoiser, scheduler, x_T, noise, cond)
        assert stats.iterations == steps
    else:
        ref, ref_stats = sample_picard(policy.denoiser, scheduler, x_T, noise, cond, tol=0.0,
                                       fixed_shape=sampler.fixed_shape)
        assert stats.iterations == ref_stats.iterations
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_accelerated_sampler_is_exact_at_zero_tolerance():
    policy = _policy(2)
    obs = torch.randn(2, 2, 3)
    seq = SamplerConfig(name="sequential", scheduler="ddpm", steps=30)
    noise = policy.make_noise(2, seq, torch.Generator().manual_seed(1))
    ref = policy.predict_chunk(obs, seq, noise=noise).action_pred
    for start in ("x_T", "noise_sum"):
        cfg = SamplerConfig(name="picard", scheduler="ddpm", steps=30, tol=0.0, accel="anderson", memory=3,
                            damping=0.5, start=start)
        out = policy.predict_chunk(obs, cfg, noise=noise)
        assert out.stats.converged
        torch.testing.assert_close(out.action_pred, ref, rtol=1e-5, atol=1e-4)


def test_sampler_options_are_checked():
    policy = _policy()
    with pytest.raises(ConfigError, match=r"sampler.steps=200.*100"):
        policy.sampler(SamplerConfig(name="sequential", scheduler="ddim", steps=200))
    with pytest.raises(ConfigError, match="pcm_checkpoint"):
        policy.sampler(SamplerConfig(name="pcm_lora", scheduler="ddim", steps=10))
    for bad, key in ((dict(accel="magic"), "sampler.accel"), (dict(start="zeros"), "sampler.start"),
                     (dict(memory=0), "sampler.memory"), (dict(damping=1.5), "sampler.damping"),
                     (dict(damping=0.0), "sampler.damping")):
        with pytest.raises(ConfigError, match=key):
            SamplerConfig(name="picard", **bad)


def test_labels_name_acceleration_and_start():
    assert SamplerConfig(name="picard", scheduler="ddim", steps=10).label == "picard/ddim10"
    assert SamplerConfig(name="pcm_lora", scheduler="ddim", steps=10, accel="anderson").label == "pcm_lora+aa/ddim10"
    assert SamplerConfig(name="picard", accel="anderson", start="noise_sum").label == "picard+aa+ns/ddpm100"
    assert SamplerConfig(name="sequential", accel="anderson").variant == "sequential"


class _Adapter(torch.nn.Module):
    """A LoRA-injected MLP with the denoiser signature."""

    def __init__(self):
        super().__init__()
        self.net = add_lora(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)), rank=2)
        for m in lora_modules(self.net):
            torch.nn.init.normal_(m.lora_B.weight, std=0.5)

    def forward(self, x, t, cond):
        return self.net(x)


def test_scaled_denoiser_matches_explicit_scale_even_if_changed_behind_its_back():
    torch.manual_seed(0)
    net = _Adapter()
    x = torch.randn(3, 4)
    denoise = scaled_denoiser(net)
    outputs = {}
    for s in (1.0, 0.5, 0.0, 0.5, 1.0):
        set_lora_scale(net, s)
        expected = net(x, None, None)
        set_lora_scale(net, 0.25)  # another wrapper of the same network changed the scale
        got = denoise(x, None, None, s)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert all(m.scale == s for m in lora_modules(net))
        outputs[s] = got
    assert not torch.allclose(outputs[1.0], outputs[0.0])  # the scale really changes the output


def test_chunk_sampler_needs_sample_shape_for_noise():
    policy = _policy()
    s = ChunkSampler(SamplerConfig(name="sequential", scheduler="ddim", steps=4), policy.noise_scheduler.config,
                     policy.denoiser)
    with pytest.raises(ConfigError, match="sample_shape"):
        s.make_noise(1)
