"""Export a base policy as a lerobot diffusion policy directory (lerobot >= 0.4's `save_pretrained` layout).

Written: `config.json` (the `DiffusionConfig` fields), `model.safetensors` (the UNet under `diffusion.unet.`),
and the processor files: `policy_preprocessor.json` (rename, to-batch, device, normalizer steps) with the
normalizer's statistics in `policy_preprocessor_step_3_normalizer_processor.safetensors`, and
`policy_postprocessor.json` (unnormalizer, device) with
`policy_postprocessor_step_0_unnormalizer_processor.safetensors`. Every feature uses MIN_MAX normalization.

Inputs: lerobot's diffusion policy needs `observation.state` (the robot's own state) and, without images,
`observation.environment_state`, and conditions each observation step on [state, image features, environment
state]. A policy whose observation is lerobot's already (an imported lerobot policy) keeps its two features. A
low-dim policy of this project's tasks is split by its observation parts: the robot's own state - PushT's agent
position, robomimic's `robot0_eef_pos`, `robot0_eef_quat`, `robot0_gripper_qpos` - becomes `observation.state`,
the rest - PushT's 9 block keypoints, robomimic's `object` vector - `observation.environment_state`, each in the
policy's order; the columns of every FiLM layer's condition weights and the normalizer's statistics are permuted
to that order, so lerobot's network computes exactly ours (a permutation: no rounding). A low-dim policy whose
observation has no such split (an unnamed flat vector) is refused. An image policy keeps its low-dim vector whole
as `observation.state` (its cameras satisfy lerobot) and writes its cameras
as VISUAL features (`observation.image` for one camera, else `observation.images.<camera>`, or the names it was
imported with), its encoder under `diffusion.rgb_encoder.` in lerobot's names and the encoder's fixed affine map
as MEAN_STD image statistics (mean, std) of shape (3, 1, 1).

The directory also holds `pcm_export.json` (`export_marker`; lerobot ignores it): the mark that lets a later export
replace the directory, the source policy's card facts (task, env, observation layout) and `obs_order` (for each
lerobot input dim in order, the policy's own dim), so that `import_lerobot` gives back the exported policy itself.

Statistics: lerobot stores float32 min/max and computes the map from them, so a min/max pair is searched among
the float32 neighbours of the exact pre-image for which `import_lerobot`'s formula gives back the policy's own
float32 scale and offset; the round trip import(export(p)) is then bit for bit. Where no pair within
`SEARCH_ULPS` steps does, the exact pre-image rounded to float32 is kept (a float32 rounding away) and the dim is
counted in the returned report.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from pcm_policy.atomic import atomic_path
from pcm_policy.errors import ConfigError
from pcm_policy.interop.common import permute_condition
from pcm_policy.interop.export_marker import MARKER_FILE, exported_by
from pcm_policy.interop.exporting import ExportSource, check_export_target
from pcm_policy.interop.lerobot import (ACTION, CONFIG, ENCODER_PREFIX, EPS, OBS_ENV, OBS_STATE, POSTPROCESSOR,
                                        PREPROCESSOR, UNET_PREFIX, WEIGHTS, read_export_marker, source_name)
from pcm_policy.model.vision import encoder_state_to_lerobot
from pcm_policy.tasks import ROBOMIMIC_ROBOT_KEYS, TASKS

PRE_STATE = "policy_preprocessor_step_3_normalizer_processor.safetensors"
POST_STATE = "policy_postprocessor_step_0_unnormalizer_processor.safetensors"
NORM_MAP = {"STATE": "MIN_MAX", "ENV": "MIN_MAX", "ACTION": "MIN_MAX"}
IMAGE_NORM_MAP = {**NORM_MAP, "VISUAL": "MEAN_STD"}  # an image policy's: its encoder's affine map as mean/std
SEARCH_ULPS = 16  # float32 neighbours tried on each side of the exact min and max
# Observation parts that are the robot's own state (lerobot's `observation.state`); the others describe the scene.
ROBOT_STATE_PARTS = frozenset({"agent_pos", *ROBOMIMIC_ROBOT_KEYS})


def export_lerobot(checkpoint: str | Path, output: str | Path) -> dict[str, Any]:
    """Write the base policy at `checkpoint` as a lerobot policy directory (atomically).

    Args:
        checkpoint: a base policy checkpoint or run directory.
        output: the directory to write; it may replace only an earlier pcm export (holding pcm's `pcm_export.json`).

    Returns:
        {"path": output, "features": {name: size}, "obs_order": for each lerobot input dim (state, then environment
        state), the policy's own dim, "inexact_dims": dims whose statistics could not give back
        the policy's float32 normalizer bit for bit (0 for this project's policies and lerobot 0.4's MIN_MAX
        ones; 2 of 18 for the lerobot 0.3.3 fixture)}.

    Raises:
        CheckpointError: no readable checkpoint, or a PCM checkpoint.
        ConfigError: a policy lerobot's UNet cannot hold, a low-dim observation with no state/environment split,
            or an output that is the source or exists and is not a pcm export (nothing is written).
    """
    output = Path(output)
    source = ExportSource.read(checkpoint, "lerobot", images=True)
    check_export_target("output", output, source.checkpoint,
                        lambda p: p.is_dir() and not p.is_symlink() and read_export_marker(p) is not None,
                        f"a lerobot policy directory holding pcm's {MARKER_FILE}")
    c = source.config
    parts = _parts(source)
    layout, order = _layout(source, parts)
    obs = {k: v[order] for k, v in source.normalizer["obs"].items()}
    obs_stats, inexact = _min_max(obs)
    action_stats, inexact_action = _min_max(source.normalizer["action"])
    # lerobot's normalizer and unnormalizer both hold min/max/mean/std of every feature.
    state, start = {}, 0
    for name, size in layout:
        part = {k: v[start:start + size] for k, v in obs.items()}
        state.update(_stats(name, obs_stats, part, start, size))
        start += size
    state.update(_stats(ACTION, action_stats, source.normalizer["action"], 0, c.action_dim))

    input_features = {name: {"type": "STATE" if name == OBS_STATE else "ENV", "shape": [size]}
                      for name, size in layout}
    network = {k: v.contiguous() for k, v in permute_condition(
        source.renamed(UNET_PREFIX, source_name), order, c.obs_dim, c.step_cond_dim, c.n_obs_steps).items()}
    if source.encoder is not None:
        vision = source.encoder.config
        cameras = _camera_names(c.camera_keys)
        for name in cameras:  # lerobot stacks the cameras in the order of its config's features
            input_features[name] = {"type": "VISUAL", "shape": [3, *vision.image_shape]}
            state[f"{name}.mean"] = torch.tensor(vision.image_mean, dtype=torch.float32).view(3, 1, 1)
            state[f"{name}.std"] = _std_before_eps(vision.image_std).view(3, 1, 1)
        network.update({k: v.float().contiguous() for k, v in encoder_state_to_lerobot(source.encoder,
                                                                                        ENCODER_PREFIX).items()})
    output_features = {ACTION: {"type": "ACTION", "shape": [c.action_dim]}}
    with atomic_path(output) as tmp:
        tmp.mkdir()
        (tmp / CONFIG).write_text(json.dumps(_config(source, input_features, output_features), indent=4))
        save_file(network, str(tmp / WEIGHTS))
        save_file(state, str(tmp / PRE_STATE))
        save_file(dict(state), str(tmp / POST_STATE))
        norm_map = IMAGE_NORM_MAP if source.encoder is not None else NORM_MAP
        (tmp / PREPROCESSOR).write_text(json.dumps(_preprocessor({**input_features, **output_features}, norm_map),
                                                   indent=2))
        (tmp / POSTPROCESSOR).write_text(json.dumps(_postprocessor(output_features, norm_map), indent=2))
        (tmp / MARKER_FILE).write_text(json.dumps(_marker(source, parts, order), indent=2))
    return {"path": output, "features": dict(layout), "obs_order": order,
            "inexact_dims": inexact + inexact_action}


def _marker(source: ExportSource, parts: list[tuple[str, int]], order: list[int]) -> dict[str, Any]:
    """`pcm_export.json`: the export mark and what gives the exported policy back (see the module)."""
    card = source.card
    task = TASKS.get(card.get("task"))
    kind = task.observations[0].kind if task is not None and list(task.obs_layout) == parts else None
    observation = card.get("observation") or {"kind": kind, "layout": [{"name": n, "size": s} for n, s in parts]}
    return {"exported_by": exported_by(source.checkpoint),
            "policy": {"task": card.get("task"), "env_id": card.get("env_id"), "abs_action":
                       bool(card.get("abs_action", False)), "observation": observation},
            "obs_order": order}


def _stats(name: str, min_max: dict[str, torch.Tensor], own: dict[str, torch.Tensor], start: int, size: int
           ) -> dict[str, torch.Tensor]:
    """`<name>.{min,max,mean,std}` for one feature: the exported min/max, the policy's own mean/std where it has
    them, else the mid-point and half-width of [min, max] (lerobot's MIN_MAX map does not read them)."""
    lo, hi = (min_max[k][start:start + size].clone() for k in ("min", "max"))
    mean = own["mean"].clone() if "mean" in own else ((lo.double() + hi.double()) / 2).float()
    std = own["std"].clone() if "std" in own else ((hi.double() - lo.double()) / 2).float()
    return {f"{name}.min": lo, f"{name}.max": hi, f"{name}.mean": mean, f"{name}.std": std}


def _std_before_eps(std) -> torch.Tensor:
    """float32 std statistics that lerobot's MEAN_STD map (and `import_lerobot`), dividing by `std + eps` in
    float32, turns back into exactly `std` (as float32) where such a value exists within a few steps."""
    target = torch.tensor(std, dtype=torch.float32)
    out = (target.double() - EPS).float()
    for i in range(len(out)):
        for candidate in _neighbours(np.float32(out[i]), 4):
            if torch.tensor(candidate) + EPS == target[i]:
                out[i] = float(candidate)
                break
    return out


def _camera_names(camera_keys) -> list[str]:
    """lerobot feature names of our cameras: kept when they are lerobot's already (an imported policy), else
    `observation.image` for a single camera and `observation.images.<camera>` for several."""
    if all(k.startswith("observation.image") for k in camera_keys):
        return list(camera_keys)
    if len(camera_keys) == 1:
        return ["observation.image"]
    return [f"observation.images.{k}" for k in camera_keys]


def _parts(source: ExportSource) -> list[tuple[str, int]]:
    """The policy's per-step observation parts (name, size): its card's layout, else its task's own."""
    layout = (source.card.get("observation") or {}).get("layout")
    if layout:
        return [(p["name"], int(p["size"])) for p in layout]
    task = TASKS.get(source.card.get("task"))
    if task is not None and task.obs_dim == source.config.obs_dim:
        return list(task.obs_layout)
    return [("obs", source.config.obs_dim)]


def _layout(source: ExportSource, parts: list[tuple[str, int]]) -> tuple[list[tuple[str, int]], list[int]]:
    """lerobot's input features [(name, size)] and, for each of their dims in order, the policy's own dim."""
    names = [n for n, _ in parts]
    everything = list(range(source.config.obs_dim))
    if names in ([OBS_STATE], [OBS_STATE, OBS_ENV]):
        return parts, everything
    if source.encoder is not None:  # the cameras are lerobot's required second input
        return [(OBS_STATE, source.config.obs_dim)], everything
    state, env, start = [], [], 0
    for name, size in parts:
        (state if name in ROBOT_STATE_PARTS else env).extend(range(start, start + size))
        start += size
    if not state or not env or start != source.config.obs_dim:
        described = ", ".join(f"{n} {s}" for n, s in parts)
        raise ConfigError(f"{source.checkpoint}: observation ({described}): lerobot's diffusion policy needs the "
                          f"robot's state ({', '.join(sorted(ROBOT_STATE_PARTS))}) and the rest as "
                          f"{OBS_ENV}; this observation has no such split")
    return [(OBS_STATE, len(state)), (OBS_ENV, len(env))], state + env


def _field(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`import_lerobot`'s MIN_MAX map from float32 statistics (processor layout), as the float32 it stores."""
    lo, hi = lo.astype(np.float64), hi.astype(np.float64)
    d = hi - lo
    d = np.where(d == 0, EPS, d)
    scale = 2.0 / d
    return (scale.astype(np.float32), (-scale * lo - 1.0).astype(np.float32))


def _min_max(stats: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """float32 (min, max) per dim whose MIN_MAX map is the field's scale and offset bit for bit: the policy's own
    min/max where they give it, else a pair within `SEARCH_ULPS` float32 steps of the exact pre-image;
    (stats, dims without one)."""
    scale = stats["scale"].numpy().astype(np.float32)
    offset = stats["offset"].numpy().astype(np.float32)
    s64, o64 = scale.astype(np.float64), offset.astype(np.float64)
    lo_exact, hi_exact = (-1.0 - o64) / s64, (1.0 - o64) / s64
    if "min" in stats and "max" in stats:  # the policy's own statistics, where they give its map exactly
        own_lo, own_hi = stats["min"].numpy().astype(np.float32), stats["max"].numpy().astype(np.float32)
        s_own, o_own = _field(own_lo, own_hi)
        own = (s_own == scale) & (o_own == offset)
        lo_exact, hi_exact = np.where(own, own_lo, lo_exact), np.where(own, own_hi, hi_exact)
    lo_out, hi_out = lo_exact.astype(np.float32), hi_exact.astype(np.float32)
    inexact = 0
    for i in range(scale.shape[0]):
        lo_c = _neighbours(np.float32(lo_exact[i]), SEARCH_ULPS)
        hi_c = _neighbours(np.float32(hi_exact[i]), SEARCH_ULPS)
        lo_grid, hi_grid = np.meshgrid(lo_c, hi_c, indexing="ij")
        s, o = _field(lo_grid.ravel(), hi_grid.ravel())
        hit = np.flatnonzero((s == scale[i]) & (o == offset[i]))
        if hit.size:
            lo_out[i], hi_out[i] = lo_grid.ravel()[hit[0]], hi_grid.ravel()[hit[0]]
        else:
            inexact += 1
    return {"min": torch.from_numpy(lo_out), "max": torch.from_numpy(hi_out)}, inexact


def _neighbours(x: np.float32, n: int) -> np.ndarray:
    """`x` and the float32 values up to `n` steps above and below it, nearest first (the nearest pair wins)."""
    out, up, down = [x], x, x
    for _ in range(n):
        up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))
        out += [up, down]
    return np.array(out, dtype=np.float32)


def _config(source: ExportSource, input_features, output_features) -> dict[str, Any]:
    """lerobot's `DiffusionConfig` fields (the vision fields: the encoder's, or lerobot's defaults, unused)."""
    c, ns = source.config, source.noise_scheduler
    vision = source.encoder.config if source.encoder is not None else None
    fields = {
        "type": "diffusion", "n_obs_steps": c.n_obs_steps, "input_features": input_features,
        "output_features": output_features, "device": "cpu", "use_amp": False,
        "horizon": c.horizon, "n_action_steps": c.n_action_steps, "normalization_mapping": dict(NORM_MAP),
        "drop_n_last_frames": c.horizon - c.n_action_steps - c.n_obs_steps + 1,
        "vision_backbone": "resnet18", "crop_shape": None, "crop_is_random": True,
        "pretrained_backbone_weights": None, "use_group_norm": True, "spatial_softmax_num_keypoints": 32,
        "use_separate_rgb_encoder_per_camera": False, "resize_shape": None,
        "down_dims": list(c.down_dims), "kernel_size": c.kernel_size, "n_groups": c.n_groups,
        "diffusion_step_embed_dim": c.diffusion_step_embed_dim, "use_film_scale_modulation": c.film_scale,
        "noise_scheduler_type": "DDPM", "num_train_timesteps": ns["num_train_timesteps"],
        "beta_schedule": ns["beta_schedule"], "beta_start": ns["beta_start"], "beta_end": ns["beta_end"],
        "prediction_type": ns["prediction_type"], "clip_sample": ns["clip_sample"],
        "clip_sample_range": ns["clip_sample_range"], "num_inference_steps": None,
        "do_mask_loss_for_padding": False,
    }
    if vision is not None:
        fields.update({"crop_shape": list(vision.crop_shape) if vision.crop_shape else None,
                       "crop_is_random": vision.crop_is_random, "use_group_norm": vision.use_group_norm,
                       "spatial_softmax_num_keypoints": vision.num_keypoints,
                       "normalization_mapping": dict(IMAGE_NORM_MAP)})
    return fields


def _norm_step(registry_name: str, features, state_file: str, norm_map) -> dict[str, Any]:
    return {"registry_name": registry_name,
            "config": {"eps": EPS, "features": features, "norm_map": dict(norm_map)},
            "state_file": state_file}


def _preprocessor(features, norm_map) -> dict[str, Any]:
    return {"name": "policy_preprocessor", "steps": [
        {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
        {"registry_name": "to_batch_processor", "config": {}},
        {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}},
        _norm_step("normalizer_processor", features, PRE_STATE, norm_map)]}


def _postprocessor(features, norm_map) -> dict[str, Any]:
    return {"name": "policy_postprocessor", "steps": [
        _norm_step("unnormalizer_processor", features, POST_STATE, norm_map),
        {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}}]}
