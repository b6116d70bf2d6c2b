"""pcm's exports of every shipped low-dim base open in the other tools' own code and give our chunks there.

The expected chunks in tests/data/interop/exports were made once, outside the project, by Diffusion Policy's eval
path (its workspace class, `__init__`, `load_payload`, the EMA policy's `predict_action`) and by lerobot 0.4.4's
`DiffusionPolicy.from_pretrained` + `make_pre_post_processors` + `conditional_sample` with a seeded generator, each
on pcm's export of `data/<task>/base` (see that folder's README for the commands). Here the same exports are made
again, and our policy - the shipped one, and the one imported back from the export - sampled with the draws those
tools made must give their chunks (to 1e-4 of each action dimension's span); the import is the shipped policy bit
for bit.
"""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pcm_policy.checkpoint import load_policy
from pcm_policy.interop import import_diffusion_policy, import_lerobot
from pcm_policy.interop.diffusion_policy_export import export_diffusion_policy
from pcm_policy.interop.lerobot_export import export_lerobot
from pcm_policy.interop.safe_pickle import read_config

ROOT = Path(__file__).parents[1]
EXPECTED = Path(__file__).parent / "data" / "interop" / "exports"
TASKS = ["pusht", "lift", "can"]
TOL = 1e-4  # of each action dimension's span
DDPM100 = {"name": "sequential", "scheduler": "ddpm", "steps": 100}


def _span(policy) -> torch.Tensor:
    p = policy.normalizer.params["action"]
    lo, hi = (-1 - p["offset"]) / p["scale"], (1 - p["offset"]) / p["scale"]
    return (hi - lo).abs()


def _deviation(policy, expected) -> float:
    """Largest |ours - theirs| over the whole chunk, as a fraction of the action dimension's span."""
    torch.set_num_threads(1)
    result = policy.predict_chunk(expected["obs"], DDPM100, noise=(expected["x_T"], expected["z"]))
    assert result.action_pred.shape == expected["action_pred"].shape
    assert torch.equal(result.action, result.action_pred[:, policy.config.n_obs_steps - 1:][:, :result.action.shape[1]])
    assert result.action.shape == expected["action"].shape
    span = _span(policy)
    return max(float(((ours - expected[key]).abs().amax(dim=(0, 1)) / span).max())
               for key, ours in (("action_pred", result.action_pred), ("action", result.action)))


def _assert_same_weights(a, b):
    wa, wb = a.weights(), b.weights()
    keys = sorted(k for k in wa if k.startswith("model.") or k.rsplit(".", 1)[1] in ("scale", "offset"))
    assert keys == sorted(k for k in wb if k.startswith("model.") or k.rsplit(".", 1)[1] in ("scale", "offset"))
    for key in keys:
        assert torch.equal(wa[key], wb[key]), key


@pytest.mark.parametrize("task", TASKS)
def test_diffusion_policys_eval_path_gives_our_chunks(task, tmp_path):
    base = ROOT / "data" / task / "base"
    shipped, _ = load_policy(base)
    path = export_diffusion_policy(base, tmp_path / f"{task}.ckpt")
    cfg = read_config(path)
    # what DP's workspace __init__ and eval.py read, written resolved
    assert cfg["training"]["seed"] == 42 and cfg["training"]["use_ema"] is True
    assert cfg["optimizer"]["_target_"] == "torch.optim.AdamW" and cfg["ema"]["power"] == 0.75
    assert cfg["task"]["env_runner"]["n_test"] == 50 and cfg["task"]["env_runner"]["test_start_seed"] == 100000
    assert "${" not in repr(cfg)
    expected = load_file(EXPECTED / f"expected_dp_export_{task}_ddpm100.safetensors")
    assert _deviation(shipped, expected) <= TOL
    back = import_diffusion_policy(path).build_policy()
    _assert_same_weights(shipped, back)
    assert _deviation(back, expected) <= TOL


@pytest.mark.parametrize("task", TASKS)
def test_lerobots_own_loaders_give_our_chunks(task, tmp_path):
    base = ROOT / "data" / task / "base"
    shipped, card = load_policy(base)
    report = export_lerobot(base, tmp_path / task)
    # lerobot needs a robot state and an environment state (it refuses a state-only policy)
    assert set(report["features"]) == {"observation.state", "observation.environment_state"}
    assert report["features"]["observation.state"] == (2 if task == "pusht" else 9)
    expected = load_file(EXPECTED / f"expected_lerobot_export_{task}_ddpm100.safetensors")
    assert _deviation(shipped, expected) <= TOL
    back = import_lerobot(tmp_path / task)
    _assert_same_weights(shipped, back.build_policy())
    assert back.card["task"] == card["task"] and back.card["env_id"] == card["env_id"]
    assert _deviation(back.build_policy(), expected) <= TOL


def test_a_wrong_order_would_be_caught():
    """The check has teeth: the lerobot chunks of one task are not the chunks of the same policy given the
    observation in lerobot's order without the permutation."""
    shipped, _ = load_policy(ROOT / "data" / "pusht" / "base")
    expected = load_file(EXPECTED / "expected_lerobot_export_pusht_ddpm100.safetensors")
    swapped = dict(expected, obs=expected["obs"][..., [18, 19, *range(18)]])
    assert _deviation(shipped, swapped) > 1e-2
