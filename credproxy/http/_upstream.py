"""
The upstream hop's client side, made strict and bounded: how an exchange
tells "the upstream's answer was malformed" from "the upstream could not be
reached" (L{malformed_kind}, L{UpstreamMalformed}), the cap on upstream
requests in flight (L{UpstreamSlots}), and Twisted's HTTP/1.1 client
protocol with the response-head screen in front of its parser and the
connection pool that builds it (L{ScreenedHTTP11ClientProtocol},
L{ScreenedConnectionPool}).

The face's own client is no longer Twisted's: it is
L{credproxy.http._upstream_client}, which is leaner per request. The
screened Twisted protocol and pool stay for whoever injects a Twisted
C{Agent} and wants it screened (tests/integration/test_upstream_hostile.py
does, for its fuzzer and its TLS case); they can go once nothing does.

The screened Twisted protocol leans on private Twisted API
(``twisted.web._newclient``: ``HTTP11ClientProtocol._parser``,
``_disconnectParser``, ``_finishResponse_WAITING`` and its stateful
``connectionLost``; ``twisted.web.client._HTTP11ClientFactory`` and
``HTTPConnectionPool._factory``; ``twisted.web.http._MalformedChunkedDataError``;
``HTTPClientParser._transferDecoders``, the table its parser picks a body
decoder from). tests/http/test_upstream_screen.py pins each, so a Twisted
upgrade that moves one fails there first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import HEADER, HTTP11ClientProtocol, HTTPClientParser, ParseError
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http import _MalformedChunkedDataError

from credproxy.http._chunked import ChunkedDecoder
from credproxy.http._config import HTTPProxyConfig
from credproxy.http._upstream_head import MalformedResponseHead, ResponseHeadScreen

log = Logger(namespace="credproxy.http")

# Kinds of malformed answer beyond the screen's own HeadDefect names.
PARSER_REFUSED_HEAD: Final = "PARSER_REFUSED_HEAD"  # Twisted's parser raised on a screened head
BAD_CHUNKED_FRAMING: Final = "BAD_CHUNKED_FRAMING"  # the body's chunked framing is broken
UNSOLICITED_BYTES: Final = "UNSOLICITED_BYTES"  # bytes after a complete answer

# The body decoders the client's parser chooses from (by Transfer-Encoding):
# ours for chunked, which is one call per read rather than per chunk.
_TRANSFER_DECODERS: Final = {b"chunked": ChunkedDecoder}

# How UpstreamSlots says why no slot was had.
WAIT_TIMEOUT: Final = "wait_timeout"
QUEUE_FULL: Final = "queue_full"


class UpstreamMalformed(Exception):
    """
    The upstream's answer broke HTTP/1.1 (its head refused by the screen or
    the parser, or its body's framing): the upstream was reached, and what
    it sent must not be relayed. C{kind} names the defect; the message is
    never the upstream's bytes.
    """

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def malformed_kind(failure: Failure) -> str | None:
    """
    The kind of malformed answer that made an upstream request or its body
    fail, looking through Twisted's wrapper exceptions (C{ResponseFailed},
    C{ResponseNeverReceived}, C{RequestTransmissionFailed} carry their
    causes in C{reasons}); None when the failure is of another sort
    (refused connection, TLS, timeout, cancel).
    """
    pending = [failure]
    while pending:
        current = pending.pop()
        value = current.value
        if isinstance(value, UpstreamMalformed):
            return value.kind
        if isinstance(value, ParseError):  # Twisted's own, should the screen let one by
            return PARSER_REFUSED_HEAD
        if isinstance(value, _MalformedChunkedDataError):
            return BAD_CHUNKED_FRAMING
        reasons = getattr(value, "reasons", None)
        if isinstance(reasons, list):
            pending.extend(r for r in reasons if isinstance(r, Failure))
    return None


class ScreenedHTTP11ClientProtocol(HTTP11ClientProtocol):
    """
    Twisted's HTTP/1.1 client protocol with a L{ResponseHeadScreen} in
    front of its parser: every head of every response on the connection is
    screened before the parser sees it, and a refused head (or a parse
    error of Twisted's, or broken body framing) aborts the connection and
    fails the request with L{UpstreamMalformed}.

    The failure is delivered at once while the request waits for its
    answer (the usual case), and otherwise by Twisted's own
    C{connectionLost} state machine when the aborted connection is lost, so
    it reaches the request whatever state the protocol is in.
    """

    def __init__(self, quiescentCallback: Callable[[Any], object] = lambda c: None) -> None:
        super().__init__(quiescentCallback)
        self._screen = ResponseHeadScreen()
        self._failure: Failure | None = None  # why this connection was aborted, once it was

    def request(self, request: Any) -> Deferred[Any]:
        if self.state == "QUIESCENT":
            self._screen.reset()  # a new answer on a persistent connection
        answer = super().request(request)
        if self._parser is not None:
            # The parser is made by the request; the answer is read later.
            self._parser._transferDecoders = _TRANSFER_DECODERS  # type: ignore[assignment]
        return answer

    def dataReceived(self, data: bytes) -> None:
        if self._failure is not None:
            return  # aborted: nothing more is read
        parser = self._parser
        if parser is None:
            # No request in flight (an idle pooled connection, or an answer
            # already complete): the upstream is not taking turns.
            self._abort(UnsolicitedBytes())
            return
        screen = self._screen
        if not screen.done:
            try:
                screened = screen.feed(data)
            except MalformedResponseHead as refusal:
                self._abort(UpstreamMalformed(refusal.defect.name))
                return
            if screened is None:
                return
            head, data = screened
            try:
                _hand_over_head(parser, head)
            except Exception:
                self._abort(UpstreamMalformed(PARSER_REFUSED_HEAD))
                return
            if not data:
                return
            parser = self._parser
            if parser is None:  # answered with its head alone, and more followed
                self._abort(UnsolicitedBytes())
                return
        try:
            parser.dataReceived(data)
        except _MalformedChunkedDataError:
            self._abort(UpstreamMalformed(BAD_CHUNKED_FRAMING))
        except Exception as error:
            # Not the upstream's doing: the body's consumer raised.
            log.failure("Unexpected error while reading an upstream answer")
            self._abort(error)

    def _finishResponse_WAITING(self, rest: bytes) -> None:
        """
        An answer is complete. Twisted drops bytes that came after it in the
        same read and keeps the connection; they are the start of an answer
        nobody asked for (a desynchronised or smuggling upstream), so the
        connection is closed instead of going back to the pool.
        """
        if rest and self._currentRequest is not None:
            # Before Twisted decides: a connection that is not persistent is
            # given up, never handed back to the pool, where the next request
            # (and its credential) would be written onto it.
            self._currentRequest.persistent = False
        super()._finishResponse_WAITING(rest)
        if rest and self._failure is None:
            self._abort(UnsolicitedBytes())

    _finishResponse_TRANSMITTING = _finishResponse_WAITING

    def _abort(self, error: Exception) -> None:
        """
        Drop the connection now (no more bytes are read, none flushed), and
        fail the request or its answer with C{error}: at once while the
        answer is awaited or read, else when the connection is lost.
        """
        self._failure = Failure(error)
        assert self.transport is not None
        self.transport.abortConnection()  # type: ignore[attr-defined]
        if self.state == "WAITING":
            # Deliver the failure in this reactor turn, as Twisted does for
            # its own parse errors: the answer's consumer must learn of it
            # before it acts on bytes of this same read (the exchange still
            # holds them, unwritten, and can answer with an error instead).
            # In any other state the lost connection delivers it.
            self._disconnectParser(self._failure)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        if self._failure is not None:
            reason = self._failure
        super().connectionLost(reason)


def _hand_over_head(parser: HTTPClientParser, head: bytes) -> None:
    """
    Give Twisted's parser a screened head as its line parser would have:
    the status line, each header, the end of the head. The screen has
    already split the head and held it to stricter rules (CRLF only, no
    folded line), so the lines are split here once, in C.

    This does what C{HTTPParser.lineReceived} does in its C{STATUS} and
    C{HEADER} states, and what C{HTTPClientParser.dataReceived} records;
    tests/http/test_upstream_screen.py pins the names it uses.
    """
    parser._everReceivedData = True
    lines = head.split(b"\r\n")
    parser.statusReceived(lines[0])
    parser.state = HEADER
    for line in lines[1:]:
        if not line:
            break
        name, _, value = line.partition(b":")
        parser.headerReceived(name, value.strip())
    parser.allHeadersReceived()


class UnsolicitedBytes(UpstreamMalformed):
    """
    The upstream wrote when no answer was due: after a complete answer, or
    on an idle pooled connection.
    """

    def __init__(self) -> None:
        super().__init__(UNSOLICITED_BYTES)


class _ScreenedClientFactory(_HTTP11ClientFactory):
    """
    What L{ScreenedConnectionPool} connects with: Twisted's pool factory,
    building the screened protocol.
    """

    def buildProtocol(self, addr: IAddress | None) -> ScreenedHTTP11ClientProtocol:
        return ScreenedHTTP11ClientProtocol(self._quiescentCallback)


class ScreenedConnectionPool(HTTPConnectionPool):
    """
    An C{HTTPConnectionPool} whose connections screen every response head.
    """

    _factory = _ScreenedClientFactory


class NoUpstreamSlot(Exception):
    """
    No upstream slot came free: C{reason} is L{WAIT_TIMEOUT} or L{QUEUE_FULL}.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UpstreamSlots:
    """
    A cap on upstream requests in flight, with a bounded wait for a slot.

    A slot is asked for just before a request is sent upstream and given
    back when its exchange is done. A request that gets none within
    C{wait_timeout} seconds fails with L{NoUpstreamSlot}; so does one that
    finds C{max_waiting} requests already waiting, which bounds the queue by
    itself (each waiter is also an agent connection, so the face's own
    connection cap bounds it too). Waiters are served first come, first
    served; cancelling a waiter's Deferred (its agent left) takes it out of
    the queue at once.
    """

    def __init__(
        self, clock: IReactorTime, limit: int, wait_timeout: float, max_waiting: int
    ) -> None:
        if limit < 1 or max_waiting < 0:
            raise ValueError("the upstream slot limit must be at least 1")
        self._clock = clock
        self.limit = limit
        self.wait_timeout = wait_timeout
        self.max_waiting = max_waiting
        self.in_use = 0
        # Insertion-ordered: the first key is the longest waiter.
        self._waiters: dict[Deferred[None], IDelayedCall] = {}

    @classmethod
    def for_config(cls, clock: IReactorTime, config: HTTPProxyConfig) -> UpstreamSlots:
        """
        The slots of one face: the queue is as long as the face has connections.
        """
        return cls(
            clock,
            config.max_upstream_connections,
            config.upstream_wait_timeout,
            config.limits.max_connections,
        )

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        """
        Take a slot now if one is free and nobody waits (the usual case,
        without a Deferred); False when the caller must L{acquire}.
        """
        if self.in_use < self.limit and not self._waiters:
            self.in_use += 1
            return True
        return False

    def acquire(self) -> Deferred[None]:
        """
        Fires (at once when one is free) when the caller holds a slot, which
        it must give back with L{release}; or fails with L{NoUpstreamSlot}.
        """
        if self.try_acquire():
            return succeed(None)
        if len(self._waiters) >= self.max_waiting:
            return fail(NoUpstreamSlot(QUEUE_FULL))
        waiter: Deferred[None] = Deferred(self._cancelled)
        self._waiters[waiter] = self._clock.callLater(self.wait_timeout, self._expired, waiter)
        return waiter

    def release(self) -> None:
        """
        Give a slot back: to the longest waiter, if any, else to the pool.
        """
        if self._waiters:
            waiter = next(iter(self._waiters))
            self._waiters.pop(waiter).cancel()
            waiter.callback(None)  # the slot passes on: in_use is unchanged
            return
        if self.in_use > 0:
            self.in_use -= 1

    def _cancelled(self, waiter: Deferred[None]) -> None:
        timer = self._waiters.pop(waiter, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _expired(self, waiter: Deferred[None]) -> None:
        if self._waiters.pop(waiter, None) is not None:
            waiter.errback(NoUpstreamSlot(WAIT_TIMEOUT))
