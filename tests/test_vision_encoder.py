import numpy as np
import pytest
import torch
from torch import nn

from pcm_policy.errors import ConfigError, PcmError
from pcm_policy.model.vision import (ResNet18, SpatialSoftmax, VisionEncoder, VisionEncoderConfig,
                                     backbone_name_from_lerobot, backbone_name_to_lerobot, build_vision_encoder,
                                     center_crop, encoder_state_from_lerobot, encoder_state_to_lerobot, random_crop)

SMALL = VisionEncoderConfig(image_shape=(40, 40), crop_shape=(32, 32), num_keypoints=8, feature_dim=16)
# A ResNet-18 at a small size keeps the test fast; the names and parameter counts do not depend on it.
RESNET = VisionEncoderConfig(kind="resnet18", image_shape=(72, 72), crop_shape=(64, 64), num_keypoints=8,
                             feature_dim=16)  # a 2x2 feature map

# torchvision's resnet18 state-dict names (torchvision.models.resnet18().state_dict()), written out by hand.
TORCHVISION_LAYER2 = [
    "layer2.0.conv1.weight", "layer2.0.bn1.weight", "layer2.0.bn1.bias", "layer2.0.bn1.running_mean",
    "layer2.0.bn1.running_var", "layer2.0.bn1.num_batches_tracked", "layer2.0.conv2.weight", "layer2.0.bn2.weight",
    "layer2.0.bn2.bias", "layer2.0.bn2.running_mean", "layer2.0.bn2.running_var", "layer2.0.bn2.num_batches_tracked",
    "layer2.0.downsample.0.weight", "layer2.0.downsample.1.weight", "layer2.0.downsample.1.bias",
    "layer2.0.downsample.1.running_mean", "layer2.0.downsample.1.running_var",
    "layer2.0.downsample.1.num_batches_tracked", "layer2.1.conv1.weight", "layer2.1.bn1.weight", "layer2.1.bn1.bias",
    "layer2.1.bn1.running_mean", "layer2.1.bn1.running_var", "layer2.1.bn1.num_batches_tracked",
    "layer2.1.conv2.weight", "layer2.1.bn2.weight", "layer2.1.bn2.bias", "layer2.1.bn2.running_mean",
    "layer2.1.bn2.running_var", "layer2.1.bn2.num_batches_tracked",
]
TORCHVISION_STEM = ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                    "bn1.num_batches_tracked"]
RESNET18_TRUNK_PARAMS = 11_176_512  # torchvision resnet18: 11,689,512 minus fc (512 * 1000 + 1000)


def _images(n=2, size=40, seed=0):
    """(n, 3, size, size) uint8 noise."""
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("config", [SMALL, RESNET], ids=["small_cnn", "resnet18"])
def test_shapes_and_eval_determinism(config):
    torch.manual_seed(0)
    enc = VisionEncoder(config).eval()
    size = config.image_shape[0]
    x = _images(3, size)
    out = enc(x)
    assert out.shape == (3, 16) and out.dtype == torch.float32 and (out >= 0).all()
    torch.testing.assert_close(enc(x), out, rtol=0, atol=0)  # centre crop: deterministic
    torch.testing.assert_close(enc(x.float() / 255), out)  # uint8 and [0, 1] floats are the same image
    history = x[None, :, None].expand(2, 3, 2, 3, size, size)  # (B=2, To=3, cameras=2, 3, H, W)
    steps = enc.encode_steps(history)
    assert steps.shape == (2, 3, 32)
    torch.testing.assert_close(steps[1, 2, 16:], out[2])  # camera-major features per step


def test_resnet18_names_follow_torchvision_and_group_norm_replaces_batch_norm():
    bn = ResNet18(group_norm=False)
    names = list(bn.state_dict())
    assert names[:6] == TORCHVISION_STEM
    assert [n for n in names if n.startswith("layer2.")] == TORCHVISION_LAYER2
    assert len([n for n in names if n.endswith("num_batches_tracked")]) == 20
    assert sum(p.numel() for p in bn.parameters()) == RESNET18_TRUNK_PARAMS

    gn = ResNet18(group_norm=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gn.modules())
    groups = {name: (m.num_groups, m.num_channels) for name, m in gn.named_modules() if isinstance(m, nn.GroupNorm)}
    assert len(groups) == 20 and all(g == c // 16 for g, c in groups.values())
    assert groups["layer4.0.downsample.1"] == (32, 512)
    # GroupNorm keeps BatchNorm's weight/bias names; only the running statistics are gone.
    assert list(gn.state_dict()) == [n for n in names if not n.rsplit(".", 1)[1].startswith(("running",
                                                                                           "num_batches"))]
    assert sum(p.numel() for p in gn.parameters()) == RESNET18_TRUNK_PARAMS


def test_lerobot_names_round_trip():
    assert backbone_name_to_lerobot("conv1.weight") == "0.weight"
    assert backbone_name_to_lerobot("bn1.bias") == "1.bias"
    assert backbone_name_to_lerobot("layer1.0.conv1.weight") == "4.0.conv1.weight"
    assert backbone_name_from_lerobot("5.0.downsample.1.weight") == "layer2.0.downsample.1.weight"
    assert backbone_name_from_lerobot("7.1.bn2.bias") == "layer4.1.bn2.bias"
    torch.manual_seed(1)
    enc = VisionEncoder(RESNET).eval()
    theirs = encoder_state_to_lerobot(enc)
    assert {"diffusion.rgb_encoder.backbone.0.weight", "diffusion.rgb_encoder.backbone.4.0.conv1.weight",
            "diffusion.rgb_encoder.backbone.6.0.downsample.0.weight", "diffusion.rgb_encoder.pool.nets.weight",
            "diffusion.rgb_encoder.pool.pos_grid", "diffusion.rgb_encoder.out.bias"} <= set(theirs)
    torch.manual_seed(2)
    other = VisionEncoder(RESNET).eval()
    other.load_state_dict(encoder_state_from_lerobot({**theirs, "diffusion.unet.x": torch.zeros(1)}, other))
    x = _images(size=72)
    torch.testing.assert_close(other(x), enc(x), rtol=0, atol=0)

    bad_grid = {**theirs, "diffusion.rgb_encoder.pool.pos_grid": torch.zeros(9, 2)}
    with pytest.raises(PcmError, match="pool.pos_grid: keypoint grid of shape \\(9, 2\\), expected \\(4, 2\\)"):
        encoder_state_from_lerobot(bad_grid, other)
    bn_stats = {**theirs, "diffusion.rgb_encoder.backbone.1.running_mean": torch.zeros(64)}
    with pytest.raises(PcmError, match="backbone.1.running_mean: BatchNorm statistics, but the encoder uses GroupNorm"):
        encoder_state_from_lerobot(bn_stats, other)
    with pytest.raises(PcmError, match="no diffusion.rgb_encoder.\\* entries"):
        encoder_state_from_lerobot({"diffusion.unet.x": torch.zeros(1)}, other)


def test_spatial_softmax_keypoint_sits_on_the_peak():
    pool = SpatialSoftmax(in_channels=1, feature_shape=(5, 7), num_keypoints=1)
    with torch.no_grad():
        pool.nets.weight.fill_(1.0)
        pool.nets.bias.zero_()
    features = torch.zeros(2, 1, 5, 7)
    features[0, 0, 1, 6] = 50.0  # row 1 of 5, column 6 of 7 (the right edge)
    features[1, 0, 4, 0] = 50.0  # bottom-left corner
    kp = pool(features)
    assert kp.shape == (2, 1, 2)
    torch.testing.assert_close(kp[0, 0], torch.tensor([1.0, -0.5]))  # x from the column, y from the row
    torch.testing.assert_close(kp[1, 0], torch.tensor([-1.0, 1.0]))
    flat = pool(torch.zeros(1, 1, 5, 7))  # no peak: the centre
    torch.testing.assert_close(flat[0, 0], torch.zeros(2), atol=1e-6, rtol=0)
    assert "pos_grid" not in pool.state_dict()  # derived from the shape


def test_center_and_random_crops():
    x = torch.arange(2 * 96 * 96, dtype=torch.float32).view(2, 1, 96, 96).expand(2, 3, 96, 96)
    c = center_crop(x, (84, 84))
    torch.testing.assert_close(c, x[:, :, 6:90, 6:90])
    assert center_crop(torch.zeros(1, 3, 9, 9), (4, 4)).shape == (1, 3, 4, 4)
    r = random_crop(x.repeat(8, 1, 1, 1), (84, 84), generator=torch.Generator().manual_seed(0))
    assert r.shape == (16, 3, 84, 84)
    offsets = set()
    for i in range(16):
        top_left = int(r[i, 0, 0, 0]) - (i % 2) * 96 * 96
        top, left = divmod(top_left, 96)
        torch.testing.assert_close(r[i], x[i % 2, :, top:top + 84, left:left + 84])  # a window of its own image
        offsets.add((top, left))
    assert len(offsets) > 4  # one offset per image, not per batch


def test_training_crop_is_random_and_eval_crop_is_not():
    torch.manual_seed(0)
    enc = VisionEncoder(SMALL)
    x = _images(4)
    enc.train()
    assert not torch.equal(enc(x), enc(x))
    enc.eval()
    assert torch.equal(enc(x), enc(x))
    fixed = VisionEncoder(VisionEncoderConfig(**{**SMALL.to_dict(), "crop_is_random": False}))
    fixed.load_state_dict(enc.state_dict())
    torch.testing.assert_close(fixed.train()(x), enc(x))  # no random crop: training == eval (GroupNorm: no stats)


@pytest.mark.parametrize("images, message", [
    (torch.zeros(1, 40, 40, 3, dtype=torch.uint8),
     r"^observation image has shape \(1, 40, 40, 3\): expected channel-first \(1, 3, 40, 40\)$"),
    (torch.zeros(1, 3, 96, 96, dtype=torch.uint8), r"^observation image is 96x96 .*: expected 40x40"),
    (torch.full((1, 3, 40, 40), 200.0), r"^observation image has float values up to 200: looks like 0\.\.255"),
    (torch.full((1, 3, 40, 40), -0.5), r"values down to -0.5: expected floats in \[0, 1\]"),
    (torch.zeros(1, 3, 40, 40, dtype=torch.int64), r"dtype torch.int64: expected uint8 \(0\.\.255\) or float"),
    (torch.full((1, 3, 40, 40), float("nan")), r"NaN or inf"),
    (torch.zeros(1, 4, 40, 40), r"has shape \(1, 4, 40, 40\): expected \(\.\.\., 3, 40, 40\) RGB"),
    (torch.zeros(3, 40, 40), r"the encoder takes \(B, 3, H, W\)"),
])
def test_bad_images_refused_in_one_line(images, message):
    enc = VisionEncoder(SMALL).eval()
    with pytest.raises(PcmError, match=message) as info:
        enc(images)
    assert "\n" not in str(info.value)


def test_config_validation_names_the_key():
    cfg = VisionEncoderConfig.from_mapping({"kind": "resnet18", "crop_shape": [84, 84], "channels": [16, 32]})
    assert cfg.crop_shape == (84, 84) and cfg.channels == (16, 32) and cfg.input_shape == (84, 84)
    assert VisionEncoderConfig.from_mapping(cfg.to_dict()) == cfg
    for bad, key in [({"kind": "vit"}, "policy.vision.kind"), ({"crop_shape": [100, 84]}, "policy.vision.crop_shape"),
                     ({"image_shape": [96]}, "policy.vision.image_shape"),
                     ({"num_keypoints": 0}, "policy.vision.num_keypoints"),
                     ({"channels": [24, 32]}, "policy.vision.channels"), ({"image_std": [1, 0, 1]}, "image_std"),
                     ({"use_group_norm": "yes"}, "use_group_norm"), ({"crop": 3}, "policy.vision.crop: unknown key")]:
        with pytest.raises(ConfigError, match=key):
            VisionEncoderConfig.from_mapping(bad)
    assert VisionEncoderConfig(channels=(24, 40), use_group_norm=False).channels == (24, 40)  # BatchNorm: any width
    enc = build_vision_encoder({"image_shape": [64, 64], "crop_shape": None})
    assert enc(torch.zeros(1, 3, 64, 64)).shape == (1, 64)
    assert tuple(enc.pool.pos_grid.shape) == (64, 2)  # 64 -> 32 -> 16 -> 8 -> 8 (last layer stride 1)
    with pytest.raises(ConfigError, match=r"policy.vision.crop_shape=\[32, 32\]: resnet18 turns it into a 1x1"):
        build_vision_encoder({"kind": "resnet18", "image_shape": [40, 40], "crop_shape": [32, 32]})
