"""The serving pieces without a server: openpi-client's msgpack-numpy encoding, request frame checks, a connection's
history, and the batcher's grouping of pending requests."""
import asyncio
import threading
import time

import msgpack
import numpy as np
import pytest
import torch

from pcm_policy.serving import wire
from pcm_policy.serving.batcher import Batcher, InferenceError
from pcm_policy.serving.frames import FrameError, ObservationKey, ObservationSpec
from pcm_policy.serving.session import Session

LOW_DIM = ObservationSpec((ObservationKey("obs", (3,), "float32"),), n_obs_steps=2)
CAMERA = ObservationSpec((ObservationKey("obs", (2,), "float32"), ObservationKey("img", (3, 4, 4), "uint8")), 2)


# ---- wire -----------------------------------------------------------------------------------------------------
def test_arrays_and_scalars_are_encoded_as_openpi_client_does():
    """The bytes equal what openpi_client.msgpack_numpy writes: {b"__ndarray__": True, b"data", b"dtype": dtype.str,
    b"shape"} and {b"__npgeneric__": True, b"data": item, b"dtype"} (maps written out here from its documented
    layout)."""
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    expected = msgpack.packb({"obs": {b"__ndarray__": True, b"data": a.tobytes(), b"dtype": "<f4", b"shape": [2, 3]},
                              "seed": {b"__npgeneric__": True, b"data": 7, b"dtype": "<i8"}}, use_bin_type=True)
    assert wire.pack({"obs": a, "seed": np.int64(7)}) == expected
    back = wire.unpack(expected)
    assert back["obs"].dtype == np.float32 and np.array_equal(back["obs"], a) and back["seed"] == 7
    assert isinstance(back["seed"], np.int64)


def test_round_trip_of_every_accepted_dtype_and_plain_values():
    message = {"b": np.array([True, False]), "u8": np.zeros((2, 3, 4), np.uint8), "i": np.arange(3, dtype=">i4"),
               "f64": np.linspace(0, 1, 5), "f16": np.ones(2, np.float16), "x": 1.5, "s": "text", "n": None,
               "nested": {"t": [1, 2], "a": np.float32(2.5)}}
    back = wire.unpack(wire.pack(message))
    for key in ("b", "u8", "i", "f64", "f16"):
        assert back[key].dtype == message[key].dtype and np.array_equal(back[key], message[key])
    assert back["x"] == 1.5 and back["s"] == "text" and back["n"] is None
    assert back["nested"]["t"] == [1, 2] and back["nested"]["a"] == np.float32(2.5)


def test_non_contiguous_arrays_are_sent_in_c_order():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]
    assert np.array_equal(wire.unpack(wire.pack({"a": a}))["a"], a)


@pytest.mark.parametrize("bad,needle", [
    (b"\xc1", "frame: not a msgpack message"),
    (msgpack.packb({"a": 1}) + b"\x00", "frame: not a msgpack message"),
    (b"\x91" * 5000 + b"\xc0", "frame: not a msgpack message"),
    (b"\x91" * 50 + b"\xc0", "nested deeper than"),
    (msgpack.packb({"obs": {b"__ndarray__": True, b"data": b"123", b"dtype": "<f4", b"shape": [2]}}),
     "obs: array data: 3 bytes do not hold shape (2,)"),
    (msgpack.packb({"obs": {b"__ndarray__": True, b"data": b"12345678", b"dtype": "|O", b"shape": [1]}}),
     "obs: array dtype '|O'"),
    (msgpack.packb({"obs": {b"__ndarray__": True, b"data": b"12345678", b"dtype": "<c8", b"shape": [1]}}),
     "obs: array dtype '<c8'"),
    (msgpack.packb({"obs": {b"__ndarray__": True, b"data": b"", b"dtype": "no-such", b"shape": [0]}}),
     "obs: array dtype 'no-such': not a numpy dtype"),
    (msgpack.packb({"obs": {b"__ndarray__": True, b"data": b"", b"dtype": "<f4", b"shape": [-1]}}),
     "obs: array shape"),
    (msgpack.packb({"obs": {b"__npgeneric__": True, b"data": "x", b"dtype": "<f4"}}), "obs: numpy scalar"),
])
def test_malformed_frames_are_one_line_wire_errors(bad, needle):
    with pytest.raises(wire.WireError) as info:
        wire.unpack(bad)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_pack_refuses_what_openpi_client_refuses():
    for value in (np.zeros(2, np.complex64), np.array([object()]), object()):
        with pytest.raises(TypeError):
            wire.pack({"x": value})


# ---- frames ---------------------------------------------------------------------------------------------------
def test_one_step_and_whole_history_frames():
    step = LOW_DIM.parse({"obs": np.array([1.0, 2.0, 3.0])})  # float64 is cast to float32
    assert not step.history and step.steps["obs"].dtype == np.float32 and not step.reset and step.seed is None
    history = LOW_DIM.parse({"obs": np.zeros((2, 3), np.float32), "reset": np.bool_(True), "seed": np.int64(3)})
    assert history.history and history.reset and history.seed == 3
    frame = CAMERA.parse({"obs": np.zeros(2, np.float32), "img": np.zeros((3, 4, 4), np.uint8), "reset": True})
    assert frame.reset and frame.steps["img"].dtype == np.uint8
    assert LOW_DIM.metadata() == {"obs": {"shape": [3], "dtype": "float32"}}
    assert CAMERA.cameras == ("img",) and CAMERA.history_bytes() == 2 * (2 * 8 + 3 * 4 * 4)


@pytest.mark.parametrize("message,needle", [
    ([1, 2], "frame: expected a map"),
    ({}, "obs: missing"),
    ({"obs": np.zeros(3, np.float32), "state": 1}, "state: unknown key"),
    ({"obs": np.zeros(3, np.float32), "x" * 500: 1}, "unknown key"),
    ({"obs": [0.0, 0.0, 0.0]}, "obs: expected an array"),
    ({"obs": np.zeros(4, np.float32)}, "obs: shape (4,), expected float (3,) per step or (2, 3) history"),
    ({"obs": np.zeros((3, 3), np.float32)}, "obs: shape (3, 3)"),
    ({"obs": np.zeros(3, np.int64)}, "obs: dtype int64, expected a float array"),
    ({"obs": np.array([0.0, np.nan, 0.0])}, "obs: contains NaN or inf"),
    ({"obs": np.array([0.0, -np.inf, 0.0], np.float32)}, "obs: contains NaN or inf"),
    ({"obs": np.array([0.0, 1e300, 0.0])}, "obs: values overflow float32"),
    ({"obs": np.zeros(3, np.float32), "reset": 1}, "reset: expected true or false"),
    ({"obs": np.zeros(3, np.float32), "seed": -1}, "seed: expected an integer"),
    ({"obs": np.zeros(3, np.float32), "seed": True}, "seed: expected an integer"),
])
def test_bad_frames_name_the_key(message, needle):
    with pytest.raises(FrameError) as info:
        LOW_DIM.parse(message)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_camera_frames_must_be_uint8_and_every_key_alike():
    good = {"obs": np.zeros(2, np.float32), "img": np.zeros((3, 4, 4), np.uint8)}
    with pytest.raises(FrameError, match="img: dtype float32, expected uint8"):
        CAMERA.parse({**good, "img": np.zeros((3, 4, 4), np.float32)})
    with pytest.raises(FrameError, match="img: shape \\(4, 4, 3\\)"):  # channel last is refused, not guessed
        CAMERA.parse({**good, "img": np.zeros((4, 4, 3), np.uint8)})
    with pytest.raises(FrameError, match="img: a history while obs is one step"):
        CAMERA.parse({**good, "img": np.zeros((2, 3, 4, 4), np.uint8)})


# ---- session --------------------------------------------------------------------------------------------------
def test_history_is_padded_at_the_start_and_at_reset_and_then_slides():
    session = Session(LOW_DIM, seed=0)
    step = lambda v, **kw: LOW_DIM.parse({"obs": np.full(3, v, np.float32), **kw})  # noqa: E731
    assert session.observe(step(1.0))["obs"][:, 0].tolist() == [1.0, 1.0]  # first step: To copies
    assert session.observe(step(2.0))["obs"][:, 0].tolist() == [1.0, 2.0]
    assert session.observe(step(3.0))["obs"][:, 0].tolist() == [2.0, 3.0]
    assert session.observe(step(4.0, reset=True))["obs"][:, 0].tolist() == [4.0, 4.0]
    whole = LOW_DIM.parse({"obs": np.array([[5.0] * 3, [6.0] * 3], np.float32)})
    assert session.observe(whole)["obs"][:, 0].tolist() == [5.0, 6.0]
    assert session.observe(step(7.0))["obs"][:, 0].tolist() == [6.0, 7.0]


def test_sessions_share_nothing_and_seed_restarts_the_generator():
    a, b = Session(LOW_DIM, seed=5), Session(LOW_DIM, seed=5)
    a.observe(LOW_DIM.parse({"obs": np.ones(3)}))
    assert b.observe(LOW_DIM.parse({"obs": np.zeros(3)}))["obs"].sum() == 0
    first = torch.randn(3, generator=a.generator)
    assert torch.equal(first, torch.randn(3, generator=b.generator))
    a.observe(LOW_DIM.parse({"obs": np.ones(3), "seed": 5}))
    assert torch.equal(torch.randn(3, generator=a.generator), first)


# ---- batcher --------------------------------------------------------------------------------------------------
class _Result:
    def __init__(self, n):
        self.actions, self.rounds, self.exact, self.encode_ms = np.arange(n, dtype=np.float32)[:, None], 1, True, 0.0


def test_requests_pending_together_are_one_batch_and_a_failure_reaches_only_its_batch():
    gate, calls = threading.Event(), []

    def infer(histories, noises, should_stop):
        calls.append([h["obs"] for h in histories])
        if len(calls) == 1:
            gate.wait(10)  # the first call blocks while three more requests arrive
        if histories[0]["obs"] == "boom":
            raise ValueError("bad\nsecond line")
        return _Result(len(histories))

    async def main():
        batcher = Batcher(infer, deadline_s=10.0, max_batch=8)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit({"obs": 0}, None, lambda: 0.0))
        while not calls:
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(batcher.submit({"obs": i}, None, lambda: 0.0)) for i in (1, 2, 3)]
        await asyncio.sleep(0.05)
        gate.set()
        replies = await asyncio.gather(first, *rest)
        with pytest.raises(InferenceError, match="inference failed: ValueError: bad$"):
            await batcher.submit({"obs": "boom"}, None, lambda: 0.0)
        after = await batcher.submit({"obs": 9}, None, lambda: 0.0)  # the worker survived
        batcher.close()
        return replies, after, batcher.summary()

    replies, after, summary = asyncio.run(main())
    assert calls[:2] == [[0], [1, 2, 3]]
    assert [r.batch_size for r in replies] == [1, 3, 3, 3]
    assert [float(r.actions[0]) for r in replies] == [0.0, 0.0, 1.0, 2.0]  # each request gets its own row
    assert after.batch_size == 1 and summary["batches"] == {1: 2, 3: 1} and summary["requests"] == 5


def test_the_batch_stops_at_the_deadline_of_its_oldest_request():
    seen = {}

    def infer(histories, noises, should_stop):
        seen["stop"] = should_stop()
        return _Result(len(histories))

    async def main():
        batcher = Batcher(infer, deadline_s=0.05)
        batcher.start()
        late = await batcher.submit({"obs": 0}, None, lambda: 0.06)  # arrived 60 ms ago
        stop_late = seen["stop"]
        await batcher.submit({"obs": 0}, None, lambda: 0.0)
        batcher.close()
        return late, stop_late, seen["stop"], batcher.summary()

    late, stop_late, stop_fresh, summary = asyncio.run(main())
    assert stop_late and not stop_fresh and summary["deadline_misses"] == 1
    assert late.queue_ms == pytest.approx(60.0)


def test_a_gathering_window_joins_requests_that_arrive_just_after_the_first():
    calls = []

    def infer(histories, noises, should_stop):
        calls.append(len(histories))
        return _Result(len(histories))

    async def main(window_ms, peers=None):
        batcher = Batcher(infer, deadline_s=10.0, window_ms=window_ms, peers=peers)
        batcher.start()

        async def later(i):
            await asyncio.sleep(0.01 * i)  # 0, 10, 20 ms after the first
            return await batcher.submit({"obs": i}, None, lambda: 0.0)

        await asyncio.gather(*(later(i) for i in range(3)))
        batcher.close()

    asyncio.run(main(200.0))
    assert calls == [3]
    calls.clear()
    asyncio.run(main(0.0))
    assert calls == [1, 1, 1]
    calls.clear()
    t0 = time.perf_counter()
    asyncio.run(main(200.0, peers=lambda: 1))  # one robot connected: nobody to wait for
    assert calls == [1, 1, 1] and time.perf_counter() - t0 < 0.15
