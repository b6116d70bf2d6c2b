"""robomimic image tasks (lift_image, can_image): the camera env, the image collector, training and eval in it."""
from __future__ import annotations

import json
import os
import warnings

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import h5py
import numpy as np
import pytest

from pcm_policy.tasks import ROBOMIMIC_CAMERAS, TASKS
from tests.fixtures import assert_refused

IMAGE_KEYS = ("agentview_image", "robot0_eye_in_hand_image")
ROBOT_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
# a tiny image policy on robomimic's 84x84 frames (the shipped config's encoder and cameras, small widths)
TINY = ["policy=unet_small_image_robomimic", "policy.down_dims=[16,32]", "policy.diffusion_step_embed_dim=16",
        "policy.n_groups=4", "policy.horizon=8", "policy.n_action_steps=4", "policy.vision.channels=[16,16]",
        "policy.vision.num_keypoints=4", "policy.vision.feature_dim=8", "device=cpu", "threads=1"]


def test_image_tasks_are_registered_with_the_robot_state_and_two_cameras():
    for name, robosuite_env in (("lift_image", "Lift"), ("can_image", "PickPlaceCan")):
        task = TASKS[name]
        assert task.env_id == f"pcm/{robosuite_env}-image-v0" and task.robosuite_env == robosuite_env
        assert task.cameras == IMAGE_KEYS and task.obs_layout == (("robot0_eef_pos", 3), ("robot0_eef_quat", 4),
                                                                  ("robot0_gripper_qpos", 2))
        assert task.dataset_path == f"data/{name}/{name}_expert.hdf5" and not task.dataset_shipped
        assert dict(task.observations[0].env_kwargs)["cameras"] == ROBOMIMIC_CAMERAS
        assert task.collect_command.startswith(f"pcm collect task={name} ")


def test_image_task_configs_compose_with_the_robomimic_image_policy():
    from pcm_policy.config import compose

    cfg = compose("train", ["task=lift_image", "policy=unet_small_image_robomimic"])
    assert cfg["task"]["env_id"] == "pcm/Lift-image-v0"
    assert cfg["dataset"]["path"] == "data/lift_image/lift_image_expert.hdf5"
    assert list(cfg["dataset"]["obs_keys"]) == list(ROBOT_KEYS)
    assert list(cfg["policy"]["camera_keys"]) == list(IMAGE_KEYS)
    assert list(cfg["policy"]["vision"]["image_shape"]) == [84, 84]


def test_a_missing_image_dataset_names_its_command(tmp_path, capsys):
    assert_refused(capsys, tmp_path, "train", "task=lift_image", "policy=unet_small_image_robomimic",
                   f"dataset.path={tmp_path / 'none.hdf5'}", f"output_dir={tmp_path / 'run'}",
                   needles=["none.hdf5"])


# ---------------------------------------------------------------------------------------------------------
# simulator (MuJoCo offscreen rendering)


@pytest.fixture(scope="module")
def camera_env():
    """A Lift env with both cameras (and the agentview render at the camera size, to compare), or a skip where
    this machine has no offscreen OpenGL - checked on GL itself, so any other failure of the env fails the tests."""
    pytest.importorskip("robosuite", reason="robosuite (robomimic extra) is not installed")
    from envs.robomimic_env import RobomimicLowDimEnv, offscreen_gl_error

    no_gl = offscreen_gl_error()
    if no_gl is not None:
        pytest.skip(f"no offscreen OpenGL (EGL/OSMesa) on this machine: {no_gl}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = RobomimicLowDimEnv("Lift", obs_keys=ROBOT_KEYS, cameras=ROBOMIMIC_CAMERAS,
                                 render_mode="rgb_array", render_size=(84, 84))
    yield env
    env.close()


def test_a_failure_of_the_camera_env_is_reworded_only_when_gl_is_missing(monkeypatch):
    """`robosuite.make` failing for another reason than GL surfaces as that failure (a regression is not a "needs
    offscreen rendering" skip); only where no GL context can be made does the env say so."""
    robosuite = pytest.importorskip("robosuite", reason="robosuite (robomimic extra) is not installed")
    import envs.robomimic_env as robomimic_env
    from pcm_policy.errors import PcmError

    def broken(*args, **kwargs):
        raise ValueError("a robosuite regression")
    monkeypatch.setattr(robosuite, "make", broken)
    monkeypatch.setattr(robomimic_env, "offscreen_gl_error", lambda: None)
    with pytest.raises(ValueError, match="a robosuite regression"):
        robomimic_env.RobomimicLowDimEnv("Lift", obs_keys=ROBOT_KEYS, cameras=ROBOMIMIC_CAMERAS)
    monkeypatch.setattr(robomimic_env, "offscreen_gl_error", lambda: "RuntimeError: no EGL display")
    with pytest.raises(PcmError, match="no offscreen OpenGL context can be made here .RuntimeError: no EGL display"):
        robomimic_env.RobomimicLowDimEnv("Lift", obs_keys=ROBOT_KEYS, cameras=ROBOMIMIC_CAMERAS)


@pytest.mark.sim
def test_camera_env_gives_upright_frames_beside_the_robot_state(camera_env):
    env = camera_env
    obs, info = env.reset(seed=3)
    assert env.observation_space.contains(obs) and set(obs) == {"obs", "image"}
    assert obs["obs"].shape == (9,) and obs["obs"].dtype == np.float32
    assert obs["image"].shape == (2, 3, 84, 84) and obs["image"].dtype == np.uint8
    frames = env.camera_frames()
    assert list(frames) == list(IMAGE_KEYS)
    for c, key in enumerate(IMAGE_KEYS):
        np.testing.assert_array_equal(obs["image"][c], frames[key].transpose(2, 0, 1))
        assert frames[key].std() > 5.0  # a scene, not a blank buffer
    # the same orientation as render() (the videos'): the agentview frame is the 84x84 render, upright
    np.testing.assert_array_equal(frames["agentview_image"], env.render())
    again, _ = env.reset(seed=3)
    np.testing.assert_array_equal(again["image"], obs["image"])  # rendering is deterministic
    moved, *_ = env.step(np.array([0, 0, 1.0, 0, 0, 0, 0]))
    assert not np.array_equal(moved["image"][1], obs["image"][1])  # the wrist camera moves with the arm


@pytest.fixture(scope="module")
def short_image_file(tmp_path_factory, camera_env):
    from envs.collect_robomimic import collect_robomimic

    path = tmp_path_factory.mktemp("robomimic_images") / "lift_image.hdf5"
    stats = collect_robomimic("lift", path, episodes=2, seed=5, keep_failed=True, progress=False, max_steps=10,
                              cameras=ROBOMIMIC_CAMERAS)
    return path, stats


@pytest.mark.sim
def test_collected_image_file_holds_compressed_upright_frames_and_reads_as_image_windows(short_image_file,
                                                                                          camera_env):
    from pcm_policy.data.image_dataset import ImageDataset
    from pcm_policy.data.robomimic import RobomimicFile

    path, stats = short_image_file
    assert stats["demos"] == 2
    with h5py.File(path, "r") as f:
        for key in IMAGE_KEYS:
            ds = f[f"data/demo_0/obs/{key}"]
            assert ds.shape == (10, 84, 84, 3) and ds.dtype == np.uint8
            assert ds.chunks == (1, 84, 84, 3) and ds.compression == "gzip"
            assert f"next_obs/{key}" not in f["data/demo_0"]  # next_obs stays low-dim
        kwargs = json.loads(f["data"].attrs["env_args"])["env_kwargs"]
        assert kwargs["use_camera_obs"] is True and kwargs["camera_names"] == list(ROBOMIMIC_CAMERAS)
        assert (kwargs["camera_heights"], kwargs["camera_widths"]) == (84, 84)
        first = {key: f[f"data/demo_0/obs/{key}"][0] for key in IMAGE_KEYS}
    camera_env.reset(seed=5)  # the first episode's reset seed: its first frames are what the env shows
    for key, frame in camera_env.camera_frames().items():
        np.testing.assert_array_equal(first[key], frame)
    with RobomimicFile(path) as f:
        assert f.env_args["env_name"] == "Lift"
    ds = ImageDataset.from_config("robomimic_hdf5", str(path), 8, 2, 4, val_ratio=0.0, camera_keys=list(IMAGE_KEYS))
    assert ds.camera_keys == IMAGE_KEYS and ds.image_shape == (84, 84)
    item = ds[0]
    assert item["image"].shape == (2, 2, 3, 84, 84) and item["obs"].shape == (2, 9)


@pytest.mark.sim
@pytest.mark.slow
def test_an_image_policy_trains_on_collected_frames_and_runs_in_the_camera_env(short_image_file, tmp_path):
    from pcm_policy.commands import run_command

    path, _ = short_image_file
    run_command("train", ["task=lift_image", f"dataset.path={path}", *TINY, "train.steps=2", "train.batch_size=4",
                          "train.warmup_steps=0", f"output_dir={tmp_path / 'run'}"])
    metrics = run_command("eval", [f"checkpoint={tmp_path / 'run'}", "task=lift_image", "episodes=1", "n_envs=1",
                                   "task.max_steps=8", "sampler=ddim", "sampler.steps=4", "threads=1", "videos=0",
                                   f"output_dir={tmp_path / 'eval'}"])
    assert metrics["episodes"] == 1 and metrics["task"] == "lift_image" and metrics["chunks"] == 2
