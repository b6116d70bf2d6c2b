"""Real-time controller: deadlines with a slow denoiser, simulated-clock queue semantics, NaN observations,
the real-time loop under stress (thousands of steps with a worker thread), one clock for deadlines and latency."""
import time
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
    """Chunk k's action for offset j is (k, j): lets a test see exactly which chunk played at which step.

    `delay_s`: each chunk sleeps this long first (a slow sampler for the real-time loop).
    """

    def __init__(self, delay_s=0.0):
        self.config = SimpleNamespace(n_obs_steps=2, n_action_steps=8, horizon=16)
        self.calls = 0
        self.seen_obs = []
        self.delay_s = delay_s

    def predict_chunk(self, obs, sampler, generator=None, should_stop=None):
        time.sleep(self.delay_s)
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


def assert_consistent_run(policy, env, log):
    """Every chunk was planned from the observations of its request step s (steps s-1 and s of CounterEnv), and
    every executed action is the newest ready chunk's action for that step, or a hold of the previous action."""
    requested = [c.step for c in log.chunks]
    for k, step in enumerate(requested):
        assert policy.seen_obs[k][0, :, 0].tolist() == [max(step - 1, 0), step], f"chunk {k} requested at {step}"
    played = [tuple(a.astype(int)) for a in env.executed]
    assert len(played) == log.steps
    held, newest = 0, 0
    for s, (k, j) in enumerate(played):
        if s > 0 and (k, j) == played[s - 1]:
            held += 1  # the queue ran dry: the last action is held
            continue
        assert k >= newest, f"step {s}: chunk {k} played after chunk {newest}"
        newest = k
        assert j == s - requested[k], f"step {s}: chunk {k} (requested at {requested[k]}) played offset {j}"
    assert held == log.held_steps


@pytest.mark.integration
def test_realtime_clock_runs_an_episode():
    policy = ScriptedPolicy()
    ctrl = Controller(policy, sampler=None, config=ControllerConfig(control_hz=200, replan_steps=4))
    env = CounterEnv()
    log = ctrl.run_realtime(env, max_steps=24)
    assert log.steps == 24 and len(log.chunks) >= 3
    assert [tuple(a.astype(int)) for a in env.executed][:4] == [(0, j) for j in range(4)]
    assert_consistent_run(policy, env, log)


@pytest.mark.integration
def test_realtime_stress_worker_plans_from_the_history_at_request():
    """Thousands of 1 ms control steps while a slow worker (2 ms per chunk) plans: the loop appends observations
    during every chunk. Each chunk must see the history as it was when requested (the controller hands the
    worker a copy), never a later or torn one, and the action queue must stay consistent."""
    policy = ScriptedPolicy(delay_s=0.002)
    ctrl = Controller(policy, sampler=None, config=ControllerConfig(control_hz=1000, replan_steps=4, margin_ms=0))
    env = CounterEnv()
    log = ctrl.run_realtime(env, max_steps=3000)
    # ~one chunk per Ta = 8 steps when the machine keeps up; fewer when it is loaded (chunks late, actions held)
    assert log.steps == 3000 and len(log.chunks) > 100
    assert_consistent_run(policy, env, log)


def test_fixed_latency_drives_deadline_checks_and_latency_records():
    """With fixed_latency_ms the sampler's deadline check reads the same (fixed) clock as the latency record:
    a chunk longer than its deadline stops after the first iteration and is a miss, on any machine; a shorter
    one runs to convergence. The outcome does not depend on the real time the sampler took."""
    policy = _tiny_policy()
    sampler = SamplerConfig(name="picard", scheduler="ddpm", steps=100, tol=1e-6)
    records = {}
    for fixed_ms in (50.0, 200.0):
        ctrl = Controller(policy, sampler, ControllerConfig(control_hz=10, margin_ms=5, fixed_latency_ms=fixed_ms))
        ctrl.reset(np.zeros(3, np.float32))
        _, records[fixed_ms] = ctrl.plan(step=0, deadline_s=ctrl._budget_s(queued=4))  # deadline 95 ms
    late, on_time = records[200.0], records[50.0]
    assert late.latency_ms == 200.0 and late.deadline_missed and not late.exact and late.iterations == 1
    assert on_time.latency_ms == 50.0 and not on_time.deadline_missed and on_time.exact and on_time.iterations > 1


def test_clock_argument_accepts_a_chunk_clock():
    from pcm_policy.control.clock import FixedLatencyClock, MeasuredClock

    ctrl = Controller(ScriptedPolicy(), sampler=None, config=ControllerConfig(control_hz=10, replan_steps=4),
                      clock=FixedLatencyClock(0.25))
    log = ctrl.run_simulated(CounterEnv(), max_steps=12)
    assert [c.latency_ms for c in log.chunks] == [250.0, 250.0] and [c.step for c in log.chunks] == [0, 4]
    fake = FakeClock()
    watch = MeasuredClock(fake).start()
    fake.t += 0.125
    assert watch() == 0.125
    with pytest.raises(ValueError, match="latency"):
        FixedLatencyClock(-1.0)


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
