"""
The HTTP face in memory, for synchronous tests: the real site, channel,
resource and exchange, on a L{StringTransport} per agent connection, a
L{Clock}, and a scripted upstream whose answers the test hands out. Nothing
touches a socket or waits on real time, so every deadline and limit of the
face can be driven by C{clock.advance}.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IHalfCloseableDescriptor
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from credproxy.broker.credentials import EnvironmentCredentialSource, ICredentialSource
from credproxy.http import HTTPProxyConfig, ProxySite
from credproxy.http._resource import ProxyResource

# What the harness's default credential source forwards: an obviously fake key.
HARNESS_API_KEY = "harness-fake-api-key"
_PEERCRED = struct.Struct("3i")


@implementer(IHalfCloseableDescriptor)
class AgentTransport(StringTransport):
    """
    An agent's connection: records what the face wrote, and whether it
    half-closed (C{write_closed}), closed (C{disconnecting}) or aborted
    (C{aborted}) it. With C{uid} it is a Unix socket whose peer the kernel
    reports as that uid, as C{SO_PEERCRED} would.
    """

    def __init__(self, *, uid: int | None = None, host: str = "127.0.0.1") -> None:
        peer: Any = UNIXAddress(None) if uid is not None else IPv4Address("TCP", host, 40000)
        super().__init__(peerAddress=peer)
        self.uid = uid
        self.write_closed = False
        self.aborted = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def readConnectionLost(self, reason: Failure) -> None:
        """The reactor's notice that the peer half-closed: nothing to do here."""

    def writeConnectionLost(self, reason: Failure) -> None:
        """The reactor's notice that our half-close is done: nothing to do here."""

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnecting = True

    def getHandle(self) -> Any:
        return _PeerHandle(self.uid) if self.uid is not None else None


@dataclass
class _PeerHandle:
    uid: int

    @property
    def family(self) -> int:
        return socket.AF_UNIX

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        return _PEERCRED.pack(4242, self.uid, self.uid)


@dataclass
class RawResponse:
    """
    One HTTP response as the agent received it.
    """

    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


def parse_responses(data: bytes) -> list[RawResponse]:
    """
    The complete responses in C{data}, in order (interim 1xx ones included);
    a trailing incomplete one is left out.
    """
    responses: list[RawResponse] = []
    while data:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            break
        status_line, *lines = data[:end].split(b"\r\n")
        _, status, reason = [*status_line.split(b" ", 2), b""][:3]
        headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(b":") for line in lines)]
        rest = data[end + 4 :]
        found = {k.lower(): v for k, v in headers}
        code = int(status)
        if 100 <= code < 200 or code in (204, 304):
            body = b""
        elif b"content-length" in found:
            size = int(found[b"content-length"])
            if len(rest) < size:
                break
            body, rest = rest[:size], rest[size:]
        elif found.get(b"transfer-encoding", b"").lower() == b"chunked":
            decoded = _dechunk(rest)
            if decoded is None:
                break
            body, rest = decoded
        else:
            body, rest = rest, b""
        responses.append(RawResponse(code, reason, headers, body))
        data = rest
    return responses


def _dechunk(data: bytes) -> tuple[bytes, bytes] | None:
    body: list[bytes] = []
    while True:
        line_end = data.find(b"\r\n")
        if line_end < 0:
            return None
        size = int(data[:line_end].split(b";")[0], 16)
        data = data[line_end + 2 :]
        if size == 0:
            trailer_end = data.find(b"\r\n")
            if trailer_end < 0:
                return None
            return b"".join(body), data[trailer_end + 2 :]
        if len(data) < size + 2:
            return None
        body.append(data[:size])
        data = data[size + 2 :]


@implementer(IResponse)
class ScriptedResponse:
    """
    An upstream answer. Unless held, its body is delivered at once; a held
    one is fed by L{send} and ended by L{end} or L{fail}. C{closed} says
    whether the face closed the upstream connection.
    """

    version = (b"HTTP", 1, 1)
    request = None
    previousResponse = None

    def __init__(
        self,
        code: int,
        body: bytes = b"",
        headers: Mapping[bytes, Sequence[bytes]] | None = None,
        *,
        phrase: bytes = b"OK",
        hold: bool = False,
    ) -> None:
        self.code = code
        self.phrase = phrase
        self.headers = Headers(
            headers if headers is not None else {b"content-type": [b"application/json"]}
        )
        self.length: int | object = UNKNOWN_LENGTH if hold else len(body)
        self._body = body
        self._hold = hold
        self.transport = StringTransport()
        self.protocol: Protocol | None = None

    def deliverBody(self, protocol: Protocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)
        if not self._hold and not self.closed:
            self.send(self._body)
            self.end()

    def send(self, data: bytes) -> None:
        assert self.protocol is not None
        self.protocol.dataReceived(data)

    def end(self) -> None:
        assert self.protocol is not None
        self.protocol.connectionLost(Failure(ResponseDone()))

    def fail(self, reason: BaseException) -> None:
        assert self.protocol is not None
        self.protocol.connectionLost(Failure(reason))

    def break_off(self, *reasons: BaseException) -> None:
        """
        End the body as Twisted's client does when it breaks: a
        C{ResponseFailed} carrying C{reasons} (e.g. the malformed framing).
        """
        self.fail(ResponseFailed([Failure(reason) for reason in reasons]))

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    @property
    def closed(self) -> bool:
        return bool(self.transport.producerState == "stopped")


@dataclass
class UpstreamRequest:
    """
    One request the face sent upstream, and the Deferred that answers it.
    """

    method: bytes
    uri: bytes
    headers: Headers
    body: bytes
    answer: Deferred[IResponse]
    cancelled: bool = False

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def respond(
        self,
        code: int = 200,
        body: bytes = b"{}",
        headers: Mapping[bytes, Sequence[bytes]] | None = None,
        **options: Any,
    ) -> ScriptedResponse:
        return self.answer_with(ScriptedResponse(code, body, headers, **options))

    def answer_with(self, response: ScriptedResponse) -> ScriptedResponse:
        self.answer.callback(response)
        return response


class _Collect:
    """
    What a body producer writes, collected.
    """

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.chunks.append(data)


@implementer(IAgent)
class ScriptedUpstream:
    """
    The upstream hop: records each request (C{requests}); the test answers.
    """

    request_type: type[UpstreamRequest] = UpstreamRequest

    def __init__(self) -> None:
        self.requests: list[UpstreamRequest] = []

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        collected = _Collect()
        if bodyProducer is not None:
            consumer: IConsumer = collected  # type: ignore[assignment]
            bodyProducer.startProducing(consumer)

        def cancel(_: Deferred[IResponse]) -> None:
            sent.cancelled = True

        sent = self.request_type(
            method, uri, headers or Headers(), b"".join(collected.chunks), Deferred(cancel)
        )
        self.requests.append(sent)
        return sent.answer


@dataclass
class AgentConnection:
    """
    One agent's connection to the face.
    """

    transport: AgentTransport
    channel: Any

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def post(
        self,
        body: bytes = b'{"model":"claude-test","max_tokens":1,"messages":[]}',
        *,
        path: bytes = b"/v1/messages",
        key: bytes | None = b"placeholder",
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        """
        Send one complete request with a Content-Length body.
        """
        lines = [b"POST " + path + b" HTTP/1.1", b"host: credproxy"]
        if key is not None:
            lines.append(b"x-api-key: " + key)
        lines.extend(name + b": " + value for name, value in headers)
        lines.append(b"content-length: %d" % (len(body),))
        self.send(b"\r\n".join(lines) + b"\r\n\r\n" + body)

    @property
    def received(self) -> bytes:
        return bytes(self.transport.value())

    def responses(self) -> list[RawResponse]:
        return parse_responses(self.transport.value())

    @property
    def closing(self) -> bool:
        """
        Whether the face has ended this connection (half-closed, closed or aborted).
        """
        transport = self.transport
        return transport.write_closed or transport.disconnecting or transport.aborted

    def hang_up(self) -> None:
        self.channel.connectionLost(Failure(ConnectionError("the agent hung up")))


@dataclass
class FaceHarness:
    """
    An HTTP face in memory. C{config} overrides L{HTTPProxyConfig} fields;
    C{credentials} defaults to an API key from a fake environment.
    """

    config: Mapping[str, Any] = field(default_factory=dict)
    credentials: ICredentialSource | None = None
    clock: Clock = field(default_factory=Clock)
    upstream: ScriptedUpstream = field(default_factory=ScriptedUpstream)

    def __post_init__(self) -> None:
        settings = dict(self.config)
        settings.setdefault("upstream", "http://upstream.invalid")
        self.settings = HTTPProxyConfig(**settings)
        if self.credentials is None:
            self.credentials = EnvironmentCredentialSource({"ANTHROPIC_API_KEY": HARNESS_API_KEY})
        self.resource = ProxyResource(self.clock, self.settings, self.credentials, self.upstream)
        self.site = ProxySite(self.resource, self.clock)

    def connect(self, *, uid: int | None = None, host: str = "127.0.0.1") -> AgentConnection:
        """
        A new agent connection: over TCP from C{host}, or over a Unix socket
        from a process of C{uid}.
        """
        transport = AgentTransport(uid=uid, host=host)
        channel = self.site.buildProtocol(transport.getPeer())
        channel.makeConnection(transport)
        return AgentConnection(transport, channel)
