"""Export a base policy as a Diffusion Policy (real-stanford/diffusion_policy) workspace checkpoint.

The `.ckpt` is what DP's `BaseWorkspace.save_checkpoint` writes for a `DiffusionUnetLowdimPolicy` run:
`torch.save({"cfg": OmegaConf config, "state_dicts": {"model", "ema_model"}, "pickles": {}})`, the policy's
state dict holding the UNet under `model.`, DP's `LinearNormalizer` (`normalizer.params_dict.{obs,action}.
{scale,offset,input_stats.*}`, the same y = x * scale + offset map as ours) and the two empty `_dummy_variable`
parameters. Both `model` and `ema_model` hold the policy's weights (DP evaluates with `ema_model`); there is no
optimizer state, so DP's `load_payload` keeps a fresh optimizer. It is written with the standard pickle module
(dill, which DP loads with, reads standard pickles). `import_diffusion_policy` reads it back bit for bit.

The config is what DP's eval path reads (`eval.py`: `hydra.utils.get_class(cfg._target_)`, the workspace's
`__init__` - `training.seed`, `policy`, `training.use_ema`, `optimizer` - `load_payload`, then
`policy.predict_action`, and `task.env_runner`), with DP's own defaults for training (`training`, `optimizer`,
`ema`) and its env runners' settings (test seeds 100000.., 50 test episodes; robomimic's runner reads the env from
the dataset the policy was trained on, `card.dataset`). Every value is written resolved: no `${...}`. It carries
`exported_by` (see `export_marker`): a later export replaces only such a file.
"""
from __future__ import annotations

import io
from pathlib import Path

import torch
from omegaconf import OmegaConf

from pcm_policy.atomic import atomic_write_bytes
from pcm_policy.interop.diffusion_policy import LOWDIM_POLICY, TASKS, UNET, source_name
from pcm_policy.interop.export_marker import exported_by, is_pcm_mark
from pcm_policy.interop.exporting import ExportSource, check_export_target
from pcm_policy.interop.safe_pickle import read_config
from pcm_policy.tasks import TASKS as OUR_TASKS

WORKSPACE = "diffusion_policy.workspace.train_diffusion_unet_lowdim_workspace.TrainDiffusionUnetLowdimWorkspace"
DDPM = "diffusers.schedulers.scheduling_ddpm.DDPMScheduler"
DP_TASK_NAMES = {ours: dp for dp, (ours, _, _) in TASKS.items()}
STATS = ("min", "max", "mean", "std")
# DP's defaults for the low-dim UNet workspace (train_diffusion_unet_lowdim_workspace.yaml): the workspace builds
# the optimizer and (training) the EMA from them, so a config without them does not open.
TRAINING = {"device": "cuda:0", "seed": 42, "debug": False, "resume": True, "lr_scheduler": "cosine",
            "lr_warmup_steps": 500, "num_epochs": 5000, "gradient_accumulate_every": 1, "use_ema": True,
            "rollout_every": 50, "checkpoint_every": 50, "val_every": 1, "sample_every": 5, "max_train_steps": None,
            "max_val_steps": None, "tqdm_interval_sec": 1.0}
OPTIMIZER = {"_target_": "torch.optim.AdamW", "lr": 1.0e-4, "betas": [0.95, 0.999], "eps": 1.0e-8,
             "weight_decay": 1.0e-6}
EMA = {"_target_": "diffusion_policy.model.diffusion.ema_model.EMAModel", "update_after_step": 0, "inv_gamma": 1.0,
       "power": 0.75, "min_value": 0.0, "max_value": 0.9999}
PUSHT_RUNNER = "diffusion_policy.env_runner.pusht_keypoints_runner.PushTKeypointsRunner"
ROBOMIMIC_RUNNER = "diffusion_policy.env_runner.robomimic_lowdim_runner.RobomimicLowdimRunner"


def export_diffusion_policy(checkpoint: str | Path, output: str | Path) -> Path:
    """Write the base policy at `checkpoint` as a Diffusion Policy `.ckpt` file (atomically).

    Args:
        checkpoint: a base policy checkpoint or run directory.
        output: the `.ckpt` file to write; it may replace only an earlier pcm export (its `cfg.exported_by`).

    Returns:
        `output` as a Path.

    Raises:
        CheckpointError: no readable checkpoint, or a PCM checkpoint.
        ConfigError: a policy DP's UNet cannot hold, or an output that is the source or exists and is not a pcm
            export (nothing is written).
    """
    output = Path(output)
    source = ExportSource.read(checkpoint, "Diffusion Policy")
    check_export_target("output", output, source.checkpoint, _is_earlier_export,
                        "a .ckpt whose cfg.exported_by names pcm-policy")
    state = source.renamed("model.", source_name)
    for field in ("obs", "action"):
        stats = source.normalizer[field]
        state[f"normalizer.params_dict.{field}.scale"] = stats["scale"]
        state[f"normalizer.params_dict.{field}.offset"] = stats["offset"]
        for stat, value in _input_stats(stats).items():
            state[f"normalizer.params_dict.{field}.input_stats.{stat}"] = value
    state["_dummy_variable"] = torch.zeros(0)
    state["mask_generator._dummy_variable"] = torch.zeros(0)
    payload = {"cfg": _config(source), "state_dicts": {"model": state, "ema_model": dict(state)},
               "pickles": {}}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(output, buffer.getvalue())
    return output


def _is_earlier_export(path: Path) -> bool:
    """Whether `path` is a `.ckpt` this exporter wrote: its config, read without running anything and without
    resolving interpolations, carries pcm's `exported_by` mark."""
    if not path.is_file() or path.is_symlink():
        return False
    cfg = read_config(path)
    return isinstance(cfg, dict) and is_pcm_mark(cfg.get("exported_by"))


def _input_stats(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DP's `input_stats` (min, max, mean, std): the policy's own statistics; for a policy that kept only
    scale/offset (an import), the range the map sends to [-1, 1] and its mid-point and half-width (DP only
    reports them; sampling uses scale and offset)."""
    if all(s in stats for s in STATS):
        return {s: stats[s] for s in STATS}
    scale, offset = stats["scale"].double(), stats["offset"].double()
    lo, hi = (-1 - offset) / scale, (1 - offset) / scale
    lo, hi = torch.minimum(lo, hi), torch.maximum(lo, hi)
    derived = {"min": lo, "max": hi, "mean": (lo + hi) / 2, "std": (hi - lo) / 2}
    return {s: stats[s] if s in stats else derived[s].float() for s in STATS}


def _config(source: ExportSource):
    """The run config DP's workspace and `DiffusionUnetLowdimPolicy` are built from."""
    c = source.config
    task = source.card.get("task")
    task_name = DP_TASK_NAMES.get(task, source.card.get("source", {}).get("task_name") or "lowdim")
    ns = source.noise_scheduler
    scheduler = {"_target_": DDPM, **{k: ns[k] for k in ("num_train_timesteps", "beta_start", "beta_end",
                                                         "beta_schedule", "variance_type", "clip_sample",
                                                         "prediction_type")}}
    if ns["clip_sample_range"] != 1.0:  # diffusers' default; older diffusers (DP's pin) lack the argument
        scheduler["clip_sample_range"] = ns["clip_sample_range"]
    model = {"_target_": UNET, "input_dim": c.action_dim, "local_cond_dim": None,
             "global_cond_dim": c.obs_dim * c.n_obs_steps, "diffusion_step_embed_dim": c.diffusion_step_embed_dim,
             "down_dims": list(c.down_dims), "kernel_size": c.kernel_size, "n_groups": c.n_groups,
             "cond_predict_scale": c.film_scale}
    policy = {"_target_": LOWDIM_POLICY, "model": model, "noise_scheduler": scheduler, "horizon": c.horizon,
              "obs_dim": c.obs_dim, "action_dim": c.action_dim, "n_action_steps": c.n_action_steps,
              "n_obs_steps": c.n_obs_steps, "num_inference_steps": ns["num_train_timesteps"],
              "obs_as_local_cond": False, "obs_as_global_cond": True, "pred_action_steps_only": False,
              "oa_step_convention": True}
    task_cfg = {"name": task_name, "obs_dim": c.obs_dim, "action_dim": c.action_dim,
                "abs_action": bool(source.card.get("abs_action", False))}
    runner = {"n_train": 6, "n_train_vis": 2, "n_test": 50, "n_test_vis": 4, "test_start_seed": 100000,
              "n_obs_steps": c.n_obs_steps, "n_action_steps": c.n_action_steps, "n_latency_steps": 0,
              "past_action": False}
    if task == "pusht" and c.obs_dim == 20:
        task_cfg["keypoint_dim"] = 2
        task_cfg["env_runner"] = {"_target_": PUSHT_RUNNER, "keypoint_visible_rate": 1.0, "train_start_seed": 0,
                                  "legacy_test": True, "max_steps": 300, "fps": 10, "agent_keypoints": False,
                                  "n_envs": None, **runner}
    if task in OUR_TASKS and OUR_TASKS[task].robosuite_env is not None:
        task_cfg["obs_keys"] = [name for name, _ in OUR_TASKS[task].observations[0].parts]
        if source.card.get("dataset"):
            task_cfg["dataset_path"] = str(source.card["dataset"])
            task_cfg["env_runner"] = {"_target_": ROBOMIMIC_RUNNER, "dataset_path": task_cfg["dataset_path"],
                                      "obs_keys": task_cfg["obs_keys"], "train_start_idx": 0, "max_steps": 400,
                                      "render_hw": [128, 128], "fps": 10, "crf": 22,
                                      "abs_action": task_cfg["abs_action"], "tqdm_interval_sec": 1.0,
                                      "n_envs": 28, **runner}
    return OmegaConf.create({
        "name": "train_diffusion_unet_lowdim", "_target_": WORKSPACE, "task_name": task_name,
        "obs_dim": c.obs_dim, "action_dim": c.action_dim, "horizon": c.horizon, "n_obs_steps": c.n_obs_steps,
        "n_action_steps": c.n_action_steps, "n_latency_steps": 0, "past_action_visible": False,
        "keypoint_visible_rate": 1.0, "obs_as_local_cond": False, "obs_as_global_cond": True,
        "pred_action_steps_only": False, "policy": policy, "task": task_cfg, "ema": EMA, "optimizer": OPTIMIZER,
        "training": TRAINING, "exported_by": exported_by(source.checkpoint),
    })
