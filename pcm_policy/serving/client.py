"""A small synchronous client speaking only the documented protocol (as openpi-client's `WebsocketClientPolicy`).

It connects without compression and without a frame size limit, sends `Authorization: Api-Key <key>` when given
a key, reads the metadata frame, then for each `infer(observation)` sends one binary msgpack frame and reads one
frame back: binary -> the reply map; text -> `ServerError` with that line. Used by the tests, `pcm serve-bench`
and `pcm eval server=...`.
"""
from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from websockets.exceptions import InvalidStatus, WebSocketException
from websockets.sync.client import connect

from pcm_policy.errors import ConfigError, PcmError
from pcm_policy.serving import wire

API_KEY_ENV = "PCM_SERVE_API_KEY"  # the server's key, read by `pcm serve` and by the clients of `pcm eval`


def api_key_from_env() -> str | None:
    """The API key in `PCM_SERVE_API_KEY` (None when unset or empty)."""
    return os.environ.get(API_KEY_ENV) or None


class ServerError(PcmError):
    """The server answered a request with an error text frame (one line, starting with the key at fault)."""


def check_url(url: Any, key: str = "server") -> str:
    """A `ws://HOST:PORT` (or `wss://`) server address.

    Raises:
        ConfigError: not a string of that form (one line naming `key`).
    """
    try:
        parts = urlsplit(url) if isinstance(url, str) else None
        port = parts.port if parts is not None else None
    except ValueError:
        parts = port = None
    if parts is None or parts.scheme not in ("ws", "wss") or not parts.hostname or port is None:
        raise ConfigError(f"{key}={url!r}: expected a server address ws://HOST:PORT")
    return url


class PolicyClient:
    """One connection to a policy server (one robot).

    Args:
        url: `ws://host:port`.
        api_key: sent as `Authorization: Api-Key <key>` (None: no header).
        timeout: seconds to wait for the handshake and for each reply.

    Attributes:
        metadata: the server's metadata map (observation keys, action shape, To, control rate, sampler, policy).

    Raises:
        PcmError: the server cannot be reached, refuses the key (HTTP 401), or sends no metadata in time.
    """

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 30.0):
        self.url, self.timeout = url, timeout
        headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
        try:
            self._ws = connect(url, compression=None, max_size=None, additional_headers=headers, proxy=None,
                               open_timeout=timeout, legacy=True)  # held open: closed by close()
        except InvalidStatus as e:
            status = e.response.status_code
            hint = f" (missing or wrong API key: set {API_KEY_ENV})" if status == 401 else ""
            raise PcmError(f"server={url}: refused the connection with HTTP {status}{hint}") from None
        except (OSError, TimeoutError, WebSocketException) as e:
            raise PcmError(f"server={url}: cannot connect ({type(e).__name__}: {e})") from None
        try:
            self.metadata = wire.unpack(self._receive())
        except wire.WireError as e:
            self.close()
            raise PcmError(f"server={url}: its metadata frame is not msgpack ({e})") from None

    def _receive(self) -> bytes | str:
        try:
            return self._ws.recv(timeout=self.timeout)
        except TimeoutError:
            raise PcmError(f"server={self.url}: no reply within {self.timeout:g} s") from None
        except WebSocketException as e:
            raise PcmError(f"server={self.url}: connection closed ({e})") from None

    def send_frame(self, frame: bytes | str) -> bytes | str:
        """Send one raw frame (binary or text) and return the raw reply frame (tests of bad frames)."""
        try:
            self._ws.send(frame)
        except WebSocketException as e:
            raise PcmError(f"server={self.url}: connection closed ({e})") from None
        return self._receive()

    def infer(self, observation: dict[str, Any]) -> dict[str, Any]:
        """One request: an observation map (`pcm_policy.serving.frames`) -> the reply map.

        Args:
            observation: key -> numpy array (one control step or the whole history), optionally `reset`, `seed`.

        Returns:
            {"actions": (Ta, Da) float32, "server_timing": {...}, "rounds", "exact", "batch_size"}.

        Raises:
            ServerError: the server answered with an error text frame.
            PcmError: the connection closed or timed out.
        """
        reply = self.send_frame(wire.pack(observation))
        if isinstance(reply, str):
            raise ServerError(f"server={self.url}: {reply}")
        return wire.unpack(reply)

    def close(self) -> None:
        """Close the connection (normal closure)."""
        self._ws.close()

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
