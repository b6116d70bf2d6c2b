"""The inference backends (`pcm_policy.backends`): the hand-written ONNX graph computes the torch network's function,
every sampler lands on its torch chunk under `onnx` and `auto`, `auto` routes by measured row counts, and the
`backend=` option refuses what cannot run in one line."""
import sys

import numpy as np
import pytest
import torch

from pcm_policy.backends import BACKENDS, check_backend
from pcm_policy.backends.auto import BackendRouter, RowTiming, rows_per_call
from pcm_policy.backends.denoisers import BackendCache, NetworkShape, build_denoisers
from pcm_policy.backends.onnx_denoiser import OnnxDenoiser
from pcm_policy.backends.scaled import BaseAtScaleZero
from pcm_policy.backends.onnx_graph import denoiser_graph
from pcm_policy.data.normalizer import Normalizer
from pcm_policy.errors import ConfigError, PcmError
from pcm_policy.model.lora import add_lora, lora_modules, scaled_denoiser
from pcm_policy.pcm.attach import load_sampler
from pcm_policy.policy import DiffusionPolicy, PolicyConfig
from pcm_policy.sampler_config import SamplerConfig
from tests.fixtures import assert_refused
from tests.golden.make import BASE, PCM_LORA_DDIM10, load_checkpoints

shipped = pytest.mark.skipif(not (BASE.is_dir() and PCM_LORA_DDIM10.is_dir()), reason="no shipped PushT checkpoints")
TINY = dict(down_dims=(16, 32), diffusion_step_embed_dim=16, n_groups=4, horizon=8, n_action_steps=4)


@pytest.fixture(scope="module")
def checkpoints():
    torch.set_num_threads(1)
    return load_checkpoints()


def _tiny_policy(seed=0, **policy) -> DiffusionPolicy:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    normalizer = Normalizer.fit({"obs": rng.uniform(0, 512, (50, 3)), "action": rng.uniform(0, 512, (50, 2))})
    return DiffusionPolicy(PolicyConfig(obs_dim=3, action_dim=2, **{**TINY, **policy}), normalizer).eval()


def _perturbed_lora(net, seed=1):
    """The network with a LoRA delta of random (non-zero) B, so that the scale matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(net):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)
    return net


def _shape(policy) -> NetworkShape:
    c = policy.config
    return NetworkShape((c.horizon, c.action_dim), c.step_cond_dim * c.n_obs_steps, c.num_train_timesteps)


def _assert_graph_matches(torch_fn, onnx_fn, shape, extra=()):
    for rows in (1, 3, 10):
        x, t, cond, *more = shape.example(rows, extra)
        with torch.no_grad():
            expected = torch_fn(x, t, cond, *more)
        diff = (onnx_fn(x, t, cond, *more) - expected).abs()
        assert float(diff.max()) <= 1e-4 and float(diff.mean()) <= 1e-5, (rows, float(diff.max()))


# ---- the graph ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", [{}, {"film_scale": False}, {"final_n_groups": 8, "down_dims": (16, 32, 64)},
                                     {"kernel_size": 3, "n_obs_steps": 3}])
def test_graph_matches_the_torch_network(variant):
    policy = _tiny_policy(**variant)
    shape = _shape(policy)
    model = denoiser_graph(policy.model, policy.config.horizon, policy.config.num_train_timesteps)
    _assert_graph_matches(policy.model, OnnxDenoiser(model, shape.sample_shape, shape.cond_dim, threads=1), shape)


def test_lora_graph_takes_the_scale_and_the_merged_graph_is_scale_one():
    policy = _tiny_policy()
    shape = _shape(policy)
    H, T = policy.config.horizon, policy.config.num_train_timesteps
    net = _perturbed_lora(add_lora(__import__("copy").deepcopy(policy.model), rank=4))
    scaled = OnnxDenoiser(denoiser_graph(net, H, T, scale=None), shape.sample_shape, shape.cond_dim, 1, scale_input=True)
    base = OnnxDenoiser(denoiser_graph(policy.model, H, T), shape.sample_shape, shape.cond_dim, 1)
    lora = BaseAtScaleZero(scaled, base)
    for scale in (0.0, 0.3, 1.0):
        _assert_graph_matches(scaled_denoiser(net), lora, shape, (scale,))
    _assert_graph_matches(scaled_denoiser(net), scaled, shape, (0.0,))  # the scale graph itself at 0, too
    merged = OnnxDenoiser(denoiser_graph(net, H, T, scale=1.0), shape.sample_shape, shape.cond_dim, 1)
    _assert_graph_matches(lambda x, t, c: scaled_denoiser(net)(x, t, c, 1.0), merged, shape)
    with pytest.raises(PcmError, match="needs a LoRA network"):
        denoiser_graph(policy.model, H, T, scale=None)


@shipped
def test_shipped_graph_is_within_1e_5_of_torch_and_compact(checkpoints):
    import onnx

    policy, pcm = checkpoints
    shape = _shape(policy)
    model = denoiser_graph(policy.model, 16, 100)
    assert len(onnx.load_from_string(model).graph.node) < 300  # torch's exporter writes ~610
    _assert_graph_matches(policy.model, OnnxDenoiser(model, shape.sample_shape, shape.cond_dim, 1), shape)


def test_onnx_denoiser_copies_inputs_and_returns_fresh_tensors():
    policy = _tiny_policy()
    shape = _shape(policy)
    den = OnnxDenoiser(denoiser_graph(policy.model, 8, 100), shape.sample_shape, shape.cond_dim, 1)
    x, _, cond = shape.example(4)
    t = torch.full((1,), 7).expand(4)  # broadcast inputs: an expanded timestep row, one condition for every row
    cond = cond[:1].expand(4, -1)
    with torch.no_grad():
        expected = policy.model(x, t.contiguous(), cond.contiguous())
    wide = torch.cat([x, x], dim=2)[:, :, :x.shape[2]]  # a strided view, as float64
    assert not wide.is_contiguous()
    first = den(wide.double(), t, cond)
    assert first.dtype == torch.float64
    torch.testing.assert_close(first.float(), expected, atol=1e-4, rtol=0)
    second = den(x, t, cond)
    assert second.data_ptr() != den(x, t, cond).data_ptr()  # the next call does not overwrite a returned output
    torch.testing.assert_close(first.float(), second, atol=1e-6, rtol=0)
    with pytest.raises(PcmError, match="global condition"):
        den(x, t, None)
    assert den.session.get_session_options().intra_op_num_threads == 1  # `threads` sets the intra-op threads
    two = OnnxDenoiser(denoiser_graph(policy.model, 8, 100), shape.sample_shape, shape.cond_dim, threads=2)
    assert two.session.get_session_options().intra_op_num_threads == 2


# ---- samplers on every backend -----------------------------------------------------------------------------------
SAMPLERS = {
    "sequential": dict(name="sequential"),
    "picard": dict(name="picard", tol=0.1),
    "picard+aa": dict(name="picard", tol=0.1, accel="anderson", damping=1.0),
    "pcm": dict(name="pcm", tol=0.1),
    "pcm_lora": dict(name="pcm_lora", tol=0.1),
    "pcm_lora+aa": dict(name="pcm_lora", tol=0.1, accel="anderson", damping=1.0),
}


@shipped
@pytest.mark.parametrize("backend", ["onnx", "auto"])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_lands_on_its_torch_chunk(checkpoints, name, backend):
    policy, pcm = checkpoints
    config = SamplerConfig(scheduler="ddim", steps=10, **SAMPLERS[name])
    cond = policy.encode(torch.tensor(np.random.default_rng(0).uniform(100, 400, (2, 2, 20)), dtype=torch.float32))
    chunks = {}
    for b in ("torch", backend):
        sampler = policy.sampler(config, pcm=pcm if config.needs_pcm else None, backend=b)
        assert sampler.backend == b
        x_T, noise = sampler.make_noise(2, torch.Generator().manual_seed(3))
        chunks[b] = sampler.sample(x_T, noise, cond)
    (ref, ref_stats), (x0, stats) = chunks["torch"], chunks[backend]
    assert stats.iterations == ref_stats.iterations and stats.converged == ref_stats.converged
    assert float((x0 - ref).abs().max()) <= 1e-4


def test_picard_at_tol_0_is_the_onnx_sequential_sample():
    """The samplers' exactness holds for the onnx denoiser as for any other: Picard at tol 0 = sequential."""
    policy = _tiny_policy()
    cond = policy.encode(torch.rand(2, 2, 3) * 512)
    out = {}
    for name in ("sequential", "picard"):
        sampler = policy.sampler(SamplerConfig(name=name, scheduler="ddpm", steps=20, tol=0.0, window=7), backend="onnx")
        x_T, noise = sampler.make_noise(2, torch.Generator().manual_seed(0))
        out[name] = sampler.sample(x_T, noise, cond)[0]
    torch.testing.assert_close(out["picard"], out["sequential"], atol=1e-5, rtol=0)


def test_samplers_and_sessions_are_built_once_per_backend():
    policy = _tiny_policy()
    seq = SamplerConfig(name="sequential", scheduler="ddim", steps=4)
    picard = SamplerConfig(name="picard", scheduler="ddim", steps=4)
    assert policy.sampler(seq, backend="onnx") is policy.sampler(seq, backend="onnx")
    assert policy.sampler(seq, backend="onnx") is not policy.sampler(seq)
    assert policy.sampler(seq, backend="onnx").base is policy.sampler(picard, backend="onnx").base  # one session
    assert policy.sampler(seq).backend == "torch" and policy.sampler(seq).calibration is None


def test_auto_records_its_calibration_for_the_rows_the_sampler_calls():
    policy = _tiny_policy()
    sampler = policy.sampler(SamplerConfig(name="picard", scheduler="ddim", steps=6), backend="auto")
    table = sampler.calibration.to_dict()
    base = table["denoisers"]["base"]
    assert table["threads"] == torch.get_num_threads() and {1, 6} <= {p["rows"] for p in base["table"]}
    for point in base["table"]:
        assert point["torch_ms"] > 0 and point["onnx_ms"] > 0
        assert point["chosen"] == ("onnx" if point["onnx_ms"] < point["torch_ms"] else "torch")
    assert "auto (" in sampler.calibration.summary()
    assert rows_per_call(sampler.config, fixed_shape=False) == [1, 2, 3, 4, 5, 6]
    assert rows_per_call(sampler.config, fixed_shape=True, batch=2) == [12]


class _FakeRouter(BackendRouter):
    """Synthetic timings: onnx is faster below `crossover` rows (no real calls)."""

    def __init__(self, crossover):
        super().__init__(lambda *a: "torch", lambda *a: "onnx", lambda rows: (torch.zeros(rows, 1, 1), None, None))
        self.crossover = crossover

    def measure(self, rows):
        timing = RowTiming(rows, torch_ms=10.0 + rows, onnx_ms=2.0 + rows * (1.0 + 8.0 / self.crossover))
        self.measured[rows] = timing
        return timing


@pytest.mark.parametrize("crossover", [1, 37, 100, 1000])
def test_router_bisects_to_the_crossover_and_routes_calls(crossover):
    router = _FakeRouter(crossover)
    router.calibrate(range(1, 101))
    assert len(router.measured) <= 2 + int(np.ceil(np.log2(100)))
    for rows in range(1, 101):
        assert router.choice(rows) == ("onnx" if rows < crossover else "torch"), rows
    assert router(torch.zeros(min(crossover, 100) + 1, 1, 1), None, None) == ("torch" if crossover <= 100 else "onnx")


# ---- options and refusals ----------------------------------------------------------------------------------------
def test_backend_option_checks():
    assert BACKENDS == ("torch", "onnx", "auto")
    assert check_backend("onnx", "cpu") == "onnx"
    with pytest.raises(ConfigError, match=r"^backend='tensorrt': expected one of torch, onnx, auto$"):
        check_backend("tensorrt")
    with pytest.raises(ConfigError, match="runs on the CPU only") as e:
        check_backend("onnx", "cuda")
    assert "\n" not in str(e.value)
    assert check_backend("auto", "cuda") == "auto"


def test_auto_on_cuda_is_torch_without_touching_a_gpu():
    policy = _tiny_policy()
    d = build_denoisers(policy.denoiser, policy.model, None, SamplerConfig(), "auto", _shape(policy),
                        torch.device("cuda"), BackendCache())
    assert d.base == policy.denoiser and d.backend == "auto" and not d.calibration.routers
    assert "cuda" in d.calibration.summary()


def test_missing_onnxruntime_is_one_line_naming_the_fix(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(ConfigError, match=r"backend=onnx: onnxruntime does not import here .*pip install "
                                          r"onnxruntime==1\.31\.1"):
        check_backend("onnx")
    assert check_backend("torch") == "torch"
    assert_refused(capsys, tmp_path, "bench", "backend=auto", f"output_dir={tmp_path / 'out'}",
                   needles=("backend=auto", "pip install onnxruntime==1.31.1"))


def test_a_pcm_callable_needs_the_torch_backend():
    policy = _tiny_policy()
    config = SamplerConfig(name="pcm", scheduler="ddim", steps=4)
    assert policy.sampler(config, pcm=policy.denoiser).backend == "torch"
    with pytest.raises(ConfigError, match="PCM must be given as its network"):
        policy.sampler(config, pcm=policy.denoiser, backend="onnx")


@shipped
def test_load_sampler_attaches_the_pcm_on_the_backend(checkpoints):
    policy, _ = checkpoints
    sampler = load_sampler(policy, {"name": "pcm_lora", "scheduler": "ddim", "steps": 10,
                                    "pcm_checkpoint": str(PCM_LORA_DDIM10)}, backend="onnx")
    assert sampler.backend == "onnx" and isinstance(sampler.pcm, BaseAtScaleZero)
