"""Import a Diffusion Policy (real-stanford/diffusion_policy) workspace checkpoint as a pcm-policy base policy.

A DP `.ckpt` is `torch.save({"cfg", "state_dicts": {"model", "ema_model", "optimizer"}, "pickles"},
pickle_module=dill)`; `cfg` is the run's OmegaConf config (resolved by DP's train.py before training). It is read
with `safe_pickle.load_restricted` (tensors, containers and OmegaConf only; no DP or dill code), and its
interpolations by `safe_config` (our own resolvers, whatever the process has registered). Supported:
`DiffusionUnetLowdimPolicy` with `obs_as_global_cond=True` (the low-dim PushT and robomimic runs), its
`ConditionalUnet1D`, a DDPM or DDIM noise scheduler. The weights are `ema_model`'s (DP evaluates with them)
unless the run trained without EMA.

The policy's state dict holds `model.*` (the UNet), `normalizer.params_dict.{obs,action}.{scale,offset,
input_stats.*}` (DP's `LinearNormalizer`: y = x * scale + offset, the same map as ours) and two empty
`_dummy_variable` parameters.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from pcm_policy.errors import CheckpointError, ConfigError
from pcm_policy.interop.common import (ImportedPolicy, affine_field, check_noise_schedule, convert_unet_weights,
                                       normalizer_from_fields, to_numpy64)
from pcm_policy.interop.safe_config import resolve_config
from pcm_policy.interop.safe_pickle import load_restricted
from pcm_policy.policy import PolicyConfig

LOWDIM_POLICY = "diffusion_policy.policy.diffusion_unet_lowdim_policy.DiffusionUnetLowdimPolicy"
UNET = "diffusion_policy.model.diffusion.conditional_unet1d.ConditionalUnet1D"
SCHEDULERS = {
    "diffusers.schedulers.scheduling_ddpm.DDPMScheduler": "DDPM", "diffusers.DDPMScheduler": "DDPM",
    "diffusers.schedulers.scheduling_ddim.DDIMScheduler": "DDIM", "diffusers.DDIMScheduler": "DDIM",
}
# DiffusionUnetLowdimPolicy's constructor arguments (the rest of cfg.policy goes to scheduler.step as kwargs).
POLICY_KEYS = {"_target_", "model", "noise_scheduler", "horizon", "obs_dim", "action_dim", "n_action_steps",
               "n_obs_steps", "num_inference_steps", "obs_as_local_cond", "obs_as_global_cond",
               "pred_action_steps_only", "oa_step_convention"}
# DP's ConditionalUnet1D constructor defaults, for keys a config leaves out.
UNET_DEFAULTS = {"local_cond_dim": None, "global_cond_dim": None, "diffusion_step_embed_dim": 256,
                 "down_dims": [256, 512, 1024], "kernel_size": 3, "n_groups": 8, "cond_predict_scale": False}
# DP's final conv block is `Conv1dBlock(start_dim, start_dim, kernel_size)`: GroupNorm with its default 8 groups.
FINAL_N_GROUPS = 8
# robomimic low-dim observation keys and sizes (the object vector takes the rest of obs_dim).
ROBOMIMIC_SIZES = {"robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2}
TASKS = {"pusht_lowdim": ("pusht", "pcm/PushT-v0", 20), "lift_lowdim": ("lift", "pcm/Lift-v0", 19),
         "can_lowdim": ("can", "pcm/PickPlaceCan-v0", 23)}


def source_name(name: str) -> str:
    """Our `ConditionalUnet1D` parameter name -> DP's (without the `model.` prefix): residual blocks keep their
    two conv blocks in `blocks.{0,1}.block`, the final one in `final_conv.0.block`, the residual 1x1 conv is
    `residual_conv`, and the down/up-sampling convs sit inside `Downsample1d`/`Upsample1d` as `.conv`."""
    name = re.sub(r"\.conv([12])\.(\d+)\.", lambda m: f".blocks.{int(m[1]) - 1}.block.{m[2]}.", name)
    name = re.sub(r"^final_conv\.0\.(\d+)\.", r"final_conv.0.block.\1.", name)
    name = re.sub(r"^(down|up)_modules\.(\d+)\.2\.", r"\1_modules.\2.2.conv.", name)
    return name.replace(".residual.", ".residual_conv.")


def import_diffusion_policy(path: str | Path) -> ImportedPolicy:
    """Read a Diffusion Policy workspace checkpoint.

    Args:
        path: the `.ckpt` file.

    Returns:
        The `ImportedPolicy`: config (DP's shape and training noise schedule, FiLM with or without scale,
        GroupNorm 8 in the final block), DP's normalizer (fields obs and action), the EMA network weights under
        our names, and the card (`source`, `observation` layout, task/env for DP's PushT/Lift/Can low-dim runs,
        `abs_action`).

    Raises:
        CheckpointError: a missing, truncated or unsafe file, another policy class, missing/unknown keys or shapes
            that disagree with the config (one line naming the file and the key).
        ConfigError: a scheduler, prediction type or sampling option the samplers do not support.
    """
    path = Path(path)
    payload = load_restricted(path)
    if not isinstance(payload, dict) or "cfg" not in payload or not isinstance(payload.get("state_dicts"), dict):
        raise CheckpointError(f"{path}: not a Diffusion Policy workspace checkpoint (no 'cfg' and 'state_dicts')")
    cfg = _resolve(payload["cfg"], path)
    policy_cfg = _section(cfg, "policy", path)
    target = policy_cfg.get("_target_")
    if target != LOWDIM_POLICY:
        raise CheckpointError(f"{path}: policy._target_={target!r}: only {LOWDIM_POLICY.rsplit('.', 1)[1]} "
                              "(low-dim, UNet) can be imported")
    config, sampling = _policy_config(policy_cfg, path)
    if cfg.get("n_latency_steps", 0):
        # DP then predicts n_action_steps + n_latency_steps actions and its env runner drops the first ones.
        raise ConfigError(f"{path}: n_latency_steps={cfg['n_latency_steps']}: latency steps are not supported yet")

    which = "ema_model" if _uses_ema(cfg) else "model"
    state = payload["state_dicts"].get(which)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: missing key 'state_dicts.{which}'")
    allowed_other = {"_dummy_variable", "mask_generator._dummy_variable"}
    for key in sorted(state):
        if not (key.startswith("model.") or key.startswith("normalizer.params_dict.") or key in allowed_other):
            raise CheckpointError(f"{path}: unexpected key 'state_dicts.{which}.{key}'")
    weights = convert_unet_weights(state, "model.", source_name, config, f"{path} (state_dicts.{which})",
                                   "policy.model.down_dims, kernel_size, diffusion_step_embed_dim, "
                                   "cond_predict_scale, obs_dim, action_dim, n_obs_steps")
    normalizer = normalizer_from_fields(_normalizer_field(state, "obs", config.obs_dim, path, which),
                                        _normalizer_field(state, "action", config.action_dim, path, which))
    extra = sorted(k for k in state if k.startswith("normalizer.params_dict.")
                   and k.split(".")[2] not in ("obs", "action"))
    if extra:
        raise CheckpointError(f"{path}: unexpected key 'state_dicts.{which}.{extra[0]}'")

    task_cfg = cfg.get("task") if isinstance(cfg.get("task"), dict) else {}
    task_name = task_cfg.get("name", cfg.get("task_name"))
    task, env_id, obs_dim = TASKS.get(task_name, (None, None, None))
    if obs_dim != config.obs_dim or config.action_dim not in ((2,) if task == "pusht" else (7, 10)):
        task, env_id = None, None
    card: dict[str, Any] = {
        "kind": "base", "task": task, "env_id": env_id, "dataset": None,
        "abs_action": bool(task_cfg.get("abs_action", cfg.get("abs_action", False))),
        "source": {"format": "diffusion_policy", "path": str(path), "weights": which,
                   "task_name": task_name, **sampling},
        "observation": _observation(task_cfg, task_name, config.obs_dim),
    }
    return ImportedPolicy(config=config, normalizer=normalizer, weights=weights, card=card)


# ---- config --------------------------------------------------------------------------------------------------
# The top-level keys an import reads (logging/hydra may hold ${now:} and the like: never resolved, never copied).
_READ_KEYS = ("policy", "task", "training", "task_name", "abs_action", "name", "n_obs_steps", "n_action_steps",
              "n_latency_steps", "horizon")


def _resolve(cfg, path: Path) -> dict[str, Any]:
    """The run config's keys an import reads, as plain containers, interpolations resolved by our own resolvers
    only (`safe_config.resolve_config`: `${a.b}` and DP's `${eval:...}` arithmetic; never the process's OmegaConf
    resolver registry, so never Python's `eval` that DP's modules register, nor `oc.env`)."""
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(cfg, DictConfig):
        raise CheckpointError(f"{path}: 'cfg' is a {type(cfg).__name__}, not an OmegaConf config")
    try:
        plain = OmegaConf.to_container(cfg, resolve=False)
    except Exception as e:
        raise CheckpointError(f"{path}: cfg is not a readable config ({str(e).splitlines()[0][:120]})") from None
    return resolve_config(plain, _READ_KEYS, path)


def _section(cfg: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    value = cfg.get(key)
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: missing key 'cfg.{key}'")
    return value


def _uses_ema(cfg: dict[str, Any]) -> bool:
    training = cfg.get("training")
    return not isinstance(training, dict) or bool(training.get("use_ema", True))


def _policy_config(p: dict[str, Any], path: Path) -> tuple[PolicyConfig, dict[str, Any]]:
    """PolicyConfig from cfg.policy, and the source's own sampling settings for the card."""
    for key in ("model", "noise_scheduler", "horizon", "obs_dim", "action_dim", "n_action_steps", "n_obs_steps"):
        if key not in p:
            raise CheckpointError(f"{path}: missing key 'cfg.policy.{key}'")
    if not p.get("obs_as_global_cond", False):
        raise ConfigError(f"{path}: policy.obs_as_global_cond=false: only policies conditioned on the observation "
                          "as a global vector are supported (inpainting and local conditioning are not)")
    if p.get("pred_action_steps_only", False):
        raise ConfigError(f"{path}: policy.pred_action_steps_only=true is not supported")
    if not p.get("oa_step_convention", False):
        raise ConfigError(f"{path}: policy.oa_step_convention=false (actions executed from step n_obs_steps) is "
                          "not supported yet; ours start at n_obs_steps - 1")
    step_kwargs = sorted(set(p) - POLICY_KEYS)
    if step_kwargs:
        raise ConfigError(f"{path}: policy.{step_kwargs[0]}: extra scheduler.step arguments are not supported")
    model = {**UNET_DEFAULTS, **p["model"]}
    if model.get("_target_") != UNET:
        raise CheckpointError(f"{path}: policy.model._target_={model.get('_target_')!r}: only {UNET} is supported")
    obs_dim, action_dim, To = int(p["obs_dim"]), int(p["action_dim"]), int(p["n_obs_steps"])
    if model["local_cond_dim"] is not None:
        raise ConfigError(f"{path}: policy.model.local_cond_dim={model['local_cond_dim']}: local conditioning is "
                          "not supported")
    if model.get("input_dim") != action_dim:
        raise CheckpointError(f"{path}: policy.model.input_dim={model.get('input_dim')} but policy.action_dim="
                              f"{action_dim}")
    if model["global_cond_dim"] != obs_dim * To:
        raise CheckpointError(f"{path}: policy.model.global_cond_dim={model['global_cond_dim']} but "
                              f"obs_dim * n_obs_steps = {obs_dim * To}")
    sched, kind = _noise_schedule(p["noise_scheduler"], path)
    try:
        config = PolicyConfig(obs_dim=obs_dim, action_dim=action_dim, horizon=int(p["horizon"]), n_obs_steps=To,
                              n_action_steps=int(p["n_action_steps"]), down_dims=tuple(model["down_dims"]),
                              diffusion_step_embed_dim=int(model["diffusion_step_embed_dim"]),
                              kernel_size=int(model["kernel_size"]), n_groups=int(model["n_groups"]),
                              noise_scheduler=sched, film_scale=bool(model["cond_predict_scale"]),
                              final_n_groups=FINAL_N_GROUPS)
    except Exception as e:
        raise CheckpointError(f"{path}: policy.horizon/n_obs_steps/n_action_steps/model.down_dims do not make a "
                              f"policy ({str(e).splitlines()[0]})") from None
    return config, {"noise_scheduler_type": kind, "num_inference_steps": p.get("num_inference_steps")}


def _noise_schedule(ns: Any, path: Path) -> tuple[dict[str, Any], str]:
    """DDPMScheduler keyword arguments (the training schedule) from cfg.policy.noise_scheduler."""
    if not isinstance(ns, dict):
        raise CheckpointError(f"{path}: policy.noise_scheduler is not a mapping")
    kind = SCHEDULERS.get(ns.get("_target_"))
    if kind is None:
        raise ConfigError(f"{path}: policy.noise_scheduler._target_={ns.get('_target_')!r}: only diffusers' "
                          "DDPMScheduler and DDIMScheduler are supported")
    pred = ns.get("prediction_type", "epsilon")
    if pred not in ("epsilon", "sample"):
        raise ConfigError(f"{path}: policy.noise_scheduler.prediction_type={pred!r}: only epsilon and sample "
                          "are supported")
    if kind == "DDPM" and ns.get("variance_type", "fixed_small") != "fixed_small":
        raise ConfigError(f"{path}: policy.noise_scheduler.variance_type={ns.get('variance_type')!r}: only "
                          "fixed_small is supported")
    if ns.get("thresholding", False):
        raise ConfigError(f"{path}: policy.noise_scheduler.thresholding=true is not supported")
    if kind == "DDIM" and not ns.get("set_alpha_to_one", True):
        raise ConfigError(f"{path}: policy.noise_scheduler.set_alpha_to_one=false is not supported")
    if ns.get("steps_offset", 0) != 0 or ns.get("timestep_spacing", "leading") != "leading":
        raise ConfigError(f"{path}: policy.noise_scheduler.steps_offset/timestep_spacing: only 0 / leading "
                          "are supported")
    sched = {"num_train_timesteps": int(ns.get("num_train_timesteps", 1000)),
             "beta_start": float(ns.get("beta_start", 0.0001)), "beta_end": float(ns.get("beta_end", 0.02)),
             "beta_schedule": ns.get("beta_schedule", "linear"), "prediction_type": pred,
             "clip_sample": bool(ns.get("clip_sample", True)),
             "clip_sample_range": float(ns.get("clip_sample_range", 1.0)), "variance_type": "fixed_small"}
    if "trained_betas" in ns and ns["trained_betas"] is not None:
        raise ConfigError(f"{path}: policy.noise_scheduler.trained_betas is not supported")
    check_noise_schedule(sched, path, "policy.noise_scheduler.beta_schedule")
    return sched, kind


# ---- normalizer / observation -------------------------------------------------------------------------------
def _normalizer_field(state, name: str, size: int, path: Path, which: str) -> dict[str, torch.Tensor]:
    prefix = f"normalizer.params_dict.{name}."
    full = f"state_dicts.{which}.{prefix}"
    for stat in ("scale", "offset"):
        if prefix + stat not in state:
            raise CheckpointError(f"{path}: missing key '{full}{stat}'")
    values = {stat: to_numpy64(state[prefix + stat], path, full + stat, size) for stat in ("scale", "offset")}
    for stat in ("min", "max", "mean", "std"):
        key = f"{prefix}input_stats.{stat}"
        if key in state:
            values[stat] = to_numpy64(state[key], path, f"state_dicts.{which}.{key}", size)
    if (values["scale"] == 0).any():
        raise CheckpointError(f"{path}: '{full}scale' has a zero entry")
    return affine_field(values.pop("scale"), values.pop("offset"), **values)


def _observation(task_cfg: dict[str, Any], task_name, obs_dim: int) -> dict[str, Any]:
    """The per-step observation layout: DP PushT = 9 keypoints (18) + agent position (2); robomimic = the
    config's obs_keys in order (the object vector takes what the robot keys leave)."""
    if task_name == "pusht_lowdim" and obs_dim == 20:
        return {"kind": "dp_pusht_lowdim", "layout": [{"name": "keypoints", "size": 18},
                                                      {"name": "agent_pos", "size": 2}]}
    keys = task_cfg.get("obs_keys")
    if isinstance(keys, list) and keys:
        sizes = [ROBOMIMIC_SIZES.get(k) for k in keys]
        unknown = [i for i, s in enumerate(sizes) if s is None]
        if len(unknown) == 1:
            sizes[unknown[0]] = obs_dim - sum(s for s in sizes if s is not None)
        return {"kind": "robomimic_lowdim", "layout": [{"name": k, "size": s} for k, s in zip(keys, sizes)]}
    return {"kind": "flat", "layout": [{"name": "obs", "size": obs_dim}]}
