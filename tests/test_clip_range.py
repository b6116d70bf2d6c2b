"""clip_sample must cover the normalized training actions: a normalizer whose range clip_sample would cut is
refused (before any data is read where the config alone tells, and once the data is fitted), every accepted
combination samples the far edge of the data, and an early-stopped chunk is kept in the training range."""
import numpy as np
import pytest
import torch

from pcm_policy.data.normalizer import Normalizer
from pcm_policy.errors import ConfigError
from pcm_policy.policy import DiffusionPolicy, PolicyConfig
from pcm_policy.sampler_config import SamplerConfig
from tests.fixtures import TINY_POLICY, assert_refused, write_pusht_zarr

PUSHT_LOW, PUSHT_HIGH = 9.0, 503.0  # PushT target positions span about 9..503 px


class OracleDenoiser(torch.nn.Module):
    """Predicts the epsilon whose x0 estimate is exactly `target` (normalized (H, Da)), at every timestep."""

    def __init__(self, target: torch.Tensor, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.register_buffer("target", target)
        self.register_buffer("abar", alphas_cumprod.float())
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # DiffusionPolicy.device reads a parameter

    def forward(self, x, t, cond):
        a = self.abar[t].view(-1, 1, 1)
        return (x - a.sqrt() * self.target) / (1 - a).sqrt()


def _pusht_like_policy(mode: str, clip: bool, clip_range: float | None = None) -> DiffusionPolicy:
    rng = np.random.default_rng(0)
    norm = Normalizer.fit({"obs": rng.normal(size=(500, 4)), "action": rng.uniform(PUSHT_LOW, PUSHT_HIGH, (500, 2))},
                          mode=mode)
    sched = dict(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                 clip_sample=clip, variance_type="fixed_small")
    if clip_range is not None:
        sched["clip_sample_range"] = clip_range
    cfg = PolicyConfig(obs_dim=4, action_dim=2, down_dims=(8, 16), diffusion_step_embed_dim=16, n_groups=4,
                       noise_scheduler=sched)
    return DiffusionPolicy(cfg, norm)


def _sample_far_corner(policy: DiffusionPolicy) -> torch.Tensor:
    """Sample a chunk whose denoiser aims every action at the data's upper corner; returns raw actions."""
    corner = policy.normalizer.params["action"]["max"]
    target = policy.normalizer.normalize("action", corner.expand(policy.config.horizon, 2).clone())
    policy.model = OracleDenoiser(target, policy.noise_scheduler.alphas_cumprod)
    chunk = policy.predict_chunk(torch.zeros(1, 2, 4), SamplerConfig(scheduler="ddim", steps=10),
                                 generator=torch.Generator().manual_seed(0))
    return chunk.action_pred[0], corner


@pytest.mark.parametrize("mode", ["gaussian", "identity"])
def test_clip_sample_with_a_normalizer_it_does_not_cover_is_refused(mode):
    with pytest.raises(ConfigError, match="dataset.normalizer.*policy.noise_scheduler.clip_sample"):
        _pusht_like_policy(mode, clip=True)
    with pytest.raises(ConfigError, match="clip_sample"):  # a range that still misses the data
        _pusht_like_policy("gaussian", clip=True, clip_range=1.5)


@pytest.mark.parametrize("mode,clip", [("limits", True), ("gaussian", False), ("identity", False),
                                       ("gaussian", True)])
def test_sampled_actions_reach_the_edge_of_the_training_range(mode, clip):
    """Every accepted combination samples the far corner of the data (503 px), not mean + 1 std (~400)."""
    policy = _pusht_like_policy(mode, clip=clip, clip_range=4.0 if (mode, clip) == ("gaussian", True) else None)
    actions, corner = _sample_far_corner(policy)
    np.testing.assert_allclose(actions.numpy(), corner.expand_as(actions).numpy(), rtol=1e-4, atol=1e-2)
    assert float(actions.max()) > 500.0


def test_an_early_stopped_chunk_is_kept_in_the_training_range_not_in_minus_one_one():
    policy = _pusht_like_policy("gaussian", clip=False)
    low, high = policy.normalized_action_range()
    p = policy.normalizer.params["action"]
    np.testing.assert_allclose(low.numpy(), (p["min"] - p["mean"]).div(p["std"]).numpy(), rtol=1e-5)
    assert float(high.min()) > 1.5  # gaussian: the data's edge lies beyond 1 std
    policy.model = OracleDenoiser(torch.full((16, 2), 5.0), policy.noise_scheduler.alphas_cumprod)  # far outside
    one_round = SamplerConfig(name="picard", scheduler="ddim", steps=10, max_iters=1)
    chunk = policy.predict_chunk(torch.zeros(1, 2, 4), one_round, generator=torch.Generator().manual_seed(0))
    assert not chunk.stats.converged
    raw = chunk.action_pred[0]
    assert float(raw.max()) <= PUSHT_HIGH + 1e-3 and float(raw.min()) >= PUSHT_LOW - 1e-3
    assert bool((raw > p["mean"] + p["std"]).all())  # a [-1, 1] clamp would stop at mean + 1 std (~400 px)


def test_pcm_train_refuses_a_clip_range_that_misses_the_data_and_writes_nothing(capsys, tmp_path):
    data = write_pusht_zarr(tmp_path / "d.zarr", lengths=[30, 40, 25, 35, 28])
    assert_refused(capsys, tmp_path, "train", f"dataset.path={data}", f"output_dir={tmp_path / 'out'}", "device=cpu",
                   "train.steps=2", *TINY_POLICY, "dataset.normalizer=gaussian",
                   "+policy.noise_scheduler.clip_sample_range=1.2",                   needles=["dataset.normalizer", "policy.noise_scheduler.clip_sample"])
