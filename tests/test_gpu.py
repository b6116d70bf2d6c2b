"""The CUDA paths: CUDA-graph replay equals eager execution, training on the device, deterministic training.

Tests marked `gpu` are left out of the default set; scripts/gpu_check.sh runs them on the GPU machine
(`pytest -m gpu`), and they are skipped where CUDA is absent. With PCM_GPU_TEST_DEVICE=cpu they run on a CPU
instead, graphs then running eagerly through the same static buffers (`GraphedDenoiser(capture=False)`): that is
how `gpu_check.sh --dry-run` rehearses them. Two tests are in the default set: the bench's CUDA-graph rows, the
sequential baseline included, give the eager rows' outputs on a CPU; and the prefix sum that deterministic CUDA
runs use instead of cumsum equals cumsum.

Only packages the GPU machine has or that travel there as wheels are imported (no zarr, no simulators):
gpu_check.sh runs this file without the conftest, whose dataset writers need zarr.
"""
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from pcm_policy.benchmark.rows import Row, build_rows, graphed_rows, time_row
from pcm_policy.checkpoint import load_policy
from pcm_policy.model.lora import add_lora, scaled_denoiser
from pcm_policy.sampling import sample_lora_switched, sample_picard, sample_sequential, sample_switched
from pcm_policy.sampling.cuda_graph import GraphedDenoiser
from tests.fixtures import write_robomimic_fixture
from tests.toys import C, DA, H, Toy

ROOT = Path(__file__).resolve().parents[1]
PUSHT = ROOT / "data" / "pusht"
DEVICE = os.environ.get("PCM_GPU_TEST_DEVICE", "cuda")
CAPTURE = DEVICE.startswith("cuda")


def on_device(test):
    """Mark a test `gpu` and skip it when the device it runs on (PCM_GPU_TEST_DEVICE, default cuda) is absent."""
    skip = pytest.mark.skipif(CAPTURE and not torch.cuda.is_available(), reason="no CUDA device on this machine")
    return skip(pytest.mark.gpu(test))


def _observations(policy, n: int) -> torch.Tensor:
    """n observation histories in PushT's pixel range (the comparisons below do not need dataset observations)."""
    cfg = policy.config
    return torch.rand(n, cfg.n_obs_steps, cfg.obs_dim, generator=torch.Generator().manual_seed(0)) * 512


def _graph_rows_match_eager(device: str, schedules: list[str], chunks: int, atol: float) -> list[Row]:
    """Every CUDA-graph row of `pcm bench` (shipped PushT checkpoints) gives its eager row's chunks and iterations.

    The eager rows use the same fixed-shape windows as the graphed ones, so the graph wrapper is the only
    difference. Returns the graphed rows (their denoisers hold the captured graphs).
    """
    policy, _ = load_policy(PUSHT / "base", device)
    pcms = {s: str(PUSHT / f"pcm_lora_{s}") for s in schedules}
    rows, skipped = build_rows(policy, schedules, tols=[0.1], window=None, stiffness=None, pcms=pcms, lora_pcms=pcms,
                               accelerated={}, device=torch.device(device))
    assert not skipped and len(rows) == 4 * len(schedules)
    graphed = graphed_rows(policy, rows)
    conds = policy.global_cond(_observations(policy, chunks).to(policy.device))
    for row, graph in zip(rows, graphed):
        assert (row.config.name, row.schedule, graph.graph) == (graph.config.name, graph.schedule, True)
        eager = Row(policy.sampler(dataclasses.replace(row.config, fixed_shape=True), pcm=row.sampler.pcm),
                    row.schedule, row.pcm_path)
        t_eager = time_row(policy, eager, conds, 0, 0, progress=False)
        t_graph = time_row(policy, graph, conds, 0, 1, progress=False)
        torch.testing.assert_close(t_graph.x0, t_eager.x0, rtol=0, atol=atol, msg=lambda m: f"{graph.name}: {m}")
        assert t_graph.iterations.tolist() == t_eager.iterations.tolist(), graph.name
    return graphed


def test_bench_graph_rows_equal_eager_rows_on_cpu():
    """Default set: the graphed rows (sequential baseline included) run the eager computation through the buffers."""
    graphed = _graph_rows_match_eager("cpu", ["ddim10"], chunks=2, atol=0.0)
    sequential = graphed[0]
    assert sequential.config.name == "sequential"
    assert len(sequential.sampler.base._entries) == 1 and sequential.sampler.base.graphs == 0  # one batch-1 shape, no capture


@on_device
def test_shipped_graph_rows_replay_equal_eager():
    """Sequential, Picard, PCM and PCM-LoRA on DDIM-10 and DDPM-100 (shipped checkpoints): replay == eager."""
    graphed = _graph_rows_match_eager(DEVICE, ["ddim10", "ddpm100"], chunks=3 if CAPTURE else 1,
                                      atol=1e-5 if CAPTURE else 0.0)
    for row in graphed:
        wrapper = row.sampler.pcm if row.config.name == "pcm_lora" else row.sampler.base
        assert wrapper.graphs == (len(wrapper._entries) if CAPTURE else 0) and wrapper.graphs >= int(CAPTURE), row.name


def _toy_problem():
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    sched.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, H, DA, dtype=torch.float64, generator=g).to(DEVICE)
    noise = torch.randn(20, 2, H, DA, dtype=torch.float64, generator=g).to(DEVICE)
    cond = torch.randn(2, C, dtype=torch.float64, generator=g).to(DEVICE)
    return sched, x_T, noise, cond


def _lora_toy():
    net = add_lora(Toy(seed=1), rank=2)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3), dtype=p.dtype) * 0.3)
    return net.to(DEVICE)


@on_device
@pytest.mark.parametrize("kind", ["picard", "pcm", "pcm_lora"])
def test_toy_graph_replay_equals_eager_and_sequential(kind):
    """Toy float64 denoisers, window 8 of 20 steps (slides and padded tail), tol 0: replay == eager == sequential."""
    sched, x_T, noise, cond = _toy_problem()
    base = Toy(seed=1).to(DEVICE)
    kw = dict(window=8, tol=0.0, fixed_shape=True)
    if kind == "picard":
        wrappers = [GraphedDenoiser(base, capture=CAPTURE)]
        run = lambda den: sample_picard(den[0], sched, x_T, noise, cond, **kw)  # noqa: E731
        eager = [base]
    elif kind == "pcm":
        pcm = Toy(seed=5, gain=1.5).to(DEVICE)
        wrappers = [GraphedDenoiser(base, capture=CAPTURE), GraphedDenoiser(pcm, capture=CAPTURE)]
        run = lambda den: sample_switched(den[0], den[1], sched, x_T, noise, cond, stiffness=5.0, **kw)  # noqa: E731
        eager = [base, pcm]
    else:
        lora = scaled_denoiser(_lora_toy())
        wrappers = [GraphedDenoiser(lora, capture=CAPTURE)]
        run = lambda den: sample_lora_switched(den[0], sched, x_T, noise, cond, stiffness=5.0, **kw)  # noqa: E731
        eager = [lora]
    x_eager, stats_eager = run(eager)
    x_graph, stats_graph = run(wrappers)
    torch.testing.assert_close(x_graph, x_eager, rtol=0, atol=1e-12)
    assert stats_graph.iterations == stats_eager.iterations
    torch.testing.assert_close(x_graph, sample_sequential(base, sched, x_T, noise, cond), rtol=0, atol=1e-9)
    for w in wrappers:
        assert w.graphs == (len(w._entries) if CAPTURE else 0) and w.graphs >= int(CAPTURE)


def _cli(*args: str, timeout: float = 240) -> None:
    """Run `pcm ...` in a fresh process (deterministic kernels must be set before its first CUDA call)."""
    r = subprocess.run([sys.executable, "-m", "pcm_policy.cli", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"pcm {' '.join(args)} exited {r.returncode}: {r.stderr[-3000:]}"


TINY_POLICY = ["policy.down_dims=[32,64]", "policy.diffusion_step_embed_dim=32", "policy.n_groups=4"]


def _train(out: Path) -> list[float]:
    """A few `pcm train deterministic=true` steps on a small robomimic Lift-layout file (hdf5: the GPU machine has
    no zarr); the logged losses."""
    data = write_robomimic_fixture(out.parent / f"{out.name}_lift.hdf5", lengths=(40, 30, 50))
    _cli("train", "task=lift", f"dataset.path={data}", f"device={DEVICE}", "deterministic=true", "seed=0", "train.steps=6",
         "train.batch_size=32", "train.log_every=1", "train.checkpoint_every=6", *TINY_POLICY, f"output_dir={out}")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["device"].startswith(DEVICE) and Path(metrics["checkpoint"]).is_dir()
    return [r["loss"] for r in records if "loss" in r]


def _train_pcm(base: Path, out: Path) -> dict:
    """Two epochs of `pcm train-pcm deterministic=true` (Picard collection, PCT loss through the prefix sum)."""
    _cli("train-pcm", f"base={base}", f"device={DEVICE}", "deterministic=true", "scheduler=ddim", "steps=4",
         "trajectories=4", "collect_batch=4", "epochs=2", "batch_size=4", "eval_observations=1", "eval_tol=0",
         "lora_rank=2", f"output_dir={out}")
    return json.loads((out / "metrics.json").read_text())


@on_device
def test_train_and_train_pcm_on_device_are_deterministic(tmp_path):
    """`pcm train` and `pcm train-pcm` with device=... deterministic=true, each twice: identical losses."""
    first, second = _train(tmp_path / "a"), _train(tmp_path / "b")
    assert len(first) == 6 and all(math.isfinite(v) for v in first)
    assert first == second
    pcm_first, pcm_second = _train_pcm(tmp_path / "a", tmp_path / "pcm_a"), _train_pcm(tmp_path / "a", tmp_path / "pcm_b")
    assert len(pcm_first["loss_per_epoch"]) == 2 and pcm_first["loss_per_epoch"] == pcm_second["loss_per_epoch"]
    assert pcm_first["device"].startswith(DEVICE)
    assert pcm_first["after"]["pcm_lora"]["max_abs_err_vs_sequential"] < 1e-4  # tol 0: exactly the base's output


def test_prefix_sum_by_matmul_equals_cumsum():
    """The deterministic-CUDA prefix sum of the Picard update (a triangular product) is cumsum, values and gradients."""
    from pcm_policy.sampling.picard import _prefix_sum_matmul

    delta = torch.randn(7, 2, H, DA, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(7, 2, H, DA, dtype=torch.float64)
    a = _prefix_sum_matmul(delta)
    torch.testing.assert_close(a, torch.cumsum(delta, dim=0), rtol=0, atol=1e-12)
    (grad_a,) = torch.autograd.grad((a * weights).sum(), delta)
    (grad_b,) = torch.autograd.grad((torch.cumsum(delta, dim=0) * weights).sum(), delta)
    torch.testing.assert_close(grad_a, grad_b, rtol=0, atol=1e-12)
