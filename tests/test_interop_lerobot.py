"""Importing lerobot diffusion policies: the imported policy reproduces lerobot's own chunks (fixtures made by
lerobot 0.4.4 and 0.3.3, see tests/data/interop/README.md), and bad input is refused in one line."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pcm_policy.checkpoint import load_policy
from pcm_policy.errors import CheckpointError, ConfigError
from pcm_policy.interop import import_lerobot, write_imported_checkpoint

DATA = Path(__file__).parent / "data" / "interop"
FIXTURES = ["lerobot_pusht_keypoints", "lerobot_pusht_keypoints_variant", "lerobot_pusht_keypoints_v033"]
SCHEDULES = [("ddpm", 100), ("ddim", 10)]
TOL = 1e-4  # of each action dimension's range


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """fixture name -> (policy loaded from the written checkpoint, card)."""
    torch.set_num_threads(1)
    out = {}
    for name in FIXTURES:
        ckpt = write_imported_checkpoint(import_lerobot(DATA / name), tmp_path_factory.mktemp(name) / "ckpt")
        out[name] = load_policy(ckpt)
    return out


def _range(policy):
    p = policy.normalizer.params["action"]
    return p["max"] - p["min"]


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("scheduler,steps", SCHEDULES)
def test_matches_lerobot(imported, name, scheduler, steps):
    policy, _ = imported[name]
    expected = load_file(DATA / f"expected_{name}_{scheduler}{steps}.safetensors")
    result = policy.predict_chunk(expected["obs"], {"name": "sequential", "scheduler": scheduler, "steps": steps},
                                  noise=(expected["x_T"], expected["z"]))
    span = _range(policy)
    for key in ("action_pred", "action"):
        ours, theirs = getattr(result, key), expected[key]
        assert ours.shape == theirs.shape
        assert ((ours - theirs).abs().amax(dim=(0, 1)) / span).max() <= TOL, key


def test_card_states_the_observation_layout(imported):
    policy, card = imported["lerobot_pusht_keypoints"]
    assert card["kind"] == "base" and card["task"] == "pusht" and card["source"]["format"] == "lerobot"
    assert card["observation"]["layout"] == [{"name": "observation.state", "size": 2},
                                             {"name": "observation.environment_state", "size": 16}]
    assert policy.config.obs_dim == 18 and policy.config.final_n_groups == 8 and policy.config.film_scale
    variant = imported["lerobot_pusht_keypoints_variant"][1]
    assert variant["policy"]["film_scale"] is False
    assert variant["policy"]["noise_scheduler"]["prediction_type"] == "sample"
    assert "lerobot < 0.4" in imported["lerobot_pusht_keypoints_v033"][1]["source"]["normalization"]


# ---- bad input: one line naming the file and the key, nothing written -------------------------------------------
def _edit_json(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _edit_tensors(path, fn):
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


def _set(key, value):
    def fn(d):
        d[key] = value
    return fn


def _image_input(d):
    d["input_features"]["observation.image"] = {"type": "VISUAL", "shape": [3, 96, 96]}


def _quantiles(d):
    d["steps"][3]["config"]["norm_map"]["STATE"] = "QUANTILES"


BAD = {
    # id: (fixture, file to edit, edit, error type, text the message must name)
    "act_policy": ("lerobot_pusht_keypoints", "config.json", _set("type", "act"), CheckpointError, "'type'"),
    "vqbet_policy": ("lerobot_pusht_keypoints", "config.json", _set("type", "vqbet"), CheckpointError, "'type'"),
    # an image beside the environment state: lerobot's condition order (state, images, environment state) is not ours
    "image_input_beside_environment_state": ("lerobot_pusht_keypoints", "config.json", _image_input, CheckpointError,
                                             "images beside observation.environment_state"),
    "missing_config_key": ("lerobot_pusht_keypoints", "config.json", lambda d: d.pop("down_dims"), CheckpointError,
                           "'down_dims'"),
    # the config now implies other shapes than the weights have: the weights file and key are named
    "shape_vs_config": ("lerobot_pusht_keypoints", "config.json", _set("down_dims", [8, 32]), CheckpointError,
                        "model.safetensors: 'diffusion.unet."),
    "unknown_weight": ("lerobot_pusht_keypoints", "model.safetensors",
                       lambda t: t.__setitem__("diffusion.unet.extra.weight", torch.zeros(2)), CheckpointError,
                       "'diffusion.unet.extra.weight'"),
    "missing_weight": ("lerobot_pusht_keypoints", "model.safetensors",
                       lambda t: t.pop("diffusion.unet.final_conv.1.bias"), CheckpointError,
                       "'diffusion.unet.final_conv.1.bias'"),
    "wrong_shape_weight": ("lerobot_pusht_keypoints", "model.safetensors",
                           lambda t: t.__setitem__("diffusion.unet.final_conv.1.bias", torch.zeros(3)),
                           CheckpointError, "'diffusion.unet.final_conv.1.bias'"),
    "truncated_weights": ("lerobot_pusht_keypoints", "model.safetensors", "truncate", CheckpointError,
                          "model.safetensors"),
    "truncated_config": ("lerobot_pusht_keypoints", "config.json", "truncate", CheckpointError, "config.json"),
    "scheduler": ("lerobot_pusht_keypoints", "config.json", _set("noise_scheduler_type", "DPMSolver"), ConfigError,
                  "noise_scheduler_type"),
    "prediction_type": ("lerobot_pusht_keypoints", "config.json", _set("prediction_type", "v_prediction"),
                        ConfigError, "prediction_type"),
    "beta_schedule": ("lerobot_pusht_keypoints", "config.json", _set("beta_schedule", "cubic"), ConfigError,
                      "beta_schedule"),
    "normalization_mode": ("lerobot_pusht_keypoints", "policy_preprocessor.json", _quantiles, ConfigError,
                           "norm_map.STATE"),
    "missing_stats": ("lerobot_pusht_keypoints", "policy_postprocessor_step_0_unnormalizer_processor.safetensors",
                      lambda t: t.pop("action.min"), CheckpointError, "'action.min'"),
    "missing_old_buffer": ("lerobot_pusht_keypoints_v033", "model.safetensors",
                           lambda t: t.pop("normalize_inputs.buffer_observation_environment_state.std"),
                           CheckpointError, "'normalize_inputs.buffer_observation_environment_state.std'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_refused(tmp_path, case):
    fixture, file, edit, error, named = BAD[case]
    src = tmp_path / fixture
    shutil.copytree(DATA / fixture, src)
    target = src / file
    if edit == "truncate":
        target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    elif file.endswith(".json"):
        _edit_json(target, edit)
    else:
        _edit_tensors(target, edit)
    out = tmp_path / "out"
    with pytest.raises(error) as info:
        write_imported_checkpoint(import_lerobot(src), out)
    message = str(info.value)
    assert "\n" not in message and named in message and str(src) in message, message
    assert file in message or case == "shape_vs_config", message
    assert not out.exists()


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a lerobot policy directory"):
        import_lerobot(tmp_path / "missing")
