"""PushT env, geometry, multi-step wrapper, expert and collector."""
from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

import envs  # noqa: F401  (registers the ids)
from pcm_policy.tasks import TASKS
from envs import pusht_geometry as geo
from envs.multistep import MultiStepWrapper

# --------------------------------------------------------------------------------------------------------
# geometry (pure numpy)


def test_block_keypoints_shapes_and_layout():
    rng = np.random.default_rng(0)
    states = np.concatenate([rng.uniform(0, 512, (3, 4, 4)), rng.uniform(-4, 4, (3, 4, 1))], -1)
    kp = geo.block_keypoints(states)
    assert kp.shape == (3, 4, 9, 2)
    obs = geo.lowdim_obs_from_state(states)
    assert obs.shape == (3, 4, 20)
    np.testing.assert_allclose(obs[..., :18], kp.reshape(3, 4, 18))
    np.testing.assert_allclose(obs[..., 18:], states[..., :2])
    # rigid transform: pairwise distances equal those of the local map
    local = np.linalg.norm(geo.DP_KEYPOINTS_LOCAL[:, None] - geo.DP_KEYPOINTS_LOCAL[None], axis=-1)
    world = np.linalg.norm(kp[1, 2][:, None] - kp[1, 2][None], axis=-1)
    np.testing.assert_allclose(world, local, atol=1e-9)
    # angle 0 at origin (x, y): keypoints are the local map shifted
    kp0 = geo.block_keypoints(np.array([0, 0, 100.0, 200.0, 0.0]))
    np.testing.assert_allclose(kp0, geo.DP_KEYPOINTS_LOCAL + [100.0, 200.0])
    np.testing.assert_allclose(geo.lowdim_obs_from_keypoints(kp, states[..., :2]), obs)


def test_keypoint_map_lies_on_the_tee():
    # every keypoint is inside the T grown by the 2 px drawn outline plus the < 1 px jitter
    import shapely.geometry as sg

    tee = sg.Polygon(geo.TEE_OUTLINE_LOCAL).buffer(3.5)
    assert all(tee.contains(sg.Point(*p)) for p in geo.DP_KEYPOINTS_LOCAL)


def test_coverage_and_legacy_offset():
    assert geo.coverage(geo.GOAL_POSE) == pytest.approx(1.0)
    assert geo.coverage(geo.GOAL_POSE + [300, 0, 0]) == 0.0
    # translation along x by d uncovers d * (30 + 90) px^2 of the 6300 px^2 T (theta = 0 goal)
    goal = np.array([256.0, 256.0, 0.0])
    assert geo.coverage(goal + [2.0, 0, 0], goal) == pytest.approx(1 - 2.0 * 120 / 6300)
    # gym-pusht's documented example: reset_to_state [0, 10, 20, 30, 1] gives block (57.866196, 50.686398)
    np.testing.assert_allclose(np.array([20.0, 30.0]) + geo.legacy_reset_offset(1.0), [57.866196, 50.686398],
                               atol=1e-5)
    state = np.array([1.0, 2.0, 57.866196, 50.686398, 1.0])
    np.testing.assert_allclose(geo.to_legacy_reset_state(state)[2:4], [20.0, 30.0], atol=1e-5)


# --------------------------------------------------------------------------------------------------------
# multi-step wrapper (fake env, no simulator)


class _CountEnv(gym.Env):
    """obs = [t, t]; reward = the action's first entry; terminates at t == term_at; success at t == succ_at."""

    def __init__(self, term_at=100, succ_at=100):
        self.observation_space = spaces.Box(-1e6, 1e6, (2,), np.float32)
        self.action_space = spaces.Box(-1e6, 1e6, (1,), np.float32)
        self.term_at, self.succ_at = term_at, succ_at
        self.t = 0
        self.actions = []

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        self.actions = []
        return np.array([0, 0], np.float32), {"is_success": False, "t": 0}

    def step(self, action):
        self.t += 1
        self.actions.append(float(action[0]))
        obs = np.array([self.t, self.t], np.float32)
        return obs, float(action[0]), self.t >= self.term_at, False, {"is_success": self.t >= self.succ_at,
                                                                       "t": self.t}


def test_multistep_padding_and_stacking():
    env = MultiStepWrapper(_CountEnv(), n_obs_steps=3, n_action_steps=4)
    assert env.observation_space.shape == (3, 2) and env.action_space.shape == (4, 1)
    obs, info = env.reset(seed=0)
    np.testing.assert_array_equal(obs, np.zeros((3, 2)))  # padded by repeating the first observation
    obs, reward, term, trunc, info = env.step(np.array([[1.0], [5.0], [2.0], [0.0]]))
    np.testing.assert_array_equal(obs[:, 0], [2, 3, 4])  # the last three observations
    assert reward == 5.0  # max over the executed steps
    assert info["step_rewards"] == [1.0, 5.0, 2.0, 0.0] and info["n_executed"] == 4
    assert info["t"] == 4 and [i["t"] for i in info["step_infos"]] == [1, 2, 3, 4]
    assert not term and not trunc
    # one step after reset: history padded with the reset observation
    env.reset()
    obs, *_ = env.step(np.array([[1.0]]))
    np.testing.assert_array_equal(obs[:, 0], [0, 0, 1])


def test_multistep_early_stop_and_truncation():
    base = _CountEnv(term_at=3)
    env = MultiStepWrapper(base, n_obs_steps=2, n_action_steps=8)
    env.reset()
    obs, reward, term, trunc, info = env.step(np.arange(8, dtype=np.float32)[:, None])
    assert term and not trunc and info["n_executed"] == 3 and base.actions == [0, 1, 2]
    np.testing.assert_array_equal(obs[:, 0], [2, 3])

    base = _CountEnv(succ_at=2)
    env = MultiStepWrapper(base, n_obs_steps=2, n_action_steps=8)
    env.reset()
    _, _, term, trunc, info = env.step(np.ones((8, 1), np.float32))
    assert info["n_executed"] == 2 and info["is_success"] and not term  # success stops the chunk

    env = MultiStepWrapper(_CountEnv(), n_obs_steps=1, n_action_steps=4, max_episode_steps=6)
    env.reset()
    assert env.step(np.ones((4, 1)))[3] is False
    _, _, term, trunc, info = env.step(np.ones((4, 1)))
    assert trunc and not term and info["n_executed"] == 2 and env.elapsed_steps == 6

    env = MultiStepWrapper(_CountEnv(), 1, 3, reward_agg="sum")
    env.reset()
    assert env.step(np.array([[1.0], [2.0], [3.0]]))[1] == 6.0
    with pytest.raises(ValueError):
        MultiStepWrapper(_CountEnv(), 1, 1, reward_agg="median")


# --------------------------------------------------------------------------------------------------------
# simulator


@pytest.fixture
def pusht_env():
    env = gym.make(TASKS["pusht"].env_id)
    yield env
    env.close()


@pytest.mark.sim
def test_keypoint_map_matches_diffusion_policy_procedure():
    np.testing.assert_allclose(geo.derive_dp_keypoint_map(), geo.DP_KEYPOINTS_LOCAL, atol=1e-9)


@pytest.mark.sim
@pytest.mark.filterwarnings("ignore:.*symmetric and normalized space")
def test_check_env():
    from gymnasium.utils.env_checker import check_env

    env = gym.make(TASKS["pusht"].env_id)
    try:
        check_env(env.unwrapped, skip_render_check=False)
    finally:
        env.close()


@pytest.mark.sim
def test_seeding_render_and_info(pusht_env):
    obs1, info1 = pusht_env.reset(seed=100000)
    obs2, info2 = pusht_env.reset(seed=100000)
    np.testing.assert_array_equal(obs1, obs2)
    assert obs1.shape == (20,) and obs1.dtype == np.float32
    assert pusht_env.observation_space.contains(obs1)
    assert set(info1) >= {"is_success", "coverage", "state", "n_contacts"}
    assert info1["coverage"] == pytest.approx(geo.coverage(info1["state"][2:]), abs=1e-9)
    a = np.array([200.0, 300.0], np.float32)
    o1 = pusht_env.step(a)[0]
    pusht_env.reset(seed=100000)
    np.testing.assert_array_equal(pusht_env.step(a)[0], o1)
    frame = pusht_env.render()
    assert frame.ndim == 3 and frame.shape[2] == 3 and frame.dtype == np.uint8
    img = pusht_env.unwrapped.render_image()
    assert img.shape == (96, 96, 3) and img.dtype == np.uint8
    assert pusht_env.reset(seed=100001)[0].tolist() != obs1.tolist()


@pytest.mark.sim
def test_reset_to_state_is_exact(pusht_env):
    for state in ([100.0, 100.0, 200.0, 300.0, 1.0], [450.0, 60.0, 256.0, 256.0, math.pi / 4],
                  [50.0, 460.0, 300.0, 200.0, -2.5]):
        obs, info = pusht_env.reset(options={"reset_to_state": state})
        s = info["state"]
        np.testing.assert_allclose(s[:4], state[:4], atol=1e-9)
        assert geo.wrap_angle(s[4] - state[4]) == pytest.approx(0.0, abs=1e-12)
        np.testing.assert_allclose(obs, geo.lowdim_obs_from_state(np.array(state)), atol=1e-3)
    obs, info = pusht_env.reset(options={"reset_to_state": [400, 400, *geo.GOAL_POSE]})
    assert info["coverage"] == pytest.approx(1.0)


@pytest.mark.sim
def test_observation_equals_features_of_recorded_state(pusht_env):
    """The env's observation equals lowdim_obs_from_state(info['state']) at every step (dataset path)."""
    from envs.pusht_expert import PushTExpert

    obs, info = pusht_env.reset(seed=3)
    expert = PushTExpert(pusht_env.unwrapped)
    for _ in range(25):
        state32 = info["state"].astype(np.float32)  # what the collector stores
        np.testing.assert_allclose(obs, geo.lowdim_obs_from_state(info["state"]), atol=1e-3)
        np.testing.assert_allclose(obs, geo.lowdim_obs_from_state(state32), atol=2e-3)
        obs, _, term, trunc, info = pusht_env.step(expert.act(obs))
        assert pusht_env.observation_space.contains(obs)


@pytest.mark.sim
def test_collected_episode_round_trip_and_replay(tmp_path, pusht_env):
    from envs.collect_pusht import collect_pusht
    from pcm_policy.data.replay_buffer import ReplayBuffer

    path = tmp_path / "demo.zarr"
    stats = collect_pusht(path, episodes=1, seed=5, keep_failed=True, images=True, progress=False, max_steps=12)
    assert stats["episodes"] == 1 and stats["attempts"] == 1 and stats["steps"] == 12
    rb = ReplayBuffer.open(path)
    assert rb.n_episodes == 1
    ep = rb.get_episode(0)
    assert ep["state"].shape == (12, 5) and ep["state"].dtype == np.float32
    assert ep["action"].shape == (12, 2) and ep["keypoint"].shape == (12, 9, 2)
    assert ep["n_contacts"].shape == (12, 1) and ep["img"].shape == (12, 96, 96, 3) and ep["img"].dtype == np.uint8
    np.testing.assert_allclose(ep["keypoint"], geo.block_keypoints(ep["state"]), atol=1e-3)
    # the recorded first state comes from the seeded reset; reset_to_state reproduces its observation
    obs_seed, info_seed = pusht_env.reset(seed=5)
    np.testing.assert_allclose(info_seed["state"], ep["state"][0], atol=1e-4)
    obs, info = pusht_env.reset(options={"reset_to_state": ep["state"][0]})
    feats = geo.lowdim_obs_from_keypoints(ep["keypoint"][0], ep["state"][0, :2])
    np.testing.assert_allclose(obs, feats, atol=1e-3)
    np.testing.assert_allclose(obs, obs_seed, atol=1e-3)
    # replaying the recorded actions from the restored state follows the recorded states
    for t in range(1, 12):
        obs, _, _, _, info = pusht_env.step(ep["action"][t - 1])
        np.testing.assert_allclose(info["state"][:4], ep["state"][t, :4], atol=0.05)


def _expert_max_coverage(env, expert, seed: int, max_steps: int = 300) -> float:
    obs, info = env.reset(seed=seed)
    expert.reset()
    best = info["coverage"]
    for _ in range(max_steps):
        obs, _, term, trunc, info = env.step(expert.act(obs))
        best = max(best, info["coverage"])
        if term or trunc:
            break
    return best


@pytest.mark.sim
def test_expert_solves_a_short_eval_seed(pusht_env):
    from envs.pusht_expert import PushTExpert

    assert _expert_max_coverage(pusht_env, PushTExpert(pusht_env.unwrapped), seed=100003) >= 0.95


@pytest.mark.sim
@pytest.mark.slow
def test_expert_success_rate_on_eval_seeds(pusht_env):
    from envs.pusht_expert import PushTExpert

    expert = PushTExpert(pusht_env.unwrapped)
    covs = [_expert_max_coverage(pusht_env, expert, seed) for seed in range(100000, 100010)]
    assert np.mean(np.asarray(covs) >= 0.95) >= 0.7
