"""
A real stand-in for the Anthropic API for tests: a twisted.web server on
127.0.0.1 that records what it received and answers with the API's real
shapes (a JSON message, or the SSE event sequence of a stream).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

MODEL = "claude-sonnet-4-5-20250929"


@dataclass
class Received:
    method: bytes
    uri: bytes
    headers: dict[str, list[str]]
    body: bytes
    request: Request

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


def message_json(text: str = "ok", input_tokens: int = 11, output_tokens: int = 7) -> bytes:
    return json.dumps(
        {
            "id": "msg_01",
            "type": "message",
            "role": "assistant",
            "model": MODEL,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
        }
    ).encode()


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def stream_events(texts: list[str], input_tokens: int = 25, output_tokens: int = 15) -> list[bytes]:
    """
    The event sequence of a streamed text answer, as the API sends it.
    """
    events = [
        sse(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_01",
                    "type": "message",
                    "role": "assistant",
                    "model": MODEL,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": input_tokens, "output_tokens": 1},
                },
            },
        ),
        sse(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        sse("ping", {"type": "ping"}),
    ]
    for text in texts:
        events.append(
            sse(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": text},
                },
            )
        )
    events += [
        sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": output_tokens},
            },
        ),
        sse("message_stop", {"type": "message_stop"}),
    ]
    return events


Handler = Callable[[Request, Received], bytes | int]


def answer_json(request: Request, received: Received) -> bytes:
    if b'"stream": true' in received.body or b'"stream":true' in received.body:
        return answer_stream(request, received)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"request-id", b"req_test")
    return message_json()


def answer_stream(request: Request, received: Received) -> bytes:
    request.setHeader(b"content-type", b"text/event-stream")
    for event in stream_events(["Hello", ", world"]):
        request.write(event)
    request.finish()
    return NOT_DONE_YET  # type: ignore[return-value]


class _Recorder(Resource):
    isLeaf = True

    def __init__(self, upstream: Upstream) -> None:
        super().__init__()
        self.upstream = upstream

    def render(self, request: Request) -> bytes | int:
        assert request.content is not None
        received = Received(
            request.method,
            request.uri,
            {
                k.decode().lower(): [v.decode() for v in vs]
                for k, vs in request.requestHeaders.getAllRawHeaders()
            },
            request.content.read(),
            request,
        )
        self.upstream.received.append(received)
        finished = request.notifyFinish()
        finished.addErrback(lambda _: self.upstream.lost.append(received))
        for waiter in self.upstream._waiters:
            if not waiter.called:
                waiter.callback(received)
        self.upstream._waiters = []
        return self.upstream.handler(request, received)


@dataclass
class Upstream:
    """
    The fake API; C{handler} decides each answer, C{received} and C{lost} record.
    """

    handler: Handler = answer_json
    received: list[Received] = field(default_factory=list)
    lost: list[Received] = field(default_factory=list)
    port: IListeningPort | None = None
    _waiters: list[Deferred[Received]] = field(default_factory=list)

    def site(self) -> Site:
        site = Site(_Recorder(self))
        site.displayTracebacks = False
        return site

    @property
    def url(self) -> str:
        assert self.port is not None
        address = self.port.getHost()
        assert isinstance(address, IPv4Address)
        return f"http://127.0.0.1:{address.port}"

    def next_request(self) -> Deferred[Received]:
        d: Deferred[Received] = Deferred()
        self._waiters.append(d)
        return d
