"""`sampler=auto`: it times exact candidates on a tiny policy, records the table, never chooses an inexact
candidate, and refuses bad settings in one line; eval, demo and the controller accept it."""
import json

import pytest
import torch

from pcm_policy.auto_sampler import AutoSettings, choose_sampler, pick_candidate
from pcm_policy.checkpoint import load_policy, resolve_checkpoint
from pcm_policy.commands import run_composed
from pcm_policy.config import compose
from pcm_policy.errors import ConfigError
from pcm_policy.observations import sample_observations
from pcm_policy.sampler_config import SamplerConfig

CANDIDATE_KEYS = {"stage", "sampler", "schedule", "tol", "backend", "threads", "p50_ms", "p99_ms", "rounds", "max_dev",
                  "p99_dev", "exact", "fits_budget", "status"}


@pytest.fixture(scope="module")
def tiny(tiny_runs):
    policy, _ = load_policy(tiny_runs / "base", torch.device("cpu"))
    return policy, sample_observations(resolve_checkpoint(tiny_runs / "base"), 3, 0)


def settings(**overrides):
    return AutoSettings.from_mapping({"name": "auto", "scheduler": "ddpm", "steps": 8, "backends": ["torch"],
                                      "chunks": 3, "warmup": 0, **overrides})


def test_auto_chooses_an_exact_candidate_and_records_the_table(tiny, tiny_runs, capsys):
    policy, obs = tiny
    s = settings(pcm_checkpoint=str(tiny_runs / "pcm_ddpm8"), tols=[0.1, 0.0])
    sampler, choice = choose_sampler(policy, s, obs, budget_ms=1e4)
    record = choice.to_dict()
    assert set(record) >= {"candidates", "chosen", "budget_ms", "deviation_bound", "chunks", "seconds"}
    names = {c["sampler"] for c in record["candidates"]}
    assert names == {"sequential", "picard", "picard+aa+x0c", "pcm_lora", "pcm_lora+aa"}
    ref = record["candidates"][0]
    assert (ref["sampler"], ref["backend"], ref["max_dev"]) == ("sequential", "torch", 0.0)  # the reference
    for c in record["candidates"]:
        assert CANDIDATE_KEYS <= set(c) and c["schedule"] == "ddpm8"
        if c["status"] == "timed":
            assert c["p50_ms"] <= c["p99_ms"] and c["exact"] == (c["max_dev"] <= s.deviation_bound)
    chosen = record["chosen"]
    assert chosen["exact"] and chosen["max_dev"] <= s.deviation_bound and chosen["fits_budget"]
    assert sampler.config == SamplerConfig(**chosen["config"]) and sampler.label == f"{chosen['sampler']}/ddpm8"
    final = [c for c in record["candidates"] if c["stage"] == "final"]
    screened = [c for c in record["candidates"] if c["stage"] == "screen"]
    assert 1 <= len(final) <= 3 and chosen["stage"] == "final"  # the fastest exact of the screen, timed again
    assert all(c["exact"] for c in final) and chosen["p50_ms"] == min(c["p50_ms"] for c in final)
    assert {(c["sampler"], c["tol"], c["backend"]) for c in final} <= {
        (c["sampler"], c["tol"], c["backend"]) for c in screened if c["exact"]}
    assert json.loads(json.dumps(record)) == record  # metrics.json-ready
    out = capsys.readouterr().out
    assert "sampler=auto:" in out and f"chosen: {chosen['sampler']}" in out


def test_auto_never_chooses_an_inexact_candidate(tiny):
    """A tol so loose that Picard stops after its first round: fast and far from sequential, never chosen."""
    policy, obs = tiny
    _, choice = choose_sampler(policy, settings(tols=[1e9], deviation_bound=1e-6), obs, budget_ms=1e4, echo=False)
    inexact = [c for c in choice.candidates if c["status"] == "timed" and not c["exact"]]
    assert inexact and all(c["rounds"] == 1 and c["max_dev"] > 1e-6 for c in inexact)
    assert choice.chosen["sampler"] == "sequential" and choice.chosen["exact"]


def test_the_choice_rule():
    c = lambda p50, exact, fits: {"p50_ms": p50, "exact": exact, "fits_budget": fits}  # noqa: E731
    assert pick_candidate([c(10, True, True), c(1, False, True), c(5, True, True)]) == (2, True)
    assert pick_candidate([c(10, True, False), c(1, False, True), c(50, True, True)]) == (2, True)
    assert pick_candidate([c(10, True, False), c(5, True, False), c(1, False, True)]) == (1, False)
    with pytest.raises(ValueError):
        pick_candidate([c(1, False, True)])


def test_auto_over_budget_takes_the_fastest_exact_and_notes_it(tiny):
    policy, obs = tiny
    _, choice = choose_sampler(policy, settings(tols=[0.0]), obs, budget_ms=1e-3, echo=False)
    assert choice.chosen["exact"] and not choice.chosen["fits_budget"]
    assert any("fits the" in n for n in choice.notes)


def test_auto_thread_counts_are_a_candidate_dimension(tiny):
    policy, obs = tiny
    before = torch.get_num_threads()
    try:
        _, choice = choose_sampler(policy, settings(tols=[0.0], threads=[1, 2]), obs, budget_ms=1e4, echo=False)
        assert {c["threads"] for c in choice.candidates if c["stage"] == "screen"} == {1}
        assert {c["threads"] for c in choice.candidates if c["stage"] == "final"} == {1, 2}
        assert torch.get_num_threads() == choice.chosen["threads"]  # left at the chosen count
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("override,match", [
    ({"backends": ["torch", "tensorflow"]}, "sampler.backends"), ({"backends": []}, "sampler.backends"),
    ({"backends": ["torch", "torch"]}, "twice"), ({"backends": "onnx"}, "sampler.backends"),
    ({"threads": [0]}, "sampler.threads.0"), ({"threads": [1, 1]}, "sampler.threads"),
    ({"tols": []}, "sampler.tols"), ({"chunks": 0}, "sampler.chunks"), ({"deviation_bound": 0}, "deviation_bound"),
    ({"accelerated": {"memory": 0}}, "memory"), ({"accelerated": {"windw": 3}}, "windw"), ({"colour": 1}, "colour"),
    ({"pcm_checkpoint": 7}, "sampler.pcm_checkpoint"),
])
def test_auto_refuses_bad_settings_in_one_line(override, match):
    with pytest.raises(ConfigError, match=match) as e:
        settings(**override)
    assert "\n" not in str(e.value)


def test_auto_refuses_a_pcm_for_another_schedule(tiny_runs):
    with pytest.raises(ConfigError, match="ddpm8"):
        from pcm_policy.auto_sampler import check_auto

        check_auto({"name": "auto", "scheduler": "ddim", "steps": 4, "pcm_checkpoint": str(tiny_runs / "pcm_ddpm8")},
                   "sampler", 100)


def test_a_sampler_config_named_auto_points_to_choose_sampler():
    with pytest.raises(ConfigError, match="sampler=auto.*choose_sampler"):
        SamplerConfig.from_mapping({"name": "auto"})


@pytest.mark.sim
def test_eval_accepts_sampler_auto(tiny_runs, tmp_path):
    cfg = compose("eval", [f"checkpoint={tiny_runs / 'base'}", "sampler=auto", "sampler.scheduler=ddim",
                           "sampler.steps=4", "sampler.backends=[torch]", "sampler.chunks=2", "episodes=1", "n_envs=1",
                           "videos=0", "task.max_steps=8", f"output_dir={tmp_path}", "device=cpu"])
    metrics = run_composed("eval", cfg)
    auto = json.loads((tmp_path / "metrics.json").read_text())["auto"]
    assert auto["chosen"]["exact"] and len(auto["candidates"]) >= 3
    assert metrics["sampler"] == f"{auto['chosen']['sampler']}/ddim4"


def test_auto_times_every_backend(tiny):
    """The default backends: each candidate under torch, onnx and auto routing, all against torch sequential."""
    policy, obs = tiny
    s = AutoSettings.from_mapping({"name": "auto", "scheduler": "ddim", "steps": 4, "chunks": 2, "tols": [0.0]})
    assert s.backends == ("torch", "onnx", "auto")
    sampler, choice = choose_sampler(policy, s, obs, budget_ms=1e4, echo=False)
    screened = [c for c in choice.candidates if c["stage"] == "screen"]
    assert {(c["sampler"], c["backend"]) for c in screened} == {
        (name, b) for name in ("sequential", "picard", "picard+aa") for b in ("torch", "onnx", "auto")}
    for c in screened:
        if c["status"] == "timed":  # tol 0 and sequential: exact on every backend, to float rounding
            assert c["max_dev"] < 1e-4 and c["exact"]
    assert sampler.backend == choice.chosen["backend"]


def test_the_controller_runs_auto_s_choice():
    """The real-time controller takes the sampler `choose_sampler` returns like any other."""
    import numpy as np

    from pcm_policy.control import Controller, ControllerConfig
    from tests.test_controller import CounterEnv, _tiny_policy

    policy = _tiny_policy()
    obs = torch.randn(3, 2, 3)
    s = AutoSettings.from_mapping({"name": "auto", "scheduler": "ddim", "steps": 4, "chunks": 3, "tols": [0.0],
                                   "backends": ["torch", "onnx"]})
    sampler, choice = choose_sampler(policy, s, obs, budget_ms=1e4, echo=False)
    ctrl = Controller(policy, sampler, ControllerConfig(control_hz=10, budget_ms=10_000))
    log = ctrl.run_simulated(CounterEnv(), max_steps=20)
    assert log.steps == 20 and log.chunks and all(c.exact for c in log.chunks)
    assert all(c.iterations <= 4 + 1 for c in log.chunks)
    assert np.isfinite(np.asarray([c.latency_ms for c in log.chunks])).all() and choice.chosen["exact"]
