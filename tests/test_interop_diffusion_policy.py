"""Importing Diffusion Policy workspace checkpoints: the imported policy reproduces DP's own chunks with its EMA
weights (fixtures made by DP's code, see tests/data/interop/README.md), the checkpoint is read without running
code from it, and bad input is refused in one line."""
import pathlib
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from pcm_policy.checkpoint import load_policy
from pcm_policy.errors import CheckpointError, ConfigError
from pcm_policy.interop import import_diffusion_policy, write_imported_checkpoint
from pcm_policy.interop.safe_config import safe_eval
from pcm_policy.interop.safe_pickle import load_restricted
from pcm_policy.policy import PolicyConfig

DATA = Path(__file__).parent / "data" / "interop"
FIXTURES = ["dp_lowdim_pusht", "dp_lowdim_pusht_noscale_ddim"]
SCHEDULES = [("ddpm", 100), ("ddim", 10)]
TOL = 1e-4  # of each action dimension's range
SEQ = {"name": "sequential"}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """fixture name -> (policy loaded from the written checkpoint, card)."""
    torch.set_num_threads(1)
    out = {}
    for name in FIXTURES:
        ckpt = write_imported_checkpoint(import_diffusion_policy(DATA / f"{name}.ckpt"),
                                         tmp_path_factory.mktemp(name) / "ckpt")
        out[name] = load_policy(ckpt)
    return out


def _max_rel(ours, theirs, policy):
    p = policy.normalizer.params["action"]
    return float(((ours - theirs).abs().amax(dim=(0, 1)) / (p["max"] - p["min"])).max())


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("scheduler,steps", SCHEDULES)
def test_matches_diffusion_policy_ema(imported, name, scheduler, steps):
    policy, card = imported[name]
    assert card["source"]["weights"] == "ema_model"
    expected = load_file(DATA / f"expected_{name}_{scheduler}{steps}.safetensors")
    result = policy.predict_chunk(expected["obs"], {**SEQ, "scheduler": scheduler, "steps": steps},
                                  noise=(expected["x_T"], expected["z"]))
    assert result.action.shape == expected["action"].shape
    assert _max_rel(result.action_pred, expected["action_pred"], policy) <= TOL
    assert _max_rel(result.action, expected["action"], policy) <= TOL
    # DP's non-EMA weights give another chunk: the import took ema_model
    assert _max_rel(result.action_pred, expected["action_pred_model"], policy) > 1e-2


def _rewrite(tmp_path, name="dp_lowdim_pusht", cfg_edit=None, state_edit=None) -> Path:
    """A copy of a fixture checkpoint with its cfg / ema_model state edited (written with plain torch.save)."""
    payload = load_restricted(DATA / f"{name}.ckpt")
    if cfg_edit:
        cfg_edit(payload["cfg"])
    if state_edit:
        state_edit(payload["state_dicts"]["ema_model"])
    path = tmp_path / f"{name}_edited.ckpt"
    torch.save(payload, path)
    return path


def test_without_ema_takes_model(tmp_path):
    path = _rewrite(tmp_path, cfg_edit=lambda c: OmegaConf.update(c, "training.use_ema", False))
    imp = import_diffusion_policy(path)
    assert imp.card["source"]["weights"] == "model"
    policy = imp.build_policy()
    expected = load_file(DATA / "expected_dp_lowdim_pusht_ddim10.safetensors")
    result = policy.predict_chunk(expected["obs"], {**SEQ, "scheduler": "ddim", "steps": 10},
                                  noise=(expected["x_T"], expected["z"]))
    assert _max_rel(result.action_pred, expected["action_pred_model"], policy) <= TOL


def test_card_and_config(imported):
    policy, card = imported["dp_lowdim_pusht"]
    assert card["task"] == "pusht" and card["env_id"] == "pcm/PushT-v0" and card["kind"] == "base"
    assert card["observation"]["layout"] == [{"name": "keypoints", "size": 18}, {"name": "agent_pos", "size": 2}]
    assert card["policy"]["final_n_groups"] == 8 and "film_scale" not in card["policy"]
    noscale = imported["dp_lowdim_pusht_noscale_ddim"][1]
    assert noscale["policy"]["film_scale"] is False and noscale["source"]["noise_scheduler_type"] == "DDIM"
    # this project's own cards are unchanged by the new optional fields
    assert set(PolicyConfig(obs_dim=2, action_dim=2).to_dict()).isdisjoint({"film_scale", "final_n_groups"})


def test_robomimic_layout_and_abs_action(tmp_path):
    keys = ["object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"]

    def edit(cfg):
        OmegaConf.update(cfg, "task.name", "square_lowdim")
        OmegaConf.update(cfg, "task.obs_keys", keys, force_add=True)
        OmegaConf.update(cfg, "task.abs_action", True, force_add=True)
    card = import_diffusion_policy(_rewrite(tmp_path, cfg_edit=edit)).card
    assert card["abs_action"] is True and card["task"] is None and card["observation"]["kind"] == "robomimic_lowdim"
    assert [e["size"] for e in card["observation"]["layout"]] == [11, 3, 4, 2]  # the object takes the rest of 20


def test_safe_eval():
    assert safe_eval("2 if True or False else 20") == 2
    assert safe_eval("20*2") == 40 and safe_eval("'8'+'0'") == "80"
    with pytest.raises(ValueError):
        safe_eval("__import__('os').getcwd()")


# ---- bad input: one line naming the file and the key, nothing written -------------------------------------------
def _target(key, value):
    return lambda c: OmegaConf.update(c, key, value, force_add=True)


def _unsafe(tmp_path):
    payload = load_restricted(DATA / "dp_lowdim_pusht.ckpt")
    payload["pickles"]["_output_dir"] = pathlib.PurePosixPath("/tmp")  # a global outside the allowlist
    path = tmp_path / "unsafe.ckpt"
    torch.save(payload, path)
    return path


def _truncated(tmp_path):
    data = (DATA / "dp_lowdim_pusht.ckpt").read_bytes()
    path = tmp_path / "truncated.ckpt"
    path.write_bytes(data[: len(data) // 2])
    return path


BAD = {
    # id: (make the file, error type, text the message must name)
    "transformer_policy": (lambda t: _rewrite(t, cfg_edit=_target(
        "policy._target_", "diffusion_policy.policy.diffusion_transformer_lowdim_policy.DiffusionTransformerLowdimPolicy")),
        CheckpointError, "policy._target_"),
    "image_policy": (lambda t: _rewrite(t, cfg_edit=_target(
        "policy._target_", "diffusion_policy.policy.diffusion_unet_hybrid_image_policy.DiffusionUnetHybridImagePolicy")),
        CheckpointError, "policy._target_"),
    "bet_policy": (lambda t: _rewrite(t, cfg_edit=_target(
        "policy._target_", "diffusion_policy.policy.bet_lowdim_policy.BETLowdimPolicy")),
        CheckpointError, "policy._target_"),
    "unknown_key": (lambda t: _rewrite(t, state_edit=lambda s: s.__setitem__("model.extra.weight", torch.zeros(1))),
                    CheckpointError, "(state_dicts.ema_model): unexpected key 'model.extra.weight'"),
    "missing_key": (lambda t: _rewrite(t, state_edit=lambda s: s.pop("model.final_conv.1.bias")),
                    CheckpointError, "'model.final_conv.1.bias'"),
    "missing_normalizer": (lambda t: _rewrite(t, state_edit=lambda s: s.pop("normalizer.params_dict.obs.scale")),
                           CheckpointError, "normalizer.params_dict.obs.scale"),
    "shape_vs_config": (lambda t: _rewrite(t, cfg_edit=_target("policy.model.down_dims", [8, 32])),
                        CheckpointError, "'model."),
    "truncated": (_truncated, CheckpointError, "truncated or corrupt"),
    "unsafe_global": (_unsafe, CheckpointError, "pathlib.PurePosixPath"),
    "scheduler": (lambda t: _rewrite(t, cfg_edit=_target(
        "policy.noise_scheduler._target_", "diffusers.schedulers.scheduling_dpmsolver_multistep.DPMSolverMultistepScheduler")),
        ConfigError, "policy.noise_scheduler._target_"),
    "prediction_type": (lambda t: _rewrite(t, cfg_edit=_target("policy.noise_scheduler.prediction_type", "v_prediction")),
                        ConfigError, "policy.noise_scheduler.prediction_type"),
    "variance_type": (lambda t: _rewrite(t, cfg_edit=_target("policy.noise_scheduler.variance_type", "fixed_large")),
                      ConfigError, "policy.noise_scheduler.variance_type"),
    "inpainting": (lambda t: _rewrite(t, cfg_edit=_target("policy.obs_as_global_cond", False)),
                   ConfigError, "policy.obs_as_global_cond"),
    "oa_step_convention": (lambda t: _rewrite(t, cfg_edit=_target("policy.oa_step_convention", False)),
                           ConfigError, "policy.oa_step_convention"),
    "step_kwargs": (lambda t: _rewrite(t, cfg_edit=_target("policy.eta", 1.0)), ConfigError, "policy.eta"),
    "latency_steps": (lambda t: _rewrite(t, cfg_edit=_target("n_latency_steps", 1)), ConfigError, "n_latency_steps"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_refused(tmp_path, case):
    make, error, named = BAD[case]
    path = make(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(error) as info:
        write_imported_checkpoint(import_diffusion_policy(path), out)
    message = str(info.value)
    assert "\n" not in message and named in message and str(path) in message, message
    assert not out.exists()


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        import_diffusion_policy(tmp_path / "none.ckpt")
