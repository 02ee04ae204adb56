"""
A fast stand-in for the Anthropic API, run as its own process by the
benchmarks so it does not share the proxy's core.

POST /v1/messages answers JSON, or an SSE stream when the body asks for
C{"stream": true}. The query string shapes the stream:
  bytes=N      stream about N bytes of content_block_delta events, as fast as the reader takes them
  events=N     N delta events ...
  interval=S   ... S seconds apart
  forever=1    never end (the reader hangs up)
GET /_hangups lists the monotonic times at which agents' requests were lost
(clock shared by all processes on Linux), for measuring hang-up propagation.

GET /_seen answers what the agents' requests carried: a count per credential
seen (C{"x-api-key <value>"} or C{"bearer <value>"}), how many Bearer
requests also had the C{oauth-2025-04-20} beta flag, and how many were
refused. POST /_reject with a JSON object whose C{bearer} member is a token
makes every later request with that Bearer token get a 401
C{authentication_error}, as the API answers a token it has expired (the
benchmarks' fake credentials only; this process never sees a real one).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

from twisted.internet import reactor
from twisted.internet.interfaces import IPushProducer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

MESSAGE = json.dumps(
    {
        "id": "msg_bench",
        "type": "message",
        "role": "assistant",
        "model": "claude-bench",
        "content": [{"type": "text", "text": "ok"}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 5, "output_tokens": 1},
    }
).encode()
START = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_bench",'
    b'"type":"message","role":"assistant","model":"claude-bench","content":[],'
    b'"usage":{"input_tokens":5,"output_tokens":1}}}\n\n'
)
DELTA = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"' + b"x" * 400 + b'"}}\n\n'
)
END = (
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
    b'"usage":{"output_tokens":7}}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n'
)
CHUNK = DELTA * 160  # ~66 KB per write
HANGUPS: list[float] = []
SEEN: Counter[str] = Counter()  # "x-api-key <value>" / "bearer <value>" -> requests
OAUTH_BETA = b"oauth-2025-04-20"
REJECTED: set[bytes] = set()  # Bearer tokens answered with a 401
STATS = {"oauth_beta": 0, "refused": 0}
REFUSAL = json.dumps(
    {
        "type": "error",
        "error": {"type": "authentication_error", "message": "OAuth token has expired"},
    }
).encode()


@implementer(IPushProducer)
class BulkStream:
    """
    Writes CHUNKs while the transport wants them (honours backpressure).
    """

    def __init__(self, request: Request, total: int | None) -> None:
        self.request = request
        self.remaining = total
        self.paused = False
        self.done = False

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and not self.done:
            if self.remaining is not None and self.remaining <= 0:
                self.done = True
                self.request.unregisterProducer()
                self.request.write(END)
                self.request.finish()
                return
            self.request.write(CHUNK)
            if self.remaining is not None:
                self.remaining -= len(CHUNK)

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.done = True


class Messages(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        if request.path == b"/_seen":
            return json.dumps({"credentials": dict(SEEN), **STATS}).encode()
        return json.dumps(HANGUPS).encode()

    def render_POST(self, request: Request) -> Any:
        body = request.content.read() if request.content else b""
        if request.path == b"/_reject":
            REJECTED.add(json.loads(body)["bearer"].encode())
            return b"{}"
        if self.refused(request):
            request.setResponseCode(401)
            request.setHeader(b"content-type", b"application/json")
            return REFUSAL
        if b'"stream": true' not in body and b'"stream":true' not in body:
            request.setHeader(b"content-type", b"application/json")
            return MESSAGE
        args = {k.decode(): v[0].decode() for k, v in request.args.items()}
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(START)
        finished = request.notifyFinish()
        finished.addErrback(lambda _: HANGUPS.append(time.monotonic()))
        if "bytes" in args or "forever" in args:
            total = None if "forever" in args else int(args["bytes"])
            producer = BulkStream(request, total)
            request.registerProducer(producer, True)
            finished.addBoth(lambda _: producer.stopProducing())
            producer.resumeProducing()
            return NOT_DONE_YET
        events = int(args.get("events", "3"))
        interval = float(args.get("interval", "0"))
        if interval == 0:
            request.write(DELTA * events + END)
            request.finish()
            return NOT_DONE_YET
        state = {"left": events, "gone": False}
        finished.addBoth(lambda _: state.__setitem__("gone", True))

        def tick() -> None:
            if state["gone"]:
                return
            if state["left"] == 0:
                request.write(END)
                request.finish()
                return
            state["left"] -= 1
            request.write(DELTA)
            reactor.callLater(interval, tick)

        reactor.callLater(interval, tick)
        return NOT_DONE_YET

    @staticmethod
    def refused(request: Request) -> bool:
        """
        Count the request's credential; whether it is a rejected Bearer token.
        """
        key = request.getHeader(b"x-api-key")
        if key is not None:
            SEEN["x-api-key " + key.decode("latin-1")] += 1
            return False
        authorization = request.getHeader(b"authorization") or b""
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"bearer":
            SEEN["other"] += 1
            return False
        SEEN["bearer " + token.decode("latin-1")] += 1
        flags = (request.getHeader(b"anthropic-beta") or b"").split(b",")
        if OAUTH_BETA in (flag.strip() for flag in flags):
            STATS["oauth_beta"] += 1
        if token in REJECTED:
            STATS["refused"] += 1
            return True
        return False


def main() -> None:
    site = Site(Messages())
    site.displayTracebacks = False
    site.log = lambda request: None  # type: ignore[method-assign]
    port = reactor.listenTCP(0, site, backlog=2048, interface="127.0.0.1")  # type: ignore[arg-type]
    print(port.getHost().port, flush=True)  # type: ignore[attr-defined]
    reactor.run()


if __name__ == "__main__":
    main()
