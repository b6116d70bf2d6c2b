"""Image policies end to end at toy sizes: the config, the condition (encoder once per chunk), checkpoints, the
commands (train with resume, bench's encoding split, train-pcm, eval) and their refusals."""
import json

import numpy as np
import pytest
import torch
import yaml

from pcm_policy.checkpoint import load_policy, weights_fingerprint
from pcm_policy.commands import run_command
from pcm_policy.data.normalizer import Normalizer
from pcm_policy.errors import ConfigError, PcmError
from pcm_policy.policy import DiffusionPolicy, PolicyConfig, select_observations
from tests.fixtures import assert_refused, pusht_image_arrays, run_cli, write_pusht_zarr

VISION = {"kind": "small_cnn", "image_shape": [32, 32], "crop_shape": [28, 28], "channels": [16, 16],
          "num_keypoints": 4, "feature_dim": 8}
TINY = dict(down_dims=(16, 32), diffusion_step_embed_dim=16, n_groups=4, horizon=8, n_action_steps=4)
TINY_CLI = ["policy=unet_small_image", "policy.down_dims=[16,32]", "policy.diffusion_step_embed_dim=16",
            "policy.n_groups=4", "policy.horizon=8", "policy.n_action_steps=4", "policy.vision.image_shape=[32,32]",
            "policy.vision.crop_shape=[28,28]", "policy.vision.channels=[16,16]", "policy.vision.num_keypoints=4",
            "policy.vision.feature_dim=8", "device=cpu", "threads=1"]
SEQ_DDIM = {"name": "sequential", "scheduler": "ddim", "steps": 4}


def _policy(seed=0) -> DiffusionPolicy:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    normalizer = Normalizer.fit({"obs": rng.uniform(0, 512, (50, 2)), "action": rng.uniform(0, 512, (50, 2))})
    config = PolicyConfig(obs_dim=2, action_dim=2, vision=VISION, camera_keys=["img"], **TINY)
    return DiffusionPolicy(config, normalizer).eval()


def _observation(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"obs": torch.rand(batch, 2, 2, generator=g) * 512,
            "image": torch.randint(0, 256, (batch, 2, 1, 3, 32, 32), dtype=torch.uint8, generator=g)}


def test_config_needs_both_an_encoder_and_cameras_and_low_dim_cards_are_unchanged():
    with pytest.raises(ConfigError, match="camera_keys"):
        PolicyConfig(obs_dim=2, action_dim=2, vision=VISION)
    with pytest.raises(ConfigError, match="camera_keys"):
        PolicyConfig(obs_dim=2, action_dim=2, camera_keys=["img"])
    with pytest.raises(ConfigError, match="policy.vision.kind"):
        PolicyConfig(obs_dim=2, action_dim=2, vision={**VISION, "kind": "vit"}, camera_keys=["img"])
    assert "vision" not in PolicyConfig(obs_dim=2, action_dim=2).to_dict()
    config = PolicyConfig(obs_dim=2, action_dim=2, vision=VISION, camera_keys=["img"], **TINY)
    assert config.step_cond_dim == 2 + 8 and PolicyConfig(**config.to_dict()) == config


def test_condition_joins_state_and_camera_features_per_step_and_encodes_once_per_chunk():
    policy = _policy()
    obs = _observation()
    cond = policy.encode(obs)
    assert cond.shape == (3, 2 * (2 + 8))
    features = policy.encoder.encode_steps(obs["image"])  # (3, To, F): state first, then the camera, per step
    torch.testing.assert_close(cond.view(3, 2, 10)[..., 2:], features)
    calls = []
    policy.encoder.register_forward_hook(lambda *a: calls.append(1))
    picard = {"name": "picard", "scheduler": "ddim", "steps": 4, "tol": 0.0}
    chunk = policy.predict_chunk(obs, picard, generator=torch.Generator().manual_seed(0))
    assert chunk.stats.iterations > 1 and len(calls) == 1  # every Picard round reuses the condition
    one = policy.predict_chunk(select_observations(obs, 0), SEQ_DDIM, generator=torch.Generator().manual_seed(0))
    assert one.action.shape == (1, 4, 2)


@pytest.mark.parametrize("observation, message", [
    (lambda o: o["obs"], "needs camera images (img)"),
    (lambda o: {**o, "image": o["image"][:, :, [0, 0]]}, "expected (3, >=2, 1, 3, H, W)"),
    (lambda o: {**o, "image": o["image"].permute(0, 1, 2, 4, 5, 3)}, "shape"),
    (lambda o: {**o, "image": o["image"].float()}, "looks like 0..255"),
    (lambda o: {**o, "image": o["image"][..., :16, :16]}, "expected 32x32"),
    (lambda o: {"image": o["image"]}, "expected 'obs'"),
])
def test_bad_observations_are_refused_in_one_line(observation, message):
    with pytest.raises(PcmError, match=None) as err:
        _policy().predict_chunk(observation(_observation()), SEQ_DDIM)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_weights_round_trip_with_the_encoder_and_the_fingerprint_covers_it():
    policy = _policy()
    state = policy.weights()
    assert any(k.startswith("encoder.backbone.") for k in state)
    again = DiffusionPolicy(policy.config, Normalizer())
    again.load_weights(state)
    again.eval()
    obs = _observation()
    a = policy.predict_chunk(obs, SEQ_DDIM, generator=torch.Generator().manual_seed(1)).action
    b = again.predict_chunk(obs, SEQ_DDIM, generator=torch.Generator().manual_seed(1)).action
    assert torch.equal(a, b)
    before = weights_fingerprint(*policy.trained_modules())
    with torch.no_grad():
        next(policy.encoder.parameters()).add_(1e-3)
    assert weights_fingerprint(*policy.trained_modules()) != before
    low_dim = DiffusionPolicy(PolicyConfig(obs_dim=2, action_dim=2, **TINY), policy.normalizer)
    assert weights_fingerprint(*low_dim.trained_modules()) == weights_fingerprint(low_dim.model)  # shipped PCMs hold


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A 4-step image policy trained by `pcm train task=pusht_image` on a small 32x32 image zarr, resumed to 6."""
    root = tmp_path_factory.mktemp("image_policy")
    arrays = pusht_image_arrays(size=32, lengths=(20, 18, 24, 16))
    data = write_pusht_zarr(root / "img.zarr", arrays=arrays)
    args = ["task=pusht_image", f"dataset.path={data}", "train.batch_size=4", "train.checkpoint_every=2",
            "train.log_every=1", "train.warmup_steps=0", *TINY_CLI, f"output_dir={root / 'run'}"]
    first = run_command("train", [*args, "train.steps=4"])
    resumed = run_command("train", [*args, "train.steps=6"])
    return root, data, first, resumed


def test_train_resumes_and_saves_the_encoder(image_run):
    root, _, first, resumed = image_run
    assert first["steps"] == 4 and resumed["resumed_from"] == 4 and np.isfinite(resumed["final_loss"])
    policy, card = load_policy(root / "run")
    assert card["task"] == "pusht_image" and card["policy"]["camera_keys"] == ["img"]
    assert policy.uses_images and card["policy"]["vision"]["image_shape"] == [32, 32]


def test_bench_reports_the_encoding_apart_from_the_denoising(image_run, tmp_path):
    root, *_ = image_run
    run_command("bench", [f"checkpoint={root / 'run'}", "task=pusht_image", "schedules=[ddim10]", "chunks=3",
                          "tols=[0.1]", "pcm=null", "pcm_lora=null", "early_stop=false", "warmup=0", "threads=1",
                          f"output_dir={tmp_path}"])
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert {r["sampler"] for r in rows} >= {"sequential", "picard"}
    for r in rows:
        assert 0 < r["encode_ms_p50"] <= r["encode_ms_p99"] and r["latency_ms_p50"] > 0
    assert "encode p50/p99 ms" in (tmp_path / "bench.md").read_text()


def test_train_pcm_on_an_image_policy(image_run, tmp_path):
    root, *_ = image_run
    metrics = run_command("train-pcm", [f"base={root / 'run'}", "scheduler=ddim", "steps=4", "trajectories=4",
                                        "collect_batch=4", "epochs=1", "batch_size=4", "eval_observations=2",
                                        "lora_rank=2", "threads=1", f"output_dir={tmp_path}"])
    policy, _ = load_policy(root / "run")
    card = yaml.safe_load(next((tmp_path / "checkpoints").glob("*/policy.yaml")).read_text())
    assert card["base_fingerprint"] == weights_fingerprint(*policy.trained_modules())  # the encoder included
    assert metrics["after"]["picard"]["observations"] == 2 and metrics["trajectories"] == 4


def test_image_policy_refusals(image_run, capsys):
    root, data, *_ = image_run
    ckpt = root / "run"
    assert_refused(capsys, root, "eval", f"checkpoint={ckpt}", "task=pusht_image", "task.env_id=pcm/PushT-v0",
                   f"output_dir={root / 'eval'}", needles=["needs camera image img", "pcm/PushT-v0"])
    assert_refused(capsys, root, "export", str(ckpt), "--format", "lerobot", root / "exp",
                   needles=["policy.vision.kind='small_cnn'", "ResNet-18"])
    assert_refused(capsys, root, "export", str(ckpt), "--format", "diffusion-policy", root / "dp.ckpt",
                   needles=["policy.vision", "image policy"])
    assert_refused(capsys, root, "train", "task=pusht_image", f"dataset.path={data}", *TINY_CLI,
                   "policy.camera_keys=[]", f"output_dir={root / 'bad'}", needles=["policy.camera_keys"])


@pytest.mark.sim
def test_image_env_gives_gym_pushts_own_frame_and_the_controller_plans_from_it():
    import gymnasium as gym

    import envs  # noqa: F401  (registers the pcm ids)
    from pcm_policy.control.controller import Controller, ControllerConfig
    from pcm_policy.tasks import TASKS

    from gym_pusht.envs.pusht import PushTEnv

    env = gym.make(TASKS["pusht_image"].env_id, max_episode_steps=20, disable_env_checker=True)
    obs, info = env.reset(seed=100000)
    assert obs["obs"].dtype == np.float32 and obs["image"].dtype == np.uint8 and obs["image"].shape == (1, 3, 96, 96)
    np.testing.assert_array_equal(obs["obs"], info["state"][:2].astype(np.float32))
    assert env.observation_space.contains(obs)
    # the frame is gym-pusht's own `pixels_agent_pos` observation (what Diffusion Policy's image PushT and lerobot
    # see), from an independent gym-pusht env given the same seed and actions
    reference = PushTEnv(obs_type="pixels_agent_pos", observation_width=96, observation_height=96)
    theirs, _ = reference.reset(seed=100000)
    for action in (None, [300.0, 200.0], [120.0, 400.0]):
        if action is not None:
            obs, *_ = env.step(np.array(action, dtype=np.float32))
            theirs, *_ = reference.step(np.array(action))
        np.testing.assert_array_equal(obs["image"][0].transpose(1, 2, 0), theirs["pixels"])
        np.testing.assert_allclose(obs["obs"], theirs["agent_pos"], rtol=0, atol=1e-4)
        assert theirs["pixels"].std() > 5.0  # a scene, not a blank frame
    reference.close()
    env.reset(seed=100000)

    torch.manual_seed(0)
    vision = {**VISION, "image_shape": [96, 96], "crop_shape": [84, 84]}
    normalizer = Normalizer.fit({"obs": np.array([[0.0, 0.0], [512.0, 512.0]]),
                                 "action": np.array([[0.0, 0.0], [512.0, 512.0]])})
    policy = DiffusionPolicy(PolicyConfig(obs_dim=2, action_dim=2, vision=vision, camera_keys=["img"], **TINY),
                             normalizer).eval()
    controller = Controller(policy, SEQ_DDIM, ControllerConfig(fixed_latency_ms=50.0))
    log = controller.run_simulated(env, max_steps=12, seed=100000)
    assert len(log.chunks) >= 2 and log.rejected_observations == 0
    snapshot = controller.history_snapshot()
    assert snapshot["obs"].shape == (2, 2) and snapshot["image"].shape == (2, 1, 3, 96, 96)
    assert not snapshot["image"].flags.writeable


def test_resnet18_policy_exports_to_lerobot_and_imports_back_bit_for_bit(tmp_path, capsys):
    """The lerobot image layout (`diffusion.rgb_encoder.*` in lerobot's names, VISUAL features, MEAN_STD image
    statistics) written by our exporter and read by our importer gives back the same weights and chunks."""
    from pcm_policy import checkpoint as ckpt_io
    from pcm_policy.interop.lerobot import import_lerobot
    from pcm_policy.interop.lerobot_export import export_lerobot

    torch.manual_seed(3)
    vision = {"kind": "resnet18", "image_shape": [96, 96], "crop_shape": [84, 84], "num_keypoints": 4,
              "feature_dim": 8, "image_mean": [0.91, 0.87, 0.85], "image_std": [0.15, 0.171, 0.2]}
    rng = np.random.default_rng(3)
    normalizer = Normalizer.fit({"obs": rng.uniform(10, 500, (40, 2)), "action": rng.uniform(10, 505, (40, 2))})
    policy = DiffusionPolicy(PolicyConfig(obs_dim=2, action_dim=2, vision=vision, camera_keys=["img"],
                                          final_n_groups=8, **TINY), normalizer).eval()  # lerobot's final block: 8
    card = {"kind": "base", "task": "pusht_image", "env_id": None, "dataset": None, "abs_action": False,
            "policy": policy.config.to_dict()}
    ckpt_io.save_checkpoint(tmp_path / "ours", card, policy.weights())
    report = export_lerobot(tmp_path / "ours", tmp_path / "lerobot")
    cfg = json.loads((tmp_path / "lerobot" / "config.json").read_text())
    assert cfg["input_features"]["observation.image"] == {"type": "VISUAL", "shape": [3, 96, 96]}
    assert cfg["normalization_mapping"]["VISUAL"] == "MEAN_STD" and cfg["crop_shape"] == [84, 84]
    assert report["inexact_dims"] == 0

    back = import_lerobot(tmp_path / "lerobot")
    assert back.card["task"] == "pusht_image" and back.card["observation"]["kind"] == "lerobot_pusht_image"
    again = back.build_policy()
    assert again.config.camera_keys == ("observation.image",)
    theirs = again.weights()
    for key, value in policy.weights().items():  # lerobot keeps min/max, not mean/std: the map itself round-trips
        if key.startswith(("model.", "encoder.")) or key.endswith((".scale", ".offset", ".min", ".max")):
            assert torch.equal(theirs[key], value), key
    obs = {"obs": torch.rand(2, 2, 2) * 400 + 20,
           "image": torch.randint(0, 256, (2, 2, 1, 3, 96, 96), dtype=torch.uint8)}
    a = policy.predict_chunk(obs, SEQ_DDIM, generator=torch.Generator().manual_seed(0)).action_pred
    b = again.predict_chunk(obs, SEQ_DDIM, generator=torch.Generator().manual_seed(0)).action_pred
    assert torch.equal(a, b)

    # `pcm import` writes it as a checkpoint that `eval` runs in the image env (its cameras under lerobot's names)
    code, err = run_cli(capsys, "import", "lerobot", tmp_path / "lerobot", f"output_dir={tmp_path / 'imported'}")
    assert code == 0, err
    card = yaml.safe_load((tmp_path / "imported" / "policy.yaml").read_text())
    from pcm_policy.checkpoint import Card
    from pcm_policy.tasks import TASKS
    Card.open_base("checkpoint", str(tmp_path / "imported"), task="pusht_image").check_env_gives_cameras(
        TASKS["pusht_image"].env_id)
    assert card["policy"]["camera_keys"] == ["observation.image"]


def test_train_on_a_robomimic_image_file_with_two_cameras(tmp_path, capsys):
    """robomimic image hdf5 (agentview + eye-in-hand, 84x84, the robot's own state): one shared encoder over both
    cameras; the Lift env gives no images, so eval refuses the policy in one line."""
    from tests.fixtures import write_robomimic_image_fixture

    data = write_robomimic_image_fixture(tmp_path / "image.hdf5", lengths=(14, 12, 16), size=32)
    cameras = "policy.camera_keys=[agentview_image,robot0_eye_in_hand_image]"
    robot_state = "dataset.obs_keys=[robot0_eef_pos,robot0_eef_quat,robot0_gripper_qpos]"  # as DP's image tasks
    metrics = run_command("train", ["task=lift", f"dataset.path={data}", *TINY_CLI, cameras, robot_state,
                                    "train.steps=2",
                                    "train.batch_size=4", "train.warmup_steps=0", f"output_dir={tmp_path / 'run'}"])
    policy, card = load_policy(tmp_path / "run")
    assert metrics["steps"] == 2 and card["policy"]["obs_dim"] == 9  # eef pos 3 + quat 4 + gripper 2
    assert policy.config.step_cond_dim == 9 + 2 * 8
    capsys.readouterr()  # (the training's progress bar)
    assert_refused(capsys, tmp_path, "eval", f"checkpoint={tmp_path / 'run'}", "task=lift",
                   f"output_dir={tmp_path / 'eval'}", needles=["needs camera image agentview_image", "pcm/Lift-v0"])
