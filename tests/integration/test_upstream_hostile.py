"""
A hostile upstream on real sockets: a raw TCP server on 127.0.0.1 that
writes scripted bytes, behind a real HTTP face on a Unix socket with its
default (screened) upstream client. Named cases (a 100 MiB head, too many
headers, a bare CR, a NUL, Connection-named headers, broken chunked framing
before and after bytes reached the agent, a persistent connection, TLS),
then a hypothesis-driven fuzzer of status lines, heads and chunked framing:
the proxy never crashes, every agent request gets one well-formed answer or
a cut-off, no traceback or critical line is logged, and no byte of a
refused head reaches the agent.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anthropic
import httpx2 as httpx
import pytest
import pytest_twisted
from hypothesis import event
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort, IPushProducer
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.threads import deferToThread
from twisted.logger import LogEvent, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from credproxy.http._errors import reason_phrase
from credproxy.http._exchange import MALFORMED_ANSWER
from credproxy.http._upstream_client import UpstreamPool
from credproxy.http._upstream_head import (
    MAX_HEAD_BYTES,
    MAX_HEADER_LINES,
    MalformedResponseHead,
    ResponseHeadScreen,
    connection_options,
)
from tests.integration.agents import PLACEHOLDER, RawAgent, connect_agent, messages_request
from tests.integration.conftest import MakeProxy, RunningProxy
from tests.logcapture import captured_log, log_text

MiB = 1024 * 1024
MESSAGE = b'{"type":"message","model":"m","usage":{"input_tokens":1,"output_tokens":2}}'
# Examples per fuzz run: bounded for the suite; raise it for a long hunt
# (CREDPROXY_UPSTREAM_FUZZ_EXAMPLES=2000).
FUZZ_EXAMPLES = int(os.environ.get("CREDPROXY_UPSTREAM_FUZZ_EXAMPLES", "60"))
# How long one agent request may take before the test calls it hung; the
# proxy's own timeouts in these tests are shorter.
ANSWER_WAIT = 10.0

pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")


# -- the raw upstream ---------------------------------------------------------------------

Script = Callable[["RawConnection"], None]


class RawConnection(Protocol):
    """
    One connection to the raw upstream: each complete request it reads
    (head and Content-Length body) runs the upstream's script, which writes
    whatever bytes it likes.
    """

    def __init__(self, upstream: RawUpstream) -> None:
        self.upstream = upstream
        self.buffer = b""
        self.written = 0
        self.requests = 0
        self.lost: Deferred[None] = Deferred()
        self.lost_reason: Failure | None = None

    def connectionMade(self) -> None:
        self.upstream.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            found = re.search(rb"(?im)^content-length:\s*(\d+)", self.buffer[:end])
            total = end + 4 + (int(found.group(1)) if found else 0)
            if len(self.buffer) < total:
                return
            self.buffer = self.buffer[total:]
            self.requests += 1
            self.upstream.script(self)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.lost.called:
            self.written += len(data)
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost_reason = reason
        self.lost.callback(None)


def answer(*pieces: bytes, close: bool = False) -> Script:
    def script(connection: RawConnection) -> None:
        for piece in pieces:
            connection.write(piece)
        if close:
            connection.close()

    return script


@dataclass
class RawUpstream:
    script: Script = field(default_factory=lambda: answer(json_answer()))
    connections: list[RawConnection] = field(default_factory=list)
    port: IListeningPort | None = None

    @property
    def url(self) -> str:
        assert self.port is not None
        address = self.port.getHost()
        assert isinstance(address, IPv4Address)
        return f"http://127.0.0.1:{address.port}"

    def factory(self) -> ServerFactory:
        return _RawFactory(self)


class _RawFactory(ServerFactory):
    def __init__(self, upstream: RawUpstream) -> None:
        self.upstream = upstream

    def buildProtocol(self, addr: Any) -> RawConnection:
        return RawConnection(self.upstream)


def json_answer(head_lines: bytes = b"", body: bytes = MESSAGE, status: bytes = b"200 OK") -> bytes:
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\nContent-Type: application/json\r\nRequest-Id: req_raw\r\n"
        + head_lines
        + b"Content-Length: %d\r\n\r\n" % (len(body),)
        + body
    )


def chunked_head(head_lines: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nRequest-Id: req_raw\r\n"
        + head_lines
        + b"Transfer-Encoding: chunked\r\n\r\n"
    )


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@pytest_twisted.async_yield_fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    upstream = RawUpstream()
    upstream.port = reactor.listenTCP(0, upstream.factory(), interface="127.0.0.1")
    try:
        yield upstream
    finally:
        for connection in upstream.connections:
            if connection.transport is not None and not connection.lost.called:
                connection.transport.abortConnection()  # type: ignore[attr-defined]
        await maybeDeferred(upstream.port.stopListening)


@pytest.fixture
def log_events() -> Iterator[list[LogEvent]]:
    with captured_log() as events:
        yield events


def assert_quiet_log(events: list[LogEvent]) -> None:
    """
    No traceback, no error or critical line, and no secret in any event.
    """
    loud = [
        log_text([e])
        for e in events
        if "log_failure" in e or e.get("log_level") in (LogLevel.error, LogLevel.critical)
    ]
    assert loud == []
    text = log_text(events)
    assert PLACEHOLDER not in text
    assert "sk-ant-api03-REAL" not in text


async def start(make_proxy: MakeProxy, upstream: RawUpstream, **config: Any) -> RunningProxy:
    config.setdefault("first_byte_timeout", 5.0)
    config.setdefault("stream_idle_timeout", 5.0)
    return await make_proxy(upstream=upstream.url, **config)


async def ask(proxy: RunningProxy, *, stream: bool = False) -> RawAgent:
    """
    One request on a fresh agent connection, waited for until the proxy
    closes it.
    """
    agent = await connect_agent(reactor, proxy.path)
    agent.send(messages_request(stream=stream, headers={"connection": "close"}))
    await agent.closed.addTimeout(ANSWER_WAIT, reactor)
    return agent


# -- the agent's side, parsed strictly ------------------------------------------------------

_AGENT_STATUS_LINE = re.compile(rb"HTTP/1\.1 [1-5][0-9][0-9] [\x20-\x7e]+")
_AGENT_FIELD_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*")


@dataclass
class Answer:
    """
    What an agent got, parsed strictly: C{complete} is false for an answer
    cut off (the connection closed before its end).
    """

    status: int
    headers: dict[bytes, bytes]
    body: bytes
    complete: bool

    def json(self) -> Any:
        return json.loads(self.body)


def strict_answer(data: bytes) -> Answer:
    """
    Parse one HTTP/1.1 answer as an agent's strict client would, failing the
    test on anything malformed (checked here independently of the proxy's
    own screen): CRLF line ends only, a status line with the standard
    reason phrase, token names and values free of control bytes; a body
    framed by Content-Length or chunked; nothing after a complete answer.
    """
    end = data.find(b"\r\n\r\n")
    assert end >= 0, f"no complete head in {data[:200]!r}"
    head = data[:end]
    crlf = head.count(b"\r\n")
    assert head.count(b"\r") == crlf == head.count(b"\n"), "a bare CR or LF in the head"
    status_line, *lines = head.split(b"\r\n")
    assert _AGENT_STATUS_LINE.fullmatch(status_line), status_line
    for line in lines:
        assert _AGENT_FIELD_LINE.fullmatch(line), line
    version, code, phrase = status_line.split(b" ", 2)
    assert version == b"HTTP/1.1"
    status = int(code)
    assert phrase == reason_phrase(status), status_line
    headers: dict[bytes, bytes] = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers.setdefault(name.lower(), value.strip())
    rest = data[end + 4 :]
    if status in (204, 304):
        assert rest == b"", "bytes after a complete answer"
        return Answer(status, headers, b"", True)
    if b"content-length" in headers:
        assert b"transfer-encoding" not in headers
        length = int(headers[b"content-length"])
        assert len(rest) <= length, "bytes after a complete answer"
        return Answer(status, headers, rest, len(rest) == length)
    assert headers.get(b"transfer-encoding") == b"chunked", headers
    body: list[bytes] = []
    while True:
        line_end = rest.find(b"\r\n")
        if line_end < 0:
            return Answer(status, headers, b"".join(body), False)
        size = int(rest[:line_end], 16)
        rest = rest[line_end + 2 :]
        if size == 0:
            if rest == b"":
                return Answer(status, headers, b"".join(body), False)
            assert rest == b"\r\n", "bytes after a complete answer"
            return Answer(status, headers, b"".join(body), True)
        if len(rest) < size + 2:
            body.append(rest[:size])
            return Answer(status, headers, b"".join(body), False)
        assert rest[size : size + 2] == b"\r\n"
        body.append(rest[:size])
        rest = rest[size + 2 :]


def assert_malformed_502(agent: RawAgent) -> Answer:
    got = strict_answer(bytes(agent.data))
    assert got.complete
    assert got.status == 502
    assert got.json() == {
        "type": "error",
        "error": {"type": "api_error", "message": MALFORMED_ANSWER},
    }
    assert b"request-id" not in got.headers  # nothing of the upstream's answer
    return got


# -- named cases ---------------------------------------------------------------------------


@implementer(IPushProducer)
class HeaderFlood:
    """
    Writes a 100 MiB header block, 64 KiB at a time, as fast as the
    connection takes it.
    """

    BLOCK = b"".join(b"X-Pad-%04d: %s\r\n" % (i, b"a" * 1000) for i in range(64))
    TOTAL = 100 * MiB

    def __init__(self, connection: RawConnection) -> None:
        self.connection = connection
        self.sent = 0
        self.paused = False
        self.stopped = False

    def start(self) -> None:
        assert self.connection.transport is not None
        self.connection.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self.connection.write(b"HTTP/1.1 200 OK\r\n")
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and not self.stopped and self.sent < self.TOTAL:
            self.sent += len(self.BLOCK)
            self.connection.write(self.BLOCK)
        if self.sent >= self.TOTAL and not self.stopped:
            self.stopped = True
            self.connection.write(b"\r\n")

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.stopped = True


@pytest_twisted.ensureDeferred
async def test_a_100_mib_head_is_refused_and_the_upstream_cut_off(
    raw_upstream: RawUpstream, make_proxy: MakeProxy, log_events: list[LogEvent]
) -> None:
    floods: list[HeaderFlood] = []

    def flood(connection: RawConnection) -> None:
        floods.append(HeaderFlood(connection))
        floods[-1].start()

    raw_upstream.script = flood
    proxy = await start(make_proxy, raw_upstream)
    agent = await ask(proxy)
    assert_malformed_502(agent)
    (connection,) = raw_upstream.connections
    await connection.lost.addTimeout(ANSWER_WAIT, reactor)
    # Cut off after the screen's limit: what left the upstream is what the
    # kernel buffers on loopback took before the abort, a fraction of it.
    assert MAX_HEAD_BYTES < connection.written < 24 * MiB
    assert floods[0].sent < HeaderFlood.TOTAL
    assert_quiet_log(log_events)
    assert "malformed response: TOO_LARGE" in log_text(log_events)


@pytest_twisted.ensureDeferred
async def test_header_count_at_and_over_the_limit(
    raw_upstream: RawUpstream, make_proxy: MakeProxy, log_events: list[LogEvent]
) -> None:
    proxy = await start(make_proxy, raw_upstream)
    fixed = 3  # Content-Type, Request-Id, Content-Length
    lines = b"".join(b"X-H%03d: v\r\n" % (i,) for i in range(MAX_HEADER_LINES - fixed))
    raw_upstream.script = answer(json_answer(lines))
    got = strict_answer(bytes((await ask(proxy)).data))
    assert (got.status, got.body, got.headers[b"x-h096"]) == (200, MESSAGE, b"v")
    raw_upstream.script = answer(json_answer(lines + b"X-One-Too-Many: v\r\n"))
    assert_malformed_502(await ask(proxy))
    assert_quiet_log(log_events)


@pytest_twisted.ensureDeferred
async def test_a_bare_cr_in_the_reason_and_a_nul_in_a_value_are_refused(
    raw_upstream: RawUpstream, make_proxy: MakeProxy, log_events: list[LogEvent]
) -> None:
    proxy = await start(make_proxy, raw_upstream)
    for bad in (
        json_answer(status=b"200 O\rK"),
        json_answer(b"X-Evil: a\x00b\r\n"),
        json_answer(b"X-Evil: a\nX-Injected: 1\r\n"),
        json_answer(b"X-Folded: a\r\n folded\r\n"),
    ):
        raw_upstream.script = answer(bad)
        got = assert_malformed_502(await ask(proxy))
        assert b"x-evil" not in got.headers and b"x-injected" not in got.headers
    warnings = [log_text([e]) for e in log_events if e.get("log_level") == LogLevel.warn]
    assert any("BARE_CR_OR_LF" in w for w in warnings)
    assert any("CONTROL_CHARACTER" in w for w in warnings)
    assert any("OBS_FOLD" in w for w in warnings)
    assert_quiet_log(log_events)


@pytest_twisted.ensureDeferred
async def test_connection_named_headers_and_the_upstreams_phrase_never_reach_the_agent(
    raw_upstream: RawUpstream, make_proxy: MakeProxy, log_events: list[LogEvent]
) -> None:
    raw_upstream.script = answer(
        json_answer(
            b"Connection: keep-alive, X-Secret-Hop\r\nX-Secret-Hop: 1\r\nKeep-Alive: timeout=5\r\n"
            b"X-Kept: 2\r\n",
            status=b"200 Everything Is Fine Trust Me",
        )
    )
    proxy = await start(make_proxy, raw_upstream)
    agent = await ask(proxy)
    got = strict_answer(bytes(agent.data))
    assert (got.status, got.body) == (200, MESSAGE)
    assert bytes(agent.data).startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"x-secret-hop" not in got.headers
    assert b"keep-alive" not in got.headers
    assert got.headers[b"x-kept"] == b"2"
    assert got.headers[b"request-id"] == b"req_raw"
    assert_quiet_log(log_events)


@pytest_twisted.ensureDeferred
async def test_a_redirect_is_relayed_never_followed(
    raw_upstream: RawUpstream, make_proxy: MakeProxy, log_events: list[LogEvent]
) -> None:
    elsewhere = raw_upstream.url + "/elsewhere"
    raw_upstream.script = answer(
        json_answer(b"Location: " + elsewhere.encode() + b"\r\n", status=b"307 Go There")
    )
    proxy = await start(make_proxy, raw_upstream)
    got = strict_answer(bytes((await ask(proxy)).data))
    assert (got.status, got.headers[b"location"]) == (307, elsewhere.encode())
    assert [c.requests for c in raw_upstream.connections] == [1]
    assert_quiet_log(log_events)


@pytest_twisted.ensureDeferred
async def test_interim_answers_pass_and_a_protocol_switch_is_refused(
    raw_upstream: RawUpstream, make_proxy: MakeProxy, log_events: list[LogEvent]
) -> None:
    proxy = await start(make_proxy, raw_upstream)
    raw_upstream.script = answer(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n",
        json_answer(),
    )
    got = strict_answer(bytes((await ask(proxy)).data))
    assert (got.status, got.body) == (200, MESSAGE)
    raw_upstream.script = answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n")
    assert_malformed_502(await ask(proxy))
    assert_quiet_log(log_events)


@pytest_twisted.ensureDeferred
async def test_a_malformed_first_chunk_is_a_502(
    raw_upstream: RawUpstream, make_proxy: MakeProxy, log_events: list[LogEvent]
) -> None:
    raw_upstream.script = answer(chunked_head(), b"zz\r\nnot a chunk\r\n")
    proxy = await start(make_proxy, raw_upstream)
    assert_malformed_502(await ask(proxy, stream=True))
    assert any("BAD_CHUNKED_FRAMING" in log_text([e]) for e in log_events)
    assert_quiet_log(log_events)


@pytest_twisted.ensureDeferred
async def test_a_good_then_a_malformed_chunk_in_one_write_is_a_502_not_nothing(
    raw_upstream: RawUpstream, make_proxy: MakeProxy, log_events: list[LogEvent]
) -> None:
    # Both arrive in one read, so in one reactor turn: the good chunk is
    # still held when the framing breaks, and the agent gets an answer
    # instead of a connection dropped with its bytes unsent.
    raw_upstream.script = answer(
        chunked_head() + chunk(b"event: ping\ndata: {}\n\n") + b"5\r\nhello!!\r\n"
    )
    proxy = await start(make_proxy, raw_upstream)
    agent = await ask(proxy, stream=True)
    assert_malformed_502(agent)
    assert b"ping" not in bytes(agent.data)
    assert_quiet_log(log_events)


@pytest_twisted.ensureDeferred
async def test_a_malformed_chunk_after_bytes_reached_the_agent_is_a_cut_off(
    raw_upstream: RawUpstream, make_proxy: MakeProxy, log_events: list[LogEvent]
) -> None:
    good = b'event: ping\ndata: {"type":"ping"}\n\n'
    raw_upstream.script = answer(chunked_head() + chunk(good))
    proxy = await start(make_proxy, raw_upstream)
    agent = await connect_agent(reactor, proxy.path)
    agent.send(messages_request(stream=True, headers={"connection": "close"}))
    while good not in bytes(agent.data):
        await agent.received_at_least(len(agent.data) + 1).addTimeout(ANSWER_WAIT, reactor)
    raw_upstream.connections[0].write(b"5\r\nhello!!\r\n")
    await agent.closed.addTimeout(ANSWER_WAIT, reactor)
    got = strict_answer(bytes(agent.data))
    assert (got.status, got.body, got.complete) == (200, good, False)
    assert_quiet_log(log_events)


def _stream_with_the_sdk(path: str) -> BaseException | None:
    client = anthropic.Anthropic(
        api_key=PLACEHOLDER,
        base_url="http://localhost",
        http_client=httpx.Client(transport=httpx.HTTPTransport(uds=path)),
        max_retries=0,
    )
    try:
        with (
            client,
            client.messages.stream(
                model="claude-sonnet-4-6",
                max_tokens=8,
                messages=[{"role": "user", "content": "Hi"}],
            ) as events,
        ):
            for _ in events:
                pass
    except Exception as error:  # what the SDK's user would see
        return error
    return None


@pytest_twisted.ensureDeferred
async def test_the_sdk_sees_the_cut_off_as_an_error(
    raw_upstream: RawUpstream, make_proxy: MakeProxy, log_events: list[LogEvent]
) -> None:
    start_event = (
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1",'
        b'"type":"message","role":"assistant","model":"m","content":[],"stop_reason":null,'
        b'"stop_sequence":null,"usage":{"input_tokens":1,"output_tokens":1}}}\n\n'
    )

    def script(connection: RawConnection) -> None:
        connection.write(chunked_head() + chunk(start_event))
        reactor.callLater(0.3, connection.write, b"5\r\nhello!!\r\n")

    raw_upstream.script = script
    proxy = await start(make_proxy, raw_upstream)
    error = await deferToThread(_stream_with_the_sdk, proxy.path)
    assert error is not None, "a cut-off stream ended cleanly for the SDK"
    assert isinstance(error, (httpx.HTTPError, anthropic.APIError)), repr(error)
    assert_quiet_log(log_events)


@pytest_twisted.ensureDeferred
async def test_each_answer_on_a_persistent_upstream_connection_is_screened(
    raw_upstream: RawUpstream, make_proxy: MakeProxy, log_events: list[LogEvent]
) -> None:
    answers = [json_answer(), json_answer(b"X-Second: \x01\r\n"), json_answer()]

    def script(connection: RawConnection) -> None:
        connection.write(answers.pop(0))

    raw_upstream.script = script
    proxy = await start(make_proxy, raw_upstream)
    first = strict_answer(bytes((await ask(proxy)).data))
    assert first.status == 200
    assert_malformed_502(await ask(proxy))
    assert [c.requests for c in raw_upstream.connections] == [2]  # one pooled connection
    await raw_upstream.connections[0].lost.addTimeout(ANSWER_WAIT, reactor)  # then closed
    third = strict_answer(bytes((await ask(proxy)).data))
    assert third.status == 200
    assert [c.requests for c in raw_upstream.connections] == [2, 1]
    assert_quiet_log(log_events)


# -- the fuzzer ------------------------------------------------------------------------------

TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
NASTY = [b"\x00", b"\r", b"\n", b"\x7f", b"\x1b", b" ", b"\t", b":", b"\xff", b"\r\n", b"\r\n "]


def _mostly(good: Any, bad: Any) -> Any:
    """
    A strategy drawing from C{good} about seven times in eight, else from
    C{bad} (on a middle value: hypothesis favours the ends of a range).
    """
    return st.integers(0, 7).flatmap(lambda n: bad if n == 5 else good)


PRINTABLE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=16)
INTERIM = [
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\nX: \x00\r\n\r\n",
]


@st.composite
def raw_answers(draw: Any) -> list[bytes]:
    """
    A raw upstream answer, cut into the writes that carry it: interim heads
    or not, a status line, header lines, framing and a body, mostly well
    formed; a third of them spoilt by one nasty byte somewhere in the head.
    """
    parts: list[bytes] = draw(_mostly(st.just([]), st.lists(st.sampled_from(INTERIM), max_size=2)))
    version = draw(
        _mostly(st.just(b"HTTP/1.1"), st.sampled_from([b"HTTP/1.0", b"HTTP/2", b"http/1.1"]))
    )
    code = draw(
        _mostly(
            st.sampled_from([200, 200, 201, 204, 304, 400, 429, 500, 529]),
            st.one_of(st.integers(100, 599), st.sampled_from([0, 42, 600, 1000])),
        )
    )
    phrase = draw(
        _mostly(st.one_of(st.just(b"OK"), PRINTABLE.map(str.encode)), st.binary(max_size=12))
    )
    names = st.text(alphabet=TCHARS, min_size=1, max_size=12).map(str.encode)
    values = _mostly(PRINTABLE.map(str.encode), st.binary(max_size=16))
    fields = [
        name + b": " + value for name, value in draw(st.lists(st.tuples(names, values), max_size=6))
    ]
    body = draw(st.binary(max_size=64))
    framing = draw(
        st.sampled_from(["chunked", "chunked", "length", "wrong-length", "close", "both", "te-odd"])
    )
    if framing in ("chunked", "both", "te-odd"):
        coding = b"gzip, chunked" if framing == "te-odd" else b"chunked"
        fields.append(b"Transfer-Encoding: " + coding)
        pieces = [chunk(body[i : i + 16]) for i in range(0, len(body), 16)]
        if draw(st.integers(0, 3)) == 2:  # spoil one chunk's framing
            bad = draw(st.sampled_from([b"zz\r\n", b"5\r\nab\r\n", b"-1\r\n", b"\r\n"]))
            pieces.insert(draw(st.integers(0, len(pieces))), bad)
        if draw(st.integers(0, 3)) != 2:  # mostly ended
            pieces.append(b"0\r\n\r\n")
        payload = b"".join(pieces)
    else:
        payload = body
    if framing in ("length", "both"):
        fields.append(b"Content-Length: %d" % (len(body),))
    elif framing == "wrong-length":
        fields.append(b"Content-Length: %d" % (len(body) + draw(st.integers(1, 10)),))
    if draw(st.booleans()):
        named = draw(st.sampled_from([b"close", b"keep-alive, x-hop", b"x-hop"]))
        fields += [b"Connection: " + named, b"X-Hop: named"]
    end = draw(_mostly(st.just(b"\r\n"), st.just(b"\n")))
    head = version + b" %d " % (code,) + phrase + b"".join(end + f for f in fields)
    if draw(st.integers(0, 2)) == 1:
        at = draw(st.integers(0, len(head)))
        head = head[:at] + draw(st.sampled_from(NASTY)) + head[at:]
    parts.append(head + end + end + payload)
    raw = b"".join(parts)
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(raw) - 1)), max_size=3))))
    return [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True) if raw[a:b]]


def _screen_verdict(raw: bytes) -> bool | None:
    """
    Whether the screen refuses this answer's heads (True), passes them
    (False), or is still waiting for their end (None).
    """
    try:
        return False if ResponseHeadScreen().feed(raw) is not None else None
    except MalformedResponseHead:
        return True


@dataclass
class FuzzWorld:
    upstream: RawUpstream
    proxy: RunningProxy
    pool: UpstreamPool


def _named_hop(raw: bytes) -> bool:
    """
    Whether a Connection header of the answer names X-Hop.
    """
    values = re.findall(rb"(?im)^connection:([^\r\n]*)", raw)
    return b"x-hop" in connection_options(values)


async def _one_example(world: FuzzWorld, pieces: list[bytes]) -> None:
    def script(connection: RawConnection) -> None:
        for delay, piece in enumerate(pieces):
            reactor.callLater(0.002 * delay, connection.write, piece)
        reactor.callLater(0.002 * len(pieces), connection.close)

    before = len(world.upstream.connections)
    world.upstream.script = script
    agent = await ask(world.proxy, stream=True)
    data = bytes(agent.data)
    raw = b"".join(pieces)
    refused = _screen_verdict(raw)
    event({True: "head refused", False: "head passed", None: "head incomplete"}[refused])
    if not data:
        event("closed without an answer")
        assert refused is False, "a refused head must be answered, not dropped"
    else:
        got = strict_answer(data)
        event(f"agent got {got.status}, complete={got.complete}")
        if refused is not False:  # refused, or the upstream closed mid-head
            assert got.status == 502 and got.complete
        if refused is True:
            assert got.json()["error"]["message"] == MALFORMED_ANSWER
        if got.status != 502 and _named_hop(raw):
            assert b"x-hop" not in got.headers
        if got.status == 502:
            assert b"request-id" not in got.headers
    for connection in world.upstream.connections[before:]:
        await connection.lost.addTimeout(ANSWER_WAIT, reactor)
    # Nothing is left behind: no exchange in flight, no upstream slot held,
    # and the next request is served.
    assert world.proxy.in_flight == 0
    assert world.proxy.face.site.proxy._context.slots.in_use == 0
    world.upstream.script = answer(json_answer(), close=True)
    good = strict_answer(bytes((await ask(world.proxy)).data))
    assert (good.status, good.body) == (200, MESSAGE)
