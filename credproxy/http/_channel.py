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
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableDescriptor,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, _ChunkedTransferDecoder, _IdentityTransferDecoder
from twisted.web.http_headers import Headers

from credproxy._limits import ConnectionSlots, SlotRefusal, peer_key
from credproxy._listen import PeerCredentials, peer_credentials
from credproxy.http._admission import FORWARDED_PATHS, PEER_REFUSED, admission_refusal
from credproxy.http._audit import RefusalAudit
from credproxy.http._body import BodyBudget
from credproxy.http._config import HTTPProxyConfig
from credproxy.http._errors import ErrorKind, raw_error_response
from credproxy.http._head import (
    HeadRefusal,
    RequestHead,
    check_incomplete,
    find_head,
    parse_head,
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
# Refused connections lingering at once (each holds a descriptor while its
# peer reads the answer); past this many, a refused one is closed at once.
MAX_LINGERING_REFUSALS: Final = 64
# How much of an unjudged head is looked at for its method and path.
_SHOWN_LINE: Final = 512
_SHOWN_METHODS: Final = frozenset(
    {b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE"}
)

_NO_SLOT: Final = {
    SlotRefusal.FACE_FULL: HeadRefusal(
        ErrorKind.OVERLOADED,
        "credproxy is serving as many connections as it may; retry shortly.",
        SlotRefusal.FACE_FULL,
    ),
    SlotRefusal.PEER_FULL: HeadRefusal(
        ErrorKind.OVERLOADED,
        "This client holds as many connections to credproxy as one client may; "
        "close some or retry shortly.",
        SlotRefusal.PEER_FULL,
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
    lingering: int = 0  # refused connections waiting for their peer to read the answer

    @classmethod
    def for_config(
        cls, config: HTTPProxyConfig, clock: IReactorTime, refusals: RefusalAudit
    ) -> FaceGuard:
        return cls(
            config=config,
            clock=clock,
            slots=ConnectionSlots(config.limits),
            budget=BodyBudget(config.max_buffered_bytes),
            refusals=refusals,
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
    _scanned = 0  # bytes of _buffered already searched for the blank line
    _lingering = False
    _slot: Hashable | None = None
    _head_timer: IDelayedCall | None = None
    _body_timer: IDelayedCall | None = None
    _linger_timer: IDelayedCall | None = None
    _awaiting_body = False
    _body_started = 0.0
    _body_progress = 0.0
    _host: IAddress | None = None
    _held_head: bytes | None = None  # the answer's head, until its body's first write

    def __init__(self) -> None:
        super().__init__()
        self._buffered = bytearray()  # a head that came in pieces, until it is whole

    @property
    def guard(self) -> FaceGuard:
        return self.site.guard

    # -- the answer's head ---------------------------------------------------------

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Headers) -> None:
        """
        Hold the answer's head to go out with the first bytes of its body,
        in one write: twisted.web writes the two separately, which on a
        connection that sends at once (credproxy._transports) would be two
        system calls and two reads for the agent. The bytes are those
        twisted.web writes (tests/http/test_channel_writes.py compares
        them); L{flush_head} sends a head no body follows.
        """
        lines = [b"%b %b %b\r\n" % (version, code, reason)]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                lines.append(b"%b: %b\r\n" % (name, value))
        lines.append(b"\r\n")
        self._held_head = b"".join(lines)

    def write(self, data: bytes) -> None:
        head = self._take_head()
        self.transport.write(head + data if head is not None else data)  # type: ignore[union-attr]

    def writeSequence(self, iovec: Sequence[bytes]) -> None:
        head = self._take_head()
        self.transport.writeSequence([head, *iovec] if head is not None else iovec)  # type: ignore[union-attr]

    def flush_head(self) -> None:
        """
        Send a held head now: the request's write that made it is over.
        """
        head = self._take_head()
        if head is not None:
            self.transport.write(head)  # type: ignore[union-attr]

    def _take_head(self) -> bytes | None:
        head, self._held_head = self._held_head, None
        return head

    # -- the connection ---------------------------------------------------------

    def getHost(self) -> IAddress:
        """
        The connection's own address, asked of the socket once: twisted.web
        asks for it on every request, and a Unix socket answers with a
        system call each time.
        """
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def connectionMade(self) -> None:
        super().connectionMade()
        self.peer = peer_credentials(self.transport)
        key = peer_key(self.transport, self.peer)
        refusal = self.guard.slots.take(key)
        if refusal is not None:
            self.refuse(_NO_SLOT[refusal], retry_after=OVERLOADED_RETRY_AFTER)
            return
        self._slot = key
        # A connection that never sends a byte must not keep its slot either.
        self._head_timer = self.callLater(self.guard.config.head_timeout, self._head_expired)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        for timer in (self._head_timer, self._body_timer, self._linger_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._head_timer = self._body_timer = self._linger_timer = None
        self._phase = _Phase.CLOSING
        if self._slot is not None:
            self.guard.slots.give_back(self._slot)
            self._slot = None
        if self._lingering:
            self._lingering = False
            self.guard.lingering -= 1
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
        buffered: bytes | bytearray
        if self._buffered:
            self._buffered += data
            buffered = self._buffered
        else:
            buffered = data
        found = find_head(buffered, self._scanned)
        if found is None:
            over_limit = check_incomplete(buffered)
            if over_limit is not None:
                self.refuse(over_limit, request_line=bytes(buffered[:_SHOWN_LINE]))
                self._buffered = bytearray()
                return
            if buffered is data:
                self._buffered = bytearray(data)
            self._scanned = len(buffered)
            if self._head_timer is None and buffered:
                self._head_timer = self.callLater(
                    self.guard.config.head_timeout, self._head_expired
                )
            return
        start, end = found
        if buffered is not data:
            buffered = bytes(buffered)
        self._buffered = bytearray()
        self._scanned = 0
        if self._head_timer is not None:
            if self._head_timer.active():
                self._head_timer.cancel()
            self._head_timer = None
        head_bytes = buffered[start:end]
        head = parse_head(head_bytes)
        if isinstance(head, HeadRefusal):
            self.refuse(head, request_line=head_bytes[:_SHOWN_LINE])
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
        self._hand_over(head, buffered[end + 4 :])
        if self._awaiting_body and self._phase is _Phase.FORWARDED and self._body_timer is None:
            now = self.guard.clock.seconds()
            self._body_started = self._body_progress = now
            self._body_timer = self.callLater(self._next_body_check(now), self._check_body)

    def _hand_over(self, head: RequestHead, rest: bytes) -> None:
        """
        Give twisted.web the judged head as its own parser would have, and
        what followed it. Its parser would split the head into lines again
        and check each once more (about a tenth of a small request's cost);
        the head has passed stricter rules here, so its request is made from
        the fields already found.

        This does what C{HTTPChannel.lineReceived} does for a request line,
        its header lines and the blank line, and leans on that class's
        private state (its request queue, C{_command}, C{_path},
        C{_version}, C{length}, C{_transferDecoder} and the name-mangled
        first-line flag); tests/http/test_gate.py pins each name.
        """
        self.resetTimeout()
        request = self.requestFactory(self, len(self.requests))
        self.requests.append(request)
        self._HTTPChannel__first_line = 0
        self._command = head.method
        self._path = head.target
        self._version = head.version
        headers = request.requestHeaders
        for name, value in head.fields():
            headers.addRawHeader(name, value)
        if head.chunked:
            self.length = None
            self._transferDecoder = _ChunkedTransferDecoder(
                request.handleContentChunk, self._finishRequestBody
            )
        else:
            self.length = head.content_length or 0
            self._transferDecoder = _IdentityTransferDecoder(
                self.length, request.handleContentChunk, self._finishRequestBody
            )
        self.allHeadersReceived()
        if self.length == 0:
            self.allContentReceived()
        else:
            self.setRawMode()
        if rest:
            super().dataReceived(rest)

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
        # Whether this request leaves the connection open, read before
        # twisted.web replays the next request (which sets it for itself).
        persistent = self.persistent
        if self._phase is _Phase.FORWARDED and persistent:
            self._phase = _Phase.HEAD
        self.admitted = None
        super().requestDone(request)
        if not persistent:
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
            request_line=bytes(self._buffered[:_SHOWN_LINE]),
        )
        self._buffered = bytearray()

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
        if self.requests:
            # The request being read (if any) is given up: its body, and
            # its share of the budget, go now, not when the connection does.
            drop_body = getattr(self.requests[-1], "drop_body", None)
            if drop_body is not None:
                drop_body()
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
        guard = self.guard
        if guard.lingering >= MAX_LINGERING_REFUSALS or not IHalfCloseableDescriptor.providedBy(
            transport
        ):
            # Every lingering refusal holds a descriptor: past the bound,
            # closed at once (the answer is flushed first).
            transport.loseConnection()
            return
        self._lingering = True
        guard.lingering += 1
        linger = REFUSED_LINGER_SECONDS if self._slot is not None else NO_SLOT_LINGER_SECONDS
        closing: Any = transport
        closing.loseWriteConnection()
        self._linger_timer = self.callLater(linger, closing.abortConnection)


def _shown_request_line(line: bytes) -> tuple[bytes, bytes]:
    """
    The method and path of a head that could not be judged, for the audit
    line, only where they are known words: what failed to parse may be
    anything, a body sent after a short Content-Length included, and must
    not reach the log.
    """
    first = line.split(b"\r\n", 1)[0]
    method, _, rest = first.partition(b" ")
    path = rest.partition(b" ")[0].partition(b"?")[0]
    return (
        method if method in _SHOWN_METHODS else b"-",
        path if path in FORWARDED_PATHS else b"-",
    )
