"""`pcm export` / export_checkpoint: a compact copy that loads as the same policy, without training state."""
import subprocess
import sys

import pytest
import torch

from pcm_policy import checkpoint as ckpt_io
from pcm_policy.errors import ConfigError
from pcm_policy.sampler_config import SamplerConfig


@pytest.fixture
def tiny_base(tiny_runs):
    return tiny_runs / "base"


def _chunk(policy, seed=0):
    obs = torch.randn(3, 2, 20, generator=torch.Generator().manual_seed(seed)) * 50 + 200
    sampler = SamplerConfig(name="sequential", scheduler="ddim", steps=4)
    return policy.predict_chunk(obs, sampler, noise=policy.make_noise(3, sampler, torch.Generator().manual_seed(seed)))


def test_export_float16_is_compact_and_loads_as_the_same_policy(tiny_base, tmp_path):
    src = ckpt_io.resolve_checkpoint(tiny_base)
    out = ckpt_io.export_checkpoint(tiny_base, tmp_path / "exported", "float16")
    assert sorted(p.name for p in out.iterdir()) == [ckpt_io.RUN_CONFIG, ckpt_io.POLICY_WEIGHTS, ckpt_io.POLICY_CARD]
    original, exported = (ckpt_io.read_weights(d / ckpt_io.POLICY_WEIGHTS) for d in (src, out))
    assert original.keys() == exported.keys()
    for key, value in exported.items():
        if key.startswith("normalizer."):  # statistics stay float32, bit for bit
            assert value.dtype == original[key].dtype and torch.equal(value, original[key]), key
        elif value.is_floating_point():
            assert value.dtype == torch.float16, key
            torch.testing.assert_close(value.float(), original[key].float(), rtol=1e-3, atol=1e-4)
    card, src_card = ckpt_io.read_card(out), ckpt_io.read_card(src)
    assert card["exported_from"] == str(src) and card["weights_dtype"] == "float16"
    assert {k: card[k] for k in ("task", "policy", "kind")} == {k: src_card[k] for k in ("task", "policy", "kind")}
    assert (out / ckpt_io.POLICY_WEIGHTS).stat().st_size < 0.6 * (src / ckpt_io.POLICY_WEIGHTS).stat().st_size

    a, _ = ckpt_io.load_policy(tiny_base)
    b, _ = ckpt_io.load_policy(out)
    ref, got = _chunk(a), _chunk(b)
    assert not torch.equal(got.action_pred, ref.action_pred)  # the weights were rounded ...
    torch.testing.assert_close(got.action_pred, ref.action_pred, rtol=0, atol=1.0)  # ... by well under a pixel
    # the exported weights are a new policy: PCMs must be trained against them (another fingerprint)
    assert ckpt_io.weights_fingerprint(b.model) != ckpt_io.weights_fingerprint(a.model)


def test_export_float32_is_lossless(tiny_base, tmp_path):
    out = ckpt_io.export_checkpoint(tiny_base, tmp_path / "exported32", "float32")
    a, _ = ckpt_io.load_policy(tiny_base)
    b, _ = ckpt_io.load_policy(out)
    assert ckpt_io.weights_fingerprint(a.model) == ckpt_io.weights_fingerprint(b.model)
    assert torch.equal(_chunk(a).action_pred, _chunk(b).action_pred)


def test_export_rejects_unknown_dtype_and_writes_nothing(tiny_base, tmp_path):
    with pytest.raises(ConfigError, match="int8"):
        ckpt_io.export_checkpoint(tiny_base, tmp_path / "bad", "int8")
    assert not (tmp_path / "bad").exists()


def test_export_command(tiny_base, tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run([sys.executable, "-m", "pcm_policy.cli", "export", str(tiny_base), str(out),
                             "--dtype", "bfloat16"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"exported {tiny_base} -> {out} (bfloat16, ")
    weights = ckpt_io.read_weights(out / ckpt_io.POLICY_WEIGHTS)
    assert {v.dtype for k, v in weights.items() if k.startswith("model.")} == {torch.bfloat16}
    assert ckpt_io.load_policy(out)[1]["weights_dtype"] == "bfloat16"
