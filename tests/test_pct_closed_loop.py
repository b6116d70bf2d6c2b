"""PCT on the states the controller meets (observations=closed_loop) and from the noise-carrying start."""
import pytest
import torch
from safetensors.torch import load_file

from pcm_policy.commands import run_composed
from pcm_policy import checkpoint as ckpt_io
from pcm_policy.config import compose
from pcm_policy.rollout import visited
from pcm_policy.sampling import StepCoefficients
from tests.fixtures import train_tiny_base


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pct_cl")
    train_tiny_base(root)
    return root


def _cfg(root, out, *extra):
    return compose("train_pcm", [
        f"base={root / 'base'}", f"output_dir={root / out}", "device=cpu", "scheduler=ddpm", "steps=10",
        "trajectories=6", "collect_batch=3", "epochs=1", "batch_size=3", "eval_observations=2", "lora_rank=4",
        "observations=closed_loop", "closed_loop.episodes=2", "closed_loop.eval_episodes=1", "closed_loop.max_steps=16",
        "closed_loop.n_envs=2", "closed_loop.sampler.steps=2", "eval_accel=null", *extra])


@pytest.mark.sim
def test_closed_loop_observations_are_recorded_once_and_train(base_run, monkeypatch):
    calls = []
    real = visited.visited_observations

    def spy(*args, **kwargs):
        calls.append(args[3:5])  # (episodes, seed_start)
        return real(*args, **kwargs)

    monkeypatch.setattr(visited, "visited_observations", spy)
    metrics = run_composed("train-pcm", _cfg(base_run, "pcm_cl", "start=noise_sum"))
    out = base_run / "pcm_cl"
    saved = load_file(str(out / "observations.safetensors"))
    # 2 training episodes of 16 steps at Ta = 8: 2 chunks each; the held-out episode is another seed
    assert saved["train"].shape == (4, 2, 20) and saved["held_out"].shape == (2, 2, 20)
    assert calls == [(2, 200000), (1, 200002)]
    assert torch.isfinite(saved["train"]).all()
    assert not torch.equal(saved["train"][:2], saved["held_out"])
    assert metrics["trajectories"] == 4
    card = ckpt_io.read_card(ckpt_io.resolve_checkpoint(out))
    assert card["observations"] == "closed_loop" and card["start"] == "noise_sum"

    # X^0 of every collected trajectory is the noise-carrying start: y_j = x_T + sum_{i<j} sigma_i z_i
    policy, _ = ckpt_io.load_policy(base_run / "base")
    scheduler = policy.scheduler_for({"name": "sequential", "scheduler": "ddpm", "steps": 10})
    coeffs = StepCoefficients.from_scheduler(scheduler)
    shard = load_file(str(out / "trajectories" / "batch_0000.safetensors"))
    x0 = shard["iterates"][0].float()  # (S+1, B, H, Da), stored in fp16
    expected = x0[0] + torch.cumsum(coeffs.noise_terms(shard["noise"]), dim=0)
    torch.testing.assert_close(x0[1:], expected, rtol=2e-3, atol=2e-3)

    # a second run in the same output dir resumes: no new rollouts
    calls.clear()
    run_composed("train-pcm", _cfg(base_run, "pcm_cl", "start=noise_sum"))
    assert calls == []
