"""
Agents for tests: a raw HTTP/1.1 client over a Unix socket whose reading can
be paused (to play a slow or hung agent), and a response parser.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

PLACEHOLDER = "sk-ant-placeholder-not-a-key"


def messages_request(
    path: str = "/v1/messages",
    body: bytes | None = None,
    *,
    stream: bool = False,
    headers: dict[str, str | None] | None = None,
    method: str = "POST",
) -> bytes:
    if body is None:
        body = json.dumps(
            {
                "model": "claude-sonnet-4-5-20250929",
                "max_tokens": 64,
                "stream": stream,
                "messages": [{"role": "user", "content": "Hi"}],
            }
        ).encode()
    all_headers: dict[str, str | None] = {
        "host": "localhost",
        "content-type": "application/json",
        "x-api-key": PLACEHOLDER,
        "anthropic-version": "2023-06-01",
        "content-length": str(len(body)),
    }
    all_headers.update(headers or {})
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in all_headers.items() if v is not None
    )
    return head.encode() + b"\r\n" + body


@dataclass
class Parsed:
    status: int
    headers: dict[str, str]
    body: bytes
    complete: bool

    def json(self) -> Any:
        return json.loads(self.body)


def parse_response(data: bytes) -> Parsed:
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        parts: list[bytes] = []
        complete = False
        offset = 0
        while offset < len(rest):
            line_end = rest.find(b"\r\n", offset)
            if line_end < 0:
                break
            size = int(rest[offset:line_end], 16)
            if size == 0:
                complete = True
                break
            start = line_end + 2
            parts.append(rest[start : start + size])
            offset = start + size + 2
        return Parsed(status, headers, b"".join(parts), complete)
    length = int(headers.get("content-length", "0"))
    return Parsed(status, headers, rest[:length], len(rest) >= length)


class RawAgent(Protocol):
    """
    Sends bytes, collects bytes; C{pause()} stops reading from the socket.
    """

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed: Deferred[None] = Deferred()
        self.lost_reason: Failure | None = None
        self._waiters: list[tuple[int, Deferred[None]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        for item in list(self._waiters):
            if len(self.data) >= item[0]:
                self._waiters.remove(item)
                item[1].callback(None)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost_reason = reason
        for _, waiter in self._waiters:
            waiter.callback(None)
        self._waiters = []
        self.closed.callback(None)

    def received_at_least(self, count: int) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if len(self.data) >= count or self.closed.called:
            d.callback(None)
        else:
            self._waiters.append((count, d))
        return d

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def pause(self) -> None:
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def resume(self) -> None:
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def abort(self) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]

    def response(self) -> Parsed:
        return parse_response(bytes(self.data))


async def connect_agent(reactor: Any, path: str) -> RawAgent:
    agent: RawAgent = await connectProtocol(UNIXClientEndpoint(reactor, path), RawAgent())
    return agent


async def exchange(reactor: Any, path: str, request: bytes) -> Parsed:
    """
    Send one request on a fresh connection (asking the proxy to close it after)
    and parse the whole answer.
    """
    agent = await connect_agent(reactor, path)
    if b"\r\nconnection:" not in request.lower().split(b"\r\n\r\n")[0]:
        request = request.replace(b"\r\n", b"\r\nconnection: close\r\n", 1)
    agent.send(request)
    await agent.closed
    return agent.response()
