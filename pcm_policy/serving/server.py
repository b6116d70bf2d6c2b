"""The policy server: openpi's websocket protocol (as openpi-client 0.1.2 speaks it) over a `ServedPolicy`.

Per connection: the server sends the metadata (one binary msgpack frame), then answers every binary frame with
one binary frame - {"actions": (Ta, Da) float32, "server_timing": {"infer_ms", "encode_ms", "queue_ms"},
"rounds", "exact", "batch_size"} - or, for a frame it cannot serve, with ONE text frame of one line that starts with
the key at fault; the connection stays open and its next frame is served. A frame larger than the size limit
closes that connection (code 1009, message too big); other connections are untouched. Beyond `max_connections`
open connections a new one is refused with HTTP 503.

Security: with an API key (`PCM_SERVE_API_KEY`), the handshake must carry `Authorization: Api-Key <key>`
(openpi-client's `api_key=`), compared in constant time; anything else is refused with HTTP 401. Without a key
the server only binds a loopback address (`check_exposure`). Nothing a client sends can stop the server or make it
print a traceback: every failure is one log line.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import signal
import threading
from http import HTTPStatus
from typing import Any, Callable

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from pcm_policy.control.clock import MeasuredClock
from pcm_policy.errors import ConfigError
from pcm_policy.serving import wire
from pcm_policy.serving.batcher import Batcher, InferenceError
from pcm_policy.serving.client import API_KEY_ENV
from pcm_policy.serving.frames import FrameError
from pcm_policy.serving.session import Session

LOG = logging.getLogger("pcm_policy.serving")
TEXT_FRAME_ERROR = "frame: a text frame; send a binary msgpack map of observation arrays (openpi-client's encoding)"


class _OneLine(logging.Filter):
    """Log records as one line: an exception becomes `: Type: first line` of the message, never a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            first = str(exc).splitlines()[0] if str(exc) else ""
            record.msg, record.args = f"{record.getMessage()}: {type(exc).__name__}: {first}", None
        record.exc_info = record.exc_text = record.stack_info = None
        return True


def _websockets_logger() -> logging.Logger:
    logger = logging.getLogger("pcm_policy.serving.websockets")
    if not any(isinstance(f, _OneLine) for f in logger.filters):
        logger.addFilter(_OneLine())
        logger.setLevel(logging.WARNING)  # its INFO lines are one per connection open/close
    return logger


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or `localhost`) is reachable from this machine only."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def check_exposure(host: str, api_key: str | None) -> None:
    """Refuse to serve beyond this machine without an API key.

    Raises:
        ConfigError: `host` is not a loopback address and no key is set (one line naming `PCM_SERVE_API_KEY`).
    """
    if not api_key and not is_loopback(host):
        raise ConfigError(f"host={host}: not a loopback address; set {API_KEY_ENV} to serve beyond this machine "
                          "(clients then send Authorization: Api-Key <key>)")


def frame_limit(history_bytes: int, max_frame_bytes: int | None = None) -> int:
    """The largest request frame accepted, bytes: `max_frame_bytes`, or by default 1 MiB plus 4 times a whole
    history's arrays (a few MB for a camera policy), so any valid request fits and a flood does not."""
    return int(max_frame_bytes) if max_frame_bytes else (1 << 20) + 4 * int(history_bytes)


class PolicyServer:
    """A websocket server of one `ServedPolicy`.

    Args:
        served: the policy, its sampler and metadata.
        host: the address to bind (default loopback).
        port: the port (0: a free one, read `port` after `start`).
        api_key: the key clients must send (None: none needed; then `host` must be loopback).
        seed: every connection's noise generator starts at this seed.
        max_batch: the most requests sampled in one call.
        max_frame_bytes: the size limit of a request frame (None: `frame_limit`'s default).
        max_connections: open connections beyond which a new one is refused (HTTP 503).
        batch_window_ms: the batcher's gathering window (`Batcher`'s `window_ms`; it waits only while the batch has
            fewer requests than there are open connections).

    Raises:
        ConfigError: a non-loopback `host` without `api_key` (`check_exposure`).
    """

    def __init__(self, served, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                 seed: int = 0, max_batch: int = 16, max_frame_bytes: int | None = None,
                 max_connections: int = 64, batch_window_ms: float = 3.0):
        check_exposure(host, api_key)
        self.served, self.host, self.port, self.seed = served, host, port, seed
        self._api_key = api_key.encode() if api_key else None
        self.max_frame_bytes = frame_limit(served.spec.history_bytes(), max_frame_bytes)
        self.metadata = {**served.metadata(), "max_frame_bytes": self.max_frame_bytes}
        self._metadata_frame = wire.pack(self.metadata)
        self.batcher = Batcher(served.infer, served.deadline_s, max_batch, batch_window_ms,
                               peers=lambda: self.open_connections)
        self.max_connections = max_connections
        self.connections = self.open_connections = self.bad_frames = 0
        self._server = None

    @property
    def url(self) -> str:
        """`ws://host:port` of the bound server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}"

    async def start(self) -> None:
        """Start the inference worker and bind; `port` then holds the bound port."""
        self.batcher.start()
        self._server = await serve(self._handle, self.host, self.port, process_request=self._authorize,
                                   max_size=self.max_frame_bytes, compression=None, logger=_websockets_logger())
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Close every connection (code 1001), let replies in flight finish, stop the worker."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await asyncio.to_thread(self.batcher.close)

    def summary(self) -> dict[str, Any]:
        """`connections` and `bad_frames` so far, and the batcher's counts (`Batcher.summary`)."""
        return {"connections": self.connections, "bad_frames": self.bad_frames, **self.batcher.summary()}

    # ---- one connection -------------------------------------------------------------------------------------
    def _authorize(self, connection: ServerConnection, request) -> Any:
        if self._api_key is not None:
            given = request.headers.get_all("Authorization")
            try:
                offered = given[0].encode() if len(given) == 1 else b""
            except UnicodeEncodeError:
                offered = b""
            if not hmac.compare_digest(offered, b"Api-Key " + self._api_key):
                LOG.info("refused %s: missing or wrong API key", _peer(connection))
                return connection.respond(HTTPStatus.UNAUTHORIZED,
                                          "missing or wrong API key (Authorization: Api-Key <key>)\n")
        if self.open_connections >= self.max_connections:
            LOG.info("refused %s: %d connections open (max_connections)", _peer(connection), self.open_connections)
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        peer = _peer(ws)
        self.connections += 1
        self.open_connections += 1
        session = Session(self.served.spec, self.seed)
        LOG.info("connected %s", peer)
        try:
            await ws.send(self._metadata_frame)
            async for message in ws:
                stopwatch = MeasuredClock().start()  # the budget runs from the frame's arrival
                await ws.send(await self._reply(session, message, stopwatch))
        except ConnectionClosed as e:
            if e.sent is not None and e.sent.code == 1009:
                LOG.info("closed %s: frame over the %d-byte limit", peer, self.max_frame_bytes)
        except Exception as e:  # a bug must not take the server down: one line, this connection only
            LOG.warning("dropped %s: %s: %s", peer, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        finally:
            self.open_connections -= 1
        LOG.info("disconnected %s after %d requests", peer, session.requests)

    async def _reply(self, session: Session, message: bytes | str, stopwatch) -> bytes | str:
        """The binary reply to one frame, or the one-line error text."""
        if isinstance(message, str):
            return self._refuse(TEXT_FRAME_ERROR)
        try:
            frame = self.served.spec.parse(wire.unpack(message))
        except (wire.WireError, FrameError) as e:
            return self._refuse(str(e))
        history = session.observe(frame)
        noise = self.served.draw_noise(session.generator)
        try:
            reply = await self.batcher.submit(history, noise, stopwatch)
        except InferenceError as e:
            return self._refuse(str(e))
        session.requests += 1
        return wire.pack({"actions": reply.actions, "rounds": reply.rounds, "exact": reply.exact,
                          "batch_size": reply.batch_size,
                          "server_timing": {"infer_ms": reply.infer_ms, "encode_ms": reply.encode_ms,
                                            "queue_ms": reply.queue_ms}})

    def _refuse(self, message: str) -> str:
        self.bad_frames += 1
        line = message.splitlines()[0] if message else "frame: refused"
        LOG.info("refused a frame: %s", line)
        return line


def _peer(connection: ServerConnection) -> str:
    address = connection.remote_address
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) and len(address) >= 2 else "client"


def serve_until_signal(server: PolicyServer, ready: Callable[[str], None]) -> dict[str, Any]:
    """Run `server` in this (main) thread until SIGINT or SIGTERM, then shut it down cleanly.

    Args:
        server: the server (not started).
        ready: called with the server's URL once it listens.

    Returns:
        `server.summary()` after shutdown.
    """
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await server.start()
        ready(server.url)
        await stop.wait()
        await server.close()

    asyncio.run(main())
    return server.summary()


class BackgroundServer:
    """A `PolicyServer` running on its own event loop in a thread (tests, benchmarks, notebooks).

    Use as a context manager: on entry the server listens (`url`); on exit it is shut down.

    Args:
        server: the server (not started).
        start_timeout: seconds to wait for it to listen.

    Raises:
        RuntimeError: it did not start in time (its one-line reason).
    """

    def __init__(self, server: PolicyServer, start_timeout: float = 30.0):
        self.server, self.start_timeout = server, start_timeout
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="pcm-serve", daemon=True)

    @property
    def url(self) -> str:
        """The server's `ws://host:port`."""
        return self.server.url

    def _run(self) -> None:
        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            try:
                await self.server.start()
            except BaseException as e:
                self._error = e
                self._ready.set()
                return
            self._ready.set()
            await self._stop.wait()
            await self.server.close()

        asyncio.run(main())

    def __enter__(self) -> "BackgroundServer":
        self._thread.start()
        if not self._ready.wait(self.start_timeout) or self._error is not None:
            raise RuntimeError(f"policy server did not start: {self._error or 'timed out'}")
        return self

    def __exit__(self, *exc) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(self.start_timeout)

