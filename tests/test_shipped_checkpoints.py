"""The shipped PushT checkpoints load, give finite in-range actions, and switched sampling equals sequential."""
from pathlib import Path

import pytest
import torch

from pcm_policy import checkpoint as ckpt_io
from pcm_policy.checkpoint import load_policy
from pcm_policy.pcm.attach import load_sampler
from pcm_policy.sampler_config import SamplerConfig

DATA = Path(__file__).resolve().parents[1] / "data" / "pusht"
pytestmark = pytest.mark.skipif(not (DATA / "base").is_dir(), reason="no shipped PushT checkpoint")


def _observations(policy, n=2):
    from pcm_policy.data.replay_buffer import ReplayBuffer
    from envs.pusht_geometry import lowdim_obs_from_state

    rb = ReplayBuffer.open(DATA / "pusht_expert.zarr", keys=["state"])
    obs = torch.as_tensor(lowdim_obs_from_state(rb["state"][[10, 11, 500, 501]]), dtype=torch.float32)
    return obs.reshape(2, 2, -1)[:n]


@pytest.mark.parametrize("schedule", ["ddim10", pytest.param("ddpm100", marks=pytest.mark.slow)])  # tol 0: 100 rounds
def test_shipped_policy_and_pcm_lora(schedule):
    policy, card = load_policy(DATA / "base")
    assert card["task"] == "pusht" and policy.config.obs_dim == 20
    pcm_dir = DATA / f"pcm_lora_{schedule}"
    if not pcm_dir.is_dir():
        pytest.skip(f"no shipped PCM for {schedule}")
    kind, steps = schedule[:4], int(schedule[4:])
    obs = _observations(policy)
    seq = SamplerConfig(name="sequential", scheduler=kind, steps=steps)
    noise = policy.make_noise(len(obs), seq, torch.Generator().manual_seed(0))
    ref = policy.predict_chunk(obs, seq, noise=noise)
    assert torch.isfinite(ref.action).all()
    assert ((ref.action > -50) & (ref.action < 562)).all()  # PushT targets live on the 512 px table
    start = ckpt_io.read_card(pcm_dir).get("start", "x_T")  # a PCM runs from the start it was trained from
    for name in ("pcm", "pcm_lora"):
        sampler = SamplerConfig(name=name, scheduler=kind, steps=steps, tol=0.0, start=start)
        sampler = load_sampler(policy, sampler, "cpu", str(pcm_dir))
        out = policy.predict_chunk(obs, sampler, noise=noise)
        assert out.stats.converged
        torch.testing.assert_close(out.action_pred, ref.action_pred, rtol=1e-5, atol=1e-3)


ROBOMIMIC = Path(__file__).resolve().parents[1] / "data"


@pytest.mark.parametrize("task, obs_dim", [("lift", 19), ("can", 23)])
def test_shipped_robomimic_policy_and_pcm_lora(task, obs_dim):
    """The robomimic bases ship without (Can) or with (Lift) their data; observations are drawn inside the
    normalizer's range, so the check needs no dataset."""
    base = ROBOMIMIC / task / "base"
    if not base.is_dir():
        pytest.skip(f"no shipped {task} base")
    policy, card = load_policy(base)
    assert card["task"] == task and policy.config.obs_dim == obs_dim and policy.config.action_dim == 7
    u = torch.rand(2, policy.config.n_obs_steps, obs_dim, generator=torch.Generator().manual_seed(0)) * 2 - 1
    obs = policy.normalizer.unnormalize("obs", u)
    seq = SamplerConfig(name="sequential", scheduler="ddim", steps=10)
    noise = policy.make_noise(len(obs), seq, torch.Generator().manual_seed(0))
    ref = policy.predict_chunk(obs, seq, noise=noise)
    assert torch.isfinite(ref.action).all()
    assert (ref.action.abs() <= 1.0 + 1e-4).all()  # robosuite delta actions live in [-1, 1]
    pcm_dir = ROBOMIMIC / task / "pcm_lora_ddim10"
    assert pcm_dir.is_dir(), f"{pcm_dir}: every shipped robomimic base ships its DDIM-10 PCM"
    for name in ("pcm", "pcm_lora"):
        sampler = load_sampler(policy, SamplerConfig(name=name, scheduler="ddim", steps=10, tol=0.0), "cpu",
                               str(pcm_dir))
        out = policy.predict_chunk(obs, sampler, noise=noise)
        assert out.stats.converged
        torch.testing.assert_close(out.action_pred, ref.action_pred, rtol=1e-5, atol=1e-3)
