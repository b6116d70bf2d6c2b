"""`pcm serve`, `pcm serve-bench` and `pcm eval server=...` from the command line: refusals before any work (one line,
exit 2), a clean shutdown on SIGINT/SIGTERM, and closed-loop PushT episodes with actions from a server.

Servers bind 127.0.0.1 at a free port only; request loops are bounded in count and time."""
import json
import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from pcm_policy.checkpoint import Card
from pcm_policy.commands import build_config, run_command
from pcm_policy.sampler_config import SamplerConfig
from pcm_policy.serving.client import PolicyClient
from pcm_policy.serving.served import load_served_policy
from pcm_policy.serving.server import BackgroundServer, PolicyServer
from tests.fixtures import assert_refused

DDIM10 = SamplerConfig(name="sequential", scheduler="ddim", steps=10)


@pytest.fixture
def no_key(monkeypatch):
    monkeypatch.delenv("PCM_SERVE_API_KEY", raising=False)


@pytest.fixture
def busy_port():
    """A port of 127.0.0.1 that another socket is listening on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("extra,needles", [
    (["host=0.0.0.0"], ["host=0.0.0.0: not a loopback address", "PCM_SERVE_API_KEY"]),
    (["host=example.org"], ["host=example.org: not a loopback address", "PCM_SERVE_API_KEY"]),
    (["backend=tensorrt"], ["backend='tensorrt'", "torch, onnx, auto"]),
    (["sampler=auto", "sampler.backends=[tensorrt]"], ["sampler.backends", "tensorrt"]),
    (["sampler=auto", "sampler.chunks=0"], ["sampler.chunks=0"]),
    (["sampler=auto", "pcm={base}"], ["pcm=", "not a PCM checkpoint"]),
    (["port=70000"], ["port=70000", "<= 65535"]),
    (["port=-1"], ["port=-1"]),
    (["max_batch=0"], ["max_batch=0"]),
    (["max_connections=0"], ["max_connections=0"]),
    (["batch_window_ms=-1"], ["batch_window_ms=-1"]),
    (["budget_ms=-5"], ["budget_ms=-5"]),
    (["control_hz=0"], ["control_hz=0"]),
    (["max_frame_mb=0"], ["max_frame_mb=0"]),
    (["sampler=pcm_lora"], ["sampler.pcm_checkpoint", "needs a PCM checkpoint"]),
    (["sampler=pcm_lora", "pcm={base}"], ["pcm=", "not a PCM checkpoint"]),
    (["sampler.steps=500"], ["sampler.steps=500"]),
])
def test_serve_refuses_bad_options_before_loading_anything(capsys, tmp_path, tiny_runs, no_work, no_key, extra,
                                                           needles):
    args = ["serve", f"checkpoint={tiny_runs / 'base'}", "port=0"] + [a.format(base=tiny_runs / "base") for a in extra]
    assert_refused(capsys, tmp_path, *args, needles=needles)


def test_serve_refuses_checkpoints_it_cannot_serve_and_a_busy_port(capsys, tmp_path, tiny_runs, no_work, no_key,
                                                                    busy_port):
    assert_refused(capsys, tmp_path, "serve", needles=["checkpoint: no checkpoint given"])
    assert_refused(capsys, tmp_path, "serve", f"checkpoint={tmp_path / 'nothing'}", needles=["checkpoint", "not found"])
    assert_refused(capsys, tmp_path, "serve", f"checkpoint={tiny_runs / 'pcm'}", needles=["is a PCM checkpoint"])
    assert_refused(capsys, tmp_path, "serve", f"checkpoint={tiny_runs / 'base'}", f"port={busy_port}",
                   needles=[f"port={busy_port}: cannot listen on 127.0.0.1:{busy_port}"])


def test_a_key_lets_serve_accept_its_options(tiny_runs, no_work, monkeypatch):
    monkeypatch.setenv("PCM_SERVE_API_KEY", "s3cret-xyz")
    config = build_config("serve", [f"checkpoint={tiny_runs / 'base'}", "port=0", "sampler=pcm_lora",
                                    "sampler.scheduler=ddim", "sampler.steps=8", f"pcm={tiny_runs / 'pcm'}",
                                    "budget_ms=50", "backend=onnx"])
    assert config.api_key == "s3cret-xyz" and "s3cret" not in repr(config)  # the key is never printed
    assert config.pcm_checkpoint == str(tiny_runs / "pcm") and config.sampler.name == "pcm_lora"
    assert config.backend == "onnx" and config.budget_ms == 50 and config.host == "127.0.0.1"


@pytest.mark.parametrize("extra,needles", [
    (["server=localhost:8000"], ["server='localhost:8000': expected a server address ws://HOST:PORT"]),
    (["server=ws://127.0.0.1"], ["expected a server address ws://HOST:PORT"]),
    (["server=ws://127.0.0.1:1", "checkpoint={base}"], ["leave out checkpoint="]),
    (["server=ws://127.0.0.1:1", "policy=expert"], ["leave out checkpoint= and policy=expert"]),
    (["server=ws://127.0.0.1:{closed}"], ["server=ws://127.0.0.1:{closed}: cannot connect"]),
])
def test_eval_server_refusals(capsys, tmp_path, tiny_runs, no_work, extra, needles):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    fill = {"base": tiny_runs / "base", "closed": closed}
    assert_refused(capsys, tmp_path, "eval", f"output_dir={tmp_path / 'out'}", *[a.format(**fill) for a in extra],
                   needles=[n.format(**fill) for n in needles])


def test_eval_refuses_a_server_of_another_task(capsys, tmp_path, tiny_runs):
    served = load_served_policy(Card.open_base("checkpoint", tiny_runs / "base"), DDIM10, None, "torch")
    with BackgroundServer(PolicyServer(served, port=0)) as server:
        assert_refused(capsys, tmp_path, "eval", f"server={server.url}", "task=lift", f"output_dir={tmp_path / 'o'}",
                       needles=[f"server={server.url}: serves a policy for task 'pusht', not task=lift"])


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_serve_shuts_down_cleanly_on_a_signal(tiny_runs, sig):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PCM_SERVE_API_KEY", None)
    process = subprocess.Popen([sys.executable, "-m", "pcm_policy.cli", "serve", f"checkpoint={tiny_runs / 'base'}",
                                "port=0", "device=cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)
    try:
        line = process.stdout.readline()  # blocks until the server listens (or exits)
        match = re.search(r"listening on (ws://127\.0\.0\.1:\d+)$", line.strip())
        assert match, (line, process.stderr.read() if process.poll() is not None else "")
        with PolicyClient(match.group(1)) as client:
            assert client.infer({"obs": np.zeros(20, np.float32)})["actions"].shape == (8, 2)
            assert isinstance(client.send_frame("text"), str)
        process.send_signal(sig)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "pcm serve: stopped; 1 chunks for 1 connections" in out and "1 frames refused" in out
    assert "Traceback" not in out + err
    assert all(line.startswith("pcm serve: ") for line in err.splitlines() if line.strip()), err


@pytest.mark.sim
def test_a_pusht_episode_with_actions_from_the_server(tmp_path, capsys):
    """The shipped PushT base (sequential DDIM-10) served on 127.0.0.1; `pcm eval server=...` runs one short episode
    through it (two envs, so two robots' requests can share a batch) and reports success, score and round trips."""
    served = load_served_policy(Card.open_base("checkpoint", "data/pusht/base"), DDIM10, None, "torch")
    with BackgroundServer(PolicyServer(served, port=0)) as server:
        metrics = run_command("eval", [f"server={server.url}", "episodes=2", "n_envs=2", "task.max_steps=24",
                                       "videos=0", f"output_dir={tmp_path}"])
    assert metrics["episodes"] == 2 and 0.0 <= metrics["score"] <= 1.0 and metrics["steps"] <= 48
    assert metrics["sampler"] == "sequential/ddim10" and metrics["server_policy"]["task"] == "pusht"
    assert metrics["chunks"] >= 6 and metrics["exact_fraction"] == 1.0 and metrics["iterations_mean"] == 10
    assert 0 < metrics["latency_ms_p50"] <= metrics["latency_ms_p99"]
    assert metrics["overhead_ms_p50"] >= 0 and set(metrics["batch_sizes"]) <= {1, 2}
    assert json.loads((tmp_path / "metrics.json").read_text())["latency_ms_p50"] == metrics["latency_ms_p50"]
    assert "round trip p50" in capsys.readouterr().out


class PerEnvNoiseAgent:
    """In process, what `pcm eval server=...` asks of the server: env i's chunks from its own generator seeded
    `seed + i`, one batched call per wave step."""

    def __init__(self, served, n_envs: int, seed: int):
        import torch

        self.served = served
        self.generators = [torch.Generator().manual_seed(seed + i) for i in range(n_envs)]

    def __call__(self, obs):
        histories = [{"obs": np.asarray(h, np.float32)} for h in obs]
        noises = [self.served.draw_noise(self.generators[i]) for i in range(len(obs))]
        return self.served.infer(histories, noises).actions


@pytest.mark.sim
def test_closed_loop_through_the_server_equals_in_process_with_the_same_noise(tmp_path):
    """PushT episodes through the server and in process with the same per-env noise streams end the same."""
    from pcm_policy.rollout.vectorized import rollout_policy

    served = load_served_policy(Card.open_base("checkpoint", "data/pusht/base"), DDIM10, None, "torch")
    local = rollout_policy(PerEnvNoiseAgent(served, 2, 100000), "pcm/PushT-v0", 2, 2, 2, 8, 40, progress=False)
    with BackgroundServer(PolicyServer(served, port=0)) as server:
        run_command("eval", [f"server={server.url}", "episodes=2", "n_envs=2", "task.max_steps=40", "videos=0",
                             f"output_dir={tmp_path}"])
    remote = [json.loads(line) for line in (tmp_path / "episodes.jsonl").read_text().splitlines()]
    for a, b in zip(local, remote):
        assert (a.seed, a.success, a.steps) == (b["seed"], b["success"], b["steps"])
        assert a.max_coverage == pytest.approx(b["max_coverage"], abs=1e-3)  # batches may round differently


@pytest.mark.slow
@pytest.mark.sim
def test_closed_loop_success_through_the_server_is_in_process_success(tmp_path):
    """50 PushT test episodes, sequential DDIM-10, through the server and in process with the same per-env noise:
    the same successes (measured: 50 of 50 episodes ended alike, success 0.74, score 0.880 both ways)."""
    from pcm_policy.rollout.results import summarize
    from pcm_policy.rollout.vectorized import rollout_policy

    served = load_served_policy(Card.open_base("checkpoint", "data/pusht/base"), DDIM10, None, "torch")
    local = summarize(rollout_policy(PerEnvNoiseAgent(served, 10, 100000), "pcm/PushT-v0", 50, 10, 2, 8, 300,
                                     progress=False), "pusht")
    with BackgroundServer(PolicyServer(served, port=0)) as server:
        remote = run_command("eval", [f"server={server.url}", "episodes=50", "videos=0", f"output_dir={tmp_path}"])
    assert abs(local["success_rate"] - remote["success_rate"]) <= 0.04, (local, remote)
    assert local["score"] == pytest.approx(remote["score"], abs=0.02)


@pytest.mark.integration
def test_serve_bench_runs_one_and_two_robots(tmp_path, tiny_runs, capsys):
    report = run_command("serve-bench", [f"checkpoint={tiny_runs / 'base'}", "clients=[1,2]", "requests=5",
                                         "max_seconds=30", "rate_hz=20", f"output_dir={tmp_path}", "device=cpu"])
    assert [r["clients"] for r in report["runs"]] == [1, 2] and all(not r["errors"] for r in report["runs"])
    assert [r["chunks"] for r in report["runs"]] == [5, 10]
    assert report["server"]["requests"] == 15 and report["observations"].endswith("from the checkpoint's dataset")
    assert "| robots | slowest robot Hz |" in capsys.readouterr().out
    assert json.loads((tmp_path / "metrics.json").read_text())["runs"][1]["clients"] == 2


def test_an_imported_policy_is_served_and_eval_picks_the_env_of_its_observation(tmp_path, capsys, no_key):
    """lerobot's PushT-keypoints policy, imported: 18-d observations (agent position + the T's 8 corners); the robot
    side of `pcm eval server=...` runs it in the env that gives them."""
    from pcm_policy.cli import main

    lerobot = tmp_path / "lerobot"
    assert main(["import", "lerobot", "tests/data/interop/lerobot_pusht_keypoints", f"output_dir={lerobot}"]) == 0
    config = build_config("serve", [f"checkpoint={lerobot}", "port=0"])
    served = load_served_policy(config.checkpoint, config.sampler, None, config.backend)
    with BackgroundServer(PolicyServer(served, port=0)) as server:
        with PolicyClient(server.url) as client:
            assert client.metadata["observation"] == {"obs": {"shape": [18], "dtype": "float32"}}
            assert client.metadata["policy"]["observation_kind"] == "lerobot_pusht_keypoints"
            assert client.infer({"obs": np.full(18, 200.0, np.float32)})["actions"].shape == (8, 2)
        eval_config = build_config("eval", [f"server={server.url}", f"output_dir={tmp_path / 'eval'}"])
    assert eval_config.task.env_id == "pcm/PushT-envstate-v0" and eval_config.server == server.url
