"""
The credential socket's server: one L{CredentialServerProtocol} per
connection (framing, timers, handshake, concurrent requests answered by id)
and the L{CredentialServerFactory} that holds what connections share (the
stores, the capability token, the set of live connections for shutdown).

What each op does lives in L{credproxy.wire._ops}; the protocol only decides
whether and when an op runs, and turns its outcome into exactly one frame.

Connection slots (L{credproxy._limits}): a connection counts in the small
pending pool until its handshake succeeds and only then takes one of the
face's slots, so connections that never handshake cannot crowd out the ones
that did. Past a limit a connection is answered with a handshake-shaped
C{RESOURCE_EXHAUSTED} frame and closed at once, never silently dropped.
"""

from __future__ import annotations

import enum
import os
from collections import Counter
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
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

from credproxy._audit_trail import IAuditTrail, LogAuditTrail
from credproxy._limits import ConnectionLimits, ConnectionSlots, SlotRefusal, peer_key
from credproxy._listen import peer_credentials
from credproxy._secret import Secret
from credproxy.broker import Broker
from credproxy.stores import StoreDown, StoreError
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
    MAX_FRAME_V1,
    MAX_FRAME_V2,
    MAX_FRAMES_PER_READ,
    MAX_IN_FLIGHT,
    MAX_LINGERING_REFUSALS,
    MAX_PENDING_HANDSHAKES,
    PARTIAL_FRAME_TIMEOUT,
    REJECTED_HANDSHAKE_CLOSE_DELAY,
    REQUEST_HANDLING_TIMEOUT,
    SHUTDOWN_HARD_CLOSE_DELAY,
    ErrorCode,
    Message,
)

log = Logger()

# The slot limits of a face unless told otherwise: 1024 connections, 256 per peer.
DEFAULT_LIMITS: Final = ConnectionLimits()


class _StreamTransport(ITCPTransport, IConsumer, IPushProducer):
    """
    What Unix and TCP stream transports both are: abortable, half-closeable,
    a consumer of our answers and a producer of the client's requests.
    """


class _Slot(enum.Enum):
    """
    What a connection holds of its factory's counts; it holds one at most.
    """

    NONE = "none"  # nothing (not yet admitted, refused, or given back)
    PENDING = "pending"  # a place in the pending-handshake pool
    FACE = "face"  # a slot of the face (and of its peer), after a handshake
    LINGERING = "lingering"  # refused, waiting for its peer to read the refusal


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
    # refusals for want of a slot (and the close reason of their connection)
    FACE_FULL: Final = SlotRefusal.FACE_FULL
    PEER_FULL: Final = SlotRefusal.PEER_FULL
    PENDING_FULL: Final = "too_many_pending_handshakes"
    STOPPING: Final = "stopping"


@dataclass(frozen=True)
class Refusal:
    """
    A handshake-shaped refusal: C{kind} is the audit line's C{reason} (and
    the flood gate's kind), C{close_reason} the C{closed} line's, C{body}
    the encoded reply frame's body.
    """

    kind: str
    code: ErrorCode
    close_reason: str
    body: bytes


def _refusal(kind: str, close_reason: str, reply: Mapping[str, Any]) -> Refusal:
    return Refusal(kind, ErrorCode(reply["code"]), close_reason, encode_json(reply))


UNKNOWN_VERSION_REFUSAL: Final = _refusal(
    "unknown_version", CloseReason.REJECTED, _handshake.UNSUPPORTED_VERSION
)
BAD_TOKEN_REFUSAL: Final = _refusal(
    "bad_capability_token", CloseReason.REJECTED, _handshake.BAD_CAPABILITY_TOKEN
)
FACE_FULL_REFUSAL: Final = _refusal(
    CloseReason.FACE_FULL, CloseReason.FACE_FULL, _handshake.TOO_MANY_CONNECTIONS
)
PEER_FULL_REFUSAL: Final = _refusal(
    CloseReason.PEER_FULL, CloseReason.PEER_FULL, _handshake.TOO_MANY_PEER_CONNECTIONS
)
PENDING_FULL_REFUSAL: Final = _refusal(
    CloseReason.PENDING_FULL, CloseReason.PENDING_FULL, _handshake.TOO_MANY_PENDING_HANDSHAKES
)
_SLOT_REFUSALS: Final = {
    SlotRefusal.FACE_FULL: FACE_FULL_REFUSAL,
    SlotRefusal.PEER_FULL: PEER_FULL_REFUSAL,
}


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

    Timers (all from the factory's reactor): the handshake deadline, from
    the moment of connecting, which no byte received moves (trickling the
    length prefix cannot stretch it); the partial-frame deadline (from the
    moment a frame's header is in, not moved by further bytes); one handling
    deadline per op; and, after the handshake, the idle deadline, checked
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
        self._handshake_timer: IDelayedCall | None = None
        self._idle_timer: IDelayedCall | None = None
        self._hard_close: IDelayedCall | None = None
        self._last_activity = 0.0
        self._close_reason: str | None = None
        self._announced = False  # a "connected" line was written, so a "closed" one is owed
        self._refused = False  # a "refused" line was written: it is the connection's last
        # Who the peer is for counting (L{peer_key}), and what it holds.
        self.peer: Hashable | None = None
        self.peer_uid: int | None = None
        self.slot = _Slot.NONE

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
        factory = self.factory
        factory.connection_made(self)
        credentials = peer_credentials(self.transport)
        self.peer_uid = credentials.uid if credentials is not None else None
        if credentials is not None and not factory.serves_uid(credentials.uid):
            # Another uid learns nothing, not even why: closed without a reply.
            factory.refusals.refused(self.number, CloseReason.PEER_UID, peer_uid=self.peer_uid)
            self._refused = True
            self._close_reason = CloseReason.PEER_UID
            self._state = _State.CLOSING
            self._transport.loseConnection()
            return
        self.peer = peer_key(self.transport, credentials)
        refusal = factory.admit(self)
        if refusal is not None:
            # A refused connection writes only its (flood-gated) refusal line:
            # no connected/closed pair, so a connection flood stays a trickle.
            self._refuse_connection(refusal)
            return
        # Its "connected" line waits for the handshake: a peer that never
        # handshakes writes only a flood-gated line when it goes.
        self._transport.registerProducer(self, True)
        self._handshake_timer = self._clock.callLater(HANDSHAKE_TIMEOUT, self._handshake_expired)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._state = _State.CLOSED
        self._unprocessed = b""
        self._cancel_timers()
        if self._hard_close is not None and self._hard_close.active():
            self._hard_close.cancel()
        self._hard_close = None
        pending, self._in_flight = self._in_flight, {}
        for entry in pending.values():
            self._abandon(entry, Status.CANCELLED)
        close_reason = self._close_reason or "peer"
        if self._announced:
            _audit.connection_event(
                self.factory.audit_trail,
                self.number,
                "closed",
                reason=close_reason,
                abandoned=len(pending),
            )
        elif not self._refused:
            # Never handshaken, and not refused (a refusal wrote its line).
            self.factory.refusals.closed_before_handshake(self.number, close_reason)
        self.factory.connection_lost(self)

    def _cancel_timers(self) -> None:
        """
        Cancel the deadlines of a live connection (not the hard close).
        """
        for timer in (self._partial_timer, self._handshake_timer, self._idle_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._partial_timer = self._handshake_timer = self._idle_timer = None

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
        self._cancel_timers()
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
                break
            self._request(body)
        if self._state is _State.HANDSHAKE or self._state is _State.OPEN:
            self._watch_partial_frame()
        else:
            # Refused during this read: keep nothing of what followed.
            self._unprocessed = b""

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

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if self._state is _State.HANDSHAKE:
            self._close(CloseReason.HANDSHAKE_TIMEOUT)

    def _check_idle(self) -> None:
        self._idle_timer = None
        if self._state is not _State.OPEN:
            return
        limit = CONNECTION_IDLE_TIMEOUT
        remaining = self._last_activity + limit - self._clock.seconds()
        if self._in_flight or remaining > 0:
            self._idle_timer = self._clock.callLater(
                remaining if remaining > 0 else limit, self._check_idle
            )
            return
        self._close(CloseReason.IDLE)

    def _close(self, reason: str) -> None:
        """
        Send EOF for a deadline missed, and hard-close after
        L{SHUTDOWN_HARD_CLOSE_DELAY} if answers still wait for a peer that
        does not read them (else the connection, and its slot, would wait
        for that peer forever).
        """
        self._close_reason = reason
        self._state = _State.CLOSING
        self._cancel_timers()
        self._transport.loseConnection()
        if self._hard_close is None:
            self._hard_close = self._clock.callLater(SHUTDOWN_HARD_CLOSE_DELAY, self._abort_now)

    # -- handshake ------------------------------------------------------------

    def _handshake(self, body: bytes) -> None:
        try:
            message = decode_json_object(body)
        except NotAJSONObject:
            self._abort(CloseReason.INVALID_JSON)
            return
        version = _handshake.negotiate_version(message)
        if version is None:
            self._refuse_connection(UNKNOWN_VERSION_REFUSAL)
            return
        required = self.factory.capability_token
        if required is not None and not _handshake.presents_token(message, required):
            self._refuse_connection(BAD_TOKEN_REFUSAL)
            return
        refusal = self.factory.promote(self)
        if refusal is not None:
            self._refuse_connection(refusal)
            return
        self.version = version
        self.sandbox = required is not None
        self.MAX_LENGTH = max_body(version)
        self._context = self.factory.context(self.sandbox, self)
        self._state = _State.OPEN
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None
        self._last_activity = self._clock.seconds()
        self._idle_timer = self._clock.callLater(CONNECTION_IDLE_TIMEOUT, self._check_idle)
        self._transport.write(frame(encode_json(_handshake.accepted(version))))
        self._announced = True
        _audit.connection_event(
            self.factory.audit_trail, self.number, "connected", peer_uid=self.peer_uid
        )
        _audit.connection_event(
            self.factory.audit_trail,
            self.number,
            "handshake",
            version=version,
            sandbox=self.sandbox,
        )

    def evict(self) -> None:
        """
        Refuse this still-handshaking connection to make room in a full
        pending pool (L{CredentialServerFactory.admit}).
        """
        if self._state is _State.HANDSHAKE:
            self._refuse_connection(PENDING_FULL_REFUSAL)

    def _refuse_connection(self, refusal: Refusal) -> None:
        """
        Refuse the connection so the client can read why: the refusal frame,
        then a half-close, then a hard close after
        L{REJECTED_HANDSHAKE_CLOSE_DELAY} if the peer never closes. What the
        connection held is given back now; while it lingers it counts among
        at most L{MAX_LINGERING_REFUSALS}, and past those it is closed as
        soon as the frame is out, without waiting for the peer.
        """
        self._state = _State.REJECTED
        self._close_reason = refusal.close_reason
        self._refused = True
        self._unprocessed = b""
        self._frames = []
        self._cancel_timers()
        self._transport.write(frame(refusal.body))
        lingers = self.factory.refused(self, refusal)
        if lingers and IHalfCloseableDescriptor.providedBy(self._transport):
            self._transport.loseWriteConnection()
        else:
            self._transport.loseConnection()
        if self._hard_close is None:
            self._hard_close = self._clock.callLater(
                REJECTED_HANDSHAKE_CLOSE_DELAY, self._abort_now
            )

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
        _audit.op_done(self.factory.audit_trail, self.number, record, 0.0)

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
        elif isinstance(result.value, StoreError):
            # A store's message names the store and entry, never a value.
            record.status = Status.ERROR
            # An outage of a shared store is logged by the store, once.
            emit = log.debug if isinstance(result.value, StoreDown) else log.error
            emit(
                "credential socket op {op}: the credential store failed: {error}",
                op=_audit.printable(record.op),
                error=str(result.value),
            )
            self._answer_error(request_id, ErrorCode.INTERNAL_ERROR, Message.STORE_UNAVAILABLE)
        else:
            # Neither the exception's text nor its traceback is logged: a
            # provider error may quote the secret it was handling.
            record.status = Status.ERROR
            log.error(
                "credential socket op {op} failed with {kind}",
                op=_audit.printable(record.op),
                kind=result.type.__qualname__ if result.type else "unknown",
            )
            self._answer_error(request_id, ErrorCode.INTERNAL_ERROR, Message.INTERNAL)
        now = self._clock.seconds()
        self._last_activity = now
        _audit.op_done(self.factory.audit_trail, self.number, record, now - entry.started)
        return

    def _interrupt(self, request_id: str, entry: _InFlight, status: str) -> None:
        """
        Stop a running op whose answer has just been written for it.
        """
        del self._in_flight[request_id]
        entry.answered = True
        entry.record.status = status
        _audit.op_done(
            self.factory.audit_trail,
            self.number,
            entry.record,
            self._clock.seconds() - entry.started,
        )
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
        _audit.op_done(
            self.factory.audit_trail,
            self.number,
            entry.record,
            self._clock.seconds() - entry.started,
        )
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
        _audit.op_done(self.factory.audit_trail, self.number, record, 0.0)

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
    the Unix peers allowed in, the connection counts, the refusal log, and
    the live connections, so a shutdown can end them all before the socket
    file goes away.

    Counting: a new connection takes a place in the pending pool
    (C{max_pending_handshakes}); a successful handshake trades it for one of
    the face's slots (C{limits}: in all, and per peer, a peer being the uid
    on a Unix socket and the address on TCP). Every path out (a refused
    handshake, a timeout, an abort, a close) gives back exactly what was
    taken. A refused connection holds no slot while it waits to close, only
    a place among L{MAX_LINGERING_REFUSALS}.
    """

    protocol = CredentialServerProtocol

    def __init__(
        self,
        reactor: IReactorTime,
        broker: Broker,
        capability_token: Secret | None = None,
        *,
        allowed_uids: frozenset[int] = frozenset(),
        limits: ConnectionLimits = DEFAULT_LIMITS,
        max_pending_handshakes: int = MAX_PENDING_HANDSHAKES,
        audit_trail: IAuditTrail | None = None,
    ) -> None:
        if max_pending_handshakes < 1:
            raise ValueError("max_pending_handshakes must be at least 1")
        self.reactor = reactor
        # Where the audit records of this server's connections and ops go.
        self.audit_trail: IAuditTrail = audit_trail if audit_trail is not None else LogAuditTrail()
        self.broker = broker
        self.capability_token = capability_token
        self.allowed_uids = allowed_uids
        self.limits = limits
        self.max_pending_handshakes = max_pending_handshakes
        self.slots = ConnectionSlots(limits)
        self.refusals = _audit.RefusalLog(reactor, self.audit_trail)
        self.accepting = True
        self._connections: set[CredentialServerProtocol] = set()
        # Insertion-ordered, so the first of a peer's is its oldest.
        self._pending: dict[CredentialServerProtocol, None] = {}
        self._lingering: set[CredentialServerProtocol] = set()
        self._numbered = 0
        self._all_gone: list[Deferred[None]] = []

    def __repr__(self) -> str:
        return (
            f"<CredentialServerFactory connections={len(self._connections)} "
            f"handshaken={self.slots.total} pending={len(self._pending)} "
            f"capability_token={'set' if self.capability_token is not None else 'none'}>"
        )

    @property
    def connections(self) -> frozenset[CredentialServerProtocol]:
        return frozenset(self._connections)

    @property
    def pending_handshakes(self) -> int:
        """
        Connections holding a place in the pending pool.
        """
        return len(self._pending)

    @property
    def lingering_refusals(self) -> int:
        """
        Refused connections waiting for their peer to read the refusal.
        """
        return len(self._lingering)

    def serves_uid(self, uid: int) -> bool:
        """
        Whether a Unix peer of this uid may connect; our own uid always may.
        """
        return uid in self.allowed_uids or uid == os.getuid()

    def context(self, sandbox: bool, connection: object) -> OpContext:
        return OpContext(self.broker, sandbox, connection)

    def buildProtocol(self, addr: object) -> CredentialServerProtocol | None:
        # Slots are decided in connectionMade, where the transport (and so
        # the peer's uid) is known; only a stopping server refuses here.
        if not self.accepting:
            self.refusals.refused(0, CloseReason.STOPPING)
            return None
        self._numbered += 1
        return CredentialServerProtocol(self, self._numbered)

    # -- counting -------------------------------------------------------------

    def admit(self, connection: CredentialServerProtocol) -> Refusal | None:
        """
        Give a new connection a place in the pending pool, or the refusal
        to answer it with when the face, or its peer, is full already (it
        could never get a slot). A full pending pool makes room instead, by
        refusing the oldest pending connection of the peer holding most of
        them: a client handshakes within a round trip of connecting, so a
        pool filled by silent connections cannot keep it out, and a peer
        flooding the pool evicts its own connections first.
        """
        if self.slots.total >= self.limits.max_connections:
            return FACE_FULL_REFUSAL
        if self.slots.held_by(connection.peer) >= self.limits.max_per_peer:
            return PEER_FULL_REFUSAL
        while len(self._pending) >= self.max_pending_handshakes:
            self._evict_one()
        self._pending[connection] = None
        connection.slot = _Slot.PENDING
        return None

    def _evict_one(self) -> None:
        held = Counter(pending.peer for pending in self._pending)
        heaviest = max(held, key=held.__getitem__)  # on a tie, the peer of the oldest
        victim = next(pending for pending in self._pending if pending.peer == heaviest)
        victim.evict()
        # evict() gave its place back, unless it was already closing (a
        # deadline missed, an abort) and keeping it until it is gone: its
        # descriptor goes within a reactor turn, so let the newcomer have it.
        if self._pending.pop(victim, None) is not None:
            victim.slot = _Slot.NONE

    def promote(self, connection: CredentialServerProtocol) -> Refusal | None:
        """
        Trade a connection's pending place for a slot of the face once its
        handshake succeeded, or say why there is none (its place is given
        back either way).
        """
        self._give_back(connection)
        refusal = self.slots.take(connection.peer)
        if refusal is not None:
            return _SLOT_REFUSALS[refusal]
        connection.slot = _Slot.FACE
        return None

    def refused(self, connection: CredentialServerProtocol, refusal: Refusal) -> bool:
        """
        Log a refusal (flood-gated) and give back what the connection held.
        True when it may wait for its peer to read the refusal (it then
        counts among the lingering ones), False when it must close now.
        """
        self.refusals.refused(
            connection.number,
            refusal.kind,
            code=refusal.code.value,
            peer_uid=connection.peer_uid,
        )
        self._give_back(connection)
        if len(self._lingering) >= MAX_LINGERING_REFUSALS:
            return False
        self._lingering.add(connection)
        connection.slot = _Slot.LINGERING
        return True

    def _give_back(self, connection: CredentialServerProtocol) -> None:
        slot, connection.slot = connection.slot, _Slot.NONE
        if slot is _Slot.PENDING:
            self._pending.pop(connection, None)
        elif slot is _Slot.FACE:
            self.slots.give_back(connection.peer)
        elif slot is _Slot.LINGERING:
            self._lingering.discard(connection)

    # -- connections ------------------------------------------------------------

    def connection_made(self, connection: CredentialServerProtocol) -> None:
        self._connections.add(connection)

    def connection_lost(self, connection: CredentialServerProtocol) -> None:
        self._give_back(connection)
        self._connections.discard(connection)
        self.broker.sessions.drop_owner(connection)
        if not self._connections:
            waiting, self._all_gone = self._all_gone, []
            for d in waiting:
                d.callback(None)

    def end_connections(self) -> Deferred[None]:
        """
        Stop accepting and end every connection (EOF now, a hard close after
        L{SHUTDOWN_HARD_CLOSE_DELAY}); fires once all of them are gone. The
        refusal counts still owed are written now.
        """
        self.accepting = False
        self.refusals.stop()
        if not self._connections:
            return succeed(None)
        gone: Deferred[None] = Deferred()
        self._all_gone.append(gone)
        for connection in list(self._connections):
            connection.end()
        return gone
