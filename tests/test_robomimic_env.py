"""robosuite-backed robomimic envs, scripted experts and demo collection."""
from __future__ import annotations

import json
import os

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from envs.collect_robomimic import split_train_valid
from envs.robomimic_env import canonical_task, default_env_args, parse_env_args
from pcm_policy.errors import DatasetError, PcmError

LIFT_KEYS = {"object": 10, "robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2}


def _robosuite():
    return pytest.importorskip("robosuite", reason="robosuite (robomimic extra) is not installed")


# ---------------------------------------------------------------------------------------------------------
# pure-python parts


def test_default_env_args_match_robomimic_conventions():
    for task, name in (("lift", "Lift"), ("Lift", "Lift"), ("can", "PickPlaceCan"), ("PickPlaceCan", "PickPlaceCan")):
        args = default_env_args(task)
        assert args["env_name"] == name and args["type"] == 1
        kw = args["env_kwargs"]
        assert kw["robots"] == ["Panda"] and kw["control_freq"] == 20
        assert kw["controller_configs"]["type"] == "OSC_POSE" and kw["controller_configs"]["control_delta"] is True
        assert kw["has_renderer"] is False and kw["use_camera_obs"] is False
        json.dumps(args)  # stored as JSON in the hdf5


def test_parse_env_args_accepts_json_and_alias_and_rejects_other_types():
    args = default_env_args("lift")
    assert parse_env_args(json.dumps(args)) == args
    alias = dict(args)
    alias.pop("type")
    alias["env_type"] = 1
    assert parse_env_args(alias)["env_name"] == "Lift"
    with pytest.raises(DatasetError):
        parse_env_args({**args, "type": 2})
    with pytest.raises(DatasetError):
        parse_env_args("{not json")
    with pytest.raises(PcmError):
        canonical_task("door")


def test_split_train_valid_is_deterministic_and_disjoint():
    names = [f"demo_{i}" for i in range(110)]
    a, b = split_train_valid(names, 0), split_train_valid(names, 0)
    assert a == b
    assert len(a["valid"]) == 11 and len(a["train"]) == 99
    assert set(a["train"]).isdisjoint(a["valid"]) and set(a["train"]) | set(a["valid"]) == set(names)
    assert split_train_valid(["demo_0", "demo_1"], 0)["valid"] and split_train_valid(["demo_0"], 0)["valid"] == []


# ---------------------------------------------------------------------------------------------------------
# simulator


@pytest.fixture(scope="module")
def rendering_works():
    """Whether this machine can make an offscreen OpenGL context (checked on GL itself: a rendering env that
    fails for another reason fails its test)."""
    _robosuite()
    from envs.robomimic_env import offscreen_gl_error

    return offscreen_gl_error() is None


@pytest.mark.sim
@pytest.mark.parametrize("env_id,dim", [pytest.param("pcm/Lift-v0", 19, marks=pytest.mark.slow),  # ~40 s of resets
                                        ("pcm/PickPlaceCan-v0", 23)])
def test_check_env(env_id, dim):
    import gymnasium as gym
    from gymnasium.utils.env_checker import check_env

    import envs  # noqa: F401  (registers the ids)

    env = gym.make(env_id)
    try:
        assert env.observation_space.shape == (dim,)
        assert env.action_space.shape == (7,)
        assert env.spec.max_episode_steps == 400
        # the render check re-creates an offscreen GL context at every hard reset (~20 s with software GL);
        # rendering is covered by test_render_returns_agentview_rgb instead
        check_env(env.unwrapped, skip_render_check=True)
        obs, info = env.reset(seed=100000)
        assert obs.dtype == np.float32 and obs.shape == (dim,) and info["is_success"] is False
        obs2, _ = env.reset(seed=100000)
        np.testing.assert_array_equal(obs, obs2)
        obs3, _ = env.reset(seed=100001)
        assert not np.array_equal(obs, obs3)
        obs, reward, terminated, truncated, info = env.step(np.zeros(7, dtype=np.float32))
        assert obs.shape == (dim,) and not terminated and not truncated and "is_success" in info
    finally:
        env.close()


@pytest.mark.sim
def test_render_returns_agentview_rgb(rendering_works):
    if not rendering_works:
        pytest.skip("no offscreen OpenGL (EGL/OSMesa) on this machine")
    from envs.robomimic_env import RobomimicLowDimEnv

    env = RobomimicLowDimEnv("Lift", render_mode="rgb_array", render_size=(48, 64))
    try:
        env.reset(seed=1)
        img = env.render()
        assert img.shape == (48, 64, 3) and img.dtype == np.uint8 and img.std() > 1.0
    finally:
        env.close()
    env = RobomimicLowDimEnv("Lift")  # no render_mode: no offscreen context, render() -> None
    try:
        env.reset(seed=1)
        assert env.render() is None
    finally:
        env.close()


@pytest.fixture(scope="module")
def short_lift_file(tmp_path_factory):
    _robosuite()
    from envs.collect_robomimic import collect_robomimic

    path = tmp_path_factory.mktemp("robomimic") / "lift_short.hdf5"
    stats = collect_robomimic("lift", path, episodes=2, seed=7, keep_failed=True, progress=False, max_steps=12)
    return path, stats


@pytest.mark.sim
def test_collected_lift_file_reads_back(short_lift_file):
    from pcm_policy.data.robomimic import RobomimicFile

    path, stats = short_lift_file
    assert path.exists() and stats["demos"] == 2 and stats["attempts"] == 2
    with RobomimicFile(path) as f:
        names = f.demo_names()
        assert names == ["demo_0", "demo_1"]
        assert sorted(f.demo_names("train") + f.demo_names("valid")) == names
        assert f.env_args == default_env_args("lift")
        assert f.obs_dims("demo_0", list(LIFT_KEYS)) == list(LIFT_KEYS.values())
        d = f.load_demo("demo_0")
        assert d["obs"].shape == (12, 19) and d["actions"].shape == (12, 7) and d["states"].shape == (12, 32)
        assert np.all(np.abs(d["actions"]) <= 1.0)
        g = f.demo_group("demo_0")
        assert int(g.attrs["num_samples"]) == 12
        assert g["dones"][()].tolist() == [0] * 11 + [1]
        assert g["rewards"].shape == (12,)
        for k, dim in LIFT_KEYS.items():
            assert g[f"next_obs/{k}"].shape == (12, dim)
        np.testing.assert_allclose(g["next_obs/robot0_eef_pos"][:-1], g["obs/robot0_eef_pos"][1:])


@pytest.mark.sim
def test_reset_to_recorded_state_reproduces_first_obs(short_lift_file):
    from envs.robomimic_env import RobomimicLowDimEnv
    from pcm_policy.data.robomimic import RobomimicFile

    path, _ = short_lift_file
    with RobomimicFile(path) as f:
        env_args = f.env_args
        demos = [f.load_demo(n) for n in f.demo_names()]
    env = RobomimicLowDimEnv(env_args=env_args)  # built from the file's env_args
    try:
        assert env.task == "Lift" and env.observation_space.shape == (19,)
        for d in demos:
            obs, info = env.reset(seed=999, options={"initial_state": d["states"][0]})
            np.testing.assert_allclose(obs, d["obs"][0], atol=1e-6)
            np.testing.assert_allclose(env.get_state(), d["states"][0])
            # replaying the recorded actions follows the recorded trajectory closely
            for a in d["actions"][:5]:
                obs, *_ = env.step(a)
            np.testing.assert_allclose(obs, d["obs"][5], atol=5e-3)
        with pytest.raises(DatasetError):
            env.reset(options={"initial_state": np.zeros(5)})
    finally:
        env.close()


@pytest.mark.slow
@pytest.mark.parametrize("task,seeds", [("lift", range(100000, 100005)), ("can", range(100000, 100002))])
def test_expert_solves_eval_seeds(task, seeds):
    _robosuite()
    from envs.robomimic_expert import evaluate_expert

    stats = evaluate_expert(task, seeds, verbose=False)
    assert stats["successes"] == len(seeds)


@pytest.mark.sim
def test_env_args_from_other_robomimic_versions_are_accepted():
    _robosuite()
    from envs.robomimic_env import RobomimicLowDimEnv

    args = default_env_args("lift")
    kw = args["env_kwargs"]
    kw.update(has_offscreen_renderer=True, use_camera_obs=True, camera_names=["agentview"], lite_physics=True)
    ctrl = kw["controller_configs"]
    ctrl["damping"] = ctrl.pop("damping_ratio")  # robomimic v0.1 files (robosuite 1.2 key names)
    ctrl["damping_limits"] = ctrl.pop("damping_ratio_limits")
    with pytest.warns(UserWarning, match="lite_physics"):
        env = RobomimicLowDimEnv(env_args=json.dumps(args))
    try:
        assert "lite_physics" not in env.make_kwargs and env.make_kwargs["use_camera_obs"] is False
        assert not env.can_render and env.observation_space.shape == (19,)
        obs, _ = env.reset(seed=3)
        assert obs.shape == (19,)
    finally:
        env.close()
