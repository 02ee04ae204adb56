"""
The upstream hop's HTTP/1.1 client: one connection protocol, its answer and
a pool of kept-alive connections, in place of Twisted's
C{HTTP11ClientProtocol}, C{HTTPClientParser}, C{Response} and
C{HTTPConnectionPool}.

Twisted's client is general: a request body produced while it is sent, a
line parser that calls back per header line, a state machine with a dozen
states, a Deferred for the request, one for its transmission and one for
the pool, a proxy object between the body and its consumer. The face sends
only bodies it holds in memory, one request at a time on a connection, and
screens every head before any parser sees it (L{ResponseHeadScreen}), so
what is left to do here is small: write the request's bytes in one write,
split a screened head (already held to strict rules) at its CRLFs, pick the
body's framing, and pass each read's body bytes on in one call (a chunked
body through L{ChunkedDecoder}, one llhttp call per read).

What it keeps of Twisted's client, because the exchange and the logs rely
on it: the C{IAgent}/C{IResponse} contract, and Twisted's exception types
(C{ResponseNeverReceived}, C{ResponseFailed}, C{ResponseDone},
C{PotentialDataLoss}, C{RequestTransmissionFailed}) with their causes in
C{reasons}, so L{credproxy.http._upstream.malformed_kind} and the log text
see what they saw before.

Its rules:

  - A request is sent once: nothing is retried, a dead pooled connection
    fails the request with C{ResponseNeverReceived}.
  - An answer is complete when its framing says so; bytes after it (in the
    same read or later), or bytes on an idle pooled connection, close the
    connection, which never goes back to the pool (the next request's
    credential is never written onto a connection out of step).
  - A connection whose answer said C{Connection: close}, came as HTTP/1.0,
    or whose body ran to the connection's close, is not reused.
  - Every wait is bounded by the exchange's timers and the pool's idle
    timeout; every buffer by a read (a body read before its consumer is
    given is held, and reading paused, until it is) or by the screen's and
    the decoder's limits.

This leans on two private Twisted names: C{Headers._rawHeaders} (the dict a
head's fields are put into at once, keyed by canonical name, instead of a
call per field) and C{twisted.web.http_headers._nameEncoder} (which makes a
canonical name); tests/http/test_upstream_client.py pins both.
"""

from __future__ import annotations

from typing import Any, Final

from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import (
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss, _MalformedChunkedDataError
from twisted.web.http_headers import Headers, _nameEncoder
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

from credproxy.http._chunked import ChunkedDecoder
from credproxy.http._upstream import BAD_CHUNKED_FRAMING, UpstreamMalformed
from credproxy.http._upstream_head import MalformedResponseHead, ResponseHeadScreen

log = Logger(namespace="credproxy.http")

# The fields Twisted's parser keeps to itself (its CONNECTION_CONTROL_HEADERS),
# by their canonical names: the answer's headers never hold them, as with
# Twisted's client.
CONNECTION_CONTROL_HEADERS: Final = frozenset(
    _nameEncoder.encode(name)
    for name in (
        b"content-length",
        b"connection",
        b"keep-alive",
        b"te",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
    )
)
_CONNECTION: Final = b"Connection"
_CONTENT_LENGTH: Final = b"Content-Length"
_TRANSFER_ENCODING: Final = b"Transfer-Encoding"
# Header names as an upstream writes them, mapped to the canonical names
# Headers keys its values by: an upstream sends the same few dozen names,
# so a name is canonicalized once, not per answer. Bounded: an upstream
# that makes up names only clears it.
MAX_CACHED_NAMES: Final = 1024
_canonical_names: dict[bytes, bytes] = {}


def canonical_name(name: bytes) -> bytes:
    """
    The name as C{Headers} keys it (Twisted's canonical capitalization).
    """
    canonical = _canonical_names.get(name)
    if canonical is None:
        canonical = _nameEncoder.encode(name)
        if len(_canonical_names) >= MAX_CACHED_NAMES:
            _canonical_names.clear()
        _canonical_names[name] = canonical
    return canonical


# Statuses whose answers have no body, whatever their head says.
_NO_BODY_STATUSES: Final = frozenset({204, 304})

PoolKey = tuple[bytes, bytes, int]

# A connection's states.
_IDLE: Final = 0  # no request on it (new, or back in the pool)
_WAITING: Final = 1  # a request sent, its answer's head awaited
_BODY: Final = 2  # the answer's body being read
_STOPPING: Final = 3  # the body's consumer stopped it: closing, its end awaited
_CLOSED: Final = 4  # closed or closing: nothing more is read or sent

# How a body is framed.
_LENGTH: Final = 0
_CHUNKED: Final = 1
_UNTIL_CLOSE: Final = 2


@implementer(IResponse, IPushProducer)
class UpstreamResponse:
    """
    One answer's head, and its body as it comes: an C{IResponse}.

    It is also the push producer its body's consumer is given as its
    transport (C{pauseProducing}, C{resumeProducing} pause and resume
    reading the connection, C{stopProducing} closes it), for as long as its
    body lasts: once the body is over, those calls do nothing, so a late
    one never touches a connection that serves another request by then.

    What arrives before L{deliverBody} (at most the rest of the read the
    head came in: reading is paused meanwhile) is held and given then.
    """

    previousResponse: IResponse | None = None
    request: Any = None

    def __init__(
        self,
        connection: UpstreamConnection,
        version: tuple[bytes, int, int],
        code: int,
        phrase: bytes,
        headers: Headers,
        length: int | object,
    ) -> None:
        self._connection = connection
        self.version = version
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self._protocol: IProtocol | None = None
        self._held: list[bytes] = []
        self._ended: Failure | None = None  # the end, while no consumer has it
        self._over = False  # the body has ended (its consumer told, or to be)

    # -- IResponse -------------------------------------------------------------

    def deliverBody(self, protocol: IProtocol) -> None:
        if self._protocol is not None:
            raise RuntimeError("the answer's body is already delivered")
        self._protocol = protocol
        protocol.makeConnection(self)  # type: ignore[arg-type]
        held, self._held = self._held, []
        for data in held:
            protocol.dataReceived(data)
        if self._ended is not None:
            ended, self._ended = self._ended, None
            protocol.connectionLost(ended)
            return
        if not self._over:
            self._connection.body_consumer_given()

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    # -- IPushProducer, for the body's consumer --------------------------------

    def pauseProducing(self) -> None:
        if not self._over:
            self._connection.pause_body()

    def resumeProducing(self) -> None:
        if not self._over:
            self._connection.resume_body()

    def stopProducing(self) -> None:
        if not self._over:
            self._connection.stop_body()

    # -- from the connection ---------------------------------------------------

    def data(self, data: bytes) -> None:
        protocol = self._protocol
        if protocol is None:
            self._held.append(data)
        else:
            protocol.dataReceived(data)

    def end(self, reason: Failure) -> None:
        """
        The body is over: ended (C{ResponseDone}, C{PotentialDataLoss}) or broken.
        """
        if self._over:
            return
        self._over = True
        protocol = self._protocol
        if protocol is None:
            self._ended = reason
        else:
            protocol.connectionLost(reason)

    @property
    def awaiting_consumer(self) -> bool:
        return self._protocol is None


class UpstreamConnection(Protocol):
    """
    One connection to an upstream, one request at a time.

    L{send} writes a request and returns the answer's Deferred; each read
    is the answer's head (screened, then split), its body, or bytes nobody
    asked for. When the answer is complete the connection goes back to its
    pool (L{UpstreamPool.put}) if it may serve another, else is closed.
    """

    def __init__(self, pool: UpstreamPool, key: PoolKey) -> None:
        self._pool = pool
        self.key = key
        self._state = _IDLE
        self._screen = ResponseHeadScreen()
        self._waiting: Deferred[IResponse] | None = None
        self._response: UpstreamResponse | None = None
        self._no_body = False  # the request was a HEAD
        self._persistent = True  # the request allows the connection's reuse
        self._framing = _LENGTH
        self._remaining = 0  # bytes of a Content-Length body still due
        self._decoder: ChunkedDecoder | None = None
        self._reusable = False  # the answer's head allows the connection's reuse
        self._consumer_paused = False
        self._reading_paused = False
        self.idle_timer: IDelayedCall | None = None
        self._lost: list[Deferred[None]] = []
        self._is_lost = False

    # -- sending ---------------------------------------------------------------

    def send(self, data: bytes, *, no_body: bool, persistent: bool) -> Deferred[IResponse]:
        """
        Write one request (its head and body, C{data}) and return its
        answer's Deferred, which cancelling before the head aborts the
        connection. C{no_body}: the request was a HEAD, whose answer has no
        body. C{persistent}: the request did not ask to close the connection.
        """
        if self._state != _IDLE or self.transport is None:
            return _failed(RequestTransmissionFailed([Failure(ConnectionLost())]))
        self._state = _WAITING
        self._no_body = no_body
        self._persistent = persistent
        waiting: Deferred[IResponse] = Deferred(self._cancel)
        self._waiting = waiting
        self.transport.write(data)
        return waiting

    def _cancel(self, waiting: Deferred[IResponse]) -> None:
        if self._waiting is waiting:
            self._fail_waiting(CancelledError())

    def _fail_waiting(self, error: BaseException | Failure) -> None:
        """
        The answer will never come: close now, fail the request at once.
        """
        waiting = self._waiting
        self._waiting = None
        self._close_now()
        if waiting is not None:
            reason = error if isinstance(error, Failure) else Failure(error)
            waiting.errback(ResponseNeverReceived([reason]))

    # -- reading ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        state = self._state
        if state == _BODY:
            self._body_read(data)
        elif state == _WAITING:
            self._head_read(data)
        elif state == _IDLE:
            # An idle connection: the upstream is not taking turns.
            self._close_now()
        # _STOPPING, _CLOSED: nothing more is read

    def _head_read(self, data: bytes) -> None:
        try:
            screened = self._screen.feed(data)
        except MalformedResponseHead as refusal:
            self._fail_waiting(UpstreamMalformed(refusal.defect.name))
            return
        if screened is None:
            return
        head, rest = screened
        response, complete = self._answer(head)
        waiting = self._waiting
        self._waiting = None
        assert waiting is not None
        if complete:
            # An answer without a body, complete with its head: bytes after
            # it are nobody's answer.
            if rest:
                self._close_now()
            else:
                self._answered()
            waiting.callback(response)
            return
        self._response = response
        waiting.callback(response)
        if self._state != _BODY:
            return  # the consumer stopped the body (or the answer was discarded)
        if rest:
            self._body_read(rest)
        if self._state == _BODY and response.awaiting_consumer:
            self._pause_reading()  # held until the body has a consumer

    def _answer(self, head: bytes) -> tuple[UpstreamResponse, bool]:
        """
        The response a screened head describes, its body's framing noted,
        and whether it is complete already (it has no body).
        The screen has held the head to strict rules (CRLF lines, token
        names, one status line, consistent framing), so it is split here
        without checking again.
        """
        lines = head.split(b"\r\n")
        status = lines[0]
        code = int(status[9:12])
        version = (b"HTTP", 1, 0 if status[7:8] == b"0" else 1)
        phrase = status[13:]
        raw: dict[bytes, list[bytes]] = {}
        connection: list[bytes] = []
        length: int | None = None
        chunked = False
        canonical = _canonical_names
        for line in lines[1:-2]:
            name, _, value = line.partition(b":")
            key = canonical.get(name) or canonical_name(name)
            value = value.strip(b" \t")
            if key in CONNECTION_CONTROL_HEADERS:
                if key == _CONNECTION:
                    connection.append(value.lower())
                elif key == _CONTENT_LENGTH:
                    length = int(value.split(b",", 1)[0])
                elif key == _TRANSFER_ENCODING:
                    chunked = True
                continue
            values = raw.get(key)
            if values is None:
                raw[key] = [value]
            else:
                values.append(value)
        headers = Headers()
        headers._rawHeaders = raw
        closes = any(b"close" in _options(value) for value in connection)
        if version[2] == 0:
            closes = closes or not any(b"keep-alive" in _options(value) for value in connection)
        self._reusable = not closes
        if self._no_body or code in _NO_BODY_STATUSES or length == 0:
            response = UpstreamResponse(self, version, code, phrase, headers, 0)
            response.end(Failure(ResponseDone()))
            return response, True
        if chunked:
            response = UpstreamResponse(self, version, code, phrase, headers, UNKNOWN_LENGTH)
            self._framing = _CHUNKED
            # Each read's data goes from llhttp to the answer in one call.
            self._decoder = ChunkedDecoder(response.data, self._chunked_finished)
        elif length is not None:
            response = UpstreamResponse(self, version, code, phrase, headers, length)
            self._framing = _LENGTH
            self._remaining = length
        else:
            response = UpstreamResponse(self, version, code, phrase, headers, UNKNOWN_LENGTH)
            self._framing = _UNTIL_CLOSE
            self._reusable = False
        self._state = _BODY
        return response, False

    def _body_read(self, data: bytes) -> None:
        response = self._response
        assert response is not None
        try:
            framing = self._framing
            if framing == _LENGTH:
                remaining = self._remaining
                if len(data) < remaining:
                    self._remaining = remaining - len(data)
                    response.data(data)
                    return
                self._remaining = 0
                response.data(data[:remaining] if len(data) > remaining else data)
                if self._state == _BODY:
                    self._body_complete(data[remaining:])
            elif framing == _CHUNKED:
                assert self._decoder is not None
                self._decoder.dataReceived(data)
            else:
                response.data(data)
        except _MalformedChunkedDataError:
            self._fail_body(UpstreamMalformed(BAD_CHUNKED_FRAMING))
        except Exception as error:
            # Not the upstream's doing: the body's consumer raised.
            log.failure("Unexpected error while reading an upstream answer")
            self._fail_body(error)

    def _chunked_finished(self, rest: bytes) -> None:
        if self._state == _BODY:
            self._body_complete(rest)

    def _body_complete(self, rest: bytes) -> None:
        """
        The answer's body ended by its framing; C{rest}, bytes after it.
        """
        response = self._response
        assert response is not None
        self._response = None
        self._decoder = None
        if rest:
            self._close_now()  # the start of an answer nobody asked for
        else:
            self._answered()
        response.end(Failure(ResponseDone()))

    def _answered(self) -> None:
        """
        An answer is complete and nothing followed it: back to the pool if
        the connection may serve another request, else closed.
        """
        if self._reusable and self._persistent and self._pool.persistent:
            self._state = _IDLE
            self._screen.reset()
            self._consumer_paused = False
            if self._reading_paused:
                self._reading_paused = False
                self.transport.resumeProducing()  # type: ignore[union-attr]
            self._pool.put(self)
        else:
            self._state = _CLOSED
            if self.transport is not None:
                self.transport.loseConnection()

    def _fail_body(self, error: BaseException) -> None:
        response = self._response
        self._response = None
        self._close_now()
        if response is not None:
            response.end(Failure(ResponseFailed([Failure(error)])))

    # -- the body's consumer ---------------------------------------------------

    def body_consumer_given(self) -> None:
        self._update_reading()

    def pause_body(self) -> None:
        self._consumer_paused = True
        self._update_reading()

    def resume_body(self) -> None:
        self._consumer_paused = False
        self._update_reading()

    def stop_body(self) -> None:
        """
        The body's consumer wants no more: the connection is closed, and the
        body ends (broken) when it is lost.
        """
        if self._state == _BODY:
            self._state = _STOPPING
            self._abort_transport()

    def _update_reading(self) -> None:
        response = self._response
        pause = self._consumer_paused or (response is not None and response.awaiting_consumer)
        if pause and not self._reading_paused and self._state == _BODY:
            self._pause_reading()
        elif not pause and self._reading_paused:
            self._reading_paused = False
            if self.transport is not None:
                self.transport.resumeProducing()  # type: ignore[attr-defined]

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    # -- closing ---------------------------------------------------------------

    def _close_now(self) -> None:
        """
        Drop the connection now: no more bytes read, none flushed, and never
        back to the pool.
        """
        self._state = _CLOSED
        self._abort_transport()

    def _abort_transport(self) -> None:
        if self.transport is not None and not self._is_lost:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def close_idle(self) -> Deferred[None]:
        """
        Close an idle connection (the pool's idle timeout, or the pool
        closing): fires when it is lost.
        """
        if self._is_lost:
            return succeed(None)
        lost: Deferred[None] = Deferred()
        self._lost.append(lost)
        if self._state == _IDLE:
            self._state = _CLOSED
            if self.transport is not None:
                self.transport.loseConnection()
        return lost

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self._is_lost = True
        state = self._state
        self._state = _CLOSED
        if self.idle_timer is not None:
            if self.idle_timer.active():
                self.idle_timer.cancel()
            self.idle_timer = None
        self._pool.forget(self)
        if state == _WAITING or self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            if waiting is not None:
                waiting.errback(ResponseNeverReceived([reason]))
        response, self._response = self._response, None
        if response is not None:
            if state == _BODY and self._framing == _UNTIL_CLOSE:
                response.end(Failure(PotentialDataLoss()))
            else:
                response.end(Failure(ResponseFailed([reason])))
        lost, self._lost = self._lost, []
        for d in lost:
            d.callback(None)


def _options(value: bytes) -> list[bytes]:
    return [option.strip(b" \t") for option in value.split(b",")]


def _failed(error: BaseException) -> Deferred[IResponse]:
    d: Deferred[IResponse] = Deferred()
    d.errback(Failure(error))
    return d


class _ConnectionFactory(Factory):
    """
    Builds the one connection an endpoint's C{connect} makes for the pool.
    """

    def __init__(self, pool: UpstreamPool, key: PoolKey) -> None:
        self._pool = pool
        self._key = key

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        return UpstreamConnection(self._pool, self._key)


class UpstreamPool:
    """
    Idle upstream connections kept for reuse, per origin (C{key}): at most
    L{maxPersistentPerHost} each (the oldest is closed to make room), each
    closed after L{cachedConnectionTimeout} seconds idle. C{persistent}
    false keeps none, and its requests ask the upstream to close.

    The attribute names are C{HTTPConnectionPool}'s, which it replaces.
    """

    maxPersistentPerHost = 2
    cachedConnectionTimeout: float = 240

    def __init__(self, reactor: IReactorTime, persistent: bool = True) -> None:
        self._reactor = reactor
        self.persistent = persistent
        self._idle: dict[PoolKey, list[UpstreamConnection]] = {}

    def take(self, key: PoolKey) -> UpstreamConnection | None:
        """
        An idle connection to C{key}'s origin (the one last put back), or None.
        """
        idle = self._idle.get(key)
        if not idle:
            return None
        # The timer keeps running: if it fires while the connection is in
        # use it does nothing, and put pushes it back, which costs less
        # than a cancel and a new timer per request.
        return idle.pop()

    def connect(self, key: PoolKey, endpoint: IStreamClientEndpoint) -> Deferred[Any]:
        """
        A new connection to C{key}'s origin through C{endpoint}.
        """
        return endpoint.connect(_ConnectionFactory(self, key))

    def put(self, connection: UpstreamConnection) -> None:
        """
        A connection whose answer is complete, to keep for the next request.
        """
        idle = self._idle.setdefault(connection.key, [])
        if len(idle) >= self.maxPersistentPerHost:
            idle.pop(0).close_idle()
        idle.append(connection)
        timer = connection.idle_timer
        if timer is not None and timer.active():
            timer.reset(self.cachedConnectionTimeout)
        else:
            connection.idle_timer = self._reactor.callLater(
                self.cachedConnectionTimeout, self._expired, connection
            )

    def _expired(self, connection: UpstreamConnection) -> None:
        connection.idle_timer = None
        idle = self._idle.get(connection.key)
        if idle is not None and connection in idle:
            idle.remove(connection)
            connection.close_idle()

    def forget(self, connection: UpstreamConnection) -> None:
        """
        A connection was lost: it is no longer kept.
        """
        idle = self._idle.get(connection.key)
        if idle is not None and connection in idle:
            idle.remove(connection)
            if not idle:
                del self._idle[connection.key]

    def idle_count(self, key: PoolKey) -> int:
        return len(self._idle.get(key, ()))

    def closeCachedConnections(self) -> Deferred[None]:
        """
        Close every idle connection; fires when all are lost.
        """
        idle = [connection for connections in self._idle.values() for connection in connections]
        self._idle = {}
        closing = [connection.close_idle() for connection in idle]
        for connection in idle:
            if connection.idle_timer is not None and connection.idle_timer.active():
                connection.idle_timer.cancel()
            connection.idle_timer = None
        done: Deferred[Any] = gatherResults(closing)
        return done.addCallback(lambda _: None)
