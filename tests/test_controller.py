"""Real-time controller: deadlines with a slow denoiser, simulated-clock queue semantics, NaN observations."""
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch

from pcm_policy.control import Controller, ControllerConfig
from pcm_policy.data.normalizer import Normalizer
from pcm_policy.policy import DiffusionPolicy, PolicyConfig
from pcm_policy.sampler_config import SamplerConfig
from pcm_policy.sampling import SamplerStats


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class CounterEnv(gym.Env):
    """1-D env whose observation is the step count; it records every action it receives."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    action_space = gym.spaces.Box(-1e9, 1e9, (2,), np.float32)

    def __init__(self, nan_at=None):
        self.nan_at = nan_at
        self.executed = []

    def reset(self, *, seed=None, options=None):
        self.t = 0
        self.executed = []
        return np.zeros(3, np.float32), {}

    def step(self, action):
        self.executed.append(np.asarray(action).copy())
        self.t += 1
        obs = np.full(3, self.t, np.float32)
        if self.t == self.nan_at:
            obs[1] = np.nan
        return obs, 0.0, False, False, {}


class ScriptedPolicy:
    """Chunk k's action for offset j is (k, j): lets a test see exactly which chunk played at which step."""

    def __init__(self, latency_clock=None):
        self.config = SimpleNamespace(n_obs_steps=2, n_action_steps=8, horizon=16)
        self.calls = 0
        self.seen_obs = []

    def predict_chunk(self, obs, sampler, generator=None, should_stop=None):
        self.seen_obs.append(obs.clone())
        pred = torch.zeros(1, 16, 2)
        pred[0, :, 0] = self.calls
        pred[0, :, 1] = torch.arange(16) - 1  # offset j at index To-1+j
        self.calls += 1
        return SimpleNamespace(action_pred=pred, stats=SamplerStats(iterations=1, evaluations=1, converged=True))


def test_simulated_clock_plays_queued_actions_while_computing():
    policy = ScriptedPolicy()
    ctrl = Controller(policy, sampler=None, config=ControllerConfig(control_hz=10, fixed_latency_ms=250, replan_steps=4))
    env = CounterEnv()
    log = ctrl.run_simulated(env, max_steps=20)
    played = [tuple(a.astype(int)) for a in env.executed]
    # chunk 0 at step 0 plays offsets 0..6; chunk 1 requested at step 4 is ready 3 steps later (250 ms at 10 Hz)
    assert played[:7] == [(0, j) for j in range(7)]
    assert played[7:15] == [(1, s - 4) for s in range(7, 15)]
    assert played[15:20] == [(2, s - 12) for s in range(15, 20)]
    assert [c.step for c in log.chunks] == [0, 4, 12, 20][:len(log.chunks)]
    assert all(c.late_steps == 0 for c in log.chunks) and log.held_steps == 0
    # the chunk requested at step 4 was planned from observations of steps 3 and 4
    assert policy.seen_obs[1][0, :, 0].tolist() == [3.0, 4.0]


def test_late_chunk_holds_last_action():
    ctrl = Controller(ScriptedPolicy(), sampler=None,
                      config=ControllerConfig(control_hz=10, fixed_latency_ms=650, replan_steps=4, budget_ms=1000))
    env = CounterEnv()
    log = ctrl.run_simulated(env, max_steps=12)
    assert log.chunks[1].late_steps == 3 and log.held_steps == 3
    played = [tuple(a.astype(int)) for a in env.executed]
    # chunk 1 is requested at step 4 and ready at step 11 (650 ms): the queue ran dry after step 7
    assert played[7:11] == [(0, 7)] * 4  # offset 7 played, then held for 3 steps
    assert played[11] == (1, 7)  # chunk 1 resumes at the current step, not at its stale start


def test_nan_observation_is_rejected_and_last_action_held():
    policy = ScriptedPolicy()
    ctrl = Controller(policy, sampler=None, config=ControllerConfig(control_hz=10, fixed_latency_ms=50, replan_steps=4))
    log = ctrl.run_simulated(CounterEnv(nan_at=4), max_steps=10)
    assert log.rejected_observations == 1
    assert all(torch.isfinite(o).all() for o in policy.seen_obs)
    assert policy.seen_obs[1][0, :, 0].tolist() == [2.0, 3.0]  # history kept the last good observations


def _tiny_policy():
    cfg = PolicyConfig(obs_dim=3, action_dim=2, down_dims=(8, 16), diffusion_step_embed_dim=16, n_groups=4)
    norm = Normalizer.fit({"obs": np.random.randn(50, 3), "action": np.random.randn(50, 2)})
    return DiffusionPolicy(cfg, norm).eval()


def test_deadline_returns_estimate_within_one_iteration():
    policy = _tiny_policy()
    clock = FakeClock()
    iteration_s = 0.030
    model = policy.model

    def slow_denoiser(x, t, cond):  # every batched network call costs 30 ms of (fake) time
        clock.t += iteration_s
        return model(x, t, cond)

    policy.denoiser = slow_denoiser
    sampler = SamplerConfig(name="picard", scheduler="ddpm", steps=100, tol=1e-6)
    ctrl = Controller(policy, sampler, ControllerConfig(control_hz=10, margin_ms=5), clock=clock)
    ctrl.reset(np.zeros(3, np.float32))
    actions, record = ctrl.plan(step=0, deadline_s=ctrl._budget_s(queued=4))
    assert record.deadline_ms == pytest.approx(95.0)
    assert not record.exact and record.deadline_missed
    assert record.iterations == 4  # 30, 60, 90 ms are under the deadline; the 4th iteration crosses it
    assert record.latency_ms <= record.deadline_ms + iteration_s * 1e3 + 1e-6
    assert np.isfinite(actions).all() and actions.shape == (12, 2)


def test_exact_chunk_within_budget_is_flagged_exact():
    policy = _tiny_policy()
    sampler = SamplerConfig(name="picard", scheduler="ddim", steps=4, tol=0.1)
    ctrl = Controller(policy, sampler, ControllerConfig(control_hz=10, budget_ms=10_000), clock=FakeClock())
    ctrl.reset(np.zeros(3, np.float32))
    _, record = ctrl.plan(step=0, deadline_s=ctrl._budget_s(queued=200))
    assert record.exact and not record.deadline_missed and record.iterations <= 4


def test_realtime_clock_runs_an_episode():
    ctrl = Controller(ScriptedPolicy(), sampler=None, config=ControllerConfig(control_hz=200, replan_steps=4))
    env = CounterEnv()
    log = ctrl.run_realtime(env, max_steps=24)
    assert log.steps == 24 and len(log.chunks) >= 3
    assert [tuple(a.astype(int)) for a in env.executed][:4] == [(0, j) for j in range(4)]


def test_anytime_estimate_stays_in_the_action_range():
    policy = _tiny_policy()
    obs = torch.zeros(1, 2, 3)
    chunk = policy.predict_chunk(obs, SamplerConfig(name="picard", scheduler="ddpm", steps=100, max_iters=2))
    assert not chunk.stats.converged
    low, high = policy.normalizer.unnormalize("action", torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))
    assert (chunk.action_pred >= low - 1e-5).all() and (chunk.action_pred <= high + 1e-5).all()


@pytest.mark.slow
def test_soak_10000_chunks_memory_and_accounting():
    """10,000 chunks with a fixed 50 ms latency: no drift in the step/chunk accounting, memory bounded per chunk."""
    import tracemalloc

    ctrl = Controller(ScriptedPolicy(), sampler=None, config=ControllerConfig(control_hz=10, fixed_latency_ms=50,
                                                                              replan_steps=4))
    env = CounterEnv()
    steps = 8 * 10_000
    tracemalloc.start()
    log = ctrl.run_simulated(env, max_steps=steps // 10)  # warm-up episode
    base, _ = tracemalloc.get_traced_memory()
    env.executed = []  # the test env's own record of actions is not the controller's memory
    log = ctrl.run_simulated(env, max_steps=steps)
    env.executed.clear()
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert log.steps == steps and len(log.chunks) == steps // 8 + 1
    assert [c.step for c in log.chunks[1:4]] == [4, 12, 20]  # the cadence never drifts
    assert log.chunks[-1].step == steps - 4
    assert sum(c.deadline_missed for c in log.chunks) == 0 and log.held_steps == 0
    assert (current - base) / len(log.chunks) < 2048  # only the per-chunk records grow
