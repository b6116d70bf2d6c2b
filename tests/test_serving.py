"""`pcm serve`'s server on 127.0.0.1 (a free port): metadata, round trips, chunks equal to the in-process ones for the
same history and noise, every bad frame, the size limit, the API key, concurrent and slow clients, deadlines.

Every server here binds 127.0.0.1 at port 0; every request loop is bounded in count and each reply waits at most
30 s (`PolicyClient`'s timeout)."""
import threading
import time

import numpy as np
import pytest
import torch

from pcm_policy.checkpoint import Card
from pcm_policy.errors import ConfigError, PcmError
from pcm_policy.sampler_config import SamplerConfig
from pcm_policy.serving import wire
from pcm_policy.serving.client import PolicyClient, ServerError
from pcm_policy.serving.served import load_served_policy
from pcm_policy.serving.server import BackgroundServer, PolicyServer

DDIM10 = SamplerConfig(name="sequential", scheduler="ddim", steps=10)


@pytest.fixture(scope="module")
def served(tiny_runs):
    """The tiny PushT base, sequential DDIM-10 (20-d observations, chunks of 8 x 2 actions)."""
    return load_served_policy(Card.open_base("checkpoint", tiny_runs / "base"), DDIM10, None, "torch")


def start(served, **kwargs) -> BackgroundServer:
    return BackgroundServer(PolicyServer(served, host="127.0.0.1", port=0, **kwargs))


def observations(served, n: int, seed: int) -> np.ndarray:
    """n PushT-shaped observation steps inside the normalizer's range, float32 (n, 20)."""
    u = torch.rand(n, served.policy.config.obs_dim, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return served.policy.normalizer.unnormalize("obs", u).numpy().astype(np.float32)


def in_process(served, history: np.ndarray, generator: torch.Generator) -> np.ndarray:
    """The chunk `pcm eval` would sample for this (To, Do) history with this generator."""
    chunk = served.policy.predict_chunk(torch.from_numpy(history)[None], served.sampler, generator=generator)
    return chunk.action[0].numpy()


def test_metadata_and_reply(served, tiny_runs):
    with start(served) as server, PolicyClient(server.url) as client:
        meta = client.metadata
        reply = client.infer({"obs": observations(served, 1, 0)[0]})
    assert meta["observation"] == {"obs": {"shape": [20], "dtype": "float32"}}
    assert meta["action"]["shape"] == [8, 2] and len(meta["action"]["low"]) == 2
    assert all(lo < hi for lo, hi in zip(meta["action"]["low"], meta["action"]["high"]))
    assert meta["n_obs_steps"] == 2 and meta["control_hz"] == 10.0 and meta["budget_ms"] == 100.0
    assert meta["sampler"] == "sequential/ddim10" and meta["backend"] == "torch"
    assert meta["policy"]["task"] == "pusht" and meta["policy"]["name"] == str(tiny_runs / "base")
    assert meta["policy"]["fingerprint"] == served.fingerprint and len(served.fingerprint) == 16
    assert meta["policy"]["observation_kind"] == "dp_pusht_lowdim" and meta["max_frame_bytes"] > 1 << 20
    assert reply["actions"].shape == (8, 2) and reply["actions"].dtype == np.float32
    assert reply["rounds"] == 10 and reply["exact"] is True and reply["batch_size"] == 1
    timing = reply["server_timing"]
    assert timing["infer_ms"] > 0 and 0 <= timing["encode_ms"] <= timing["infer_ms"] and timing["queue_ms"] >= 0


def test_served_chunks_equal_in_process_chunks_for_the_same_history_and_noise(served):
    """One step per request (history padded at the start, then sliding), a whole history, a seed restart; a second
    connection starts from the same seed and none of the first connection's history."""
    o = observations(served, 3, 1)
    generator = torch.Generator().manual_seed(0)  # the server's seed
    with start(served, seed=0) as server:
        with PolicyClient(server.url) as client:
            got = [client.infer({"obs": o[0]})["actions"], client.infer({"obs": o[1]})["actions"],
                   client.infer({"obs": np.stack([o[2], o[0]]), "seed": 7})["actions"],
                   client.infer({"obs": o[1], "reset": True})["actions"]]
        with PolicyClient(server.url) as other:
            fresh = other.infer({"obs": o[0]})["actions"]
    want = [in_process(served, np.stack([o[0], o[0]]), generator),
            in_process(served, np.stack([o[0], o[1]]), generator)]
    seeded = torch.Generator().manual_seed(7)
    want += [in_process(served, np.stack([o[2], o[0]]), seeded), in_process(served, np.stack([o[1], o[1]]), seeded)]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-4)
    np.testing.assert_allclose(fresh, want[0], rtol=0, atol=1e-4)
    assert not np.allclose(got[0], got[1])  # the noise stream moves on from chunk to chunk


BAD_FRAMES = [  # (frame, the start of the one-line reply)
    (b"\x00\xffnot msgpack", "frame: not a msgpack message"),
    ("a text frame", "frame: a text frame"),
    (wire.pack([1, 2, 3]), "frame: expected a map"),
    (wire.pack({}), "obs: missing"),
    (wire.pack({"obs": np.zeros(20, np.float32), "state": np.zeros(2)}), "state: unknown key"),
    (wire.pack({"obs": np.zeros(19, np.float32)}), "obs: shape (19,)"),
    (wire.pack({"obs": np.zeros((3, 20), np.float32)}), "obs: shape (3, 20)"),
    (wire.pack({"obs": np.zeros(20, np.int32)}), "obs: dtype int32"),
    (wire.pack({"obs": np.full(20, np.nan, np.float32)}), "obs: contains NaN or inf"),
    (wire.pack({"obs": np.full(20, np.inf)}), "obs: contains NaN or inf"),
    (wire.pack({"obs": [0.0] * 20}), "obs: expected an array"),
    (wire.pack({"obs": np.zeros(20, np.float32), "reset": "yes"}), "reset: expected true or false"),
    (wire.pack({"obs": np.zeros(20, np.float32), "seed": 1.5}), "seed: expected an integer"),
    (wire.pack({"obs": {b"__ndarray__": True, b"data": b"\x00" * 8, b"dtype": "|O", b"shape": [1]}}),
     "obs: array dtype '|O'"),
    (wire.pack({"obs": {b"__ndarray__": True, b"data": b"\x00" * 3, b"dtype": "<f4", b"shape": [20]}}),
     "obs: array data"),
]


def test_every_bad_frame_gets_one_error_line_and_the_connection_is_served_after_it(served, capfd):
    good = {"obs": observations(served, 1, 2)[0]}
    with start(served) as server, PolicyClient(server.url) as client:
        for frame, start_of_reply in BAD_FRAMES:
            reply = client.send_frame(frame)
            assert isinstance(reply, str) and reply.startswith(start_of_reply) and "\n" not in reply, reply
            assert client.infer(good)["actions"].shape == (8, 2)  # the next frame on this connection is served
        with pytest.raises(ServerError, match="obs: contains NaN"):  # as openpi-client raises on a text reply
            client.infer({"obs": np.full(20, np.nan, np.float32)})
        summary = server.server.summary()
    assert summary["bad_frames"] == len(BAD_FRAMES) + 1 and summary["requests"] == len(BAD_FRAMES)
    assert "Traceback" not in "".join(capfd.readouterr())


def test_a_frame_over_the_size_limit_closes_that_connection_only(served, capfd):
    with start(served, max_frame_bytes=4096) as server:
        assert server.server.metadata["max_frame_bytes"] == 4096
        with PolicyClient(server.url) as flooder, PolicyClient(server.url) as robot:
            with pytest.raises(PcmError, match="1009"):
                flooder.send_frame(b"\x00" * 5000)
            with pytest.raises(PcmError, match="connection closed"):
                flooder.infer({"obs": np.zeros(20, np.float32)})
            assert robot.infer({"obs": observations(served, 1, 3)[0]})["actions"].shape == (8, 2)
    assert "Traceback" not in "".join(capfd.readouterr())


def test_api_key_is_checked_in_the_handshake(served):
    with start(served, api_key="s3cret key") as server:
        for key in (None, "wrong", "s3cret"):
            with pytest.raises(PcmError, match="HTTP 401"):
                PolicyClient(server.url, api_key=key)
        with PolicyClient(server.url, api_key="s3cret key") as client:
            assert client.infer({"obs": np.zeros(20, np.float32)})["actions"].shape == (8, 2)


def test_connections_beyond_the_limit_are_refused_with_503(served):
    with start(served, max_connections=1) as server:
        with PolicyClient(server.url) as first:
            with pytest.raises(PcmError, match="HTTP 503"):
                PolicyClient(server.url)
            assert first.infer({"obs": np.zeros(20, np.float32)})["actions"].shape == (8, 2)
        for _ in range(100):  # the server sees the close a moment later
            if server.server.open_connections == 0:
                break
            time.sleep(0.02)
        with PolicyClient(server.url) as again:
            assert again.metadata["n_obs_steps"] == 2


def test_no_key_means_loopback_only(served):
    with pytest.raises(ConfigError, match="host=0.0.0.0: not a loopback address; set PCM_SERVE_API_KEY"):
        PolicyServer(served, host="0.0.0.0", port=0)  # refused before anything binds


def test_four_concurrent_clients_are_batched_and_each_gets_its_own_chunks(served, monkeypatch):
    """Four robots send together; the worker is slowed a little so their requests meet in the queue. Each reply is
    the chunk of that robot's own history and noise stream."""
    infer = served.infer

    def slow_infer(*args, **kwargs):
        time.sleep(0.02)
        return infer(*args, **kwargs)

    monkeypatch.setattr(served, "infer", slow_infer)
    n_clients, n_requests = 4, 6
    steps = [observations(served, n_requests, 10 + c) for c in range(n_clients)]
    replies = [[] for _ in range(n_clients)]
    errors = []
    barrier = threading.Barrier(n_clients)

    def robot(c, url):
        try:
            with PolicyClient(url) as client:
                barrier.wait(30)
                for i in range(n_requests):
                    replies[c].append(client.infer({"obs": steps[c][i]}))
        except Exception as e:
            errors.append(e)

    with start(served, seed=3) as server:
        threads = [threading.Thread(target=robot, args=(c, server.url)) for c in range(n_clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not errors and all(len(r) == n_requests for r in replies)
    assert max(r["batch_size"] for rs in replies for r in rs) >= 2
    monkeypatch.undo()
    for c in range(n_clients):
        generator, history = torch.Generator().manual_seed(3), [steps[c][0]] * 2
        for i in range(n_requests):
            history = [history[-1], steps[c][i]] if i else history
            want = in_process(served, np.stack(history), generator)
            # batched rows round differently from batch 1 (measured up to ~1e-3 px over 10 steps); another
            # robot's history or noise would move the chunk by pixels
            np.testing.assert_allclose(replies[c][i]["actions"], want, rtol=0, atol=1e-2)


def test_silent_and_slow_clients_never_delay_the_others(served):
    """One client stays silent, another has sent the first half of a frame and stalls: a third is served meanwhile,
    request after request; the stalled one is served once its frame is complete."""
    release = threading.Event()
    frame = wire.pack({"obs": observations(served, 1, 4)[0]})
    stalled_reply = []

    def fragments():
        yield frame[:10]
        release.wait(60)
        yield frame[10:]

    with start(served) as server, PolicyClient(server.url) as silent, PolicyClient(server.url) as slow:
        sender = threading.Thread(target=lambda: stalled_reply.append(slow.send_frame(fragments())))
        sender.start()
        time.sleep(0.1)
        with PolicyClient(server.url) as robot:
            for step in observations(served, 5, 5):
                assert robot.infer({"obs": step})["actions"].shape == (8, 2)
        assert not stalled_reply and sender.is_alive()
        release.set()
        sender.join(60)
        assert silent.metadata["n_obs_steps"] == 2
    assert len(stalled_reply) == 1 and isinstance(stalled_reply[0], bytes)


def test_the_anytime_path_stops_at_the_deadline_and_says_so(tiny_runs):
    """budget_ms=0: the Picard sampler is stopped after its first round and returns its estimate, marked not exact -
    the same chunk as predict_chunk stopped at once; with the default budget it converges."""
    card = Card.open_base("checkpoint", tiny_runs / "base")
    picard = SamplerConfig(name="picard", scheduler="ddim", steps=10)
    hurried = load_served_policy(card, picard, None, "torch", budget_ms=0)
    relaxed = load_served_policy(card, picard, None, "torch", budget_ms=10_000)
    step = observations(hurried, 1, 6)[0]
    with start(hurried) as server, PolicyClient(server.url) as client:
        stopped = client.infer({"obs": step})
    with start(relaxed) as server, PolicyClient(server.url) as client:
        converged = client.infer({"obs": step})
    assert stopped["exact"] is False and stopped["rounds"] == 1
    assert converged["exact"] is True and converged["rounds"] > 1
    want = hurried.policy.predict_chunk(torch.from_numpy(np.stack([step, step]))[None], hurried.sampler,
                                        generator=torch.Generator().manual_seed(0), should_stop=lambda: True)
    np.testing.assert_allclose(stopped["actions"], want.action[0].numpy(), rtol=0, atol=1e-4)


def test_a_switching_sampler_with_its_pcm_is_served_exactly(tiny_runs):
    card = Card.open_base("checkpoint", tiny_runs / "base")
    served = load_served_policy(card, SamplerConfig(name="pcm_lora", scheduler="ddim", steps=8), str(tiny_runs / "pcm"),
                                "torch", budget_ms=10_000)
    step = observations(served, 1, 7)[0]
    with start(served) as server, PolicyClient(server.url) as client:
        assert client.metadata["sampler"] == "pcm_lora/ddim8"
        reply = client.infer({"obs": step})
    assert reply["exact"] is True
    np.testing.assert_allclose(reply["actions"], in_process(served, np.stack([step, step]),
                                                            torch.Generator().manual_seed(0)), rtol=0, atol=1e-4)


def test_an_image_policy_takes_uint8_camera_frames():
    """The shipped image PushT policy: `obs` (2,) and camera `img` (3, 96, 96) uint8 per step; served chunk equal to
    the in-process one for the same history and noise."""
    served = load_served_policy(Card.open_base("checkpoint", "data/pusht_image/base"), DDIM10, None, "torch")
    rng = np.random.default_rng(0)
    history = {"obs": np.array([[200.0, 300.0], [210.0, 290.0]], np.float32),
               "img": rng.integers(0, 256, (2, 3, 96, 96)).astype(np.uint8)}
    with start(served) as server, PolicyClient(server.url) as client:
        assert client.metadata["observation"] == {"obs": {"shape": [2], "dtype": "float32"},
                                                  "img": {"shape": [3, 96, 96], "dtype": "uint8"}}
        assert client.metadata["policy"]["task"] == "pusht_image"
        reply = client.infer(history)
        refused = client.send_frame(wire.pack({**history, "img": history["img"].astype(np.float32)}))
    assert refused.startswith("img: dtype float32, expected uint8")
    want = served.policy.predict_chunk({"obs": torch.from_numpy(history["obs"])[None],
                                        "image": torch.from_numpy(history["img"])[None, :, None]}, served.sampler,
                                       generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(reply["actions"], want.action[0].numpy(), rtol=0, atol=1e-3)


def test_the_remote_agent_gives_each_env_its_own_connection_and_noise(served):
    """`pcm eval server=...`'s agent: (N, To, Do) histories -> (N, Ta, Da), env i's noise seeded `seed + i`."""
    from pcm_policy.serving.remote import RemoteAgent

    histories = observations(served, 4, 8).reshape(2, 2, 20)
    with start(served) as server:
        agent = RemoteAgent(server.url, 2, seed=100)
        try:
            actions = agent(histories)
            assert agent(histories[:1]).shape == (1, 8, 2)  # a wave's finished envs are left out
        finally:
            agent.close()
    assert actions.shape == (2, 8, 2) and actions.dtype == np.float32
    for i in range(2):
        want = in_process(served, histories[i], torch.Generator().manual_seed(100 + i))
        np.testing.assert_allclose(actions[i], want, rtol=0, atol=1e-2)
    summary = agent.summary()
    assert summary["chunks"] == 3 and summary["exact_fraction"] == 1.0 and summary["latency_ms_p50"] > 0


@pytest.mark.parametrize("backend", ["onnx", "auto"])
def test_a_server_on_another_backend_serves_the_torch_chunk(tiny_runs, served, backend):
    """backend=onnx|auto (pcm_policy.backends): the metadata names it, and the chunk lands within 1e-4 of the torch
    chunk sampled in process for the same history and noise."""
    other = load_served_policy(Card.open_base("checkpoint", tiny_runs / "base"), DDIM10, None, backend)
    step = observations(served, 1, 3)[0]
    with start(other, seed=5) as server, PolicyClient(server.url) as client:
        meta = client.metadata
        got = client.infer({"obs": step})["actions"]
    assert meta["backend"] == backend and other.sampler.backend == backend
    want = in_process(served, np.stack([step, step]), torch.Generator().manual_seed(5))
    normalized = [served.policy.normalizer.normalize("action", torch.from_numpy(a)).numpy() for a in (got, want)]
    np.testing.assert_allclose(*normalized, rtol=0, atol=1e-4)  # normalized action units


def test_sampler_auto_serves_its_exact_choice_and_says_so(tiny_runs, served):
    """sampler=auto: the sampler is chosen at load by timing (pcm_policy.auto_sampler), the metadata names the choice,
    and the served chunk is within the deviation bound of the torch sequential chunk for the same noise."""
    from pcm_policy.auto_sampler import AutoSettings
    settings = AutoSettings(scheduler="ddim", steps=10, backends=("torch", "onnx"), tols=(0.01,), chunks=2, warmup=0)
    auto = load_served_policy(Card.open_base("checkpoint", tiny_runs / "base"), settings, None, None, echo=False)
    step = observations(served, 1, 4)[0]
    with start(auto, seed=3) as server, PolicyClient(server.url) as client:
        meta = client.metadata
        reply = client.infer({"obs": step})
    chosen = auto.auto.chosen
    assert chosen["exact"] and meta["auto"]["sampler"] == chosen["sampler"] and meta["backend"] == chosen["backend"]
    assert meta["sampler"] == auto.sampler.label and reply["exact"] is True
    want = in_process(served, np.stack([step, step]), torch.Generator().manual_seed(3))
    normalized = [served.policy.normalizer.normalize("action", torch.from_numpy(a)).numpy()
                  for a in (reply["actions"], want)]
    np.testing.assert_allclose(*normalized, rtol=0, atol=settings.deviation_bound)
