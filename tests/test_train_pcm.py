"""PCT training end to end on a tiny policy: checkpoint layout, base binding, exact switched sampling, resume."""
import json

import pytest
import torch

from pcm_policy.commands import run_composed
from pcm_policy import checkpoint as ckpt_io
from pcm_policy.config import compose
from pcm_policy.errors import CheckpointError, ConfigError
from pcm_policy.pcm.attach import load_pcm, load_sampler
from pcm_policy.sampler_config import SamplerConfig
from tests.fixtures import write_pusht_zarr

TINY = ["policy.down_dims=[16,32]", "policy.diffusion_step_embed_dim=32", "policy.n_groups=4"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pct")
    data = write_pusht_zarr(root / "d.zarr", lengths=[30, 40, 25, 35, 28])
    cfg = compose("train", [f"dataset.path={data}", f"output_dir={root / 'base'}", "device=cpu", "train.steps=20",
                            "train.batch_size=16", "train.checkpoint_every=20", "train.warmup_steps=0", *TINY])
    run_composed("train", cfg)
    return root


def _pcm_cfg(root, mode, out, **kw):
    overrides = [f"base={root / 'base'}", f"mode={mode}", f"output_dir={root / out}", "device=cpu", "steps=10",
                 "trajectories=6", "collect_batch=3", "epochs=2", "batch_size=3", "eval_observations=2",
                 "checkpoint_every=1", "lora_rank=4"]
    return compose("train_pcm", overrides + [f"{k}={v}" for k, v in kw.items()])


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_train_pcm_writes_checkpoint_metrics_and_attaches_exactly(base_run, mode):
    metrics = run_composed("train-pcm", _pcm_cfg(base_run, mode, f"pcm_{mode}"))
    assert len(metrics["loss_per_epoch"]) == 2 and all(l > 0 for l in metrics["loss_per_epoch"])
    assert {"picard", "pcm"} <= set(metrics["after"]) and ("pcm_lora" in metrics["after"]) == (mode == "lora")
    assert (base_run / f"pcm_{mode}" / "metrics.json").is_file()
    shards = sorted((base_run / f"pcm_{mode}" / "trajectories").glob("batch_*.safetensors"))
    assert len(shards) == 2

    policy, _ = ckpt_io.load_policy(base_run / "base")
    card = ckpt_io.read_card(ckpt_io.resolve_checkpoint(base_run / f"pcm_{mode}"))
    assert card["kind"] == "pcm" and card["mode"] == mode and card["base_fingerprint"] == ckpt_io.weights_fingerprint(policy.model)

    obs = torch.randn(2, 2, 20) * 50 + 200
    names = ["pcm", "pcm_lora"] if mode == "lora" else ["pcm"]
    seq = SamplerConfig(name="sequential", scheduler="ddpm", steps=10)
    noise = policy.make_noise(2, seq, torch.Generator().manual_seed(3))
    ref = policy.predict_chunk(obs, seq, noise=noise).action_pred
    for name in names:
        sampler = SamplerConfig(name=name, scheduler="ddpm", steps=10, tol=0.0)
        sampler = load_sampler(policy, sampler, "cpu", str(base_run / f"pcm_{mode}"))
        out = policy.predict_chunk(obs, sampler, noise=noise)
        torch.testing.assert_close(out.action_pred, ref, rtol=1e-5, atol=1e-4)  # pixels: float32 rounding
        assert out.stats.converged


def test_pcm_refuses_other_base_and_missing_checkpoint(base_run, tmp_path):
    run_composed("train-pcm", _pcm_cfg(base_run, "lora", "pcm_bind", epochs=1))
    policy, _ = ckpt_io.load_policy(base_run / "base")
    with torch.no_grad():
        next(policy.model.parameters()).add_(1.0)
    with pytest.raises(CheckpointError, match="another base"):
        load_pcm(base_run / "pcm_bind", policy)
    with pytest.raises(ConfigError, match="pcm_checkpoint"):
        load_sampler(policy, SamplerConfig(name="pcm"), "cpu")


def test_train_pcm_resumes(base_run, capsys):
    """A run stopped after epoch 1 and re-run with epochs=2 continues from its checkpoint (it says so, and does
    not train epoch 1 again) and ends with the losses and weights of an uninterrupted 2-epoch run."""
    first = run_composed("train-pcm", _pcm_cfg(base_run, "lora", "pcm_resume", epochs=1))
    capsys.readouterr()
    resumed = run_composed("train-pcm", _pcm_cfg(base_run, "lora", "pcm_resume", epochs=2))
    assert "resuming PCT from" in capsys.readouterr().out
    straight = run_composed("train-pcm", _pcm_cfg(base_run, "lora", "pcm_straight", epochs=2))
    assert "resuming PCT from" not in capsys.readouterr().out
    assert resumed["loss_per_epoch"][:1] == first["loss_per_epoch"]
    assert resumed["loss_per_epoch"] == pytest.approx(straight["loss_per_epoch"], rel=1e-9)
    assert json.loads((base_run / "pcm_resume" / "metrics.json").read_text())["steps"] == 4
    weights = [ckpt_io.read_weights(ckpt_io.resolve_checkpoint(base_run / run) / ckpt_io.POLICY_WEIGHTS)
               for run in ("pcm_resume", "pcm_straight")]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=0, atol=1e-6)
