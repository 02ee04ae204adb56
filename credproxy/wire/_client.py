"""
The Twisted client of the credential socket: llxprt-code's ProxySocketClient
behaviour (the protocol reference (docs/wire.md)) for code running under a reactor.

One connection at a time, made lazily and handshaken before any request; many
requests share it, correlated by id. At most MAX_IN_FLIGHT are on the wire (the
server's own limit, so the client never provokes RESOURCE_EXHAUSTED); later ones
wait in a bounded queue, their timeout already running.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorTime,
    IReactorUNIX,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from credproxy._secret import Secret
from credproxy.wire._client_errors import (
    ProtocolViolation,
    ProxyClientClosed,
    ProxyClientError,
    ProxyConnectionLost,
    ProxyRequestError,
    ProxyTimeoutError,
)
from credproxy.wire._client_framing import (
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
    CLIENT_MAX_WAITING,
    CLIENT_REQUEST_TIMEOUT,
    MAX_FRAME_V1,
    MAX_IN_FLIGHT,
    ErrorCode,
    Message,
)

_log = Logger()


@dataclass(eq=False)
class _Call:
    """
    One request from C{request()} until its Deferred fires.
    """

    op: str
    payload: dict[str, Any]
    deferred: Deferred[dict[str, Any]] = field(init=False)
    timer: IDelayedCall | None = None
    request_id: str | None = None
    connection: _ClientProtocol | None = None

    def settle(self) -> bool:
        """
        Stop the timer; whether the call was still unsettled.
        """
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        return not self.deferred.called


class _ClientProtocol(Int32StringReceiver):
    """
    One connection: handshake first, then answers matched to requests by id.
    Any inbound violation aborts it; the client then fails what was pending.
    """

    MAX_LENGTH = MAX_FRAME_V1  # until the handshake settles a version

    def __init__(self, client: ProxySocketClient) -> None:
        self._client = client
        self.version: int | None = None
        self.in_flight: dict[str, _Call] = {}
        self.gone = False
        self.lost: Deferred[None] = Deferred()
        self._handshake_timer: IDelayedCall | None = None

    @property
    def stream(self) -> ITCPTransport:
        """
        The transport, typed as what every stream transport is (abortConnection).
        """
        assert self.transport is not None
        return cast(ITCPTransport, self.transport)

    def connectionMade(self) -> None:
        client = self._client
        self.stream.write(encode_frame(handshake_message(client.capability_token), MAX_FRAME_V1))
        self._handshake_timer = client.reactor.callLater(
            client.request_timeout, self._handshake_timed_out
        )

    def _handshake_timed_out(self) -> None:
        self._handshake_timer = None
        _log.warn("credential proxy did not answer the handshake; dropping the connection")
        self.stream.abortConnection()

    def stringReceived(self, string: bytes) -> None:
        if self.gone:
            return
        try:
            message = parse_body(string)
            if self.version is None:
                self._handshake_replied(message)
            else:
                self._answered(message)
        except ProtocolViolation as violation:
            self.drop(str(violation))

    def lengthLimitExceeded(self, length: int) -> None:
        self.drop("credential proxy sent a frame over the size limit")

    def drop(self, why: str) -> None:
        """
        Abort at once: the peer broke the protocol, so nothing more it sends counts.
        """
        if not self.gone:
            self.gone = True
            _log.warn("dropping the credential proxy connection: {why}", why=why)
            self.stream.abortConnection()

    def _handshake_replied(self, message: dict[str, Any]) -> None:
        self._stop_handshake_timer()
        try:
            version = negotiated_version(message)
        except ProxyRequestError as refusal:
            self.gone = True
            _log.warn("credential proxy refused the handshake: {code}", code=refusal.code)
            self._client._handshake_refused(refusal)
            self.stream.loseConnection()
            return
        self.version = version
        self.MAX_LENGTH = max_body(version)
        self._client._advance()

    def _answered(self, message: dict[str, Any]) -> None:
        answer = parse_answer(message)
        if answer is None:
            return
        call = self.in_flight.pop(answer.request_id, None)
        if call is None or not call.settle():
            return  # an answer to a timed-out or cancelled request, or to a cancel
        if answer.error is not None:
            call.deferred.errback(answer.error)
        else:
            call.deferred.callback(answer.data if answer.data is not None else {})
        self._client._advance()

    def send(self, call: _Call) -> None:
        """
        Put C{call} on the wire; a frame over the limit fails only that call.
        """
        assert self.version is not None
        request_id = str(uuid.uuid4())
        try:
            frame = encode_frame(
                request_message(self.version, request_id, call.op, call.payload),
                max_body(self.version),
            )
        except (ProxyClientError, TypeError, ValueError):
            if call.settle():
                call.deferred.errback()
            return
        call.request_id, call.connection = request_id, self
        self.in_flight[request_id] = call
        self.stream.write(frame)

    def forget(self, call: _Call) -> None:
        """
        Stop waiting for C{call}'s answer and ask the server to abort it.
        """
        if call.request_id is None or self.in_flight.pop(call.request_id, None) is None:
            return
        if not self.gone and self.version is not None:
            cancel_id = str(uuid.uuid4())
            self.stream.write(
                encode_frame(cancel_message(self.version, cancel_id, call.request_id), MAX_FRAME_V1)
            )

    def _stop_handshake_timer(self) -> None:
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.gone = True
        self._stop_handshake_timer()
        calls = list(self.in_flight.values())
        self.in_flight.clear()
        self._client._connection_lost(self, calls)
        self.lost.callback(None)


class _ClientFactory(Factory):
    def __init__(self, client: ProxySocketClient) -> None:
        self._client = client

    def buildProtocol(self, addr: object) -> _ClientProtocol:
        protocol = _ClientProtocol(self._client)
        self._client._protocol = protocol
        return protocol


class ProxySocketClient:
    """
    A lazily connecting, self-healing client of one credential socket.

    @param reactor: time source for timers (and the reactor for a Unix path).
    @param endpoint: where the server listens: an endpoint, or a Unix socket path.
    @param capability_token: presented in every handshake, when given.
    @param request_timeout: default seconds a request may take (capped at an hour).
    @param idle_timeout: seconds without pending requests before the connection closes.
    @param max_waiting: requests allowed to queue behind the MAX_IN_FLIGHT on the wire.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        endpoint: IStreamClientEndpoint | str,
        capability_token: Secret | None = None,
        request_timeout: float = CLIENT_REQUEST_TIMEOUT,
        idle_timeout: float = CLIENT_IDLE_TIMEOUT,
        max_waiting: int = CLIENT_MAX_WAITING,
    ) -> None:
        if isinstance(endpoint, str):
            if not IReactorUNIX.providedBy(reactor):
                raise TypeError("a Unix socket path needs a reactor providing IReactorUNIX")
            self._where = endpoint
            endpoint = UNIXClientEndpoint(reactor, endpoint)
        else:
            self._where = type(endpoint).__name__
        if idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive")
        self.reactor = reactor
        self.capability_token = capability_token
        self.request_timeout = checked_timeout(request_timeout, CLIENT_REQUEST_TIMEOUT)
        self.idle_timeout = float(idle_timeout)
        self._endpoint = endpoint
        self._max_waiting = max_waiting
        self._waiting: deque[_Call] = deque()
        self._protocol: _ClientProtocol | None = None
        self._connecting: Deferred[Any] | None = None
        self._idle_timer: IDelayedCall | None = None

    def __repr__(self) -> str:
        token = "with" if self.capability_token is not None else "without"
        return f"<ProxySocketClient {self._where!r} {token} capability token>"

    @property
    def version(self) -> int | None:
        """
        The protocol version of the current connection, None while there is none.
        """
        protocol = self._protocol
        return None if protocol is None or protocol.gone else protocol.version

    @property
    def pending(self) -> int:
        """
        Requests issued and not yet settled (queued or on the wire).
        """
        on_wire = len(self._protocol.in_flight) if self._protocol is not None else 0
        return len(self._waiting) + on_wire

    def request(
        self, op: str, payload: Mapping[str, Any] | None = None, timeout: float | None = None
    ) -> Deferred[dict[str, Any]]:
        """
        Send C{op} and return a Deferred of the answer's C{data}. It fails with
        L{ProxyRequestError} on C{ok:false}, L{ProxyTimeoutError} after the
        timeout, L{ProxyConnectionLost} when the connection goes away first.
        Cancelling the Deferred, like a timeout, sends a C{cancel} for it.

        @param timeout: seconds for this call; None for the client's default.
        """
        seconds = checked_timeout(timeout, self.request_timeout)
        call = _Call(str(op), dict(payload or {}))
        call.deferred = Deferred(lambda _: self._abandon(call))
        if len(self._waiting) >= self._max_waiting:
            return fail(ProxyRequestError(ErrorCode.RESOURCE_EXHAUSTED, Message.TOO_MANY_IN_FLIGHT))
        call.timer = self.reactor.callLater(seconds, self._expire, call, seconds)
        self._waiting.append(call)
        self._advance()
        return call.deferred

    def close(self) -> Deferred[None]:
        """
        Drop the connection now, failing what is pending with
        L{ProxyClientClosed}; fires once the connection is gone. A later
        request connects again.
        """
        self._stop_idle_timer()
        calls = list(self._waiting)
        self._waiting.clear()
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            calls.extend(protocol.in_flight.values())
            protocol.in_flight.clear()
        if self._connecting is not None:
            self._connecting.cancel()
        for call in calls:
            if call.settle():
                call.deferred.errback(ProxyClientClosed())
        if protocol is None or protocol.lost.called:
            return succeed(None)
        protocol.gone = True
        protocol.stream.abortConnection()
        done: Deferred[None] = Deferred()
        protocol.lost.addBoth(lambda _: done.callback(None))
        return done

    # -- internals -----------------------------------------------------------

    def _advance(self) -> None:
        """
        Move queued calls onto the wire, connecting first if needed, and keep
        the idle timer running exactly while nothing is pending.
        """
        protocol = self._protocol
        if protocol is None or protocol.gone:
            if self._waiting and self._connecting is None:
                self._connect()
            return
        if protocol.version is None:
            return  # handshaking
        while self._waiting and len(protocol.in_flight) < MAX_IN_FLIGHT:
            protocol.send(self._waiting.popleft())
        if self._waiting or protocol.in_flight:
            self._stop_idle_timer()
        elif self._idle_timer is None:
            self._idle_timer = self.reactor.callLater(self.idle_timeout, self._idle)

    def _connect(self) -> None:
        self._protocol = None
        connecting = self._endpoint.connect(_ClientFactory(self))
        self._connecting = connecting

        def connected(protocol: _ClientProtocol) -> None:
            if self._connecting is connecting:
                self._connecting = None

        def failed(reason: Failure) -> None:
            if self._connecting is connecting:
                self._connecting = None
            kind = reason.type.__name__ if reason.type is not None else "error"
            _log.warn("cannot connect to the credential proxy: {kind}", kind=kind)
            self._fail_waiting(ProxyConnectionLost)

        connecting.addCallbacks(connected, failed)

    def _idle(self) -> None:
        self._idle_timer = None
        protocol, self._protocol = self._protocol, None
        if protocol is not None and not protocol.gone:
            protocol.gone = True
            protocol.stream.loseConnection()

    def _stop_idle_timer(self) -> None:
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None

    def _expire(self, call: _Call, seconds: float) -> None:
        call.timer = None
        self._abandon(call)
        if call.settle():
            call.deferred.errback(ProxyTimeoutError(seconds))

    def _abandon(self, call: _Call) -> None:
        """
        The caller stopped waiting (timeout or cancel): unqueue the call, or
        cancel it on the wire so the server stops work and its answer is ignored.
        """
        if call.timer is not None and call.timer.active():
            call.timer.cancel()
        call.timer = None
        if call in self._waiting:
            self._waiting.remove(call)
        elif call.connection is not None:
            call.connection.forget(call)
        self._advance()

    def _fail_waiting(self, error: Callable[[], ProxyClientError]) -> None:
        calls = list(self._waiting)
        self._waiting.clear()
        for call in calls:
            if call.settle():
                call.deferred.errback(error())

    def _handshake_refused(self, refusal: ProxyRequestError) -> None:
        self._fail_waiting(lambda: ProxyRequestError(refusal.code, refusal.message))

    def _connection_lost(self, protocol: _ClientProtocol, calls: list[_Call]) -> None:
        """
        Fail every pending request of the lost connection at once, and the
        queued ones with them; the next request starts a new connection.
        """
        if self._protocol is protocol:
            self._protocol = None
            self._stop_idle_timer()
            self._fail_waiting(ProxyConnectionLost)
        for call in calls:
            if call.settle():
                call.deferred.errback(ProxyConnectionLost())
