"""
credproxy's upstream HTTP/1.1 client on a StringTransport: the screened
head, the answer's headers as Twisted's client gave them, every framing,
the connection's reuse and when it is refused, cancellation, the body's
consumer (held bytes, pause, stop), the pool's bounds and idle timeout,
and the private Twisted names the client leans on.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import http_headers
from twisted.web._newclient import (
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface.verify import verifyObject

from credproxy.http import _upstream_client
from credproxy.http._chunked import MAX_BYTES_WITHOUT_DATA
from credproxy.http._upstream import BAD_CHUNKED_FRAMING, malformed_kind
from credproxy.http._upstream_client import (
    CONNECTION_CONTROL_HEADERS,
    MAX_CACHED_NAMES,
    UpstreamConnection,
    UpstreamPool,
    UpstreamResponse,
    canonical_name,
)
from credproxy.http._upstream_head import MAX_HEAD_BYTES, HeadDefect

KEY = (b"http", b"upstream", 80)
REQUEST = b"POST /v1/messages HTTP/1.1\r\nHost: upstream\r\nContent-Length: 2\r\n\r\n{}"


class Collector(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.reads: list[bytes] = []
        self.ended: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.reads.append(data)
        self.data += data

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.ended = reason


class Connected:
    """
    One client connection on a StringTransport, in a pool on a Clock.
    """

    def __init__(self, pool: UpstreamPool | None = None) -> None:
        self.clock = Clock()
        self.pool = pool or UpstreamPool(self.clock)
        self.protocol = UpstreamConnection(self.pool, KEY)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def request(
        self, *, no_body: bool = False, persistent: bool = True
    ) -> tuple[list[IResponse], list[Failure], Deferred[IResponse]]:
        answers: list[IResponse] = []
        failures: list[Failure] = []
        d = self.protocol.send(REQUEST, no_body=no_body, persistent=persistent)
        d.addCallbacks(answers.append, failures.append)
        return answers, failures, d

    def feed(self, *reads: bytes) -> None:
        for data in reads:
            self.protocol.dataReceived(data)

    def lose(self, reason: BaseException | None = None) -> None:
        self.protocol.connectionLost(Failure(reason or ConnectionAborted()))

    @property
    def aborted(self) -> bool:
        return bool(self.transport.disconnected)  # what abortConnection sets

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    @property
    def pooled(self) -> bool:
        return self.pool.idle_count(KEY) == 1


def body_of(response: IResponse) -> Collector:
    collector = Collector()
    response.deliverBody(collector)
    return collector


def reasons_of(failure: Failure) -> list[Failure]:
    """
    The causes a Twisted wrapper exception carries.
    """
    assert isinstance(failure.value, ResponseFailed)
    reasons: list[Failure] = failure.value.reasons
    return reasons


def ended_with(collector: Collector, kind: type[BaseException]) -> bool:
    return collector.ended is not None and collector.ended.check(kind) is not None


class AnswerTests(SynchronousTestCase):
    def test_the_request_is_written_once_as_given(self) -> None:
        connected = Connected()
        connected.request()
        self.assertEqual(connected.transport.value(), REQUEST)

    def test_a_good_answer_is_parsed_as_twisteds_client_parsed_it(self) -> None:
        connected = Connected()
        answers, _, _ = connected.request()
        connected.feed(
            b"HTTP/1.1 201 Created\r\nConnection: x-hop\r\nX-Hop: 1\r\n"
            b"content-type: text/event-stream\r\nrequest-id: req_1\r\nX-Many: a\r\n"
            b"X-Many: b\r\nx-spaced:   v  \r\netag: e\r\nKeep-Alive: timeout=5\r\n"
            b"Content-Length: 5\r\n\r\nhello"
        )
        (response,) = answers
        self.assertTrue(verifyObject(IResponse, response))
        self.assertEqual(
            (response.code, response.phrase, response.version, response.length),
            (201, b"Created", (b"HTTP", 1, 1), 5),
        )
        # The same Headers that adding each field publicly would have made:
        # canonical names, values stripped, Twisted's connection headers kept out.
        expected = Headers()
        for name, value in [
            (b"content-type", b"text/event-stream"),
            (b"request-id", b"req_1"),
            (b"X-Many", b"a"),
            (b"X-Many", b"b"),
            (b"x-spaced", b"v"),
            (b"etag", b"e"),
        ]:
            expected.addRawHeader(name, value)
        self.assertEqual(response.headers, expected)
        self.assertEqual(response.headers.getRawHeaders(b"Content-Type"), [b"text/event-stream"])
        self.assertEqual(response.headers.getRawHeaders(b"ETag"), [b"e"])
        collector = body_of(response)
        self.assertEqual(collector.data, b"hello")
        self.assertTrue(ended_with(collector, ResponseDone))
        self.assertTrue(connected.pooled)
        self.assertFalse(connected.closed)

    def test_a_status_line_without_a_phrase_and_http_1_0(self) -> None:
        connected = Connected()
        answers, _, _ = connected.request()
        connected.feed(b"HTTP/1.0 200\r\nContent-Length: 0\r\n\r\n")
        (response,) = answers
        self.assertEqual((response.code, response.phrase), (200, b""))
        self.assertEqual(response.version, (b"HTTP", 1, 0))
        self.assertFalse(connected.pooled)  # HTTP/1.0 without keep-alive closes
        self.assertTrue(connected.closed)

    def test_an_http_1_0_answer_that_keeps_alive_is_reused(self) -> None:
        connected = Connected()
        connected.request()
        connected.feed(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(connected.pooled)

    def test_a_head_in_pieces_is_screened_whole(self) -> None:
        connected = Connected()
        answers, failures, _ = connected.request()
        for byte in b"HTTP/1.1 200 OK\r\nX: a\r\nY: b\x00\r\n\r\n":
            connected.feed(bytes([byte]))
        self.assertEqual(answers, [])
        self.assertTrue(connected.aborted)
        self.assertEqual(malformed_kind(failures[0]), HeadDefect.CONTROL_CHARACTER.name)

    def test_a_refused_head_fails_the_request_at_once_and_aborts(self) -> None:
        connected = Connected()
        answers, failures, _ = connected.request()
        connected.feed(b"HTTP/1.1 200 O\rK\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(connected.aborted)
        self.assertEqual((answers, len(failures)), ([], 1))  # in the same turn
        connected.feed(b"more")  # nothing more is read
        connected.lose()  # and the lost connection changes nothing
        (failure,) = failures
        self.assertTrue(failure.check(ResponseNeverReceived))
        self.assertEqual(malformed_kind(failure), HeadDefect.BARE_CR_OR_LF.name)
        self.assertFalse(connected.pooled)

    def test_a_head_over_the_limit_is_refused(self) -> None:
        connected = Connected()
        _, failures, _ = connected.request()
        connected.feed(b"HTTP/1.1 200 OK\r\nX: " + b"a" * MAX_HEAD_BYTES)
        self.assertEqual(malformed_kind(failures[0]), HeadDefect.TOO_LARGE.name)

    def test_each_answer_on_a_persistent_connection_is_screened(self) -> None:
        connected = Connected()
        answers, _, _ = connected.request()
        connected.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
        body_of(answers[0])
        self.assertIs(connected.pool.take(KEY), connected.protocol)
        answers, failures, _ = connected.request()
        connected.feed(b"HTTP/1.1 200 OK\r\nX: \x7f\r\n\r\n")
        self.assertEqual(answers, [])
        self.assertEqual(malformed_kind(failures[0]), HeadDefect.CONTROL_CHARACTER.name)

    def test_an_interim_answer_is_dropped(self) -> None:
        connected = Connected()
        answers, _, _ = connected.request()
        connected.feed(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
        )
        self.assertEqual([a.code for a in answers], [201])
        self.assertTrue(connected.pooled)

    def test_answers_without_a_body(self) -> None:
        for status, no_body in [
            (b"204 No Content", False),
            (b"304 Not Modified", False),
            (b"200 OK", True),  # to a HEAD
        ]:
            connected = Connected()
            answers, _, _ = connected.request(no_body=no_body)
            connected.feed(b"HTTP/1.1 " + status + b"\r\nContent-Length: 10\r\n\r\n")
            (response,) = answers
            self.assertEqual(response.length, 0, status)
            collector = body_of(response)
            self.assertEqual(collector.data, b"")
            self.assertTrue(ended_with(collector, ResponseDone))
            self.assertTrue(connected.pooled, status)

    def test_a_zero_length_answer_is_complete_with_its_head(self) -> None:
        connected = Connected()
        answers, _, _ = connected.request()
        connected.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(answers[0].length, 0)
        self.assertTrue(connected.pooled)

    def test_a_content_length_body_in_pieces(self) -> None:
        connected = Connected()
        answers, _, _ = connected.request()
        connected.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nab")
        collector = body_of(answers[0])
        connected.feed(b"cd")
        self.assertIsNone(collector.ended)
        connected.feed(b"ef")
        self.assertEqual(collector.reads, [b"ab", b"cd", b"ef"])
        self.assertTrue(ended_with(collector, ResponseDone))
        self.assertTrue(connected.pooled)

    def test_a_chunked_body_is_one_call_per_read(self) -> None:
        connected = Connected()
        answers, _, _ = connected.request()
        connected.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n")
        (response,) = answers
        self.assertIs(response.length, UNKNOWN_LENGTH)
        self.assertFalse(response.headers.hasHeader(b"transfer-encoding"))
        collector = body_of(response)
        connected.feed(b"1\r\nc\r\n2\r\nde\r\n0\r\n\r\n")
        self.assertEqual(collector.reads, [b"ab", b"cde"])
        self.assertTrue(ended_with(collector, ResponseDone))
        self.assertTrue(connected.pooled)

    def test_a_close_delimited_body_is_potential_data_loss_and_not_reused(self) -> None:
        connected = Connected()
        answers, _, _ = connected.request()
        connected.feed(b"HTTP/1.1 200 OK\r\n\r\nsome")
        (response,) = answers
        self.assertIs(response.length, UNKNOWN_LENGTH)
        collector = body_of(response)
        connected.feed(b" more")
        connected.lose(ConnectionDone())
        self.assertEqual(collector.data, b"some more")
        self.assertTrue(ended_with(collector, PotentialDataLoss))
        self.assertFalse(connected.pooled)

    def test_connection_close_is_not_reused(self) -> None:
        for value in (b"close", b"Keep-Alive, Close"):
            connected = Connected()
            answers, _, _ = connected.request()
            connected.feed(
                b"HTTP/1.1 200 OK\r\nConnection: " + value + b"\r\nContent-Length: 2\r\n\r\nok"
            )
            collector = body_of(answers[0])
            self.assertTrue(ended_with(collector, ResponseDone))
            self.assertFalse(connected.pooled)
            self.assertTrue(connected.closed)
            self.assertFalse(connected.aborted)  # closed in good order

    def test_a_request_that_asked_to_close_is_not_reused(self) -> None:
        connected = Connected()
        connected.request(persistent=False)
        connected.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertFalse(connected.pooled)
        self.assertTrue(connected.closed)

    def test_a_pool_that_keeps_nothing_reuses_nothing(self) -> None:
        connected = Connected(UpstreamPool(Clock(), persistent=False))
        connected.request()
        connected.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertFalse(connected.pooled)
        self.assertTrue(connected.closed)


class DesynchronisedTests(SynchronousTestCase):
    def test_bytes_after_a_complete_answer_close_the_connection(self) -> None:
        for chunked in (True, False):
            for extra_in_same_read in (True, False):
                connected = Connected()
                answers, _, _ = connected.request()
                if chunked:
                    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    body = b"1\r\na\r\n0\r\n\r\n"
                else:
                    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n"
                    body = b"a"
                connected.feed(head)
                collector = body_of(answers[0])
                smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
                if extra_in_same_read:
                    connected.feed(body + smuggled)
                    self.assertFalse(connected.pooled)  # never handed back
                else:
                    connected.feed(body)
                    self.assertTrue(connected.pooled)
                    connected.feed(smuggled)
                self.assertEqual(collector.data, b"a")
                self.assertTrue(ended_with(collector, ResponseDone))  # that answer was whole
                self.assertTrue(connected.aborted, (chunked, extra_in_same_read))
                connected.lose()
                self.assertFalse(connected.pooled)
                self.assertIsNone(connected.pool.take(KEY))

    def test_bytes_after_a_bodyless_answer_close_the_connection(self) -> None:
        connected = Connected()
        answers, _, _ = connected.request()
        connected.feed(b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\n")
        self.assertEqual([a.code for a in answers], [204])
        self.assertTrue(connected.aborted)
        self.assertFalse(connected.pooled)

    def test_bytes_on_an_idle_connection_close_it(self) -> None:
        connected = Connected()
        connected.feed(b"HTTP/1.1 200 OK\r\n\r\n")  # before any request
        self.assertTrue(connected.aborted)
        connected = Connected()
        connected.request()
        connected.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(connected.pooled)
        connected.feed(b"x")
        self.assertTrue(connected.aborted)
        connected.lose()
        self.assertFalse(connected.pooled)

    def test_broken_chunked_framing_fails_the_body_at_once(self) -> None:
        connected = Connected()
        answers, _, _ = connected.request()
        connected.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        collector = body_of(answers[0])
        connected.feed(b"4\r\ngood\r\n")
        connected.feed(b"5\r\nhello\r\nzz\r\n")
        # The refused read's data is not passed on, even its good chunk.
        self.assertEqual(collector.data, b"good")
        self.assertTrue(connected.aborted)
        self.assertTrue(ended_with(collector, ResponseFailed))  # before the connection is lost
        assert collector.ended is not None
        self.assertEqual(malformed_kind(collector.ended), BAD_CHUNKED_FRAMING)
        connected.lose()
        self.assertFalse(connected.pooled)

    def test_chunked_framing_without_data_is_bounded(self) -> None:
        connected = Connected()
        answers, _, _ = connected.request()
        connected.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        collector = body_of(answers[0])
        connected.feed(b"1;" + b"x" * (MAX_BYTES_WITHOUT_DATA + 1))
        self.assertTrue(connected.aborted)
        assert collector.ended is not None
        self.assertEqual(malformed_kind(collector.ended), BAD_CHUNKED_FRAMING)


class LossAndCancelTests(SynchronousTestCase):
    def test_a_connection_lost_before_the_head_is_response_never_received(self) -> None:
        connected = Connected()
        _, failures, _ = connected.request()
        connected.feed(b"HTTP/1.1 200 OK\r\n")
        connected.lose(ConnectionLost())
        (failure,) = failures
        self.assertTrue(failure.check(ResponseNeverReceived))
        self.assertTrue(reasons_of(failure)[0].check(ConnectionLost))
        self.assertIsNone(malformed_kind(failure))

    def test_a_dead_pooled_connection_fails_the_request_without_retry(self) -> None:
        connected = Connected()
        connected.request()
        connected.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        taken = connected.pool.take(KEY)
        assert taken is not None
        _, failures, _ = connected.request()
        connected.lose(ConnectionDone())  # the upstream had closed it
        self.assertTrue(failures[0].check(ResponseNeverReceived))
        self.assertEqual(connected.transport.value().count(b"POST "), 2)  # one per request

    def test_a_lost_connection_after_the_head_fails_the_body(self) -> None:
        for head in (
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
        ):
            connected = Connected()
            answers, _, _ = connected.request()
            connected.feed(head)
            collector = body_of(answers[0])
            connected.lose(ConnectionDone())
            self.assertEqual(collector.data, b"abc")
            self.assertTrue(ended_with(collector, ResponseFailed))
            self.assertFalse(connected.pooled)

    def test_cancelling_before_the_head_aborts(self) -> None:
        connected = Connected()
        answers, failures, d = connected.request()
        connected.feed(b"HTTP/1.1 200")
        d.cancel()
        self.assertTrue(connected.aborted)
        (failure,) = failures
        self.assertTrue(failure.check(ResponseNeverReceived))
        self.assertTrue(reasons_of(failure)[0].check(CancelledError))
        connected.feed(b" OK\r\n\r\n")
        connected.lose()
        self.assertEqual((answers, len(failures)), ([], 1))

    def test_cancelling_after_the_head_changes_nothing(self) -> None:
        connected = Connected()
        answers, _, d = connected.request()
        connected.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
        d.cancel()
        self.assertFalse(connected.aborted)
        collector = body_of(answers[0])
        connected.feed(b"ok")
        self.assertTrue(ended_with(collector, ResponseDone))

    def test_a_connection_in_use_refuses_another_request(self) -> None:
        connected = Connected()
        connected.request()
        _, failures, _ = connected.request()
        self.assertTrue(failures[0].check(RequestTransmissionFailed))
        self.assertEqual(connected.transport.value().count(b"POST "), 1)


class BodyConsumerTests(SynchronousTestCase):
    def test_bytes_before_the_consumer_are_held_and_reading_paused(self) -> None:
        connected = Connected()
        received: list[IResponse] = []
        d = connected.protocol.send(REQUEST, no_body=False, persistent=True)
        d.addCallback(received.append)  # no deliverBody in the callback
        connected.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        self.assertEqual(connected.transport.producerState, "paused")
        collector = body_of(received[0])
        self.assertEqual(collector.data, b"ab")
        self.assertEqual(connected.transport.producerState, "producing")
        connected.feed(b"cd")
        self.assertTrue(ended_with(collector, ResponseDone))

    def test_an_end_before_the_consumer_is_given_with_it(self) -> None:
        connected = Connected()
        received: list[IResponse] = []
        connected.protocol.send(REQUEST, no_body=False, persistent=True).addCallback(
            received.append
        )
        connected.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(connected.pooled)
        self.assertEqual(connected.transport.producerState, "producing")
        collector = body_of(received[0])
        self.assertEqual(collector.data, b"ok")
        self.assertTrue(ended_with(collector, ResponseDone))
        with self.assertRaises(RuntimeError):
            received[0].deliverBody(Collector())

    def test_the_consumer_pauses_resumes_and_stops_reading(self) -> None:
        connected = Connected()
        answers, _, _ = connected.request()
        connected.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        response = answers[0]
        assert isinstance(response, UpstreamResponse)
        collector = body_of(response)
        assert collector.transport is not None
        collector.transport.pauseProducing()  # type: ignore[attr-defined]
        self.assertEqual(connected.transport.producerState, "paused")
        collector.transport.resumeProducing()  # type: ignore[attr-defined]
        self.assertEqual(connected.transport.producerState, "producing")
        collector.transport.stopProducing()  # type: ignore[attr-defined]
        self.assertTrue(connected.aborted)
        connected.feed(b"abc")  # nothing more is read
        self.assertIsNone(collector.ended)  # the end comes with the lost connection
        connected.lose()
        self.assertEqual(collector.data, b"")
        self.assertTrue(ended_with(collector, ResponseFailed))
        self.assertFalse(connected.pooled)

    def test_a_consumer_that_stops_while_it_is_given_the_body(self) -> None:
        class Discard(Protocol):
            def connectionMade(self) -> None:
                assert self.transport is not None
                self.transport.stopProducing()  # type: ignore[attr-defined]

        connected = Connected()
        d = connected.protocol.send(REQUEST, no_body=False, persistent=True)
        d.addCallback(lambda response: response.deliverBody(Discard()))
        connected.feed(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 5\r\n\r\nno")
        self.assertTrue(connected.aborted)
        self.assertFalse(connected.pooled)

    def test_a_paused_consumer_is_resumed_for_the_next_request(self) -> None:
        connected = Connected()
        answers, _, _ = connected.request()
        connected.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
        collector = body_of(answers[0])
        assert collector.transport is not None
        collector.transport.pauseProducing()  # type: ignore[attr-defined]
        connected.feed(b"ok")  # the read that was already under way
        self.assertTrue(connected.pooled)
        self.assertEqual(connected.transport.producerState, "producing")
        # Once the body is over, its consumer's calls reach nothing.
        collector.transport.pauseProducing()  # type: ignore[attr-defined]
        collector.transport.stopProducing()  # type: ignore[attr-defined]
        self.assertEqual(connected.transport.producerState, "producing")
        self.assertFalse(connected.closed)

    def test_a_consumer_that_raises_aborts_the_connection(self) -> None:
        class Raising(Collector):
            def dataReceived(self, data: bytes) -> None:
                raise RuntimeError("consumer bug")

        connected = Connected()
        answers, _, _ = connected.request()
        connected.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n")
        collector = Raising()
        answers[0].deliverBody(collector)
        connected.feed(b"ab")
        self.assertTrue(connected.aborted)
        self.assertTrue(ended_with(collector, ResponseFailed))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class RecordingEndpoint:
    def __init__(self) -> None:
        self.factories: list[IProtocolFactory] = []

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        self.factories.append(factory)
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 80))
        assert protocol is not None
        protocol.makeConnection(StringTransport())
        return succeed(protocol)


def answered(pool: UpstreamPool) -> UpstreamConnection:
    """
    A new connection of C{pool}'s, one answer done on it.
    """
    connection = UpstreamConnection(pool, KEY)
    connection.makeConnection(StringTransport())
    connection.send(REQUEST, no_body=False, persistent=True)
    connection.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    return connection


class PoolTests(SynchronousTestCase):
    def test_the_pool_connects_with_its_own_connections(self) -> None:
        pool = UpstreamPool(Clock())
        endpoint = RecordingEndpoint()
        connections: list[Any] = []
        pool.connect(KEY, endpoint).addCallback(connections.append)  # type: ignore[arg-type]
        (connection,) = connections
        self.assertIsInstance(connection, UpstreamConnection)
        self.assertEqual(connection.key, KEY)

    def test_the_last_put_back_is_taken_first_and_each_once(self) -> None:
        pool = UpstreamPool(Clock())
        pool.maxPersistentPerHost = 4
        first, second = answered(pool), answered(pool)
        self.assertIs(pool.take(KEY), second)
        self.assertIs(pool.take(KEY), first)
        self.assertIsNone(pool.take(KEY))
        self.assertIsNone(pool.take((b"https", b"upstream", 443)))

    def test_connections_kept_per_origin_are_bounded(self) -> None:
        pool = UpstreamPool(Clock())
        pool.maxPersistentPerHost = 3
        connections = [answered(pool) for _ in range(5)]
        self.assertEqual(pool.idle_count(KEY), 3)
        # The oldest were closed to make room.
        closed = [c for c in connections if c.transport.disconnecting]  # type: ignore[union-attr]
        self.assertEqual(closed, connections[:2])

    def test_an_idle_connection_is_closed_after_the_timeout(self) -> None:
        clock = Clock()
        pool = UpstreamPool(clock)
        pool.cachedConnectionTimeout = 120
        connection = answered(pool)
        clock.advance(119)
        self.assertEqual(pool.idle_count(KEY), 1)
        clock.advance(1)
        self.assertEqual(pool.idle_count(KEY), 0)
        self.assertTrue(connection.transport.disconnecting)  # type: ignore[union-attr]

    def test_reuse_restarts_the_idle_timeout_and_use_is_never_timed_out(self) -> None:
        clock = Clock()
        pool = UpstreamPool(clock)
        pool.cachedConnectionTimeout = 120
        connection = answered(pool)
        clock.advance(100)
        self.assertIs(pool.take(KEY), connection)
        connection.send(REQUEST, no_body=False, persistent=True)
        clock.advance(100)  # past the first deadline, while in use
        self.assertFalse(connection.transport.disconnecting)  # type: ignore[union-attr]
        connection.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        clock.advance(119)
        self.assertEqual(pool.idle_count(KEY), 1)
        clock.advance(1)
        self.assertEqual(pool.idle_count(KEY), 0)
        self.assertLessEqual(len(clock.getDelayedCalls()), 0)

    def test_a_lost_idle_connection_is_forgotten_and_its_timer_cancelled(self) -> None:
        clock = Clock()
        pool = UpstreamPool(clock)
        connection = answered(pool)
        connection.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(pool.take(KEY))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_close_cached_connections_fires_when_they_are_lost(self) -> None:
        clock = Clock()
        pool = UpstreamPool(clock)
        pool.maxPersistentPerHost = 4
        connections = [answered(pool) for _ in range(2)]
        closed = pool.closeCachedConnections()
        self.assertNoResult(closed)
        self.assertTrue(all(c.transport.disconnecting for c in connections))  # type: ignore[union-attr]
        self.assertEqual(clock.getDelayedCalls(), [])
        for connection in connections:
            connection.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(closed)
        self.assertIsNone(pool.take(KEY))
        self.successResultOf(UpstreamPool(clock).closeCachedConnections())


class PrivateTwistedNamesTests(SynchronousTestCase):
    def test_headers_keep_values_in_raw_headers_by_canonical_name(self) -> None:
        headers = Headers()
        headers.addRawHeader(b"content-type", b"a")
        headers.addRawHeader(b"x-xss-protection", b"b")
        self.assertEqual(
            headers._rawHeaders, {b"Content-Type": [b"a"], b"X-XSS-Protection": [b"b"]}
        )
        self.assertEqual(http_headers._nameEncoder.encode(b"www-authenticate"), b"WWW-Authenticate")
        self.assertIn("_rawHeaders", Headers.__slots__)

    def test_canonical_names_are_twisteds_and_their_cache_is_bounded(self) -> None:
        self.assertEqual(canonical_name(b"etag"), b"ETag")
        self.assertEqual(canonical_name(b"REQUEST-ID"), b"Request-Id")
        for n in range(MAX_CACHED_NAMES + 10):
            canonical_name(b"x-made-up-%d" % (n,))
        self.assertLessEqual(len(_upstream_client._canonical_names), MAX_CACHED_NAMES)

    def test_the_connection_control_headers_are_twisteds(self) -> None:
        from twisted.web._newclient import HTTPClientParser

        self.assertEqual(
            CONNECTION_CONTROL_HEADERS,
            {canonical_name(name) for name in HTTPClientParser.CONNECTION_CONTROL_HEADERS},
        )
