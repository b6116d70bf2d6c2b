"""An image policy from a low-dim one (`pcm_policy.state_encoder`, `pcm train-encoder`): the column match, the
exact assembly (the image policy's chunks are the head's chunks on the state the encoder reads), the regression,
the encoder without a final activation, and the command with its refusals."""
import json

import numpy as np
import pytest
import torch

from pcm_policy.backends.onnx_encoder import encoder_graph
from pcm_policy.checkpoint import load_policy
from pcm_policy.commands import run_command
from pcm_policy.data.normalizer import Normalizer
from pcm_policy.errors import ConfigError, DatasetError, PcmError
from pcm_policy.model.vision import VisionEncoderConfig, build_vision_encoder, encoder_state_to_lerobot
from pcm_policy.policy import DiffusionPolicy, PolicyConfig
from pcm_policy.state_encoder import (EncoderSettings, assemble_image_policy, camera_weights, regression_error,
                                      shared_columns, state_targets, train_state_encoder)
from tests.fixtures import assert_refused, pusht_image_arrays, write_pusht_zarr

TINY = dict(down_dims=(16, 32), diffusion_step_embed_dim=16, n_groups=4, horizon=8, n_action_steps=4)
VISION = dict(kind="small_cnn", image_shape=(32, 32), crop_shape=None, crop_is_random=False, channels=(16, 16),
              num_keypoints=4)
SEQ_DDIM = {"name": "sequential", "scheduler": "ddim", "steps": 4}


def _head(seed=0) -> DiffusionPolicy:
    """A low-dim PushT-shaped head: 18 keypoint columns, then the agent position (2)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    normalizer = Normalizer.fit({"obs": rng.uniform(0, 512, (50, 20)), "action": rng.uniform(0, 512, (50, 2))})
    return DiffusionPolicy(PolicyConfig(obs_dim=20, action_dim=2, **TINY), normalizer).eval()


def _encoder(outputs=18, seed=0):
    torch.manual_seed(seed)
    return build_vision_encoder({**VISION, "feature_dim": outputs}).eval()


def test_shared_columns_finds_the_own_observation_in_the_heads_and_refuses_what_it_lacks():
    state = np.random.default_rng(0).normal(size=(30, 5)).astype(np.float32)
    assert shared_columns(state[:, [3, 1]], state, "d.zarr") == [3, 1]
    with pytest.raises(DatasetError, match="d.zarr: column 1 .* not a column of the head"):
        shared_columns(np.stack([state[:, 0], state[:, 0] + 1], 1), state, "d.zarr")
    with pytest.raises(DatasetError, match="30 steps of the image observation, 29"):
        shared_columns(state, state[:29], "d.zarr")


@pytest.mark.parametrize("own", [[18, 19], [0, 19]])
def test_assembled_policy_samples_the_heads_chunks_on_the_state_the_encoder_reads(own):
    head, encoder = _head(), _encoder()
    policy = assemble_image_policy(head, encoder, own, ["img"])
    assert policy.config.obs_dim == 2 and policy.config.vision_config.feature_activation == "none"
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 2, 1, 3, 32, 32), dtype=torch.uint8, generator=g)
    state = torch.rand(3, 2, 20, generator=g) * 512
    with torch.no_grad():  # the head's observation with the predicted columns replaced by what the encoder reads
        predicted = encoder.project(images.flatten(0, 2)).view(3, 2, 18)
        normalized = head.normalizer.normalize("obs", state)
        rest = [i for i in range(20) if i not in own]
        normalized[..., rest] = predicted
        seen = head.normalizer.unnormalize("obs", normalized)
    ours = policy.predict_chunk({"obs": state[..., own], "image": images}, SEQ_DDIM,
                                generator=torch.Generator().manual_seed(7))
    theirs = head.predict_chunk(seen, SEQ_DDIM, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours.action, theirs.action, atol=1e-3, rtol=0)  # env units (px): float32 rounding


def test_cameras_are_weighted_by_inverse_variance_and_agreeing_cameras_give_the_heads_chunk():
    weights = camera_weights(torch.tensor([[1.0, 4.0], [1.0, 1.0]]))
    torch.testing.assert_close(weights, torch.tensor([[0.5, 0.2], [0.5, 0.8]]))
    torch.testing.assert_close(camera_weights(torch.tensor([[0.3, 2.0]])), torch.ones(1, 2))
    head, encoder = _head(), _encoder()
    mix = camera_weights(torch.rand(2, 18) + 0.1)
    policy = assemble_image_policy(head, encoder, [18, 19], ["a", "b"], mix)
    g = torch.Generator().manual_seed(2)
    frame = torch.randint(0, 256, (2, 2, 1, 3, 32, 32), dtype=torch.uint8, generator=g)
    state = torch.rand(2, 2, 20, generator=g) * 512
    with torch.no_grad():  # both cameras see the same frame: their weighted predictions are the one prediction
        normalized = head.normalizer.normalize("obs", state)
        normalized[..., :18] = encoder.project(frame.flatten(0, 2)).view(2, 2, 18)
        seen = head.normalizer.unnormalize("obs", normalized)
    ours = policy.predict_chunk({"obs": state[..., 18:], "image": frame.repeat(1, 1, 2, 1, 1, 1)}, SEQ_DDIM,
                                generator=torch.Generator().manual_seed(5))
    theirs = head.predict_chunk(seen, SEQ_DDIM, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours.action, theirs.action, atol=1e-3, rtol=0)
    with pytest.raises(PcmError, match="camera weights of shape"):
        assemble_image_policy(head, encoder, [18, 19], ["a", "b"], torch.ones(2, 18))


def test_assembly_refuses_an_image_head_and_a_mismatched_encoder():
    with pytest.raises(PcmError, match="predicts 5 columns, the head's observation has 18"):
        assemble_image_policy(_head(), _encoder(5), [18, 19], ["img"])
    image_head = assemble_image_policy(_head(), _encoder(), [18, 19], ["img"])
    with pytest.raises(PcmError, match="low-dim policy"):
        assemble_image_policy(image_head, _encoder(), [0], ["img"])


def test_feature_activation_none_keeps_the_signed_projection_and_is_refused_where_a_relu_is_fixed():
    encoder = _encoder(6)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    relu = build_vision_encoder({**VISION, "feature_dim": 6}).eval()
    relu.load_state_dict(encoder.state_dict())
    none = build_vision_encoder({**VISION, "feature_dim": 6, "feature_activation": "none"}).eval()
    none.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        assert (none(images) < 0).any() and torch.equal(relu(images), none(images).clamp_min(0))
    with pytest.raises(ConfigError, match="policy.vision.feature_activation='tanh'"):
        VisionEncoderConfig(feature_activation="tanh")
    resnet = build_vision_encoder({"kind": "resnet18", "image_shape": (64, 64), "crop_shape": None,
                                   "feature_activation": "none"})
    with pytest.raises(PcmError, match="ends in a ReLU"):
        encoder_state_to_lerobot(resnet)


def test_onnx_encoder_graph_keeps_the_signed_features():
    ort = pytest.importorskip("onnxruntime")
    none = build_vision_encoder({**VISION, "feature_dim": 6, "feature_activation": "none"}).eval()
    session = ort.InferenceSession(encoder_graph(none, n_obs_steps=2, cameras=1))
    images = torch.randint(0, 256, (3, 2, 1, 3, 32, 32), dtype=torch.uint8)
    (got,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    with torch.no_grad():
        want = none.encode_steps(images).numpy()
    assert (want < 0).any() and np.abs(got - want).max() < 1e-4


def test_regression_learns_where_the_square_is():
    """Frames with a bright square at a random place; the target is its position: the error falls well below
    the spread of the targets."""
    rng = np.random.default_rng(0)
    n = 256
    xy = rng.integers(4, 24, (n, 2))
    frames = torch.zeros(n, 1, 3, 32, 32, dtype=torch.uint8)
    for i, (x, y) in enumerate(xy):
        frames[i, 0, :, y:y + 5, x:x + 5] = 255
    targets = torch.as_tensor((xy - 14) / 10, dtype=torch.float32)
    encoder = _encoder(2)
    before = regression_error(encoder, frames[200:], targets[200:])[0].mean()
    m = train_state_encoder(encoder, frames, targets, np.arange(200), np.arange(200, n),
                            EncoderSettings(steps=500, batch_size=32, lr=3e-3, warmup_steps=10, log_every=250), seed=0)
    assert len(m["log"]) == 2 and m["log"][-1]["step"] == 500
    assert np.mean(m["val_mae"]) < 0.4 * float(before), (before, m["val_mae"])
    with pytest.raises(PcmError, match="3 state columns to predict but an encoder of 2"):
        train_state_encoder(encoder, frames, torch.zeros(n, 3), np.arange(10), np.arange(0), EncoderSettings(), 0)


def test_state_targets_are_the_heads_normalized_predicted_columns():
    head = _head()
    state = np.random.default_rng(1).uniform(0, 512, (7, 20)).astype(np.float32)
    t = state_targets(head, state, [18, 19])
    torch.testing.assert_close(t, head.normalizer.normalize("obs", torch.from_numpy(state))[:, :18])


@pytest.fixture(scope="module")
def image_zarr(tmp_path_factory):
    root = tmp_path_factory.mktemp("state_encoder")
    return root, write_pusht_zarr(root / "img.zarr", arrays=pusht_image_arrays(size=32, lengths=(20, 18, 24, 16)))


ARGS = ["steps=3", "batch_size=8", "log_every=1", "vision.channels=[16,16]", "vision.num_keypoints=4", "threads=1"]


def test_train_encoder_writes_an_image_policy_that_is_the_head_on_the_read_state(tiny_runs, image_zarr, capsys):
    root, data = image_zarr
    out = root / "run"
    metrics = run_command("train-encoder", ["task=pusht_image", f"dataset.path={data}", f"head={tiny_runs / 'base'}",
                                            *ARGS, f"output_dir={out}"])
    assert metrics["own_columns"] == [18, 19] and len(metrics["val_mae"]) == 18 and len(metrics["log"]) == 3
    assert json.loads((out / "metrics.json").read_text())["checkpoint"] == metrics["checkpoint"]
    from pcm_policy.checkpoint import resolve_checkpoint
    from pcm_policy.observations import dataset_windows
    train_windows, _ = dataset_windows(resolve_checkpoint(out))  # what train-pcm and bench draw histories from
    assert len(train_windows) > 0
    policy, card = load_policy(out)
    head, _ = load_policy(tiny_runs / "base")
    assert card["task"] == "pusht_image" and card["policy"]["vision"]["feature_activation"] == "none"
    assert card["policy"]["vision"]["image_shape"] == [32, 32] and card["policy"]["camera_keys"] == ["img"]
    frames = torch.from_numpy(pusht_image_arrays(size=32, lengths=(20, 18, 24, 16))["img"][:4]).permute(0, 3, 1, 2)
    images = frames[:, None, None].repeat(1, 2, 1, 1, 1, 1)
    agent = torch.rand(4, 2, 2) * 512
    with torch.no_grad():
        read = policy.encoder.project(images.flatten(0, 2)).view(4, 2, 18)
        normalized = torch.cat([read, head.normalizer.normalize("obs", torch.cat([torch.zeros(4, 2, 18), agent], -1))
                                [..., 18:]], -1)
        seen = head.normalizer.unnormalize("obs", normalized)
    ours = policy.predict_chunk({"obs": agent, "image": images}, SEQ_DDIM, generator=torch.Generator().manual_seed(3))
    theirs = head.predict_chunk(seen, SEQ_DDIM, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours.action, theirs.action, atol=1e-3, rtol=0)


def test_train_encoder_refusals(tiny_runs, image_zarr, capsys, no_work):
    root, data = image_zarr
    common = ["task=pusht_image", f"dataset.path={data}", *ARGS]
    out = f"output_dir={root / 'bad'}"
    assert_refused(capsys, root, "train-encoder", *common, out, needles=["head: no checkpoint given"])
    assert_refused(capsys, root, "train-encoder", *common, f"head={root / 'nothing'}", out, needles=["head"])
    assert_refused(capsys, root, "train-encoder", *common, f"head={tiny_runs / 'pcm'}", out,
                   needles=["is a PCM checkpoint"])
    assert_refused(capsys, root, "train-encoder", "task=pusht", f"head={tiny_runs / 'base'}", out,
                   needles=["task=pusht: a low-dim task"])
    assert_refused(capsys, root, "train-encoder", *common, f"head={tiny_runs / 'base'}", "+vision.feature_dim=8", out,
                   needles=["vision.feature_dim: set by the head"])
    assert_refused(capsys, root, "train-encoder", "task=pusht_image", f"dataset.path={root / 'missing.zarr'}",
                   f"head={tiny_runs / 'base'}", out, needles=["missing.zarr: no such file or directory"])
    assert_refused(capsys, root, "train-encoder", *common, f"head={tiny_runs / 'base'}", "steps=0", out,
                   needles=["steps=0"])


def test_export_link_head_ships_the_encoder_only_and_loads_the_same_policy(tiny_runs, image_zarr, tmp_path, capsys):
    """`pcm export --link-head`: the encoder alone plus a link to the head; loading rewires the head again, and a
    head whose weights changed since is refused."""
    import shutil

    from pcm_policy.checkpoint import read_weights, weights_fingerprint
    from tests.fixtures import run_cli

    root, data = image_zarr
    head_dir = tmp_path / "head"
    shutil.copytree(tiny_runs / "base", head_dir)
    run_command("train-encoder", ["task=pusht_image", f"dataset.path={data}", f"head={head_dir}", *ARGS,
                                  f"output_dir={tmp_path / 'run'}"])
    code, err = run_cli(capsys, "export", str(tmp_path / "run"), str(tmp_path / "linked"), "--link-head")
    assert code == 0, err
    stored = read_weights(tmp_path / "linked" / "policy.safetensors")
    assert stored and all(k.startswith("encoder.") for k in stored)
    full, _ = load_policy(tmp_path / "run")
    linked, card = load_policy(tmp_path / "linked")
    assert card["head"]["linked"] and card["head"]["own_columns"] == [18, 19]
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, linked.model.state_dict()[key]), key
    for key, value in full.encoder.state_dict().items():  # fp16 storage
        torch.testing.assert_close(value, linked.encoder.state_dict()[key], atol=2e-3, rtol=1e-3)
    assert weights_fingerprint(full.model) == weights_fingerprint(linked.model)
    assert_refused(capsys, tmp_path, "export", str(tmp_path / "linked"), str(tmp_path / "again"), "--link-head",
                   needles=["already linked"])
    assert_refused(capsys, tmp_path, "export", str(tiny_runs / "base"), str(tmp_path / "x"), "--link-head",
                   needles=["not assembled from a low-dim head"])
    assert_refused(capsys, tmp_path, "export", str(tmp_path / "run"), str(tmp_path / "x"), "--link-head",
                   "--format", "onnx", needles=["--link-head: only --format pcm"])
    run_command("train", [f"dataset.path={tiny_runs / 'd.zarr'}", f"output_dir={head_dir}", "device=cpu",
                          "train.steps=12", "train.batch_size=16", "train.checkpoint_every=12",
                          "policy.down_dims=[16,32]", "policy.diffusion_step_embed_dim=32", "policy.n_groups=4"])
    code, err = run_cli(capsys, "eval", f"checkpoint={tmp_path / 'linked'}", "task=pusht_image", "episodes=1",
                        f"output_dir={tmp_path / 'e'}")
    assert code == 2 and "has other weights" in err[-1] and not (tmp_path / "e").exists(), (code, err)
