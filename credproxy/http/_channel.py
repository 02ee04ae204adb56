"""
The HTTP face's connection: twisted.web's L{HTTPChannel} with a gate in
front of it. The gate holds each request head until it is complete, judges
it (L{credproxy.http._head}) and admits it (L{credproxy.http._admission})
before twisted.web sees a byte of it, so a refused request is answered and
closed having made credproxy read no body and send no C{100 Continue}.

It also holds the connection's slot on the face and the deadlines a request
must meet: the whole head within C{head_timeout} of its first byte, and a
body that makes progress every C{body_idle_timeout} and is done within
C{body_timeout}. twisted.web's own idle timeout, which every received byte
restarts, stays only for idle kept-alive connections.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from twisted.internet.interfaces import IDelayedCall, IHalfCloseableDescriptor, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel

from credproxy._limits import ConnectionSlots, SlotRefusal, peer_key
from credproxy._listen import PeerCredentials, peer_credentials
from credproxy.http._admission import PEER_REFUSED, admission_refusal
from credproxy.http._audit import RefusalAudit
from credproxy.http._body import BodyBudget
from credproxy.http._config import HTTPProxyConfig
from credproxy.http._errors import ErrorKind, raw_error_response
from credproxy.http._head import (
    HeadRefusal,
    RequestHead,
    check_incomplete,
    parse_head,
    split_head,
)
from credproxy.http._headers import presented_placeholder

if TYPE_CHECKING:
    from credproxy.http._site import ProxySite

log = Logger(namespace="credproxy.http")

# After a refusal the connection stops sending, and reads and drops what the
# agent still sends, so the agent reads the answer instead of a reset; it is
# closed when the agent closes, or after this long.
REFUSED_LINGER_SECONDS: Final = 5.0
# A connection refused for want of a slot has sent no body yet: it needs
# less time to read its answer, and holds a descriptor while it lingers.
NO_SLOT_LINGER_SECONDS: Final = 1.0
# What an overloaded answer asks the agent to wait before trying again.
OVERLOADED_RETRY_AFTER: Final = 1

_NO_SLOT: Final = {
    SlotRefusal.FACE_FULL: HeadRefusal(
        ErrorKind.OVERLOADED,
        "credproxy is serving as many connections as it may; retry shortly.",
        "too_many_connections",
    ),
    SlotRefusal.PEER_FULL: HeadRefusal(
        ErrorKind.OVERLOADED,
        "This client holds as many connections to credproxy as one client may; "
        "close some or retry shortly.",
        "too_many_connections_from_peer",
    ),
}


@dataclass
class FaceGuard:
    """
    What all connections of one HTTP face share: their settings, the clock,
    their slots, the body budget and the refusal audit.
    """

    config: HTTPProxyConfig
    clock: IReactorTime
    slots: ConnectionSlots
    budget: BodyBudget
    refusals: RefusalAudit

    @classmethod
    def for_config(cls, config: HTTPProxyConfig, clock: IReactorTime) -> FaceGuard:
        return cls(
            config=config,
            clock=clock,
            slots=ConnectionSlots(config.limits),
            budget=BodyBudget(config.max_buffered_bytes),
            refusals=RefusalAudit(clock),
        )


class _Phase(enum.Enum):
    HEAD = "head"  # the gate is collecting a request head
    FORWARDED = "forwarded"  # twisted.web has the request: its body, then its answer
    CLOSING = "closing"  # answered for the last time: input is dropped


class ProxyChannel(HTTPChannel):
    """
    One agent connection to the HTTP face.

    Hooks for the request: L{admitted} is the head twisted.web is parsing
    (the request takes it in C{gotLength}), and L{refuse} answers and closes
    from anywhere in a request's life before its answer has begun.
    """

    site: ProxySite
    admitted: RequestHead | None = None
    peer: PeerCredentials | None = None
    _phase = _Phase.HEAD
    _buffered = b""
    _slot: Hashable | None = None
    _head_timer: IDelayedCall | None = None
    _body_timer: IDelayedCall | None = None
    _linger_timer: IDelayedCall | None = None
    _awaiting_body = False
    _body_started = 0.0
    _body_progress = 0.0

    @property
    def guard(self) -> FaceGuard:
        return self.site.guard

    # -- the connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self.peer = peer_credentials(self.transport)
        key = peer_key(self.transport)
        refusal = self.guard.slots.take(key)
        if refusal is not None:
            self.refuse(_NO_SLOT[refusal], retry_after=OVERLOADED_RETRY_AFTER)
            return
        self._slot = key

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        for timer in (self._head_timer, self._body_timer, self._linger_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._head_timer = self._body_timer = self._linger_timer = None
        self._phase = _Phase.CLOSING
        if self._slot is not None:
            self.guard.slots.give_back(self._slot)
            self._slot = None
        super().connectionLost(reason)

    # -- the gate ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        phase = self._phase
        if phase is _Phase.FORWARDED:
            if self._awaiting_body:
                self._body_progress = self.guard.clock.seconds()
            super().dataReceived(data)
            return
        if phase is _Phase.CLOSING:
            return  # answered for the last time: read (to notice the close) and drop
        buffered = self._buffered + data if self._buffered else data
        parts = split_head(buffered)
        if parts is None:
            try:
                check_incomplete(buffered)
            except HeadRefusal as over_limit:
                self._buffered = b""
                self.refuse(over_limit, request_line=buffered)
                return
            self._buffered = buffered
            if self._head_timer is None and buffered:
                self._head_timer = self.callLater(
                    self.guard.config.head_timeout, self._head_expired
                )
            return
        self._buffered = b""
        if self._head_timer is not None:
            if self._head_timer.active():
                self._head_timer.cancel()
            self._head_timer = None
        head_bytes = parts[0]
        try:
            head = parse_head(head_bytes)
        except HeadRefusal as malformed:
            self.refuse(malformed, request_line=head_bytes)
            return
        refusal = admission_refusal(
            self.guard.config,
            head.method,
            head.path,
            self.peer.uid if self.peer is not None else None,
            presented_placeholder(head),
        )
        if refusal is not None:
            self.refuse(refusal, method=head.method, path=head.path)
            return
        self._phase = _Phase.FORWARDED
        self.admitted = head
        self._awaiting_body = head.has_body
        super().dataReceived(buffered)  # twisted.web parses the head just judged, and on
        if self._awaiting_body and self._phase is _Phase.FORWARDED and self._body_timer is None:
            now = self.guard.clock.seconds()
            self._body_started = self._body_progress = now
            self._body_timer = self.callLater(self._next_body_check(now), self._check_body)

    # -- twisted.web's hooks ------------------------------------------------------

    def allContentReceived(self) -> None:
        self._awaiting_body = False
        if self._body_timer is not None:
            if self._body_timer.active():
                self._body_timer.cancel()
            self._body_timer = None
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        # Before twisted.web replays what it buffered meanwhile: that is the
        # next request's head, for the gate.
        if self._phase is _Phase.FORWARDED:
            self._phase = _Phase.HEAD
        self.admitted = None
        super().requestDone(request)
        if not self.persistent:
            self._phase = _Phase.CLOSING

    # -- deadlines ----------------------------------------------------------------

    def _head_expired(self) -> None:
        self._head_timer = None
        seconds = self.guard.config.head_timeout
        self.refuse(
            HeadRefusal(
                ErrorKind.REQUEST_TIMEOUT,
                f"The request head did not arrive within {seconds:g} s.",
                "head_timeout",
            ),
            request_line=self._buffered,
        )
        self._buffered = b""

    def _next_body_check(self, now: float) -> float:
        config = self.guard.config
        idle_end = self._body_progress + config.body_idle_timeout
        total_end = self._body_started + config.body_timeout
        return max(0.0, min(idle_end, total_end) - now)

    def _check_body(self) -> None:
        self._body_timer = None
        if not self._awaiting_body or self._phase is not _Phase.FORWARDED:
            return
        config = self.guard.config
        now = self.guard.clock.seconds()
        if now >= self._body_started + config.body_timeout:
            message = f"The request body did not arrive within {config.body_timeout:g} s."
        elif now >= self._body_progress + config.body_idle_timeout:
            message = f"The request body made no progress for {config.body_idle_timeout:g} s."
        else:
            self._body_timer = self.callLater(self._next_body_check(now), self._check_body)
            return
        head = self.admitted
        self.refuse(
            HeadRefusal(ErrorKind.REQUEST_TIMEOUT, message, "body_timeout"),
            method=head.method if head is not None else b"-",
            path=head.path if head is not None else b"-",
        )

    # -- refusing -------------------------------------------------------------------

    def refuse(
        self,
        refusal: HeadRefusal,
        *,
        method: bytes | None = None,
        path: bytes | None = None,
        request_line: bytes = b"",
        retry_after: int | None = None,
    ) -> None:
        """
        Answer C{refusal} and close: stop sending, drop what the agent still
        sends, close when it does or after a short linger. The audit line
        names C{method} and C{path}, or what C{request_line} shows of them.
        """
        if self._phase is _Phase.CLOSING:
            return
        self._phase = _Phase.CLOSING
        self._awaiting_body = False
        for timer in (self._head_timer, self._body_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._head_timer = self._body_timer = None
        if refusal.kind is ErrorKind.OVERLOADED and retry_after is None:
            retry_after = OVERLOADED_RETRY_AFTER
        answer = raw_error_response(
            refusal.kind, refusal.message, retry_after=retry_after, extra_headers=refusal.headers
        )
        transport: Any = self.transport
        transport.write(answer)
        if method is None or path is None:
            method, path = _shown_request_line(request_line)
        detail = ""
        if refusal is PEER_REFUSED and self.peer is not None:
            detail = f"peer_uid={self.peer.uid} peer_pid={self.peer.pid}"
        self.guard.refusals.refused(
            method=method,
            path=path,
            status=refusal.kind.status,
            outcome=refusal.outcome,
            response_bytes=len(answer),
            detail=detail,
        )
        linger = REFUSED_LINGER_SECONDS if self._slot is not None else NO_SLOT_LINGER_SECONDS
        if IHalfCloseableDescriptor.providedBy(transport):
            closing: Any = transport
            closing.loseWriteConnection()
            self._linger_timer = self.callLater(linger, closing.abortConnection)
        else:
            transport.loseConnection()


def _shown_request_line(line: bytes) -> tuple[bytes, bytes]:
    """
    The method and path of a head that could not be parsed, as far as they
    can be told, for the audit line (which cuts and escapes them).
    """
    first = line.split(b"\r\n", 1)[0].split(b"\n", 1)[0]
    method, _, rest = first.partition(b" ")
    target = rest.partition(b" ")[0]
    return method[:32] or b"-", target.partition(b"?")[0] or b"-"
