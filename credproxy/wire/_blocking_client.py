"""
The credential-socket client for code without a reactor: plain Unix sockets,
callable from many threads at once, with the Twisted client's semantics.

Design: each connection has one reader thread that owns all reads. Callers
send under a lock and wait on their own event, so concurrent requests share
one connection and answers may come in any order. Only a reader that is
always listening can fail every waiting caller the moment the connection
drops (a design where callers take turns reading would notice only when one
of them reads), and it is also where the idle close lives: it sleeps until the
idle deadline whenever nothing is pending.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

from credproxy._secret import Secret
from credproxy.wire._client_errors import (
    ProtocolViolation,
    ProxyClientClosed,
    ProxyClientError,
    ProxyConnectionLost,
    ProxyTimeoutError,
)
from credproxy.wire._client_framing import (
    FrameDecoder,
    cancel_message,
    checked_timeout,
    encode_frame,
    handshake_message,
    negotiated_version,
    parse_answer,
    parse_body,
    request_message,
)
from credproxy.wire._codec import max_body
from credproxy.wire._spec import (
    CLIENT_IDLE_TIMEOUT,
    CLIENT_REQUEST_TIMEOUT,
    MAX_FRAME_V1,
    MAX_IN_FLIGHT,
)

_RECV_SIZE = 64 * 1024


class _Slot:
    """
    Where the reader thread leaves one answer for the caller waiting on it.
    """

    __slots__ = ("data", "error", "event")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.data: dict[str, Any] | None = None
        self.error: ProxyClientError | None = None

    def fill(self, data: dict[str, Any] | None, error: ProxyClientError | None) -> None:
        self.data, self.error = data, error
        self.event.set()

    def result(self) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        return self.data if self.data is not None else {}


class _Stale(Exception):
    """
    The connection closed for idleness just before a request: use a new one.
    """


_OPEN, _IDLE, _LOST, _CLOSED = "open", "idle", "lost", "closed"


class _Connection:
    """
    One handshaken connection and its reader thread.
    """

    def __init__(
        self, sock: socket.socket, version: int, decoder: FrameDecoder, idle_timeout: float
    ) -> None:
        self.version = version
        self._sock = sock
        self._decoder = decoder
        self._idle_timeout = idle_timeout
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self._pending: dict[str, _Slot] = {}
        self._state = _OPEN
        self._last_active = time.monotonic()
        self._reader = threading.Thread(
            target=self._read_loop, name="credproxy-client-reader", daemon=True
        )
        self._reader.start()

    @property
    def usable(self) -> bool:
        with self._cond:
            return self._state == _OPEN

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def call(
        self, op: str, payload: Mapping[str, Any], deadline: float, seconds: float
    ) -> dict[str, Any]:
        request_id = str(uuid.uuid4())
        frame = encode_frame(
            request_message(self.version, request_id, op, payload), max_body(self.version)
        )
        slot = _Slot()
        with self._cond:
            while self._state == _OPEN and len(self._pending) >= MAX_IN_FLIGHT:
                if not self._cond.wait(deadline - time.monotonic()):
                    raise ProxyTimeoutError(seconds)
            self._check_open()
            self._pending[request_id] = slot
        self._send(frame)
        if not slot.event.wait(max(0.0, deadline - time.monotonic())):
            with self._cond:
                abandoned = self._pending.pop(request_id, None) is not None
                self._settled()
            if abandoned:
                cancel = cancel_message(self.version, str(uuid.uuid4()), request_id)
                self._send(encode_frame(cancel, MAX_FRAME_V1))
                raise ProxyTimeoutError(seconds)
        return slot.result()

    def _check_open(self) -> None:
        if self._state == _IDLE:
            raise _Stale()
        if self._state == _CLOSED:
            raise ProxyClientClosed()
        if self._state == _LOST:
            raise ProxyConnectionLost()

    def _send(self, frame: bytes) -> None:
        try:
            with self._send_lock:
                self._sock.sendall(frame)
        except OSError:
            self._end(_LOST)

    def _settled(self) -> None:
        """
        Call with the condition held after a request left C{_pending}.
        """
        if not self._pending:
            self._last_active = time.monotonic()
        self._cond.notify_all()

    def close(self) -> None:
        self._end(_CLOSED)

    def _end(self, state: str) -> None:
        """
        Leave the open state once: fail every pending caller at once and wake
        the reader, which closes the socket.
        """
        with self._cond:
            if self._state != _OPEN:
                return
            self._state = state
            slots = list(self._pending.values())
            self._pending.clear()
            self._cond.notify_all()
        error: type[ProxyClientError] = (
            ProxyClientClosed if state == _CLOSED else ProxyConnectionLost
        )
        for slot in slots:
            slot.fill(None, error())
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def _read_loop(self) -> None:
        try:
            while self._read_once():
                pass
        finally:
            self._end(_LOST)
            with self._send_lock:
                self._sock.close()

    def _read_once(self) -> bool:
        with self._cond:
            if self._state != _OPEN:
                return False
            if self._pending:
                wait = self._idle_timeout
            else:
                wait = self._last_active + self._idle_timeout - time.monotonic()
                if wait <= 0:
                    self._state = _IDLE
                    return False
        try:
            readable, _, _ = select.select([self._sock], [], [], wait)
            if not readable:
                return True
            data = self._sock.recv(_RECV_SIZE)
        except (OSError, ValueError):
            return False
        if not data:
            return False
        try:
            for body in self._decoder.feed(data):
                self._deliver(parse_body(body))
        except ProtocolViolation:
            return False
        return True

    def _deliver(self, message: dict[str, Any]) -> None:
        answer = parse_answer(message)
        if answer is None:
            return
        with self._cond:
            slot = self._pending.pop(answer.request_id, None)
            if slot is None:
                return  # answer to an abandoned request or to a cancel
            self._settled()
        slot.fill(answer.data, answer.error)


class BlockingProxySocketClient:
    """
    A lazily connecting, self-healing, thread-safe client of one credential socket.

    @param path: the Unix socket path.
    @param capability_token: presented in every handshake, when given.
    @param request_timeout: default seconds a request may take (capped at an hour);
        it covers connecting, the handshake and waiting for a free slot too.
    @param idle_timeout: seconds without pending requests before the connection closes.
    """

    def __init__(
        self,
        path: str,
        capability_token: Secret | None = None,
        request_timeout: float = CLIENT_REQUEST_TIMEOUT,
        idle_timeout: float = CLIENT_IDLE_TIMEOUT,
    ) -> None:
        if idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive")
        self.path = path
        self.capability_token = capability_token
        self.request_timeout = checked_timeout(request_timeout, CLIENT_REQUEST_TIMEOUT)
        self.idle_timeout = float(idle_timeout)
        self._connect_lock = threading.Lock()
        self._connection: _Connection | None = None

    def __repr__(self) -> str:
        token = "with" if self.capability_token is not None else "without"
        return f"<BlockingProxySocketClient {self.path!r} {token} capability token>"

    def __enter__(self) -> BlockingProxySocketClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def version(self) -> int | None:
        """
        The protocol version of the current connection, None while there is none.
        """
        connection = self._connection
        return connection.version if connection is not None and connection.usable else None

    @property
    def pending(self) -> int:
        connection = self._connection
        return connection.pending if connection is not None else 0

    def request(
        self, op: str, payload: Mapping[str, Any] | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """
        Send C{op} and return the answer's C{data}.

        @raise ProxyRequestError: the server answered C{ok:false}.
        @raise ProxyTimeoutError: no answer in time (a C{cancel} was sent).
        @raise ProxyConnectionLost: the connection went away or could not be made.
        """
        seconds = checked_timeout(timeout, self.request_timeout)
        deadline = time.monotonic() + seconds
        body = dict(payload or {})
        while True:
            connection = self._connected(deadline, seconds)
            try:
                return connection.call(str(op), body, deadline, seconds)
            except _Stale:
                continue

    def close(self) -> None:
        """
        Drop the connection, failing pending calls with L{ProxyClientClosed}.
        A later request connects again.
        """
        with self._connect_lock:
            connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    def _connected(self, deadline: float, seconds: float) -> _Connection:
        if not self._connect_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise ProxyTimeoutError(seconds)
        try:
            connection = self._connection
            if connection is None or not connection.usable:
                connection = self._connection = self._open(deadline, seconds)
            return connection
        finally:
            self._connect_lock.release()

    def _open(self, deadline: float, seconds: float) -> _Connection:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                sock.connect(self.path)
                sock.sendall(encode_frame(handshake_message(self.capability_token), MAX_FRAME_V1))
                decoder = FrameDecoder(MAX_FRAME_V1)
                version = negotiated_version(parse_body(self._first_frame(sock, decoder, deadline)))
            except TimeoutError:
                raise ProxyTimeoutError(seconds) from None
            except (OSError, ProtocolViolation):
                raise ProxyConnectionLost() from None
            decoder.limit = max_body(version)
            # Sends that stall this long mean a server that stopped reading.
            sock.settimeout(self.request_timeout)
        except ProxyClientError:
            sock.close()
            raise
        return _Connection(sock, version, decoder, self.idle_timeout)

    @staticmethod
    def _first_frame(sock: socket.socket, decoder: FrameDecoder, deadline: float) -> bytes:
        while True:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            data = sock.recv(_RECV_SIZE)
            if not data:
                raise ConnectionResetError()
            bodies = decoder.feed(data)
            if bodies:
                if len(bodies) > 1:
                    raise ProtocolViolation("credential proxy spoke before the handshake reply")
                return bodies[0]
