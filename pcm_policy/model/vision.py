"""Image encoder of Diffusion Policy's image policies: crop -> conv trunk -> spatial-softmax keypoints -> linear.

Design (Chi et al. 2023, section 3.3 and its code; lerobot's `DiffusionRgbEncoder`): a ResNet-18 trunk without its
global pooling and classifier, with every BatchNorm replaced by a GroupNorm of `channels // 16` groups (BatchNorm
statistics drift when the encoder is trained end to end with an EMA of the weights); spatial-softmax keypoints
instead of global average pooling (Levine et al. 2016, "End-to-end training of deep visuomotor policies"; Finn et
al. 2016); a linear projection with ReLU; a random crop in training and the centre crop at inference (84x84 of
96x96 for PushT). `SmallCnn` is a four-layer trunk with the same head, cheap enough to train on a CPU.

Images enter as (..., 3, H, W) uint8 in 0..255 or float in [0, 1] (both accepted; a float image above 1 is refused
as "looks like 0..255"), then pass a fixed per-channel affine map `(x - image_mean) / image_std` (default: to
[-1, 1], as Diffusion Policy's image normalizer; a lerobot import sets its dataset's mean/std there).

Parameter names: the ResNet trunk uses torchvision's `resnet18` names (`conv1`, `bn1`, `layer1.0.conv1`,
`layer2.0.downsample.0`, ...); the head uses lerobot's (`pool.nets`, `out`), so `backbone.*`, `pool.nets.*` and
`out.*` of a lerobot `diffusion.rgb_encoder` load after `encoder_state_from_lerobot` renames lerobot's numbered
backbone (`backbone.0`, `backbone.4.0.conv1`, ...: it keeps `children()[:-2]` of torchvision's model in an
`nn.Sequential`) to torchvision's names.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pcm_policy.errors import ConfigError, PcmError

KINDS = ("small_cnn", "resnet18")
FEATURE_ACTIVATIONS = ("relu", "none")
KEY_PREFIX = "policy.vision"  # where the encoder's keys live in a policy config, for messages


def _pair(key: str, value: Any) -> tuple[int, int]:
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in value)):
        raise ConfigError(f"{KEY_PREFIX}.{key}={value!r}: expected two positive integers [H, W]")
    return int(value[0]), int(value[1])


def _triple(key: str, value: Any, positive: bool) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or not all(np.isfinite(out)) or (positive and min(out) <= 0):
        what = "three positive numbers" if positive else "three finite numbers"
        raise ConfigError(f"{KEY_PREFIX}.{key}={value!r}: expected {what} (one per RGB channel)")
    return out


@dataclass(frozen=True)
class VisionEncoderConfig:
    """One image encoder's shape, validated on construction (the `policy.vision` keys).

    Attributes:
        kind: `small_cnn` (the CPU default, `SmallCnn`) or `resnet18` (DP/lerobot's, `ResNet18`).
        image_shape: (H, W) of the images the encoder accepts (PushT 96x96, robomimic 84x84).
        crop_shape: (h, w) cropped out of them (random in training, centre at inference); None = no crop.
        crop_is_random: False uses the centre crop in training too (lerobot's `crop_is_random`).
        num_keypoints: K, spatial-softmax keypoints (lerobot's `spatial_softmax_num_keypoints`).
        feature_dim: F, features per image after the projection (lerobot: 2 K).
        use_group_norm: GroupNorm (`channels // 16` groups) instead of BatchNorm in the trunk.
        channels: `small_cnn` only: output channels of its conv layers (multiples of 16 with GroupNorm).
        image_mean, image_std: per-channel affine map applied to [0, 1] images before the trunk.
        feature_activation: `relu` (lerobot's and Diffusion Policy's encoder: features >= 0) or `none` (the
            projection as it is: an encoder regressed onto a signed state, `pcm_policy.state_encoder`).

    Raises:
        ConfigError: a field out of range, naming `policy.vision.<key>`.
    """

    kind: str = "small_cnn"
    image_shape: tuple[int, int] = (96, 96)
    crop_shape: tuple[int, int] | None = (84, 84)
    crop_is_random: bool = True
    num_keypoints: int = 32
    feature_dim: int = 64
    use_group_norm: bool = True
    channels: tuple[int, ...] = (16, 32, 64, 64)
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    feature_activation: str = "relu"

    def __post_init__(self):
        fix = lambda key, value: object.__setattr__(self, key, value)  # noqa: E731 (frozen dataclass)
        if self.kind not in KINDS:
            raise ConfigError(f"{KEY_PREFIX}.kind={self.kind!r}: expected one of {', '.join(KINDS)}")
        fix("image_shape", _pair("image_shape", self.image_shape))
        if self.crop_shape is not None:
            fix("crop_shape", _pair("crop_shape", self.crop_shape))
            if self.crop_shape[0] > self.image_shape[0] or self.crop_shape[1] > self.image_shape[1]:
                raise ConfigError(f"{KEY_PREFIX}.crop_shape={list(self.crop_shape)}: larger than "
                                  f"image_shape={list(self.image_shape)}")
        for key in ("crop_is_random", "use_group_norm"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{KEY_PREFIX}.{key}={getattr(self, key)!r}: expected true or false")
        for key in ("num_keypoints", "feature_dim"):
            value = getattr(self, key)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{KEY_PREFIX}.{key}={value!r}: expected an integer >= 1")
        channels = tuple(self.channels) if isinstance(self.channels, (tuple, list)) else ()
        if not channels or not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c >= 1
                                   for c in channels):
            raise ConfigError(f"{KEY_PREFIX}.channels={self.channels!r}: expected a non-empty list of positive ints")
        if self.use_group_norm and any(c % 16 for c in channels):
            raise ConfigError(f"{KEY_PREFIX}.channels={list(channels)}: with use_group_norm every width must be a "
                              f"multiple of 16 (GroupNorm of channels // 16 groups)")
        fix("channels", tuple(int(c) for c in channels))
        fix("image_mean", _triple("image_mean", self.image_mean, positive=False))
        fix("image_std", _triple("image_std", self.image_std, positive=True))
        if self.feature_activation not in FEATURE_ACTIVATIONS:
            raise ConfigError(f"{KEY_PREFIX}.feature_activation={self.feature_activation!r}: expected one of "
                              f"{', '.join(FEATURE_ACTIVATIONS)}")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | "VisionEncoderConfig") -> "VisionEncoderConfig":
        """Build from a `policy.vision` mapping (any sequence, e.g. a YAML list, for a tuple), or return a config
        as it is.

        Raises:
            ConfigError: an unknown key, or a value out of range.
        """
        if isinstance(cfg, VisionEncoderConfig):
            return cfg
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(cfg) - set(known))
        if unknown:
            raise ConfigError(f"{KEY_PREFIX}.{unknown[0]}: unknown key (known: {', '.join(known)})")
        return cls(**{k: tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v for k, v in cfg.items()})

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain JSON/YAML values (tuples as lists), for a checkpoint card."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @property
    def input_shape(self) -> tuple[int, int]:
        """(H, W) the trunk sees: the crop, or the whole image without one."""
        return self.crop_shape or self.image_shape


# ---- input checks and crops ----------------------------------------------------------------------------------
def images_to_unit_float(images: torch.Tensor, image_shape: tuple[int, int]) -> torch.Tensor:
    """Check an image batch and return it as float32 in [0, 1].

    Args:
        images: (..., 3, H, W) uint8 in 0..255 or floating in [0, 1], channel-first.
        image_shape: the (H, W) expected.

    Returns:
        (..., 3, H, W) float32 in [0, 1] (uint8 divided by 255).

    Raises:
        PcmError: one line: not a tensor, channel-last or not 3 channels, another size, another dtype, a float image
            with NaN/inf, negative values or values above 1 ("looks like 0..255").
    """
    H, W = image_shape
    if not isinstance(images, torch.Tensor):
        raise PcmError(f"observation image is a {type(images).__name__}: expected a torch tensor (..., 3, {H}, {W})")
    shape = tuple(images.shape)
    if images.ndim < 3 or shape[-3] != 3:
        if images.ndim >= 3 and shape[-1] == 3:
            lead = ", ".join(str(s) for s in shape[:-3])
            raise PcmError(f"observation image has shape {shape}: expected channel-first "
                           f"({lead + ', ' if lead else ''}3, {shape[-3]}, {shape[-2]})")
        raise PcmError(f"observation image has shape {shape}: expected (..., 3, {H}, {W}) RGB, channel-first")
    if shape[-2:] != (H, W):
        raise PcmError(f"observation image is {shape[-2]}x{shape[-1]} (shape {shape}): expected {H}x{W} "
                       f"({KEY_PREFIX}.image_shape)")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise PcmError(f"observation image has dtype {images.dtype}: expected uint8 (0..255) or float in [0, 1]")
    if images.numel():
        lo, hi = torch.stack(torch.aminmax(images)).tolist()  # one device sync
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise PcmError("observation image holds NaN or inf")
        if hi > 1.0 + 1e-6:
            raise PcmError(f"observation image has float values up to {hi:g}: looks like 0..255; "
                           f"pass uint8 or floats in [0, 1]")
        if lo < -1e-6:
            raise PcmError(f"observation image has float values down to {lo:g}: expected floats in [0, 1]")
    return images.float()


def center_crop_offsets(image_shape: tuple[int, int], crop_shape: tuple[int, int]) -> tuple[int, int]:
    """(top, left) of the centre (h, w) window of an (H, W) image: `round((H - h) / 2)` with Python's round, as
    torchvision's `CenterCrop` (so 96 -> 84 starts at row/column 6)."""
    (h, w), (H, W) = crop_shape, image_shape
    return int(round((H - h) / 2.0)), int(round((W - w) / 2.0))


def center_crop(images: torch.Tensor, crop_shape: tuple[int, int], image_shape: tuple[int, int] | None = None
                ) -> torch.Tensor:
    """The centre (h, w) window of (B, C, H, W) images (`center_crop_offsets`); `image_shape` gives (H, W) as
    Python ints where the tensor's own shape is symbolic (ONNX export)."""
    (h, w) = crop_shape
    top, left = center_crop_offsets(tuple(image_shape or images.shape[-2:]), crop_shape)
    return images[..., top:top + h, left:left + w]


def random_crop(images: torch.Tensor, crop_shape: tuple[int, int],
                generator: torch.Generator | None = None) -> torch.Tensor:
    """An (h, w) window at an independent uniformly random offset for every image of (B, C, H, W).

    Per-sample offsets as Diffusion Policy's `CropRandomizer` (torchvision's `RandomCrop`, which lerobot uses,
    draws one offset per call). Offsets come from `generator` (default: torch's global RNG), on the CPU.
    """
    (h, w), (B, _, H, W) = crop_shape, images.shape
    top = torch.randint(0, H - h + 1, (B,), generator=generator).to(images.device)
    left = torch.randint(0, W - w + 1, (B,), generator=generator).to(images.device)
    rows = top[:, None, None] + torch.arange(h, device=images.device)[None, :, None]  # (B, h, 1)
    cols = left[:, None, None] + torch.arange(w, device=images.device)[None, None, :]  # (B, 1, w)
    batch = torch.arange(B, device=images.device)[:, None, None]
    return images.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (B, h, w, C) -> (B, C, h, w)


# ---- trunks ---------------------------------------------------------------------------------------------------
def _norm(channels: int, group_norm: bool) -> nn.Module:
    """GroupNorm with channels // 16 groups (Diffusion Policy's and lerobot's BatchNorm replacement), or BatchNorm.

    GroupNorm has `weight` and `bias` like BatchNorm but no `running_mean` / `running_var` / `num_batches_tracked`
    buffers: a BatchNorm state dict's statistics have nowhere to go.
    """
    return nn.GroupNorm(channels // 16, channels) if group_norm else nn.BatchNorm2d(channels)


def _init_conv(module: nn.Module) -> None:
    """Kaiming-normal conv weights (fan_out, ReLU) and unit/zero norms, torchvision's ResNet initialisation."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): two 3x3 convs with a shortcut, torchvision's parameter names.

    `conv1` (3x3, `stride`) -> `bn1` -> ReLU -> `conv2` (3x3) -> `bn2`, plus the input (through `downsample` = 1x1
    conv with `stride` + norm when the shape changes), then ReLU. `bn*` are GroupNorm with `group_norm`.

    Args:
        in_channels, channels: input and output channels.
        stride: stride of conv1 (and of the shortcut).
        group_norm: GroupNorm instead of BatchNorm.
    """

    def __init__(self, in_channels: int, channels: int, stride: int, group_norm: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm(channels, group_norm)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = _norm(channels, group_norm)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                                            _norm(channels, group_norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, channels, ceil(H / stride), ceil(W / stride))."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


class ResNet18(nn.Module):
    """ResNet-18 trunk (BasicBlocks [2, 2, 2, 2], widths 64-512) without avgpool/fc; torchvision's names.

    `conv1` (7x7, stride 2) -> `bn1` -> ReLU -> `maxpool` (3x3, stride 2) -> `layer1..layer4` (strides 1, 2, 2, 2):
    (B, 3, H, W) -> (B, 512, ceil(H / 32), ceil(W / 32)) (84x84 -> 3x3).

    Args:
        group_norm: GroupNorm (channels // 16 groups) instead of BatchNorm.
    """

    out_channels = 512

    def __init__(self, group_norm: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = _norm(64, group_norm)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        widths, strides, in_ch = (64, 128, 256, 512), (1, 2, 2, 2), 64
        for i, (width, stride) in enumerate(zip(widths, strides), start=1):
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(in_ch, width, stride, group_norm),
                                                     BasicBlock(width, width, 1, group_norm)))
            in_ch = width
        _init_conv(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float -> (B, 512, ceil(H / 32), ceil(W / 32))."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class SmallCnn(nn.Sequential):
    """A small conv trunk for CPU training: 3x3 conv -> norm -> ReLU per width, stride 2 for all but the last.

    With the default widths (16, 32, 64, 64) an 84x84 crop becomes a 64 x 11 x 11 map (11 x 11 keeps the
    spatial-softmax keypoints fine-grained; ResNet-18 ends at 3 x 3); 67 k parameters with the head, about 10 M
    multiply-adds per image against ResNet-18's 0.26 G at 84x84. Layers are `<i>.0` (conv), `<i>.1` (norm).

    Args:
        channels: output widths of the conv layers.
        group_norm: GroupNorm (channels // 16 groups) instead of BatchNorm.
    """

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64, 64), group_norm: bool = True):
        layers, in_ch = [], 3
        for i, width in enumerate(channels):
            stride = 2 if i < len(channels) - 1 else 1
            layers.append(nn.Sequential(nn.Conv2d(in_ch, width, 3, stride=stride, padding=1, bias=False),
                                        _norm(width, group_norm), nn.ReLU(inplace=True)))
            in_ch = width
        super().__init__(*layers)
        self.out_channels = in_ch
        _init_conv(self)


# ---- head -----------------------------------------------------------------------------------------------------
class SpatialSoftmax(nn.Module):
    """Spatial soft-argmax keypoints (Levine et al. 2016; robomimic / lerobot's formulation and names).

    A 1x1 conv `nets` maps C channels to K keypoint maps; each map gets a softmax over its H*W positions, and the
    keypoint is the expected (x, y) under it on a grid from -1 to 1: x over the columns (left -1, right +1), y over
    the rows (top -1, bottom +1), built with numpy's `linspace` in float64 then cast, as lerobot does.

    Args:
        in_channels: C of the feature map.
        feature_shape: (H, W) of the feature map.
        num_keypoints: K.

    Attributes:
        nets: the 1x1 conv C -> K.
        pos_grid: (H * W, 2) buffer of (x, y), row-major over positions; derived from the shape, so not saved
            (lerobot saves it: `encoder_state_from_lerobot` checks it and drops it).
    """

    def __init__(self, in_channels: int, feature_shape: tuple[int, int], num_keypoints: int):
        super().__init__()
        H, W = feature_shape
        self.num_keypoints = num_keypoints
        self.nets = nn.Conv2d(in_channels, num_keypoints, kernel_size=1)
        pos_x, pos_y = np.meshgrid(np.linspace(-1.0, 1.0, W), np.linspace(-1.0, 1.0, H))
        grid = np.stack([pos_x.reshape(-1), pos_y.reshape(-1)], axis=1)
        self.register_buffer("pos_grid", torch.from_numpy(grid).float(), persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, K, 2) keypoints (x, y) in [-1, 1]."""
        maps = self.nets(features)
        attention = F.softmax(maps.flatten(2), dim=-1)  # (B, K, H * W)
        return attention @ self.pos_grid


class VisionEncoder(nn.Module):
    """Image -> feature vector: check, to [0, 1], affine, crop, trunk, spatial softmax, `out` linear + ReLU (or
    no activation, `feature_activation`).

    Modules: `backbone` (`ResNet18` or `SmallCnn`), `pool` (`SpatialSoftmax`), `out` (Linear 2K -> F), as
    lerobot's `DiffusionRgbEncoder`. `forward` is deterministic in eval mode (centre crop); in training mode the
    crop is random (per image) unless `crop_is_random` is False.

    Args:
        config: the encoder's shape.

    Attributes:
        config: as given.
        feature_dim: F, features per image.

    Raises:
        ConfigError: the trunk turns the (cropped) input into a feature map under 2x2 (the keypoints would be
            constant).
    """

    def __init__(self, config: VisionEncoderConfig):
        super().__init__()
        self.config = config
        self.feature_dim = config.feature_dim
        if config.kind == "resnet18":
            self.backbone = ResNet18(group_norm=config.use_group_norm)
        else:
            self.backbone = SmallCnn(config.channels, group_norm=config.use_group_norm)
        with torch.no_grad():  # the feature-map size, from a dry run as lerobot does
            was_training = self.backbone.training
            feature_shape = self.backbone.eval()(torch.zeros(1, 3, *config.input_shape)).shape[-2:]
            self.backbone.train(was_training)
        if min(feature_shape) < 2:
            key = "crop_shape" if config.crop_shape else "image_shape"
            raise ConfigError(f"{KEY_PREFIX}.{key}={list(config.input_shape)}: {config.kind} turns it into a "
                              f"{feature_shape[0]}x{feature_shape[1]} feature map; spatial-softmax keypoints need >= 2x2")
        self.pool = SpatialSoftmax(self.backbone.out_channels, tuple(feature_shape), config.num_keypoints)
        self.out = nn.Linear(2 * config.num_keypoints, config.feature_dim)
        self.relu = nn.ReLU()
        self.register_buffer("image_mean", torch.tensor(config.image_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(config.image_std).view(3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Encode (B, 3, H, W) images (uint8 0..255 or float in [0, 1]) -> (B, F) float32 features (>= 0 with
        the default `feature_activation` relu).

        Raises:
            PcmError: one line, for an image of the wrong shape, channel order, dtype or range
                (`images_to_unit_float`).
        """
        return self.activate(self.project(images))

    def activate(self, projected: torch.Tensor) -> torch.Tensor:
        """The final activation (`feature_activation`) applied to `project`'s output."""
        return self.relu(projected) if self.config.feature_activation == "relu" else projected

    def project(self, images: torch.Tensor) -> torch.Tensor:
        """`forward` before its final activation: (B, 3, H, W) images -> (B, F) `out(keypoints)`, any sign (what
        a regression onto a state trains, `pcm_policy.state_encoder`).

        Raises:
            PcmError: as `forward`.
        """
        if images.ndim != 4:
            raise PcmError(f"observation image has shape {tuple(images.shape)}: the encoder takes (B, 3, H, W)")
        x = (images_to_unit_float(images, self.config.image_shape) - self.image_mean) / self.image_std
        if self.config.crop_shape is not None:
            if self.training and self.config.crop_is_random:
                x = random_crop(x, self.config.crop_shape)
            else:
                x = center_crop(x, self.config.crop_shape)
        keypoints = self.pool(self.backbone(x))  # (B, K, 2)
        return self.out(keypoints.flatten(1))  # flattened (x0, y0, x1, y1, ...), as lerobot

    def encode_steps(self, images: torch.Tensor) -> torch.Tensor:
        """Encode an observation history of one or more cameras with this (shared) encoder.

        Args:
            images: (B, To, N, 3, H, W), N cameras per step.

        Returns:
            (B, To, N * F): each step's camera features concatenated camera-major, lerobot's layout
            (`(b s n) ... -> b s (n ...)`), ready to join the low-dim observation of that step.

        Raises:
            PcmError: `images` is not 6-d, or as `forward`.
        """
        if images.ndim != 6:
            raise PcmError(f"observation images have shape {tuple(images.shape)}: expected "
                           f"(B, To, cameras, 3, {self.config.image_shape[0]}, {self.config.image_shape[1]})")
        B, To, N = images.shape[:3]
        features = self(images.reshape(B * To * N, *images.shape[3:]))
        return features.reshape(B, To, N * self.feature_dim)


def build_vision_encoder(config: VisionEncoderConfig | Mapping[str, Any]) -> VisionEncoder:
    """A freshly initialised `VisionEncoder` from a config or a `policy.vision` mapping.

    Raises:
        ConfigError: an unknown key or a value out of range (`VisionEncoderConfig`), or an input too small for the
            trunk (a feature map under 2x2).
    """
    return VisionEncoder(VisionEncoderConfig.from_mapping(config))


# ---- lerobot's parameter names ----------------------------------------------------------------------------------
# lerobot keeps torchvision's resnet children()[:-2] in an nn.Sequential: conv1, bn1, relu, maxpool, layer1..4.
_LEROBOT_BACKBONE = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
_TORCHVISION_BACKBONE = {v: k for k, v in _LEROBOT_BACKBONE.items()}


def backbone_name_to_lerobot(name: str) -> str:
    """Our (torchvision) ResNet trunk name -> lerobot's numbered one: `layer1.0.conv1.weight` -> `4.0.conv1.weight`,
    `conv1.weight` -> `0.weight`, `bn1.bias` -> `1.bias`.

    Raises:
        KeyError: a name outside the trunk.
    """
    head, _, rest = name.partition(".")
    return f"{_LEROBOT_BACKBONE[head]}.{rest}"


def backbone_name_from_lerobot(name: str) -> str:
    """lerobot's numbered ResNet trunk name -> ours (torchvision's): `5.0.downsample.1.weight` ->
    `layer2.0.downsample.1.weight`, the inverse of `backbone_name_to_lerobot`.

    Raises:
        KeyError: a name whose first part is not a trunk index (0, 1, 4-7).
    """
    head, _, rest = name.partition(".")
    return f"{_TORCHVISION_BACKBONE[head]}.{rest}"


def _require_resnet(encoder: VisionEncoder) -> None:
    if encoder.config.kind != "resnet18":
        raise PcmError(f"{KEY_PREFIX}.kind={encoder.config.kind!r}: lerobot's rgb_encoder is a resnet18 one")
    if encoder.config.feature_activation != "relu":
        raise PcmError(f"{KEY_PREFIX}.feature_activation={encoder.config.feature_activation!r}: lerobot's "
                       "rgb_encoder ends in a ReLU")


def encoder_state_from_lerobot(state: Mapping[str, torch.Tensor], encoder: VisionEncoder,
                               prefix: str = "diffusion.rgb_encoder.") -> dict[str, torch.Tensor]:
    """The `prefix`ed entries of a lerobot state dict as a state dict for `encoder` (a `resnet18` one).

    Renames `backbone.<i>.*` with `backbone_name_from_lerobot`, keeps `pool.nets.*` and `out.*`, checks lerobot's
    saved `pool.pos_grid` against ours (a mismatch means another crop or image size) and drops it. For a per-camera
    encoder (`use_separate_rgb_encoder_per_camera`) pass `prefix="diffusion.rgb_encoder.<camera>."`.

    Args:
        state: a lerobot `model.safetensors` state dict (any other keys are ignored).
        encoder: the encoder the result is for (its config decides the norm and the grid).
        prefix: where the encoder's entries start.

    Returns:
        A state dict that `encoder.load_state_dict(..., strict=True)` accepts when it is complete.

    Raises:
        PcmError: `encoder` is not a `resnet18` one, no entry under `prefix`, an entry outside backbone/pool/out, BatchNorm running statistics for a
            GroupNorm encoder, or a `pos_grid` of another shape or value.
    """
    _require_resnet(encoder)
    entries = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not entries:
        raise PcmError(f"no {prefix}* entries in the state dict (not an image policy?)")
    out = {}
    for name, value in entries.items():
        part, _, rest = name.partition(".")
        if part == "backbone":
            try:
                ours = backbone_name_from_lerobot(rest)
            except KeyError:
                raise PcmError(f"{prefix}{name}: not a ResNet trunk entry") from None
            if encoder.config.use_group_norm and ours.rsplit(".", 1)[-1] in ("running_mean", "running_var",
                                                                             "num_batches_tracked"):
                raise PcmError(f"{prefix}{name}: BatchNorm statistics, but the encoder uses GroupNorm "
                               f"(set {KEY_PREFIX}.use_group_norm=false)")
            out[f"backbone.{ours}"] = value
        elif name == "pool.pos_grid":
            if tuple(value.shape) != tuple(encoder.pool.pos_grid.shape) or not torch.allclose(
                    value.float(), encoder.pool.pos_grid, atol=1e-6):
                raise PcmError(f"{prefix}{name}: keypoint grid of shape {tuple(value.shape)}, expected "
                               f"{tuple(encoder.pool.pos_grid.shape)} (another crop_shape or image size?)")
        elif part in ("pool", "out"):
            out[name] = value
        else:
            raise PcmError(f"{prefix}{name}: unknown encoder entry (expected backbone.*, pool.*, out.*)")
    return out


def encoder_state_to_lerobot(encoder: VisionEncoder, prefix: str = "diffusion.rgb_encoder.") -> dict[str, torch.Tensor]:
    """`encoder`'s state dict in lerobot's names (`prefix` + `backbone.<i>.*`, `pool.nets.*`, `pool.pos_grid`,
    `out.*`), the inverse of `encoder_state_from_lerobot` (a `resnet18` encoder).

    Raises:
        PcmError: `encoder` is not a `resnet18` one.
    """
    _require_resnet(encoder)
    out = {}
    for name, value in encoder.state_dict().items():
        part, _, rest = name.partition(".")
        out[prefix + (f"backbone.{backbone_name_to_lerobot(rest)}" if part == "backbone" else name)] = value
    out[prefix + "pool.pos_grid"] = encoder.pool.pos_grid.clone()
    return out
