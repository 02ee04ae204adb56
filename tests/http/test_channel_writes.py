"""
The agent's answer goes out with its head and its body's first bytes in one
write, and those bytes are the ones twisted.web would have written in two.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers

from credproxy.testing import AgentTransport, FaceHarness, ScriptedResponse


class CountingTransport(AgentTransport):
    """Records each write call, as the socket would see it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def writeSequence(self, seq: Any) -> None:
        self.write(b"".join(seq))


def _twisteds_head(version: bytes, code: bytes, reason: bytes, headers: Headers) -> bytes:
    channel = HTTPChannel()
    transport = StringTransport()
    channel.transport = transport
    channel.writeHeaders(version, code, reason, headers)
    written: bytes = transport.value()
    return written


class HeldHeadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.face = FaceHarness()
        self.transport = CountingTransport(uid=None)
        self.channel = self.face.site.buildProtocol(self.transport.getPeer())
        self.channel.makeConnection(self.transport)

    def _post(self) -> Any:
        body = b'{"model":"claude-test","max_tokens":1,"messages":[]}'
        self.channel.dataReceived(
            b"POST /v1/messages HTTP/1.1\r\nhost: credproxy\r\nx-api-key: placeholder\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        return self.face.upstream.requests[-1]

    def test_a_whole_answer_is_one_write_with_twisteds_bytes(self) -> None:
        upstream = self._post()
        answer = b'{"type":"message"}'
        upstream.respond(200, answer)
        self.assertEqual(len(self.transport.writes), 1)
        written = self.transport.writes[0]
        head, _, body = written.partition(b"\r\n\r\n")
        self.assertEqual(body, answer)
        lines = head.split(b"\r\n")
        self.assertEqual(lines[0], b"HTTP/1.1 200 OK")
        headers = Headers()
        for line in lines[1:]:
            name, _, value = line.partition(b": ")
            headers.addRawHeader(name, value)
        self.assertEqual(head + b"\r\n\r\n", _twisteds_head(b"HTTP/1.1", b"200", b"OK", headers))

    def test_a_streamed_answer_sends_its_head_with_the_first_chunk(self) -> None:
        upstream = self._post()
        response = upstream.answer_with(
            ScriptedResponse(200, headers={b"content-type": [b"text/event-stream"]}, hold=True)
        )
        self.assertEqual(self.transport.writes, [])  # nothing until the body's first bytes
        response.send(b"event: ping\n\n")
        self.face.clock.advance(0)
        self.assertEqual(len(self.transport.writes), 1)
        self.assertIn(
            b"Transfer-Encoding: chunked\r\n\r\nd\r\nevent: ping\n\n\r\n", self.transport.writes[0]
        )
        response.send(b"data: 1\n\n")
        self.assertEqual(self.transport.writes[1], b"9\r\ndata: 1\n\n\r\n")

    def test_an_answer_without_a_body_sends_its_head(self) -> None:
        upstream = self._post()
        upstream.respond(200, b"")
        self.assertEqual(len(self.transport.writes), 1)
        self.assertTrue(self.transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertTrue(self.transport.writes[0].endswith(b"\r\n\r\n"))
        self.assertIn(b"Content-Length: 0\r\n", self.transport.writes[0])

    def test_an_error_answer_is_one_write(self) -> None:
        self.channel.dataReceived(
            b"POST /v1/messages HTTP/1.1\r\nhost: credproxy\r\nx-api-key: placeholder\r\n"
            b"content-length: 2\r\n\r\n{}"
        )
        upstream = self.face.upstream.requests[-1]
        upstream.answer.errback(ConnectionRefusedError())
        self.assertEqual(len(self.transport.writes), 1)
        self.assertIn(b"HTTP/1.1 502 Bad Gateway\r\n", self.transport.writes[0])
        self.assertTrue(self.transport.writes[0].endswith(b'"}}'))
