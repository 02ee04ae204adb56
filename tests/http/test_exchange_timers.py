"""
The first-byte deadline of an exchange, driven by a Clock: the agent gets a
504 in the API's shape and the upstream request is cancelled.
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


@implementer(IAgent)
class SilentUpstream:
    """
    Accepts every request and never answers; records cancellations.
    """

    def __init__(self) -> None:
        self.cancelled = 0

    def request(
        self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None
    ) -> Deferred[Any]:
        def cancel(_: Deferred[Any]) -> None:
            self.cancelled += 1

        return Deferred(cancel)


class FirstByteTimerTests(SynchronousTestCase):
    def test_silence_until_the_deadline_is_a_504_and_a_cancel(self) -> None:
        clock = Clock()
        upstream = SilentUpstream()
        config = HTTPProxyConfig(upstream="http://upstream.invalid", first_byte_timeout=30.0)
        credentials = EnvironmentCredentialSource({"ANTHROPIC_API_KEY": "sk-ant-real"})
        site = ProxySite(ProxyResource(clock, config, credentials, upstream), clock)
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
        transport = StringTransport()
        channel.makeConnection(transport)
        body = b'{"model":"m","max_tokens":1,"messages":[]}'
        channel.dataReceived(
            b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: p\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        clock.advance(29.9)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(upstream.cancelled, 0)
        clock.advance(0.1)
        answer = transport.value()
        self.assertTrue(answer.startswith(b"HTTP/1.1 504 "), answer[:40])
        self.assertIn(
            b'"type":"api_error","message":"The upstream API sent no response within 30 s."', answer
        )
        self.assertNotIn(b"sk-ant-real", answer)
        self.assertEqual(upstream.cancelled, 1)
