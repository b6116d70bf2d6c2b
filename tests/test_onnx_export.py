"""`pcm export --format onnx`: the directory it writes, the self-check that refuses to write, the checksums the loader
verifies, an image policy's encoder graph, and docs/onnx.md's onnxruntime + diffusers example against our chunk."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from pcm_policy.backends import exported
from pcm_policy.backends.exported import POLICY_JSON, export_onnx, load_exported
from pcm_policy.errors import CheckpointError
from pcm_policy.sampler_config import SamplerConfig
from tests.fixtures import assert_refused, run_cli
from tests.golden.make import BASE, PCM_LORA_DDIM10, load_checkpoints

ROOT = Path(__file__).resolve().parents[1]
shipped = pytest.mark.skipif(not (BASE.is_dir() and PCM_LORA_DDIM10.is_dir()), reason="no shipped PushT checkpoints")


@pytest.fixture(scope="module")
def shipped_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "pusht_onnx"
    code = __import__("pcm_policy.cli", fromlist=["main"]).main(
        ["export", str(BASE), str(out), "--format", "onnx", f"pcm={PCM_LORA_DDIM10}"])
    assert code == 0
    return out


def _doc_example() -> dict:
    """docs/onnx.md's python block, executed: its `sample_chunk` function (no pcm_policy import in it)."""
    text = (ROOT / "docs" / "onnx.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "pcm_policy" not in code
    namespace: dict = {}
    exec(compile(code, "docs/onnx.md", "exec"), namespace)
    return namespace


@shipped
def test_doc_example_samples_our_ddim10_chunk_with_onnxruntime_and_diffusers(shipped_export):
    policy, _ = load_checkpoints()
    sample_chunk = _doc_example()["sample_chunk"]
    observations = np.random.default_rng(0).uniform(100, 400, (3, 2, 20)).astype(np.float32)
    sampler = policy.sampler(SamplerConfig(name="sequential", scheduler="ddim", steps=10))
    for i, obs in enumerate(observations):
        theirs = torch.from_numpy(np.asarray(sample_chunk(str(shipped_export), obs, seed=i), np.float32))
        ours = policy.predict_chunk(torch.from_numpy(obs), sampler,
                                    noise=sampler.make_noise(1, torch.Generator().manual_seed(i))).action_pred[0]
        normalized = [policy.normalizer.normalize("action", a) for a in (theirs, ours)]
        assert float((normalized[0] - normalized[1]).abs().max()) <= 1e-4


@shipped
def test_policy_json_holds_what_sampling_needs(shipped_export):
    policy, _ = load_checkpoints()
    spec = json.loads((shipped_export / POLICY_JSON).read_text())
    c = policy.config
    assert {k: spec[k] for k in ("horizon", "n_obs_steps", "n_action_steps", "obs_dim", "action_dim")} == \
        {"horizon": 16, "n_obs_steps": 2, "n_action_steps": 8, "obs_dim": 20, "action_dim": 2}
    assert spec["noise_scheduler"] == c.noise_scheduler and spec["executed_actions"] == [1, 9]
    for field in ("obs", "action"):
        for stat in ("scale", "offset"):
            np.testing.assert_array_equal(np.float32(spec["normalizer"][field][stat]),
                                          policy.normalizer.params[field][stat].numpy())
    assert spec["global_cond"]["dim"] == 40
    assert spec["observation"]["kind"] == "pusht_keypoints" or spec["observation"]["parts"]
    assert sum(p["size"] for p in spec["observation"]["parts"]) == 20 and spec["observation"]["cameras"] == []
    assert set(spec["graphs"]) == {"denoiser.onnx", "pcm_lora.onnx"}
    assert spec["graphs"]["pcm_lora.onnx"]["inputs"]["scale"] == [1, "float32"]
    assert spec["pcm"]["scheduler"] == "ddim" and spec["pcm"]["mode"] == "lora"
    for file, entry in spec["graphs"].items():
        assert entry["self_check_max_abs_diff"] <= 1e-4
        names = [i.name for i in ort.InferenceSession(str(shipped_export / file)).get_inputs()]
        assert names == list(entry["inputs"])
    loaded = load_exported(shipped_export)
    assert loaded.spec == spec and set(loaded.graphs) == set(spec["graphs"])


@shipped
def test_loader_refuses_graphs_that_do_not_match_their_checksums(shipped_export, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shipped_export, copy)
    data = bytearray((copy / "pcm_lora.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "pcm_lora.onnx").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"pcm_lora\.onnx: does not match its SHA-256 checksum"):
        load_exported(copy)
    (copy / "pcm_lora.onnx").unlink()
    with pytest.raises(CheckpointError, match=r"pcm_lora\.onnx: missing"):
        load_exported(copy)
    (copy / POLICY_JSON).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_exported(copy)
    with pytest.raises(CheckpointError, match="not an ONNX export"):
        load_exported(tmp_path / "nowhere")


def test_export_refuses_to_write_when_onnxruntime_and_torch_disagree(tiny_runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(exported, "SELF_CHECK_ATOL", 1e-12)  # float rounding alone now fails it
    line = assert_refused(capsys, tmp_path, "export", tiny_runs / "base", tmp_path / "out", "--format", "onnx",
                          f"pcm={tiny_runs / 'pcm'}", needles=("self-check failed", "differs from torch by",
                                                                "nothing written"))
    assert re.search(r"(denoiser|pcm_lora)\.onnx differs from torch by \d\.\d\de-\d\d at N=(1|10)", line), line


def test_export_of_a_tiny_run_and_its_refusals(tiny_runs, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(capsys, "export", tiny_runs / "base", out, "--format", "onnx", f"pcm={tiny_runs / 'pcm'}")
    assert code == 0 and not err
    assert sorted(p.name for p in out.iterdir()) == ["denoiser.onnx", "pcm_lora.onnx", "policy.json"]
    code, _ = run_cli(capsys, "export", tiny_runs / "base", out, "--format", "onnx")  # replaces an export
    assert code == 0 and not (out / "pcm_lora.onnx").exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep")
    assert_refused(capsys, tmp_path, "export", tiny_runs / "base", tmp_path / "notes", "--format", "onnx",
                   needles=("is not an ONNX export",))
    assert_refused(capsys, tmp_path, "export", tiny_runs / "base", tmp_path / "x", f"pcm={tiny_runs / 'pcm'}",
                   needles=("only --format onnx exports a PCM",))
    assert_refused(capsys, tmp_path, "export", tiny_runs / "base", tmp_path / "x", "--format", "onnx", "pmc=1",
                   needles=("pmc=1: unknown option",))
    assert_refused(capsys, tmp_path, "export", tiny_runs / "base", tmp_path / "x", "--format", "onnx",
                   f"pcm={tiny_runs / 'other_base'}", needles=("not a PCM checkpoint",))


def test_image_policy_exports_its_encoder(tmp_path):
    from tests.test_image_policy import _observation, _policy

    policy = _policy()
    spec = export_onnx(policy, tmp_path / "img", {"task": "pusht_image"}, source="test")
    assert set(spec["graphs"]) == {"denoiser.onnx", "encoder.onnx"}
    assert spec["observation"]["cameras"] == ["img"] and spec["observation"]["image_shape"] == [32, 32]
    obs = _observation(batch=3)
    features = ort.InferenceSession(str(tmp_path / "img" / "encoder.onnx")).run(None, {"images": obs["image"].numpy()})[0]
    nobs = policy.normalizer.normalize("obs", obs["obs"]).numpy()
    cond = np.concatenate([nobs, features], axis=-1).reshape(3, -1)  # policy.json: global_cond.layout
    with torch.no_grad():
        expected = policy.encode(obs).numpy()
    assert cond.shape[1] == spec["global_cond"]["dim"]
    np.testing.assert_allclose(cond, expected, atol=1e-4, rtol=0)


def test_a_full_pcm_exports_as_pcm_onnx(tmp_path):
    from pcm_policy.pcm.attach import build_pcm_network
    from tests.test_backends import _tiny_policy

    policy = _tiny_policy()
    pcm = build_pcm_network(policy.model, "full")
    with torch.no_grad():
        for p in pcm.parameters():
            p.add_(0.01 * torch.randn_like(p))
    spec = export_onnx(policy, tmp_path / "full", {"task": "pusht"}, source="test", pcm=pcm,
                       pcm_card={"mode": "full", "scheduler": "ddim", "steps": 4})
    assert set(spec["graphs"]) == {"denoiser.onnx", "pcm.onnx"} and "scale" not in spec["graphs"]["pcm.onnx"]["inputs"]
    assert spec["pcm"]["mode"] == "full" and load_exported(tmp_path / "full").graphs.keys() == spec["graphs"].keys()
