"""
The credential socket's server: one L{CredentialServerProtocol} per
connection (framing, timers, handshake, concurrent requests answered by id)
and the L{CredentialServerFactory} that holds what connections share (the
stores, the capability token, the set of live connections for shutdown).

What each op does lives in L{credproxy.wire._ops}; the protocol only decides
whether and when an op runs, and turns its outcome into exactly one frame.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from typing import Any, Final, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IHalfCloseableDescriptor,
    IPushProducer,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from credproxy._listen import peer_credentials
from credproxy._secret import Secret
from credproxy.broker import Broker
from credproxy.wire import _audit, _handshake
from credproxy.wire._codec import (
    LENGTH_PREFIX,
    NotAJSONObject,
    decode_json_object,
    encode_json,
    frame,
    js_number,
    max_body,
)
from credproxy.wire._op_table import OPERATIONS
from credproxy.wire._ops import (
    AuditRecord,
    OpContext,
    OpFailure,
    Status,
    text,
)
from credproxy.wire._spec import (
    CANCEL_OP,
    CONNECTION_IDLE_TIMEOUT,
    HANDSHAKE_TIMEOUT,
    HEADER_SIZE,
    MAX_CONNECTIONS,
    MAX_FRAME_V1,
    MAX_FRAME_V2,
    MAX_FRAMES_PER_READ,
    MAX_IN_FLIGHT,
    PARTIAL_FRAME_TIMEOUT,
    REJECTED_HANDSHAKE_CLOSE_DELAY,
    REQUEST_HANDLING_TIMEOUT,
    SHUTDOWN_HARD_CLOSE_DELAY,
    ErrorCode,
    Message,
)

log = Logger()

_REFUSAL_FRAMES: Final = {
    ErrorCode.UNKNOWN_VERSION: encode_json(_handshake.UNSUPPORTED_VERSION),
    ErrorCode.UNAUTHORIZED: encode_json(_handshake.BAD_CAPABILITY_TOKEN),
}


class _StreamTransport(ITCPTransport, IConsumer, IPushProducer):
    """
    What Unix and TCP stream transports both are: abortable, half-closeable,
    a consumer of our answers and a producer of the client's requests.
    """


class _State(enum.Enum):
    HANDSHAKE = "handshake"  # waiting for the first frame
    OPEN = "open"  # serving requests
    REJECTED = "rejected"  # handshake refused: reply written, input dropped, closing
    CLOSING = "closing"  # shutdown: EOF sent, input dropped
    CLOSED = "closed"


class CloseReason:
    """
    Why the server ended a connection, as the audit line says it.
    """

    OVERSIZED_FRAME: Final = "oversized_frame"
    INVALID_JSON: Final = "invalid_json"
    FLOOD: Final = "flood"
    PARTIAL_FRAME_TIMEOUT: Final = "partial_frame_timeout"
    HANDSHAKE_TIMEOUT: Final = "handshake_timeout"
    IDLE: Final = "idle"
    REJECTED: Final = "rejected_handshake"
    SHUTDOWN: Final = "shutdown"
    PEER_UID: Final = "peer_uid"


def _echoed_id(value: object) -> str:
    """
    The C{id} to answer an invalid request with: the request's own, as
    JavaScript's C{String()} would render it, or C{"unknown"} without one.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return "unknown"


def _request_id(value: object) -> str | None:
    """
    The request's id as a string, or None when it is missing or empty (a
    JavaScript falsy value: absent, C{""}, C{0}, C{false}, C{null}).
    """
    if not value or not isinstance(value, str | int | float) or isinstance(value, bool):
        return None
    return _echoed_id(value)


class _InFlight:
    """
    One running op: its Deferred, its handling timer, its audit record.
    C{answered} is set once its one answer has been written (or must never
    be, because the connection is gone).
    """

    __slots__ = ("answered", "deferred", "record", "started", "timer")

    def __init__(self, record: AuditRecord, started: float) -> None:
        self.record = record
        self.started = started
        self.deferred: Deferred[dict[str, Any]] | None = None
        self.timer: IDelayedCall | None = None
        self.answered = False


@implementer(IPushProducer)
class CredentialServerProtocol(Int32StringReceiver):
    """
    One connection to the credential socket.

    Framing is L{Int32StringReceiver}'s, with C{MAX_LENGTH} at the version 1
    limit until a version 2 handshake raises it. Frames of one read are
    counted before any is acted on, so a flood is cut off having done
    nothing. The protocol is its transport's producer: while the client does
    not read its answers, it stops reading new requests.

    Timers (all from the factory's reactor): the partial-frame deadline
    (from the moment a frame's header is in, not moved by further bytes);
    one handling deadline per op; and the idle/handshake deadline, checked
    lazily against the time of the last activity so a busy connection does
    not pay for rescheduling on every read.
    """

    MAX_LENGTH = MAX_FRAME_V1

    def __init__(self, factory: CredentialServerFactory, number: int) -> None:
        self.factory = factory
        self.number = number
        self._clock = factory.reactor
        self._state = _State.HANDSHAKE
        self.version: int | None = None
        self.sandbox = False
        self._context: OpContext | None = None
        self._in_flight: dict[str, _InFlight] = {}
        self._frames: list[bytes] = []  # bodies of the current read, to act on after it
        self._frames_this_read = 0
        self._partial_timer: IDelayedCall | None = None
        self._idle_timer: IDelayedCall | None = None
        self._hard_close: IDelayedCall | None = None
        self._last_activity = 0.0
        self._close_reason: str | None = None

    def __repr__(self) -> str:
        return f"<CredentialServerProtocol #{self.number} {self._state.value}>"

    @property
    def _transport(self) -> _StreamTransport:
        assert self.transport is not None
        return cast(_StreamTransport, self.transport)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    # -- connection lifecycle -----------------------------------------------

    def connectionMade(self) -> None:
        self.factory.connection_made(self)
        peer = peer_credentials(self.transport)
        _audit.connection_event(
            self.number, "connected", peer_uid=peer.uid if peer is not None else None
        )
        if peer is not None and not self.factory.serves_uid(peer.uid):
            self._close_reason = CloseReason.PEER_UID
            self._state = _State.CLOSING
            self._transport.loseConnection()
            return
        self._transport.registerProducer(self, True)
        self._last_activity = self._clock.seconds()
        self._idle_timer = self._clock.callLater(HANDSHAKE_TIMEOUT, self._check_idle)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._state = _State.CLOSED
        self._unprocessed = b""
        for timer in (self._partial_timer, self._idle_timer, self._hard_close):
            if timer is not None and timer.active():
                timer.cancel()
        self._partial_timer = self._idle_timer = self._hard_close = None
        pending, self._in_flight = self._in_flight, {}
        for entry in pending.values():
            self._abandon(entry, Status.CANCELLED)
        _audit.connection_event(
            self.number, "closed", reason=self._close_reason or "peer", abandoned=len(pending)
        )
        self.factory.connection_lost(self)

    def end(self) -> None:
        """
        End the connection for a shutdown: abandon running ops, send EOF once
        the answers already written are flushed, and hard-close after
        L{SHUTDOWN_HARD_CLOSE_DELAY} if the peer does not read them.
        """
        if self._state is _State.CLOSED:
            return
        if self._state is not _State.REJECTED:
            self._close_reason = self._close_reason or CloseReason.SHUTDOWN
        self._state = _State.CLOSING
        pending, self._in_flight = self._in_flight, {}
        for entry in pending.values():
            self._abandon(entry, Status.CANCELLED)
        self._transport.loseConnection()
        if self._hard_close is None:
            self._hard_close = self._clock.callLater(SHUTDOWN_HARD_CLOSE_DELAY, self._abort_now)

    def _abort(self, reason: str) -> None:
        """
        Close at once, without a reply: the peer broke the framing.
        """
        self._close_reason = reason
        self._state = _State.CLOSED
        self.paused = True  # Int32StringReceiver stops framing the rest of this read
        self._unprocessed = b""  # nothing of an oversized or broken frame is kept
        self._frames = []
        self._transport.abortConnection()

    def _abort_now(self) -> None:
        self._hard_close = None
        self._transport.abortConnection()

    # -- producer: stop reading while the client does not read ----------------

    def pauseProducing(self) -> None:
        self.paused = True
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        if self._state is not _State.CLOSED:
            self._transport.resumeProducing()
            self.dataReceived(b"")  # act on frames read before the pause

    def stopProducing(self) -> None:
        self.paused = True

    # -- framing --------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._state is not _State.HANDSHAKE and self._state is not _State.OPEN:
            return  # rejected or closing: read (to notice EOF) and drop
        if data:
            self._last_activity = self._clock.seconds()
        self._frames_this_read = 0
        super().dataReceived(data)
        frames, self._frames = self._frames, []
        for body in frames:
            if self._state is not _State.OPEN:
                return
            self._request(body)
        if self._state is _State.HANDSHAKE or self._state is _State.OPEN:
            self._watch_partial_frame()

    def stringReceived(self, body: bytes) -> None:
        if self._state is not _State.HANDSHAKE and self._state is not _State.OPEN:
            return
        self._frames_this_read += 1
        if self._frames_this_read > MAX_FRAMES_PER_READ:
            self._abort(CloseReason.FLOOD)
        elif self._state is _State.HANDSHAKE:
            # At once, so the rest of this read is framed with the new limit.
            self._handshake(body)
        else:
            self._frames.append(body)

    def lengthLimitExceeded(self, length: int) -> None:
        self._abort(CloseReason.OVERSIZED_FRAME)

    def _watch_partial_frame(self) -> None:
        """
        Arm the partial-frame deadline when a header is in but its body is
        not; disarm it once a frame completes. While paused, frames wait on
        us, not on the peer, so no deadline runs.
        """
        timer = self._partial_timer
        if timer is not None and (self._frames_this_read or self.paused):
            timer.cancel()
            self._partial_timer = timer = None
        pending = self._unprocessed
        if timer is None and not self.paused and len(pending) >= HEADER_SIZE:
            (length,) = LENGTH_PREFIX.unpack_from(pending)
            if len(pending) < HEADER_SIZE + length:
                self._partial_timer = self._clock.callLater(
                    PARTIAL_FRAME_TIMEOUT, self._partial_frame_expired
                )

    def _partial_frame_expired(self) -> None:
        self._partial_timer = None
        self._abort(CloseReason.PARTIAL_FRAME_TIMEOUT)

    def _check_idle(self) -> None:
        self._idle_timer = None
        if self._state is not _State.HANDSHAKE and self._state is not _State.OPEN:
            return
        handshaking = self._state is _State.HANDSHAKE
        limit = HANDSHAKE_TIMEOUT if handshaking else CONNECTION_IDLE_TIMEOUT
        remaining = self._last_activity + limit - self._clock.seconds()
        if self._in_flight or remaining > 0:
            self._idle_timer = self._clock.callLater(
                remaining if remaining > 0 else limit, self._check_idle
            )
            return
        self._close_reason = CloseReason.HANDSHAKE_TIMEOUT if handshaking else CloseReason.IDLE
        self._state = _State.CLOSING
        self._transport.loseConnection()

    # -- handshake ------------------------------------------------------------

    def _handshake(self, body: bytes) -> None:
        try:
            message = decode_json_object(body)
        except NotAJSONObject:
            self._abort(CloseReason.INVALID_JSON)
            return
        version = _handshake.negotiate_version(message)
        if version is None:
            self._reject(ErrorCode.UNKNOWN_VERSION)
            return
        required = self.factory.capability_token
        if required is not None and not _handshake.presents_token(message, required):
            self._reject(ErrorCode.UNAUTHORIZED)
            return
        self.version = version
        self.sandbox = required is not None
        self.MAX_LENGTH = max_body(version)
        self._context = self.factory.context(self.sandbox, self)
        self._state = _State.OPEN
        self._transport.write(frame(encode_json(_handshake.accepted(version))))
        _audit.connection_event(self.number, "handshake", version=version, sandbox=self.sandbox)

    def _reject(self, code: ErrorCode) -> None:
        """
        Refuse the handshake so the client can read why: the error frame,
        then a half-close, then a hard close if the peer never reads it.
        """
        self._state = _State.REJECTED
        self._close_reason = CloseReason.REJECTED
        self._unprocessed = b""
        self._frames = []
        self._transport.write(frame(_REFUSAL_FRAMES[code]))
        _audit.connection_event(self.number, "refused", code=code.value)
        if IHalfCloseableDescriptor.providedBy(self._transport):
            self._transport.loseWriteConnection()
        else:
            self._transport.loseConnection()
        self._hard_close = self._clock.callLater(REJECTED_HANDSHAKE_CLOSE_DELAY, self._abort_now)

    # -- requests -------------------------------------------------------------

    def _request(self, body: bytes) -> None:
        try:
            message = decode_json_object(body)
        except NotAJSONObject:
            self._abort(CloseReason.INVALID_JSON)
            return
        raw_id, op = message.get("id"), message.get("op")
        request_id = _request_id(raw_id)
        if request_id is None or not isinstance(op, str) or not op:
            self._refuse(
                _echoed_id(raw_id), op, ErrorCode.INVALID_REQUEST, Message.MISSING_ID_OR_OP
            )
            return
        payload = message.get("payload")
        if not isinstance(payload, dict):
            payload = {}
        if op == CANCEL_OP:
            self._cancel(request_id, payload)
        elif request_id in self._in_flight:
            self._refuse(request_id, op, ErrorCode.INVALID_REQUEST, Message.DUPLICATE_ID)
        elif len(self._in_flight) >= MAX_IN_FLIGHT:
            self._refuse(request_id, op, ErrorCode.RESOURCE_EXHAUSTED, Message.TOO_MANY_IN_FLIGHT)
        elif op not in OPERATIONS:
            self._refuse(request_id, op, ErrorCode.INVALID_REQUEST, Message.UNKNOWN_OP_PREFIX + op)
        else:
            self._run(request_id, op, payload)

    def _refuse(self, request_id: str, op: object, code: ErrorCode, message: str) -> None:
        record = AuditRecord(op if isinstance(op, str) else "", status=Status.INVALID)
        if code is ErrorCode.RESOURCE_EXHAUSTED:
            record.status = Status.ERROR
        self._answer_error(request_id, code, message)
        _audit.op_done(self.number, record, 0.0)

    def _run(self, request_id: str, op: str, payload: Mapping[str, Any]) -> None:
        assert self._context is not None
        entry = _InFlight(AuditRecord(op), self._clock.seconds())
        self._in_flight[request_id] = entry
        handler = OPERATIONS[op]
        done: Deferred[dict[str, Any]] = Deferred.fromCoroutine(
            handler(self._context, payload, entry.record)
        )
        entry.deferred = done
        done.addBoth(self._finished, request_id, entry)
        if not entry.answered:
            entry.timer = self._clock.callLater(
                REQUEST_HANDLING_TIMEOUT, self._timed_out, request_id, entry
            )

    def _finished(
        self, result: dict[str, Any] | Failure, request_id: str, entry: _InFlight
    ) -> None:
        if entry.timer is not None and entry.timer.active():
            entry.timer.cancel()
        if self._in_flight.get(request_id) is entry:
            del self._in_flight[request_id]
        if entry.answered:
            return  # cancelled, timed out or abandoned: already answered or never will be
        entry.answered = True
        record = entry.record
        if not isinstance(result, Failure):
            self._answer({"id": request_id, "ok": True, "data": result})
        elif isinstance(result.value, OpFailure):
            failure = result.value
            record.status = failure.status
            answer = _error(request_id, failure.code, failure.message)
            if failure.retry_after is not None:
                answer["retryAfter"] = js_number(failure.retry_after)
            self._answer(answer)
        else:
            # Neither the exception's text nor its traceback is logged: a store
            # or provider error may quote the secret it was handling.
            record.status = Status.ERROR
            log.error(
                "credential socket op {op} failed with {kind}",
                op=_audit.printable(record.op),
                kind=result.type.__qualname__ if result.type else "unknown",
            )
            self._answer_error(request_id, ErrorCode.INTERNAL_ERROR, Message.INTERNAL)
        now = self._clock.seconds()
        self._last_activity = now
        _audit.op_done(self.number, record, now - entry.started)
        return

    def _interrupt(self, request_id: str, entry: _InFlight, status: str) -> None:
        """
        Stop a running op whose answer has just been written for it.
        """
        del self._in_flight[request_id]
        entry.answered = True
        entry.record.status = status
        _audit.op_done(self.number, entry.record, self._clock.seconds() - entry.started)
        if entry.deferred is not None:
            entry.deferred.cancel()

    def _abandon(self, entry: _InFlight, status: str) -> None:
        """
        Stop a running op of a connection that is going away, unanswered.
        """
        if entry.answered:
            return
        entry.answered = True
        entry.record.status = status
        _audit.op_done(self.number, entry.record, self._clock.seconds() - entry.started)
        if entry.deferred is not None:
            entry.deferred.cancel()

    def _cancel(self, request_id: str, payload: Mapping[str, Any]) -> None:
        record = AuditRecord(CANCEL_OP)
        target = text(payload, "targetId")
        if target is None:
            record.status = Status.INVALID
            self._answer_error(request_id, ErrorCode.INVALID_REQUEST, Message.MISSING_TARGET_ID)
        else:
            entry = self._in_flight.get(target)
            self._answer({"id": request_id, "ok": True, "data": {"cancelled": entry is not None}})
            if entry is not None:
                self._answer_error(target, ErrorCode.CANCELLED, Message.CANCELLED)
                self._interrupt(target, entry, Status.CANCELLED)
            record.count = 1 if entry is not None else 0
        _audit.op_done(self.number, record, 0.0)

    def _timed_out(self, request_id: str, entry: _InFlight) -> None:
        entry.timer = None
        if self._in_flight.get(request_id) is entry:
            self._answer_error(request_id, ErrorCode.INTERNAL_ERROR, Message.TIMED_OUT)
            self._interrupt(request_id, entry, Status.TIMED_OUT)

    # -- answers --------------------------------------------------------------

    def _answer_error(self, request_id: str, code: ErrorCode, message: str) -> None:
        self._answer(_error(request_id, code, message))

    def _answer(self, message: dict[str, Any]) -> None:
        """
        Write one answer as one frame, replaced by the protocol's error when
        it is too large for the peer's version (the connection stays open).
        """
        if self._state is not _State.OPEN:
            return
        request_id = message["id"]
        try:
            body = encode_json(message)
        except TypeError:
            body = encode_json(_error(request_id, ErrorCode.INTERNAL_ERROR, Message.INTERNAL))
        # A version 1 peer's limit counts the whole frame, header included.
        limit = MAX_FRAME_V1 - HEADER_SIZE if self.version == 1 else MAX_FRAME_V2
        if len(body) > limit:
            code, text = (
                (ErrorCode.RESPONSE_TOO_LARGE, Message.RESPONSE_TOO_LARGE_V1)
                if self.version == 1
                else (ErrorCode.INTERNAL_ERROR, Message.FRAME_TOO_LARGE)
            )
            body = encode_json(_error(request_id, code, text))
            if len(body) > limit:
                # Only an id near the frame limit gets here: it cannot be
                # echoed, so no answer could be correlated. Say nothing.
                log.warn(
                    "credential socket conn={conn}: an answer's id is too long to send",
                    conn=self.number,
                )
                return
        self._transport.write(frame(body))


def _error(request_id: str, code: ErrorCode, message: str) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "code": code, "error": message}


class CredentialServerFactory(Factory):
    """
    What every connection of one credential socket shares: the broker, the
    capability token (connections that present it are sandbox connections),
    the Unix peers allowed in, and the live connections, so a shutdown can
    end them all before the socket file goes away.
    """

    protocol = CredentialServerProtocol

    def __init__(
        self,
        reactor: IReactorTime,
        broker: Broker,
        capability_token: Secret | None = None,
        *,
        allowed_uids: frozenset[int] = frozenset(),
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.reactor = reactor
        self.broker = broker
        self.capability_token = capability_token
        self.allowed_uids = allowed_uids
        self.max_connections = max_connections
        self.accepting = True
        self._connections: set[CredentialServerProtocol] = set()
        self._numbered = 0
        self._all_gone: list[Deferred[None]] = []

    def __repr__(self) -> str:
        return (
            f"<CredentialServerFactory connections={len(self._connections)} "
            f"capability_token={'set' if self.capability_token is not None else 'none'}>"
        )

    @property
    def connections(self) -> frozenset[CredentialServerProtocol]:
        return frozenset(self._connections)

    def serves_uid(self, uid: int) -> bool:
        """
        Whether a Unix peer of this uid may connect; our own uid always may.
        """
        return uid == os.getuid() or uid in self.allowed_uids

    def context(self, sandbox: bool, connection: object) -> OpContext:
        return OpContext(self.broker, sandbox, connection)

    def buildProtocol(self, addr: object) -> CredentialServerProtocol | None:
        if not self.accepting or len(self._connections) >= self.max_connections:
            _audit.connection_event(
                0, "refused", reason="stopping" if not self.accepting else "too_many_connections"
            )
            return None
        self._numbered += 1
        return CredentialServerProtocol(self, self._numbered)

    def connection_made(self, connection: CredentialServerProtocol) -> None:
        self._connections.add(connection)

    def connection_lost(self, connection: CredentialServerProtocol) -> None:
        self._connections.discard(connection)
        self.broker.sessions.drop_owner(connection)
        if not self._connections:
            waiting, self._all_gone = self._all_gone, []
            for d in waiting:
                d.callback(None)

    def end_connections(self) -> Deferred[None]:
        """
        Stop accepting and end every connection (EOF now, a hard close after
        L{SHUTDOWN_HARD_CLOSE_DELAY}); fires once all of them are gone.
        """
        self.accepting = False
        if not self._connections:
            return succeed(None)
        gone: Deferred[None] = Deferred()
        self._all_gone.append(gone)
        for connection in list(self._connections):
            connection.end()
        return gone
