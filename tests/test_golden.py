"""Golden outputs: the shipped PushT base and LoRA PCM still give the chunks recorded in tests/golden/.

`tests/golden/pusht_base.safetensors` stores fixed observations and noise and, for each case of
`tests.golden.make.CASES` (sequential DDIM-10 and DDPM-100, Picard full-window and windowed, one PCM step in
output and in weight space, a weight-space PCM run), the chunk, iteration count and convergence flag. This test
recomputes them from the stored inputs (float32, CPU) and compares: a change to the network, the normalizer,
the scheduler step math or the samplers fails here. Every case is recomputed on each backend (`torch`, `onnx`: the UNet as an ONNX graph
run by onnxruntime, `auto`): all must reproduce the torch-made artifact within the same tolerance.

When such a change is deliberate (new shipped checkpoints, an intended change of the outputs), regenerate the
artifact from the repository root and say why in the commit:

    python -m tests.golden.make
"""
import pytest
import torch

from pcm_policy.checkpoint import weights_fingerprint
from tests.golden.make import BASE, CASES, COMMAND, GOLDEN, PCM_LORA_DDIM10, compute_outputs, load_checkpoints, read_golden

pytestmark = pytest.mark.skipif(not (BASE.is_dir() and PCM_LORA_DDIM10.is_dir()), reason="no shipped PushT checkpoints")

# Unnormalized PushT actions (px on a 512 px table). Thread count alone moves them by <= 6e-5 px (float32
# rounding); any real change to the model or the step math moves them by far more (see the last test).
ATOL_PX = 1e-3


@pytest.fixture(scope="module")
def golden():
    return read_golden(GOLDEN)


@pytest.fixture(scope="module")
def checkpoints():
    return load_checkpoints()


BACKENDS = ("torch", "onnx", "auto")


@pytest.fixture(scope="module", params=BACKENDS)
def computed(request, golden, checkpoints):
    inputs, _, _ = golden
    return compute_outputs(*checkpoints, inputs, backend=request.param)


def test_golden_file_is_for_the_shipped_base(golden, checkpoints):
    _, outputs, meta = golden
    assert meta["base_fingerprint"] == weights_fingerprint(checkpoints[0].model), (
        f"data/pusht/base changed since {GOLDEN.name} was made; if that is deliberate, run `{COMMAND}`")
    assert {k.rsplit(".", 1)[0] for k in outputs} == set(CASES), f"cases changed: run `{COMMAND}`"


@pytest.mark.parametrize("case", list(CASES))
def test_golden_output(case, golden, computed):
    _, expected, _ = golden
    assert int(computed[f"{case}.iterations"]) == int(expected[f"{case}.iterations"])
    assert bool(computed[f"{case}.converged"]) == bool(expected[f"{case}.converged"])
    torch.testing.assert_close(computed[f"{case}.action_pred"], expected[f"{case}.action_pred"],
                               rtol=0.0, atol=ATOL_PX, msg=lambda m: f"{case}: {m}\n(deliberate? run `{COMMAND}`)")


def test_golden_outputs_are_what_the_cases_claim(golden):
    """The recorded chunks themselves: exact samplers agree with sequential, capped PCM steps are not exact."""
    _, out, _ = golden
    seq = out["sequential_ddim10.action_pred"]
    err = {case: (out[f"{case}.action_pred"] - seq).abs().max().item()
           for case in ("picard_ddim10", "picard_ddim10_window4", "pcm_lora_ddim10", "pcm_lora_ddim10_step1")}
    for case in ("picard_ddim10", "picard_ddim10_window4", "pcm_lora_ddim10"):
        assert bool(out[f"{case}.converged"]) and int(out[f"{case}.iterations"]) < 10
        assert err[case] < 10.0  # px (2% of the table): converged at tol 0.1 near the sequential chunk
    assert err["pcm_lora_ddim10_step1"] > err["pcm_lora_ddim10"]  # switching back to the base improves the chunk
    ddpm = (out["picard_ddpm100_window25.action_pred"] - out["sequential_ddpm100.action_pred"]).abs().max()
    assert bool(out["picard_ddpm100_window25.converged"]) and ddpm < 10.0
    for case in ("pcm_ddim10_step1", "pcm_lora_ddim10_step1"):
        assert int(out[f"{case}.iterations"]) == 1 and not bool(out[f"{case}.converged"])
    # a full-scale LoRA PCM step is the same map in output space and in weight space
    torch.testing.assert_close(out["pcm_ddim10_step1.action_pred"], out["pcm_lora_ddim10_step1.action_pred"])


def test_golden_comparison_catches_a_small_weight_change(golden, checkpoints):
    """The tolerance is tight enough: nudging one bias of the base by 1e-4 moves a sequential chunk past it
    (by about 0.03 px; 1e-5 still moves it by 3e-3 px)."""
    inputs, expected, _ = golden
    policy, _ = checkpoints
    bias = next(p for name, p in policy.model.named_parameters() if name.endswith("bias"))
    saved = bias.detach().clone()
    with torch.no_grad():
        bias.add_(1e-4)
    try:
        sampler, _, n = CASES["sequential_ddim10"]
        chunk = policy.predict_chunk(inputs["obs"][:n], sampler=sampler,
                                     noise=(inputs["ddim10.x_T"][:n], inputs["ddim10.noise"][:, :n]))
    finally:
        with torch.no_grad():
            bias.copy_(saved)
    assert (chunk.action_pred - expected["sequential_ddim10.action_pred"]).abs().max() > 10 * ATOL_PX
