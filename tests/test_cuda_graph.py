"""GraphedDenoiser: the same buffer logic as the CUDA-graph path, run eagerly on CPU (capture where CUDA exists)."""
import pytest
import torch
from diffusers import DDPMScheduler

from pcm_policy.model.lora import add_lora, scaled_denoiser
from pcm_policy.sampling import sample_lora_switched, sample_picard, sample_sequential
from pcm_policy.sampling.cuda_graph import GraphedDenoiser
from tests.toys import C, DA, H, Toy

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_graphed_picard_equals_sequential(device):
    torch.manual_seed(0)
    den = Toy(seed=1).to(device)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    sched.set_timesteps(20)
    x_T = torch.randn(2, H, DA, dtype=torch.float64, device=device)
    noise = torch.randn(20, 2, H, DA, dtype=torch.float64, device=device)
    cond = torch.randn(2, C, dtype=torch.float64, device=device)
    graphed = GraphedDenoiser(den, capture=device == "cuda")
    ref = sample_sequential(den, sched, x_T, noise, cond)
    x0, stats = sample_picard(graphed, sched, x_T, noise, cond, window=8, tol=0.0, fixed_shape=True)
    torch.testing.assert_close(x0, ref, rtol=0, atol=1e-10)
    assert len(graphed._entries) == 1  # one fixed window shape for the whole run
    assert graphed.graphs == (1 if device == "cuda" else 0)


def test_graphed_lora_keeps_one_entry_per_scale():
    base = Toy(seed=2)
    lora = add_lora(base, rank=2)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    den = scaled_denoiser(lora)
    graphed = GraphedDenoiser(den, capture=False)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    sched.set_timesteps(10)
    x_T = torch.randn(1, H, DA, dtype=torch.float64)
    noise = torch.randn(10, 1, H, DA, dtype=torch.float64)
    a, _ = sample_lora_switched(den, sched, x_T, noise, tol=0.0, fixed_shape=True)
    b, stats = sample_lora_switched(graphed, sched, x_T, noise, tol=0.0, fixed_shape=True)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(graphed._entries) == len(set(stats.lambdas))
