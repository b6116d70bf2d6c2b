"""Import a lerobot diffusion policy (`save_pretrained` directory) as a pcm-policy base policy.

The directory holds `config.json` (the `DiffusionConfig` fields) and `model.safetensors` (the network under
`diffusion.unet.`), and the normalization statistics in one of two layouts:

* lerobot >= 0.4: processor files beside the weights - `policy_preprocessor.json` with a `normalizer_processor`
  step (its `eps`, `features`, `norm_map` and a `state_file` holding `<feature>.<stat>` tensors) and
  `policy_postprocessor.json` with an `unnormalizer_processor` step for the action;
* lerobot < 0.4: buffers inside `model.safetensors`: `normalize_inputs.buffer_<feature with . as _>.<stat>`,
  `normalize_targets.buffer_action.<stat>` and `unnormalize_outputs.buffer_action.<stat>`.

lerobot conditions on `observation.state`, then image features, then `observation.environment_state`, per
observation step, flattened over the steps; the imported policy takes the flat per-step observation
[state, environment state] in env units and normalizes each part as lerobot does (one affine map per dim).
An image policy (VISUAL inputs, lerobot's `diffusion_pusht`) imports with its encoder - ResNet-18 with GroupNorm,
spatial-softmax keypoints and the projection under `diffusion.rgb_encoder.` - as `policy.vision`; its cameras'
per-channel statistics become the encoder's fixed affine map (`image_mean`/`image_std`), and it takes its cameras'
frames as the `image` history (0..255 uint8 or [0, 1] floats, as lerobot's [0, 1] frames). Supported: one shared
encoder, state + cameras (no environment state beside images), no resize.
A directory `pcm export --format lerobot` wrote also holds `pcm_export.json` (`lerobot_export`): the exported
policy's observation order and card facts, with which the import of a low-dim export gives back that policy
itself (its observation layout, task and env; the condition weights and statistics permuted back, bit for bit).
Only JSON and safetensors are read: no lerobot code is needed or run.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pcm_policy.checkpoint import read_weights
from pcm_policy.errors import CheckpointError, ConfigError
from pcm_policy.errors import PcmError
from pcm_policy.interop.common import (ImportedPolicy, affine_field, check_noise_schedule, concat_fields,
                                       convert_unet_weights, normalizer_from_fields, permute_condition, to_numpy64)
from pcm_policy.interop.export_marker import MARKER_FILE, is_pcm_mark
from pcm_policy.model.vision import VisionEncoderConfig, build_vision_encoder, encoder_state_from_lerobot
from pcm_policy.policy import PolicyConfig
from pcm_policy.tasks import TASKS

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
PREPROCESSOR = "policy_preprocessor.json"
POSTPROCESSOR = "policy_postprocessor.json"
OBS_STATE, OBS_ENV, ACTION = "observation.state", "observation.environment_state", "action"
UNET_PREFIX = "diffusion.unet."
ENCODER_PREFIX = "diffusion.rgb_encoder."
OLD_PREFIXES = ("normalize_inputs.", "normalize_targets.", "unnormalize_outputs.")
MODES = ("MIN_MAX", "MEAN_STD", "IDENTITY")
EPS = 1e-8  # lerobot's normalization epsilon (fixed before 0.4, the processor's `eps` since)
# lerobot's final conv block is `DiffusionConv1dBlock(d, d, kernel_size)`: GroupNorm with its default 8 groups.
FINAL_N_GROUPS = 8
_REQUIRED = ("n_obs_steps", "horizon", "n_action_steps", "input_features", "output_features",
             "normalization_mapping", "down_dims", "kernel_size", "n_groups", "diffusion_step_embed_dim",
             "use_film_scale_modulation", "noise_scheduler_type", "num_train_timesteps", "beta_schedule",
             "beta_start", "beta_end", "prediction_type", "clip_sample", "clip_sample_range")


def source_name(name: str) -> str:
    """Our `ConditionalUnet1D` parameter name -> lerobot's `DiffusionConditionalUnet1d` name (without the
    `diffusion.unet.` prefix): the conv blocks wrap their layers in `.block`, the residual 1x1 conv is
    `residual_conv`; the down/up-sampling convs and everything else keep their names."""
    import re

    name = re.sub(r"\.conv([12])\.(\d+)\.", r".conv\1.block.\2.", name)
    name = re.sub(r"^final_conv\.0\.(\d+)\.", r"final_conv.0.block.\1.", name)
    return name.replace(".residual.", ".residual_conv.")


def import_lerobot(path: str | Path) -> ImportedPolicy:
    """Read a lerobot diffusion policy directory.

    Args:
        path: the directory `save_pretrained` wrote (`config.json`, `model.safetensors`, and for lerobot >= 0.4
            the processor files).

    Returns:
        The `ImportedPolicy`: config (lerobot's shape and training noise schedule, FiLM switch, GroupNorm 8 in the
        final block), normalizer over the flat per-step observation [observation.state,
        observation.environment_state] and the action, network weights under our names, and the card
        (`source`, `observation` layout; task "pusht" for the PushT keypoints layout).

    Raises:
        CheckpointError: a missing or unreadable file, another policy type, an image layout not supported (see the
            module), missing/unknown keys or shapes that disagree with the config (one line naming the file and
            the key).
        ConfigError: a scheduler, prediction type or normalization mode the samplers do not support.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a lerobot policy directory (expected {CONFIG} and {WEIGHTS} inside)")
    cfg_file = root / CONFIG
    cfg = _read_json(cfg_file)
    kind = cfg.get("type")
    if kind != "diffusion":
        raise CheckpointError(f"{cfg_file}: type={kind!r}: only lerobot's diffusion policy can be imported "
                              "(key 'type')")
    for key in _REQUIRED:
        if key not in cfg:
            hint = " (a config from before lerobot's input_features schema?)" if key == "input_features" else ""
            raise CheckpointError(f"{cfg_file}: missing key {key!r}{hint}")
    layout = _layout(cfg, cfg_file)
    cameras = _cameras(cfg, cfg_file)
    obs_dim = sum(size for _, size in layout)
    action_dim = _feature_size(cfg["output_features"], ACTION, "ACTION", cfg_file, "output_features")
    extra_out = sorted(set(cfg["output_features"]) - {ACTION})
    if extra_out:
        raise CheckpointError(f"{cfg_file}: output_features.{extra_out[0]}: only 'action' is supported")

    config = _policy_config(cfg, cfg_file, obs_dim, action_dim)
    weights_file = root / WEIGHTS
    state = read_weights(weights_file)
    if cameras:  # the encoder's features join the condition: the UNet's shapes follow
        config = _with_vision(cfg, cfg_file, root, config, cameras, state, weights_file)
    allowed = (UNET_PREFIX, *OLD_PREFIXES, *((ENCODER_PREFIX,) if cameras else ()))
    for key in sorted(state):
        if not key.startswith(allowed):
            raise CheckpointError(f"{weights_file}: unexpected key {key!r} (only the UNet"
                                  f"{', the image encoder' if cameras else ''} and normalization buffers are "
                                  "expected)")
    weights = convert_unet_weights(state, UNET_PREFIX, source_name, config, weights_file,
                                   "down_dims, kernel_size, diffusion_step_embed_dim, use_film_scale_modulation, "
                                   "input_features, output_features, n_obs_steps")
    if (root / PREPROCESSOR).is_file() or (root / POSTPROCESSOR).is_file():
        obs_field, action_field, norm_source = _processor_normalizer(root, layout, action_dim)
    else:
        obs_field, action_field = _buffer_normalizer(state, weights_file, cfg, cfg_file, layout, action_dim)
        norm_source = f"normalization buffers in {WEIGHTS} (lerobot < 0.4)"
    _check_action_clipping(cfg, cfg_file, action_field)
    normalizer = normalizer_from_fields(obs_field, action_field)
    encoder_weights = _encoder_weights(config, state, weights_file) if cameras else None

    pusht = [(n, s) for n, s in layout] == [(OBS_STATE, 2), (OBS_ENV, 16)] and action_dim == 2 and not cameras
    pusht_image = ([(n, s) for n, s in layout] == [(OBS_STATE, 2)] and action_dim == 2 and len(cameras) == 1
                   and cameras[0][1] == (96, 96))
    kind = "lerobot_pusht_keypoints" if pusht else "lerobot_pusht_image" if pusht_image else "lerobot_state"
    card: dict[str, Any] = {
        "kind": "base", "task": "pusht" if pusht else "pusht_image" if pusht_image else None, "env_id": None,
        "dataset": None, "abs_action": False,
        "source": {"format": "lerobot", "path": str(root), "normalization": norm_source,
                   "noise_scheduler_type": cfg["noise_scheduler_type"],
                   "num_inference_steps": cfg.get("num_inference_steps")},
        "observation": {"kind": kind, "layout": [{"name": n, "size": s} for n, s in layout]},
    }
    imported = ImportedPolicy(config=config, normalizer=normalizer, weights=weights, card=card,
                              encoder_weights=encoder_weights)
    marker = read_export_marker(root)
    if marker is None or cameras:  # an image export keeps its low-dim vector whole and its cameras renamed
        return imported
    return _as_exported(imported, marker, root / MARKER_FILE)


def read_export_marker(root: Path) -> dict[str, Any] | None:
    """The `pcm_export.json` of a directory pcm exported (a JSON object carrying pcm's mark), else None."""
    try:
        marker = json.loads((Path(root) / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and is_pcm_mark(marker.get("exported_by")) else None


def _as_exported(imported: ImportedPolicy, marker: dict[str, Any], file: Path) -> ImportedPolicy:
    """The policy pcm exported: observation dims back in its own order (condition weights and statistics, a
    permutation), its card's task, env and observation layout (not its dataset: `pcm import ... dataset.path=`
    records one).

    Raises:
        CheckpointError: a marker that does not fit the policy (naming the file and key).
    """
    config = imported.config
    order, facts = marker.get("obs_order"), marker.get("policy")
    if not isinstance(order, list) or sorted(order) != list(range(config.obs_dim)) or \
            not all(type(i) is int for i in order):
        raise CheckpointError(f"{file}: obs_order is not an order of the {config.obs_dim} observation dims")
    if not isinstance(facts, dict):
        raise CheckpointError(f"{file}: missing key 'policy'")
    observation = facts.get("observation")
    layout = observation.get("layout") if isinstance(observation, dict) else None
    if not isinstance(layout, list) or not all(isinstance(p, dict) and isinstance(p.get("name"), str) and
                                               type(p.get("size")) is int for p in layout) or \
            sum(p["size"] for p in layout) != config.obs_dim:
        raise CheckpointError(f"{file}: policy.observation.layout does not describe {config.obs_dim} dims")
    task = facts.get("task")
    if task is not None and task not in TASKS:
        raise CheckpointError(f"{file}: policy.task={task!r} is not a task of this project")
    inverse = [0] * len(order)
    for j, i in enumerate(order):
        inverse[i] = j
    index = torch.as_tensor(inverse, dtype=torch.long)
    obs = {k: v[index] for k, v in imported.normalizer.state_dict().items() if k.startswith("normalizer.obs.")}
    action = {k: v for k, v in imported.normalizer.state_dict().items() if k.startswith("normalizer.action.")}
    normalizer = normalizer_from_fields({k.rsplit(".", 1)[1]: v for k, v in obs.items()},
                                        {k.rsplit(".", 1)[1]: v for k, v in action.items()})
    weights = permute_condition(imported.weights, inverse, config.obs_dim, config.step_cond_dim, config.n_obs_steps)
    card = dict(imported.card, task=task, env_id=facts.get("env_id") if task is not None else None,
                abs_action=bool(facts.get("abs_action", False)), observation=observation)
    card["source"] = dict(card["source"], exported_by=marker["exported_by"])
    return ImportedPolicy(config=config, normalizer=normalizer, weights=weights, card=card,
                          encoder_weights=imported.encoder_weights)


# ---- config --------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({str(e).splitlines()[0][:100]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return data


def _feature_size(features: Any, key: str, ftype: str, file: Path, section: str) -> int:
    """The size of 1-D feature `key` of type `ftype` in `section`; CheckpointError naming the key otherwise."""
    if not isinstance(features, dict) or not isinstance(features.get(key), dict):
        raise CheckpointError(f"{file}: missing key '{section}.{key}'")
    ft = features[key]
    if ft.get("type") != ftype:
        raise CheckpointError(f"{file}: {section}.{key}.type={ft.get('type')!r}, expected {ftype!r}")
    shape = ft.get("shape")
    if not isinstance(shape, list) or len(shape) != 1 or not isinstance(shape[0], int) or shape[0] < 1:
        raise CheckpointError(f"{file}: {section}.{key}.shape={shape!r}: expected one positive size")
    return shape[0]


def _layout(cfg: dict[str, Any], file: Path) -> list[tuple[str, int]]:
    """The per-step observation parts in lerobot's conditioning order: state, then environment state."""
    features = cfg["input_features"]
    if not isinstance(features, dict):
        raise CheckpointError(f"{file}: input_features is not a mapping")
    for key, ft in features.items():
        ftype = ft.get("type") if isinstance(ft, dict) else None
        if ftype == "VISUAL":
            continue  # `_cameras`
        if key not in (OBS_STATE, OBS_ENV):
            raise CheckpointError(f"{file}: input_features.{key} (type {ftype!r}): only {OBS_STATE} and "
                                  f"{OBS_ENV} are supported")
    layout = [(OBS_STATE, _feature_size(features, OBS_STATE, "STATE", file, "input_features"))]
    if OBS_ENV in features:
        layout.append((OBS_ENV, _feature_size(features, OBS_ENV, "ENV", file, "input_features")))
    return layout


def _cameras(cfg: dict[str, Any], file: Path) -> list[tuple[str, tuple[int, int]]]:
    """(name, (H, W)) of every VISUAL input, in lerobot's stacking order (the config's); [] for a low-dim policy.

    Raises:
        CheckpointError: an image layout not supported (see the module), naming the key.
    """
    cameras = []
    for key, ft in cfg["input_features"].items():
        if not (isinstance(ft, dict) and ft.get("type") == "VISUAL"):
            continue
        shape = ft.get("shape")
        if not (isinstance(shape, list) and len(shape) == 3 and shape[0] == 3
                and all(isinstance(s, int) and s > 0 for s in shape)):
            raise CheckpointError(f"{file}: input_features.{key}.shape={shape!r}: expected [3, H, W] (RGB)")
        cameras.append((key, (shape[1], shape[2])))
    if not cameras:
        return cameras
    unsupported = [
        ("vision_backbone", cfg.get("vision_backbone") != "resnet18", "only resnet18 is supported"),
        ("use_separate_rgb_encoder_per_camera", bool(cfg.get("use_separate_rgb_encoder_per_camera")),
         "one encoder shared by every camera is supported"),
        ("resize_shape", cfg.get("resize_shape") is not None, "resizing images before the crop is not supported"),
        ("input_features", OBS_ENV in cfg["input_features"],
         "images beside observation.environment_state are not supported yet"),
        ("input_features", len({size for _, size in cameras}) > 1, "cameras of different sizes are not supported"),
    ]
    for key, bad, why in unsupported:
        if bad:
            raise CheckpointError(f"{file}: {key}={cfg.get(key)!r}: {why}" if key != "input_features" else
                                  f"{file}: input_features: {why}")
    return cameras


def _with_vision(cfg, cfg_file: Path, root: Path, config: PolicyConfig, cameras, state, weights_file: Path
                 ) -> PolicyConfig:
    """`config` with the `vision` and `camera_keys` of a lerobot image policy (lerobot's encoder projects to
    2 x spatial_softmax_num_keypoints features).

    Raises:
        CheckpointError: vision keys out of range, naming the config file.
    """
    mean, std = _image_affine(cfg, cfg_file, root, state, weights_file, [name for name, _ in cameras])
    keypoints = cfg.get("spatial_softmax_num_keypoints")
    crop = cfg.get("crop_shape")
    try:
        vision = VisionEncoderConfig(
            kind="resnet18", image_shape=cameras[0][1], crop_shape=tuple(crop) if crop is not None else None,
            crop_is_random=bool(cfg.get("crop_is_random", True)), num_keypoints=keypoints,
            feature_dim=2 * keypoints if isinstance(keypoints, int) else keypoints,
            use_group_norm=bool(cfg.get("use_group_norm", True)), image_mean=mean, image_std=std)
        return PolicyConfig(**{**config.to_dict(), "vision": vision.to_dict(),
                               "camera_keys": [name for name, _ in cameras]})
    except PcmError as e:
        raise CheckpointError(f"{cfg_file}: crop_shape/spatial_softmax_num_keypoints/input_features do not make "
                              f"an image encoder ({str(e).splitlines()[0]})") from None


def _encoder_weights(config: PolicyConfig, state, weights_file: Path) -> dict[str, torch.Tensor]:
    """The `diffusion.rgb_encoder.*` weights under `VisionEncoder`'s names, checked by loading them strictly.

    Raises:
        CheckpointError: missing, unknown or misshapen entries (another crop, keypoint count or norm), naming the
            weights file.
    """
    try:
        encoder = build_vision_encoder(config.vision_config)
        weights = encoder_state_from_lerobot(state, encoder, ENCODER_PREFIX)
        encoder.load_state_dict(weights, strict=True)
    except (PcmError, RuntimeError) as e:
        first = [line.strip() for line in str(e).strip().splitlines()]
        raise CheckpointError(f"{weights_file}: {ENCODER_PREFIX}* does not fit crop_shape/"
                              f"spatial_softmax_num_keypoints/use_group_norm ({' '.join(first[:2])[:200]})") from None
    return {k: v.float() for k, v in weights.items()}


def _image_affine(cfg, cfg_file: Path, root: Path, state, weights_file: Path, names: list[str]):
    """Per-channel (mean, std) of the encoder's affine map that makes lerobot's image normalization of [0, 1]
    frames: MEAN_STD (x - mean) / (std + eps) (`std + eps` as lerobot divides by it), MIN_MAX 2 (x - min) /
    (max - min) - 1, IDENTITY x. Every camera must share the statistics (one encoder, one map)."""
    if (root / PREPROCESSOR).is_file():
        conf, stats_state, stats_file = _processor_step(root / PREPROCESSOR, "normalizer_processor")
        mode = _mode(conf.get("norm_map", {}), "VISUAL", root / PREPROCESSOR, "norm_map")
        only = conf.get("normalize_observation_keys")
        eps, prefixes = float(conf.get("eps", EPS)), {n: n for n in names}
        if only is not None:
            mode = "IDENTITY" if not any(n in only for n in names) else mode
    else:
        mode = _mode(cfg["normalization_mapping"], "VISUAL", cfg_file, "normalization_mapping")
        stats_state, stats_file, eps = state, weights_file, EPS
        prefixes = {n: "normalize_inputs.buffer_" + n.replace(".", "_") for n in names}
    if mode == "IDENTITY":
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    maps = []
    for name in names:
        stats = _stats_of(stats_state, prefixes[name])
        for stat in {"MIN_MAX": ("min", "max"), "MEAN_STD": ("mean", "std")}[mode]:
            value = stats.get(stat)
            if value is None:
                raise CheckpointError(f"{stats_file}: missing key {prefixes[name] + '.' + stat!r} ({mode} image "
                                      "normalization needs it)")
            if value.numel() != 3:
                raise CheckpointError(f"{stats_file}: {prefixes[name]}.{stat} has shape {tuple(value.shape)}: "
                                      "per-channel statistics (3, 1, 1) are supported")
        if mode == "MEAN_STD":
            maps.append((stats["mean"].flatten().tolist(), (stats["std"].float() + eps).flatten().tolist()))
        else:
            lo, hi = stats["min"].double().flatten(), stats["max"].double().flatten()
            maps.append((((lo + hi) / 2).tolist(), ((hi - lo) / 2).tolist()))
    if any(m != maps[0] for m in maps):
        raise CheckpointError(f"{stats_file}: the cameras {', '.join(names)} have different image statistics; one "
                              "shared encoder with one normalization is supported")
    return tuple(maps[0][0]), tuple(maps[0][1])


def _policy_config(cfg: dict[str, Any], file: Path, obs_dim: int, action_dim: int) -> PolicyConfig:
    kind = cfg["noise_scheduler_type"]
    if kind not in ("DDPM", "DDIM"):
        raise ConfigError(f"{file}: noise_scheduler_type={kind!r}: only DDPM and DDIM are supported")
    pred = cfg["prediction_type"]
    if pred not in ("epsilon", "sample"):
        raise ConfigError(f"{file}: prediction_type={pred!r}: only epsilon and sample are supported")
    # The training schedule, as DDPMScheduler keyword arguments: lerobot passes exactly these to its scheduler
    # (diffusers' defaults for the rest: fixed_small variance, set_alpha_to_one, steps_offset 0, leading spacing).
    sched = dict(num_train_timesteps=cfg["num_train_timesteps"], beta_start=cfg["beta_start"],
                 beta_end=cfg["beta_end"], beta_schedule=cfg["beta_schedule"], prediction_type=pred,
                 clip_sample=bool(cfg["clip_sample"]), clip_sample_range=float(cfg["clip_sample_range"]),
                 variance_type="fixed_small")
    check_noise_schedule(sched, file, "beta_schedule")
    try:
        return PolicyConfig(obs_dim=obs_dim, action_dim=action_dim, horizon=cfg["horizon"],
                            n_obs_steps=cfg["n_obs_steps"], n_action_steps=cfg["n_action_steps"],
                            down_dims=tuple(cfg["down_dims"]), diffusion_step_embed_dim=cfg["diffusion_step_embed_dim"],
                            kernel_size=cfg["kernel_size"], n_groups=cfg["n_groups"], noise_scheduler=sched,
                            film_scale=bool(cfg["use_film_scale_modulation"]), final_n_groups=FINAL_N_GROUPS)
    except Exception as e:  # PcmError from the shape checks, TypeError from odd values
        raise CheckpointError(f"{file}: horizon/n_obs_steps/n_action_steps/down_dims do not make a policy "
                              f"({str(e).splitlines()[0]})") from None


# ---- normalization -------------------------------------------------------------------------------------------
def _mode(norm_map: dict[str, Any], ftype: str, file: Path, key: str) -> str:
    mode = norm_map.get(ftype, "IDENTITY")
    if mode not in MODES:
        raise ConfigError(f"{file}: {key}.{ftype}={mode!r}: only {', '.join(MODES)} are supported")
    return mode


def _field(mode: str, stats: dict[str, np.ndarray], eps: float, old_layout: bool, inverse: bool):
    """scale/offset of one feature's normalization, float64.

    lerobot >= 0.4 (processor): MIN_MAX y = 2 (x - min) / d - 1 with d = max - min (eps where it is 0),
    MEAN_STD y = (x - mean) / (std + eps). lerobot < 0.4 (buffers): MIN_MAX y = 2 (x - min) / (max - min + eps) - 1.
    Both unnormalize MEAN_STD as y * std + mean and the old one MIN_MAX as (y + 1) / 2 (max - min) + min, without
    eps: `inverse=True` (the action) returns the map whose inverse is exactly that unnormalization.
    """
    if mode == "MIN_MAX":
        d = stats["max"] - stats["min"]
        if old_layout and not inverse:
            d = d + eps
        else:
            d = np.where(d == 0, eps, d)
        scale = 2.0 / d
        return scale, -scale * stats["min"] - 1.0
    std = stats["std"] if inverse else stats["std"] + eps
    std = np.where(std == 0, eps, std)
    return 1.0 / std, -stats["mean"] / std


def _feature_field(mode, stats, size, file, key, eps, old_layout, inverse) -> dict[str, torch.Tensor]:
    needed = {"MIN_MAX": ("min", "max"), "MEAN_STD": ("mean", "std"), "IDENTITY": ()}[mode]
    for stat in needed:
        if stat not in stats:
            raise CheckpointError(f"{file}: missing key {key(stat)!r} ({mode} normalization needs it)")
    raw = {s: to_numpy64(v, file, key(s), size) for s, v in stats.items() if s in ("min", "max", "mean", "std")}
    if mode == "IDENTITY":
        scale, offset = np.ones(size), np.zeros(size)
    else:
        scale, offset = _field(mode, raw, eps, old_layout, inverse)
    return affine_field(scale, offset, min=raw.get("min"), max=raw.get("max"))


def _processor_step(path: Path, registry_name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """(config, state tensors, state file) of the step `registry_name` of a processor pipeline JSON."""
    pipeline = _read_json(path)
    steps = pipeline.get("steps")
    if not isinstance(steps, list):
        raise CheckpointError(f"{path}: missing key 'steps'")
    for i, step in enumerate(steps):
        if isinstance(step, dict) and step.get("registry_name") == registry_name:
            conf = step.get("config")
            if not isinstance(conf, dict):
                raise CheckpointError(f"{path}: missing key 'steps.{i}.config'")
            state_file = step.get("state_file")
            if not isinstance(state_file, str):
                raise CheckpointError(f"{path}: missing key 'steps.{i}.state_file'")
            state_path = path.parent / Path(state_file).name
            return conf, read_weights(state_path), state_path
    raise CheckpointError(f"{path}: no '{registry_name}' step")


def _stats_of(state: dict[str, torch.Tensor], feature: str) -> dict[str, torch.Tensor]:
    return {k[len(feature) + 1:]: v for k, v in state.items() if k.startswith(feature + ".") and
            "." not in k[len(feature) + 1:]}


def _processor_normalizer(root: Path, layout, action_dim):
    pre_conf, pre_state, pre_file = _processor_step(root / PREPROCESSOR, "normalizer_processor")
    post_conf, post_state, post_file = _processor_step(root / POSTPROCESSOR, "unnormalizer_processor")
    types = {OBS_STATE: "STATE", OBS_ENV: "ENV"}
    only = pre_conf.get("normalize_observation_keys")
    obs_parts = []
    for name, size in layout:
        mode = _mode(pre_conf.get("norm_map", {}), types[name], root / PREPROCESSOR, "norm_map")
        if only is not None and name not in only:
            mode = "IDENTITY"
        obs_parts.append(_feature_field(mode, _stats_of(pre_state, name), size, pre_file,
                                        lambda s, n=name: f"{n}.{s}", float(pre_conf.get("eps", EPS)),
                                        old_layout=False, inverse=False))
    mode = _mode(post_conf.get("norm_map", {}), "ACTION", root / POSTPROCESSOR, "norm_map")
    action = _feature_field(mode, _stats_of(post_state, ACTION), action_dim, post_file, lambda s: f"{ACTION}.{s}",
                            float(post_conf.get("eps", EPS)), old_layout=False, inverse=True)
    return concat_fields(obs_parts), action, "processor files (lerobot >= 0.4)"


def _buffer_normalizer(state, weights_file: Path, cfg, cfg_file: Path, layout, action_dim):
    types = {OBS_STATE: "STATE", OBS_ENV: "ENV"}
    norm_map = cfg["normalization_mapping"]
    obs_parts = []
    for name, size in layout:
        mode = _mode(norm_map, types[name], cfg_file, "normalization_mapping")
        prefix = "normalize_inputs.buffer_" + name.replace(".", "_")
        obs_parts.append(_feature_field(mode, _stats_of(state, prefix), size, weights_file,
                                        lambda s, p=prefix: f"{p}.{s}", EPS, old_layout=True, inverse=False))
    mode = _mode(norm_map, "ACTION", cfg_file, "normalization_mapping")
    prefix = "unnormalize_outputs.buffer_action"
    action = _feature_field(mode, _stats_of(state, prefix), action_dim, weights_file, lambda s: f"{prefix}.{s}",
                            EPS, old_layout=True, inverse=True)
    return concat_fields(obs_parts), action


def _check_action_clipping(cfg, cfg_file: Path, action_field) -> None:
    """lerobot clips every x0 estimate to +-clip_sample_range in normalized units; our policies refuse a clip that
    does not cover the normalized training actions (see `DiffusionPolicy`), so such a source cannot be
    reproduced: refuse it here in lerobot's own terms."""
    if not cfg["clip_sample"] or "min" not in action_field or "max" not in action_field:
        return
    r = float(cfg["clip_sample_range"])
    lo = action_field["min"] * action_field["scale"] + action_field["offset"]
    hi = action_field["max"] * action_field["scale"] + action_field["offset"]
    if float(lo.min()) < -r * (1 + 1e-4) or float(hi.max()) > r * (1 + 1e-4):
        raise ConfigError(f"{cfg_file}: clip_sample=true with normalization_mapping.ACTION="
                          f"{cfg['normalization_mapping'].get('ACTION')!r} clips the training actions "
                          f"([{float(lo.min()):.3g}, {float(hi.max()):.3g}] normalized, clip_sample_range {r:g}): "
                          "not supported yet")
