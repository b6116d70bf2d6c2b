"""An image policy from a low-dim one: a camera encoder trained to see the state the low-dim policy sees.

A low-dim policy (the *head*) conditions on the env's state (PushT: 9 block keypoints + the agent position). An
image policy of the same env sees its cameras and part of that state (PushT: the agent position). The recipe:

1. Regression (privileged information, used in training only): the encoder learns to predict from each camera
   frame the rest of the head's observation - the *predicted columns*, in the head's normalized units - from the
   state the collector recorded beside every frame. Supervised, so it trains in minutes on a CPU, where learning
   the same features through the diffusion loss took hours and fell short (data/pusht_image/README.md).
2. Exact assembly: the image policy's encoder keeps its projection as it is (`feature_activation: none`: the
   features are the predicted state, signed), and the head's FiLM condition weights are rewired column by column
   to the image policy's layout [own obs, camera features] per observation step (`assemble_image_policy`). The
   assembled network computes the head's network on (own obs, predicted state) - the low-dim policy with the
   state read from the camera - in the ordinary image-policy format (eval, bench, train-pcm, ONNX export, serve,
   `pcm train train.init_from=` for end-to-end fine-tuning).

Why no ReLU: the FiLM blocks apply Mish to the condition before their linear map, so features relu(s) and relu(-s)
could not be recombined into the head's Mish(s) exactly. Everything else is Diffusion Policy's / lerobot's image
policy (spatial-softmax encoder, features joined to the low-dim observation per step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from pcm_policy.data.normalizer import Normalizer
from pcm_policy.errors import DatasetError, PcmError
from pcm_policy.model.vision import VisionEncoder, VisionEncoderConfig
from pcm_policy.options import check_int, check_number
from pcm_policy.policy import DiffusionPolicy, PolicyConfig


def shared_columns(own_obs: np.ndarray, state_obs: np.ndarray, where: str) -> list[int]:
    """Where each column of the image policy's own observation sits in the head's observation.

    Both arrays come from the same file (the image dataset read twice, as each policy reads it), so a shared
    quantity is equal bit for bit; the first equal column is taken.

    Args:
        own_obs: (N, Do) the image policy's low-dim observation per step.
        state_obs: (N, Ds) the head's observation of the same steps.
        where: what to name in the error (the dataset file).

    Returns:
        Do column indices into `state_obs`.

    Raises:
        DatasetError: a row-count mismatch, or a column of `own_obs` found nowhere in `state_obs`.
    """
    if own_obs.shape[0] != state_obs.shape[0]:
        raise DatasetError(f"{where}: {own_obs.shape[0]} steps of the image observation, {state_obs.shape[0]} of "
                           "the low-dim one")
    columns = []
    for j in range(own_obs.shape[1]):
        match = [i for i in range(state_obs.shape[1]) if np.array_equal(own_obs[:, j], state_obs[:, i])]
        if not match:
            raise DatasetError(f"{where}: column {j} of the image policy's observation is not a column of the head's "
                               "observation (the head must see everything the image policy sees)")
        columns.append(match[0])
    return columns


def predicted_columns(obs_dim: int, own_columns: Sequence[int]) -> list[int]:
    """The head's observation columns the encoder predicts: those not in the image policy's own, in order."""
    own = set(own_columns)
    return [i for i in range(obs_dim) if i not in own]


@dataclass(frozen=True)
class EncoderSettings:
    """How the encoder is regressed onto the state (the `train_encoder` command's optimisation keys).

    Attributes:
        steps: optimizer steps.
        batch_size: frames per step.
        lr: AdamW peak learning rate (cosine decay after a linear warm-up).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
        log_every: steps between validation errors in the log.

    Raises:
        ConfigError: a value of the wrong type or range, naming the key.
    """

    steps: int = 4000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-6
    warmup_steps: int = 100
    log_every: int = 500

    def __post_init__(self):
        check_int("steps", self.steps, 1)
        check_int("batch_size", self.batch_size, 1)
        check_number("lr", self.lr, 0, low_open=True)
        check_number("weight_decay", self.weight_decay, 0)
        check_int("warmup_steps", self.warmup_steps, 0)
        check_int("log_every", self.log_every, 1)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> "EncoderSettings":
        """Read the settings from a command config (absent keys take their defaults)."""
        return cls(**{k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg})


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def regression_error(encoder: VisionEncoder, frames: torch.Tensor, targets: torch.Tensor,
                     batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Per camera and column, the mean absolute and mean squared error of `encoder.project` (eval mode).

    Args:
        frames: (N, cameras, 3, H, W) uint8.
        targets: (N, P) float32.

    Returns:
        (cameras, P) mean |prediction - target| and (cameras, P) mean squared error, in the targets' units.
    """
    was_training = encoder.training
    encoder.eval()
    abs_sum = torch.zeros(frames.shape[1], targets.shape[1])
    sq_sum = torch.zeros_like(abs_sum)
    with torch.no_grad():
        for start in range(0, len(frames), batch_size):
            f, t = frames[start:start + batch_size], targets[start:start + batch_size]
            error = encoder.project(f.flatten(0, 1)).view(len(f), f.shape[1], -1) - t[:, None]
            abs_sum += error.abs().sum(0)
            sq_sum += (error ** 2).sum(0)
    encoder.train(was_training)
    n = max(1, len(frames))
    return abs_sum / n, sq_sum / n


def camera_weights(mse: torch.Tensor) -> torch.Tensor:
    """Inverse-variance weights of each camera's prediction of each column: (cameras, P) mean squared errors ->
    (cameras, P) weights summing to 1 over the cameras (the minimum-variance mean of independent estimates; one
    camera: all ones)."""
    inverse = 1.0 / mse.clamp_min(1e-12)
    return inverse / inverse.sum(0, keepdim=True)


def train_state_encoder(encoder: VisionEncoder, frames: torch.Tensor, targets: torch.Tensor, train_rows: np.ndarray,
                        val_rows: np.ndarray, settings: EncoderSettings, seed: int) -> dict[str, Any]:
    """Regress `encoder.project` (every camera, one shared encoder) onto the state `targets` (mean squared error).

    Args:
        encoder: an encoder whose `feature_dim` is P, trained in place.
        frames: (N, cameras, 3, H, W) uint8, every step of the dataset.
        targets: (N, P) float32, the predicted columns of the head's normalized observation at those steps.
        train_rows, val_rows: step indices of the training and the held-out episodes.
        settings: the optimisation.
        seed: the batch draws.

    Returns:
        {"val_mae" (P,) list: per column, over the cameras; "val_mae_per_camera" (cameras, P) and "val_mse_per_camera"
        (cameras, P) lists (all None without held-out steps); "train_loss_last": float; "log": [{"step", "loss",
        "val_mae_mean"}]}.

    Raises:
        PcmError: `targets` does not have P columns, or there is no training step.
    """
    if targets.shape[1] != encoder.feature_dim:
        raise PcmError(f"{targets.shape[1]} state columns to predict but an encoder of {encoder.feature_dim} outputs")
    if len(train_rows) == 0:
        raise PcmError("no training step to regress the encoder on")
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, settings.steps, min(settings.warmup_steps, settings.steps // 10)))
    rng = np.random.default_rng(seed)
    train_rows, val_rows = np.asarray(train_rows), np.asarray(val_rows)
    log, loss_value = [], float("nan")
    encoder.train()
    bar = tqdm(range(settings.steps), desc="train-encoder", unit="step", dynamic_ncols=True)
    for step in bar:
        rows = torch.from_numpy(rng.choice(train_rows, size=settings.batch_size))
        f, t = frames[rows], targets[rows]
        pred = encoder.project(f.flatten(0, 1)).view(len(f), f.shape[1], -1)
        loss = ((pred - t[:, None]) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.2e}")
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            entry = {"step": step + 1, "loss": loss_value}
            if len(val_rows):
                entry["val_mae_mean"] = float(regression_error(encoder, frames[val_rows], targets[val_rows])[0].mean())
            log.append(entry)
            bar.write(f"step {step + 1}: loss {loss_value:.3e}"
                      + (f", held-out mean |error| {entry['val_mae_mean']:.4f}" if "val_mae_mean" in entry else ""))
    encoder.eval()
    if not len(val_rows):
        return {"val_mae": None, "val_mae_per_camera": None, "val_mse_per_camera": None,
                "train_loss_last": loss_value, "log": log}
    mae, mse = regression_error(encoder, frames[val_rows], targets[val_rows])
    return {"val_mae": mae.mean(0).tolist(), "val_mae_per_camera": mae.tolist(), "val_mse_per_camera": mse.tolist(),
            "train_loss_last": loss_value, "log": log}


def _rewire_condition(weight: torch.Tensor, step_embed_dim: int, n_obs_steps: int, head_obs_dim: int,
                      own_columns: Sequence[int], predicted_columns: Sequence[int], weights: torch.Tensor) -> torch.Tensor:
    """A head's FiLM condition weight (out, Dt + To * Ds) -> the image policy's (out, Dt + To * (Do + cameras * P)).

    Per step: the own-observation columns copied from where they sit in the head's observation; camera c's feature
    j gets W[:, j] * weights[c, j] (`weights` (cameras, P) sums to 1 over the cameras). Exact for one camera (Mish
    then sees the same values); with several, the linear map sees the weighted mean of the cameras'
    Mish(prediction)."""
    Do, P, cameras = len(own_columns), len(predicted_columns), weights.shape[0]
    per_step = Do + cameras * P
    out = weight.new_zeros(weight.shape[0], step_embed_dim + n_obs_steps * per_step)
    out[:, :step_embed_dim] = weight[:, :step_embed_dim]
    for k in range(n_obs_steps):
        src, dst = step_embed_dim + k * head_obs_dim, step_embed_dim + k * per_step
        out[:, dst:dst + Do] = weight[:, [src + c for c in own_columns]]
        state = weight[:, [src + c for c in predicted_columns]]
        for c in range(cameras):
            at = dst + Do + c * P
            out[:, at:at + P] = state * weights[c].to(state)
    return out


def assemble_image_policy(head: DiffusionPolicy, encoder: VisionEncoder, own_columns: Sequence[int],
                          camera_keys: Sequence[str], weights: Sequence[Sequence[float]] | None = None
                          ) -> DiffusionPolicy:
    """The image policy computing `head`'s network on (own obs, the state `encoder` predicts), exactly.

    Args:
        head: the low-dim policy (observation of Ds columns, normalizer fields `obs` and `action`).
        encoder: trained by `train_state_encoder` to predict the head's normalized observation at the columns
            not in `own_columns` (in increasing order); `feature_dim` = that count, P.
        own_columns: where each column of the image policy's own observation sits in the head's (`shared_columns`).
        camera_keys: the image policy's cameras (each one's features predict the state).
        weights: (cameras, P) how much each camera's prediction of each column counts (summing to 1 over the
            cameras; `camera_weights` of the held-out errors); None: equal.

    Returns:
        A DiffusionPolicy (eval mode, CPU, float32) with observation Do = len(own_columns), the encoder's config
        with `feature_activation` none, the head's action normalizer and its observation normalizer at
        `own_columns`.

    Raises:
        PcmError: the head is an image policy, or the encoder's outputs do not match the predicted columns.
    """
    if head.uses_images:
        raise PcmError("the head must be a low-dim policy (it sees the state, not cameras)")
    cfg = head.config
    predicted = predicted_columns(cfg.obs_dim, own_columns)
    P = len(predicted)
    if encoder.feature_dim != P:
        raise PcmError(f"the encoder predicts {encoder.feature_dim} columns, the head's observation has {P} beyond "
                       "the image policy's own")
    C = len(camera_keys)
    mix = torch.full((C, P), 1.0 / C) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    if mix.shape != (C, P) or not torch.allclose(mix.sum(0), torch.ones(P), atol=1e-5) or (mix < 0).any():
        raise PcmError(f"camera weights of shape {tuple(mix.shape)}: expected ({C}, {P}), >= 0, summing to 1 over "
                       "the cameras")
    vision = VisionEncoderConfig(**{**encoder.config.to_dict(), "feature_activation": "none"})
    config = PolicyConfig(**{**cfg.to_dict(), "obs_dim": len(own_columns), "vision": vision.to_dict(),
                             "camera_keys": list(camera_keys)})
    normalizer = Normalizer()
    for name, params in head.normalizer.params.items():
        take = list(own_columns) if name == "obs" else slice(None)
        normalizer.params[name] = {k: v[take].clone() for k, v in params.items()}
    policy = DiffusionPolicy(config, normalizer)
    state = {k: v.detach().clone() for k, v in head.model.state_dict().items()}
    for key in [k for k in state if k.endswith("cond_encoder.1.weight")]:
        state[key] = _rewire_condition(state[key], cfg.diffusion_step_embed_dim, cfg.n_obs_steps, cfg.obs_dim,
                                       own_columns, predicted, mix)
    policy.model.load_state_dict(state)
    policy.encoder.load_state_dict({k: v.detach().clone() for k, v in encoder.state_dict().items()})
    return policy.eval()


def state_targets(head: DiffusionPolicy, state_obs: np.ndarray, own_columns: Sequence[int]) -> torch.Tensor:
    """(N, Ds) head observations in env units -> (N, P) its normalized values at the predicted columns."""
    normalized = head.normalizer.normalize("obs", torch.as_tensor(state_obs, dtype=torch.float32))
    return normalized[:, predicted_columns(state_obs.shape[1], own_columns)].contiguous()


def error_in_env_units(head: DiffusionPolicy, val_mae: Sequence[float], own_columns: Sequence[int]) -> list[float]:
    """Per predicted column, a normalized mean |error| in the head's observation units (limits: px for PushT)."""
    scale = head.normalizer.params["obs"]["scale"]
    return [float(e / abs(float(scale[i]))) for e, i in zip(val_mae, predicted_columns(len(scale), own_columns))]


__all__ = ["EncoderSettings", "assemble_image_policy", "camera_weights", "error_in_env_units", "predicted_columns",
           "regression_error", "shared_columns", "state_targets", "train_state_encoder"]
