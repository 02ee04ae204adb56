"""
The request body limit on a StringTransport: refused from Content-Length
before any body is read (and without 100 Continue), refused while counting
a chunked body, and a body exactly at the limit forwarded whole.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IAgent
from zope.interface import implementer

from credproxy.broker.credentials import EnvironmentCredentialSource
from credproxy.http import HTTPProxyConfig, ProxySite
from credproxy.http._resource import ProxyResource

LIMIT = 1000


@implementer(IAgent)
class RecordingAgent:
    """
    Stands in for the network: records what would be sent, never answers.
    """

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def request(
        self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None
    ) -> Deferred[Any]:
        collected = StringTransport()
        bodyProducer.startProducing(collected)
        self.bodies.append(collected.value())
        return Deferred()


def _serve() -> tuple[StringTransport, RecordingAgent, Any]:
    clock = Clock()
    agent = RecordingAgent()
    config = HTTPProxyConfig(upstream="http://upstream.invalid", max_body=LIMIT)
    credentials = EnvironmentCredentialSource({"ANTHROPIC_API_KEY": "sk-ant-real"})
    site = ProxySite(ProxyResource(clock, config, credentials, agent), clock)
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
    transport = StringTransport()
    channel.makeConnection(transport)
    return transport, agent, channel


def _head(length: int | None, *extra: bytes) -> bytes:
    lines = [b"POST /v1/messages HTTP/1.1", b"host: x", b"x-api-key: p", *extra]
    if length is not None:
        lines.append(b"content-length: %d" % length)
    return b"\r\n".join(lines) + b"\r\n\r\n"


class BodyLimitTests(SynchronousTestCase):
    def test_content_length_over_the_limit_is_refused_before_the_body(self) -> None:
        transport, agent, channel = _serve()
        channel.dataReceived(_head(LIMIT + 1, b"expect: 100-continue"))
        answer = transport.value()
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer[:40])
        self.assertNotIn(b"100 Continue", answer)
        self.assertIn(b'"type":"request_too_large"', answer.replace(b" ", b""))
        self.assertEqual(agent.bodies, [])

    def test_chunked_body_over_the_limit_is_refused(self) -> None:
        transport, agent, channel = _serve()
        channel.dataReceived(_head(None, b"transfer-encoding: chunked"))
        chunk = b"x" * 600
        channel.dataReceived(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.assertEqual(transport.value(), b"")  # 600 bytes: still within the limit
        channel.dataReceived(b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunk), chunk))
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertEqual(agent.bodies, [])

    def test_body_exactly_at_the_limit_is_forwarded_whole(self) -> None:
        transport, agent, channel = _serve()
        body = b"{" + b"x" * (LIMIT - 2) + b"}"
        channel.dataReceived(_head(len(body)) + body)
        self.assertEqual(agent.bodies, [body])
        self.assertEqual(transport.value(), b"")  # waiting for the (never answering) upstream
