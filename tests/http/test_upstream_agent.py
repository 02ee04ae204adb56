"""
The upstream hop's agent: what it writes on the wire (the path and query,
one I{Host}, the bytes Twisted's own client writes), what it refuses before
connecting, the origin parsed once, a pooled connection reused, and
redirects delivered, never followed.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import Request as ClientRequest
from twisted.web._newclient import ResponseNeverReceived
from twisted.web.client import URI
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import implementer

from credproxy.http._body import BodyProducer, RequestBody
from credproxy.http._upstream_agent import MAX_CACHED_ORIGINS, UpstreamAgent, request_bytes
from credproxy.http._upstream_client import UpstreamPool


class WriteCountingTransport(StringTransport):
    """
    A StringTransport that keeps each write.
    """

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


@implementer(IStreamClientEndpoint)
class StringEndpoint:
    """
    Connects at once, each connection on a StringTransport of its own.
    """

    def __init__(self) -> None:
        self.transports: list[WriteCountingTransport] = []
        self.protocols: list[Any] = []

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 80))
        transport = WriteCountingTransport()
        assert protocol is not None
        protocol.makeConnection(transport)
        self.transports.append(transport)
        self.protocols.append(protocol)
        return succeed(protocol)


@implementer(IAgentEndpointFactory)
class RecordingEndpoints:
    """
    An endpoint factory that counts what it is asked for.
    """

    def __init__(self) -> None:
        self.asked: list[URI] = []
        self.endpoint = StringEndpoint()

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        self.asked.append(uri)
        return self.endpoint


class UpstreamAgentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.endpoints = RecordingEndpoints()
        self.agent = UpstreamAgent(self.endpoints, UpstreamPool(Clock()))

    def send(
        self, uri: bytes, headers: Headers | None = None, method: bytes = b"POST"
    ) -> tuple[list[IResponse], list[Failure]]:
        answers: list[IResponse] = []
        failures: list[Failure] = []
        d = self.agent.request(method, uri, headers, BodyProducer(RequestBody([b"{}"])))
        d.addCallbacks(answers.append, failures.append)
        return answers, failures

    def wire(self, index: int = 0) -> bytes:
        sent: bytes = self.endpoints.endpoint.transports[index].value()
        return sent

    def test_the_path_and_query_are_the_request_target(self) -> None:
        self.send(b"http://upstream.example:8080/v1/messages?beta=true")
        head = self.wire().split(b"\r\n\r\n")[0].split(b"\r\n")
        self.assertEqual(head[0], b"POST /v1/messages?beta=true HTTP/1.1")
        self.assertIn(b"host: upstream.example:8080", [line.lower() for line in head])

    def test_the_host_value_leaves_out_a_default_port_and_brackets_ipv6(self) -> None:
        for uri, host in [
            (b"https://api.example/v1/messages", b"api.example"),
            (b"http://api.example/v1/messages", b"api.example"),
            (b"http://api.example:443/v1/messages", b"api.example:443"),
            (b"http://[::1]:8080/v1/messages", b"[::1]:8080"),
        ]:
            agent = UpstreamAgent(self.endpoints, UpstreamPool(Clock()))
            agent.request(b"POST", uri, None, BodyProducer(RequestBody([b"{}"])))
            sent = self.endpoints.endpoint.transports[-1].value().lower()
            self.assertIn(b"\r\nhost: " + host + b"\r\n", sent, uri)

    def test_a_url_without_a_path_asks_for_the_root(self) -> None:
        self.send(b"http://upstream.example")
        self.assertTrue(self.wire().startswith(b"POST / HTTP/1.1\r\n"))

    def test_the_callers_headers_are_not_changed(self) -> None:
        headers = Headers({b"x-api-key": [b"sk-ant-api03-real"]})
        self.send(b"http://upstream.example/v1/messages", headers)
        self.assertFalse(headers.hasHeader(b"host"))
        self.assertIn(b"\r\nX-Api-Key: sk-ant-api03-real\r\n", self.wire())

    def test_a_host_the_caller_gave_is_the_one_sent(self) -> None:
        self.send(b"http://127.0.0.1:8080/v1/messages", Headers({b"host": [b"api.example"]}))
        sent = self.wire().lower()
        self.assertEqual(sent.count(b"\r\nhost:"), 1)
        self.assertIn(b"\r\nhost: api.example\r\n", sent)

    def test_a_bad_url_or_method_fails_without_connecting(self) -> None:
        for method, uri in [
            (b"POST", b"/v1/messages"),  # not absolute
            (b"POST", b"ftp://upstream.example/v1/messages"),
            (b"POST", b"http:///v1/messages"),  # no host
            (b"POST", b"http://upstream.example/v1/messa ges"),
            (b"POST", b"http://upstream.example/v1/\x00"),
            (b"POST", b"http://upstream.example/v1/\r\nx-evil: 1"),
            (b"POST", b"http://upstream.example/v1/\xc3\xa9"),
            (b"POST", b"http://upstream.exa mple/v1/messages"),
            (b"PO ST", b"http://upstream.example/v1/messages"),
            (b"", b"http://upstream.example/v1/messages"),
        ]:
            answers, failures = self.send(uri, method=method)
            self.assertEqual(answers, [])
            (failure,) = failures
            self.assertIsInstance(failure.value, ValueError, (method, uri))
        self.assertEqual(self.endpoints.endpoint.transports, [])

    def test_an_origin_is_parsed_and_its_endpoint_found_once(self) -> None:
        self.send(b"http://upstream.example/v1/messages")
        self.send(b"http://upstream.example/v1/messages/count_tokens?x=1")
        self.assertEqual(len(self.endpoints.asked), 1)
        self.assertEqual(self.endpoints.asked[0].host, b"upstream.example")

    def test_the_origin_cache_is_bounded(self) -> None:
        for port in range(MAX_CACHED_ORIGINS + 3):
            self.send(b"http://upstream.example:%d/v1/messages" % (8000 + port,))
        self.assertLessEqual(len(self.agent._origins), MAX_CACHED_ORIGINS)
        self.assertEqual(len(self.endpoints.asked), MAX_CACHED_ORIGINS + 3)

    def test_a_redirect_is_the_answer_and_is_not_followed(self) -> None:
        answers, failures = self.send(b"http://upstream.example/v1/messages")
        self.endpoints.endpoint.protocols[0].dataReceived(
            b"HTTP/1.1 307 Temporary Redirect\r\n"
            b"Location: http://elsewhere.example/v1/messages\r\n"
            b"Content-Length: 0\r\n\r\n"
        )
        self.assertEqual(failures, [])
        (response,) = answers
        self.assertEqual(response.code, 307)
        self.assertEqual(len(self.endpoints.endpoint.transports), 1)
        self.assertEqual(self.wire().count(b"POST "), 1)
        self.assertEqual(len(self.endpoints.asked), 1)

    def test_a_kept_alive_connection_serves_the_next_request(self) -> None:
        answers, _ = self.send(b"http://upstream.example/v1/messages")
        self.endpoints.endpoint.protocols[0].dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
        )
        self.assertEqual(len(answers), 1)
        self.send(b"http://upstream.example/v1/messages")
        self.assertEqual(len(self.endpoints.endpoint.transports), 1)
        self.assertEqual(self.wire().count(b"POST /v1/messages HTTP/1.1"), 2)

    def test_cancelling_before_the_head_aborts_the_connection(self) -> None:
        for pooled in (False, True):
            agent = UpstreamAgent(self.endpoints, UpstreamPool(Clock()))
            if pooled:
                agent.request(b"POST", b"http://upstream.example/", None, None)
                self.endpoints.endpoint.protocols[-1].dataReceived(
                    b"HTTP/1.1 204 No Content\r\n\r\n"
                )
            failures: list[Failure] = []
            d = agent.request(b"POST", b"http://upstream.example/", None, None)
            d.addErrback(failures.append)
            d.cancel()
            transport = self.endpoints.endpoint.transports[-1]
            self.assertTrue(transport.disconnected, pooled)  # what abortConnection sets
            (failure,) = failures
            self.assertTrue(failure.check(ResponseNeverReceived))

    def test_a_body_still_being_produced_is_refused(self) -> None:
        class Producing:
            length = 2

            def startProducing(self, consumer: Any) -> Deferred[None]:
                return Deferred()

            def pauseProducing(self) -> None: ...
            def resumeProducing(self) -> None: ...
            def stopProducing(self) -> None: ...

        failures: list[Failure] = []
        self.agent.request(
            b"POST",
            b"http://upstream.example/",
            None,
            Producing(),  # type: ignore[arg-type]
        ).addErrback(failures.append)
        (failure,) = failures
        self.assertIsInstance(failure.value, ValueError)
        self.assertEqual(self.endpoints.endpoint.transports, [])

    def test_a_request_without_a_body(self) -> None:
        self.agent.request(b"GET", b"http://upstream.example/v1/models")
        self.assertEqual(self.wire(), b"GET /v1/models HTTP/1.1\r\nHost: upstream.example\r\n\r\n")


class RequestBytesTests(SynchronousTestCase):
    """
    What the agent writes is what Twisted's client writes for the same
    request (Twisted's own request is the oracle here), with Host last.
    """

    def twisted_writes(
        self, method: bytes, body: BodyProducer | None, persistent: bool, host: bytes
    ) -> bytes:
        transport = StringTransport()
        headers = Headers({b"x-api-key": [b"sk-ant-api03-real"], b"anthropic-beta": [b"a", b"b"]})
        headers.addRawHeader(b"host", host)  # what Twisted's Agent adds
        request = ClientRequest._construct(
            method, b"/v1/messages?beta=true", headers, body, persistent=persistent, parsedURI=None
        )
        request.writeTo(transport)
        sent: bytes = transport.value()
        return sent

    def test_the_bytes_are_those_twisted_writes(self) -> None:
        for method, chunks in [
            (b"POST", []),
            (b"POST", [b"{}"]),
            (b"POST", [b'{"model":', b' "claude"', b"}" * 5000]),
            (b"POST", None),
            (b"GET", None),
        ]:
            for persistent in (True, False):
                headers = Headers(
                    {b"x-api-key": [b"sk-ant-api03-real"], b"anthropic-beta": [b"a", b"b"]}
                )
                body = None if chunks is None else BodyProducer(RequestBody(chunks))
                ours = request_bytes(
                    method, b"/v1/messages?beta=true", headers, b"api.example", body, persistent
                )
                theirs = self.twisted_writes(method, body, persistent, b"api.example")
                self.assertEqual(ours, theirs, (method, chunks, persistent))
                self.assertFalse(headers.hasHeader(b"host"))

    def test_a_host_the_headers_carry_is_not_written_twice(self) -> None:
        sent = request_bytes(
            b"POST",
            b"/",
            Headers({b"host": [b"given.example"]}),
            None,
            BodyProducer(RequestBody([b"{}"])),
            True,
        )
        self.assertEqual(sent.lower().count(b"\r\nhost:"), 1)
        self.assertTrue(sent.endswith(b"\r\n\r\n{}"))

    def test_the_agent_writes_an_in_memory_body_with_its_head_in_one_write(self) -> None:
        endpoints = RecordingEndpoints()
        agent = UpstreamAgent(endpoints, UpstreamPool(Clock()))
        agent.request(
            b"POST",
            b"http://upstream.example/v1/messages",
            None,
            BodyProducer(RequestBody([b"{", b"}"])),
        )
        (transport,) = endpoints.endpoint.transports
        self.assertEqual(len(transport.writes), 1)
        self.assertTrue(transport.writes[0].endswith(b"\r\n\r\n{}"))

    def test_the_twisted_oracles_constructor_exists(self) -> None:
        # Only the tests use it (as the reference for the bytes written).
        request = ClientRequest._construct(
            b"POST", b"/", Headers({b"host": [b"h"]}), None, persistent=True, parsedURI=None
        )
        self.assertTrue(request.persistent)
