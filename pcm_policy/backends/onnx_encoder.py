"""An image policy's encoder as an ONNX graph: the camera history as the env gives it -> the features `encode` uses.

Graph: input `images` (N, To, cameras, 3, H, W) uint8 (each step's `image` observation, channel-first, 0..255);
output `features` (N, To, cameras * F) float32, each step's camera features camera-major - what
`DiffusionPolicy.global_cond` concatenates after that step's normalized low-dim observation before flattening over
the To steps. The inference path of `VisionEncoder.forward` in eval mode (to [0, 1], the affine map, the centre
crop, trunk, spatial softmax, projection); written by torch's TorchScript exporter (`dynamo=False`), N dynamic. It
runs once per chunk, so unlike the denoiser (`onnx_graph`) it is not hand-written for speed.
"""
from __future__ import annotations

import io
import warnings

import torch
from torch import nn

from pcm_policy.backends.registry import import_onnx
from pcm_policy.model.vision import VisionEncoder, center_crop

OPSET = 17
INPUT = "images"
OUTPUT = "features"


class _InferenceEncoder(nn.Module):
    """`VisionEncoder.encode_steps` for uint8 images in eval mode, without the data-dependent input checks (the
    graph's input type and shape stand for them)."""

    def __init__(self, encoder: VisionEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        N, To, cameras = images.shape[:3]
        x = images.reshape(N * To * cameras, *images.shape[3:]).float() / 255.0
        x = (x - enc.image_mean) / enc.image_std
        if enc.config.crop_shape is not None:
            x = center_crop(x, enc.config.crop_shape, enc.config.image_shape)
        keypoints = enc.pool(enc.backbone(x))
        features = enc.activate(enc.out(keypoints.flatten(1)))
        return features.reshape(N, To, cameras * enc.feature_dim)


def encoder_graph(encoder: VisionEncoder, n_obs_steps: int, cameras: int) -> bytes:
    """The serialized ONNX model of `encoder` over an observation history (interface in the module docstring).

    Args:
        encoder: the policy's `VisionEncoder` (its weights are read; its train/eval mode is restored).
        n_obs_steps: To (a static axis).
        cameras: the number of cameras (a static axis).

    Returns:
        The model's bytes (opset `OPSET`).

    Raises:
        ConfigError: the onnx package does not import (one line naming the pip command).
    """
    import_onnx("pcm export --format onnx")  # torch's exporter needs it; fail with the fix, not a traceback
    H, W = encoder.config.image_shape
    example = torch.zeros(1, n_obs_steps, cameras, 3, H, W, dtype=torch.uint8)
    was_training = encoder.training
    buffer = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated, and pinned
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # GroupNorm's batch check, a constant here
            torch.onnx.export(_InferenceEncoder(encoder.eval()), (example,), buffer, input_names=[INPUT],
                              output_names=[OUTPUT], dynamic_axes={INPUT: {0: "N"}, OUTPUT: {0: "N"}},
                              opset_version=OPSET, dynamo=False)
    finally:
        encoder.train(was_training)
    return buffer.getvalue()
