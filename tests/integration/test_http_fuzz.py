"""
A hostile-input fuzzer for the HTTP face, on real sockets: a running
C{twistd credproxy} (its own process, as in use) in front of a raw upstream
that checks every request it gets. Hypothesis writes request lines, headers
and framing, well formed and not; for each, the proxy must answer exactly
once with a well-formed response or close, never crash, never log a
traceback or a critical line, and never let a malformed request reach the
upstream.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from credproxy.http._head import MAX_HEAD
from credproxy.testing import RawResponse, parse_responses

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
API_KEY = "sk-ant-api03-REAL-fuzz-key-0123456789abcdef"
UPSTREAM_ANSWER = b'{"type":"message","usage":{"input_tokens":1,"output_tokens":1}}'
FORWARDED = (b"/v1/messages", b"/v1/messages/count_tokens")
# How long a client waits for an answer to a request that may never be
# complete (the proxy rightly waits for the rest of it).
QUIET_AFTER = 0.5

_TOKEN = re.compile(rb"[!#$%&'*+\-.^`|~0-9A-Za-z]+")  # no "_": those are never forwarded
_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] [1-5][0-9][0-9] [\x20-\x7e]+")
_RESPONSE_HEADER = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+: ?[\t\x20-\x7e\x80-\xff]*")


@dataclass
class RawUpstream:
    """
    The upstream: answers every request with one small JSON message, and
    records each as a list of problems (empty when it was well formed).
    """

    server: socket.socket
    checked: list[list[str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def port(self) -> int:
        port: int = self.server.getsockname()[1]
        return port

    def serve(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._connection, args=(connection,), daemon=True).start()

    def _connection(self, connection: socket.socket) -> None:
        connection.settimeout(10)
        buffered = b""
        with connection:
            while True:
                while b"\r\n\r\n" not in buffered:
                    try:
                        data = connection.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    buffered += data
                head, _, buffered = buffered.partition(b"\r\n\r\n")
                problems, length = _check_forwarded(head)
                while len(buffered) < length:
                    data = connection.recv(65536)
                    if not data:
                        problems.append("body cut short")
                        break
                    buffered += data
                buffered = buffered[length:]
                with self.lock:
                    self.checked.append(problems)
                connection.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(UPSTREAM_ANSWER), UPSTREAM_ANSWER)
                )


def _check_forwarded(head: bytes) -> tuple[list[str], int]:
    """
    What is wrong with a request head the proxy forwarded, independently of
    the proxy's own parser; and its body length.
    """
    problems: list[str] = []
    request_line, *lines = head.split(b"\r\n")
    parts = request_line.split(b" ")
    if len(parts) != 3 or parts[0] != b"POST" or parts[2] != b"HTTP/1.1":
        problems.append("bad request line")
    elif parts[1].partition(b"?")[0] not in FORWARDED or not re.fullmatch(
        rb"/[\x21-\x7e]*", parts[1]
    ):
        problems.append("bad target")
    names: list[bytes] = []
    length = 0
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name) or not _VALUE.fullmatch(value):
            problems.append("malformed header line")
            continue
        names.append(name.lower())
        if name.lower() == b"content-length":
            length = int(value)
        if name.lower() == b"x-api-key" and value.strip() != API_KEY.encode():
            problems.append("wrong credential")
    for hop in (b"connection", b"transfer-encoding", b"expect", b"upgrade", b"te"):
        if hop in names:
            problems.append(f"hop-by-hop {hop!r} forwarded")
    if names.count(b"x-api-key") != 1 or b"authorization" in names:
        problems.append("not exactly one credential")
    if names.count(b"host") != 1:
        problems.append("not exactly one host")
    return problems, length


@dataclass
class Proxy:
    process: subprocess.Popen[bytes]
    socket_path: str
    log_path: str
    upstream: RawUpstream

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    runtime = str(tmp_path_factory.mktemp("fuzz"))
    os.chmod(runtime, 0o700)
    server = socket.create_server(("127.0.0.1", 0))
    upstream = RawUpstream(server)
    threading.Thread(target=upstream.serve, daemon=True).start()
    socket_path = os.path.join(runtime, "http.sock")
    log_path = os.path.join(runtime, "twistd.log")
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "XDG_RUNTIME_DIR": runtime,
        "HOME": runtime,
        "ANTHROPIC_API_KEY": API_KEY,
    }
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                TWISTD,
                "--pidfile=",
                "-n",
                "credproxy",
                "--store",
                "memory",
                "--http",
                f"unix:address={socket_path}:mode=600",
                "--upstream",
                f"http://127.0.0.1:{upstream.port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environ,
            cwd=runtime,
        )
    running = Proxy(process, socket_path, log_path, upstream)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(socket_path):
            assert process.poll() is None, running.log()
            assert time.monotonic() < deadline, "credproxy did not start listening"
            time.sleep(0.05)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        finally:
            server.close()


def _talk(path: str, pieces: list[bytes]) -> tuple[bytes, bool]:
    """
    Send C{pieces}, then read until the proxy closes or goes quiet; return
    what came back and whether the proxy closed.
    """
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect(path)
    received = b""
    closed = False
    with client:
        try:
            for piece in pieces:
                client.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused while still sending: what it answered is read below
        client.settimeout(QUIET_AFTER)
        while True:
            try:
                data = client.recv(65536)
            except TimeoutError:
                if received and len(parse_responses(received)) == 0:
                    client.settimeout(5)  # an answer has begun: wait for the rest of it
                    continue
                break
            except ConnectionResetError:
                closed = True
                break
            if not data:
                closed = True
                break
            received += data
            if any(
                r.status >= 200 and r.header(b"connection") != b"close"
                for r in parse_responses(received)
            ):
                break  # answered, and kept alive: nothing more will come
    return received, closed


def _check_answers(received: bytes, closed: bool) -> list[RawResponse]:
    """
    Split what the proxy sent into responses, checking each strictly: a
    well-formed status line and header lines, a body exactly as long as its
    Content-Length, and nothing torn or extra. At most one final response.
    """
    responses: list[RawResponse] = []
    rest = received
    while rest:
        end = rest.find(b"\r\n\r\n")
        assert end >= 0, f"a torn response head: {rest[:300]!r}"
        status_line, *lines = rest[:end].split(b"\r\n")
        assert _STATUS_LINE.fullmatch(status_line), status_line
        headers = []
        for line in lines:
            assert _RESPONSE_HEADER.fullmatch(line), line
            name, _, value = line.partition(b":")
            headers.append((name.lower(), value.strip()))
        found = dict(headers)
        assert b"transfer-encoding" not in found, "the fuzzer's upstream never streams"
        status = int(status_line.split(b" ")[1])
        rest = rest[end + 4 :]
        size = 0 if status < 200 else int(found.get(b"content-length", b"-1"))
        assert size >= 0, f"a final response without Content-Length: {status_line!r}"
        assert len(rest) >= size, f"a torn body: {len(rest)} of {size} bytes"
        body, rest = rest[:size], rest[size:]
        responses.append(RawResponse(status, status_line.split(b" ", 2)[2], headers, body))
    final = [r for r in responses if r.status >= 200]
    assert len(final) <= 1, [r.status for r in responses]
    if not closed:
        # An unanswered connection is one still waiting for the rest of a request.
        assert final == [] or final[0].header(b"connection") != b"close", final
    return final


methods = st.sampled_from([b"GET", b"PUT", b"post", b"P\x00ST", b"POST\t", b""])
targets = st.one_of(
    st.sampled_from(
        [
            b"/v1/messages/count_tokens",
            b"/v1/messages?beta=true",
            b"/v1/other",
            b"*",
            b"http://evil.example/v1/messages",
            b"/v1/messages#frag",
            b"",
        ]
    ),
    st.binary(max_size=40).map(lambda b: b"/v1/messages?" + b),
    st.integers(min_value=8180, max_value=8210).map(lambda n: b"/v1/messages?" + b"-" * n),
)
versions = st.sampled_from([b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 x", b"http/1.1", b""])
header_names = st.one_of(
    st.sampled_from(
        [
            b"Host",
            b"x-api-key",
            b"x_api_key",
            b"authorization",
            b"content-length",
            b"transfer-encoding",
            b"expect",
            b"connection",
            b"anthropic-version",
            b"anthropic_version",
            b"te",
            b"upgrade",
            b"bad name",
            b"",
        ]
    ),
    st.binary(min_size=1, max_size=12),
)
header_values = st.one_of(
    st.sampled_from(
        [
            b"x",
            b"placeholder",
            b"2",
            b"-1",
            b"0x10",
            b"chunked",
            b"identity",
            b"gzip, chunked",
            b"100-continue",
            b"close",
            b"keep-alive, x-api-key",
            b"Bearer placeholder",
            b"2023-06-01",
        ]
    ),
    st.binary(max_size=30),
)
bodies = st.one_of(
    st.binary(max_size=64),
    st.just(b"2\r\n{}\r\n0\r\n\r\n"),
    st.just(b"zz\r\n{}\r\n0\r\n\r\n"),
    st.just(b"2\r\n{}0\r\n\r\n"),
)
MUTATIONS = (
    "method",
    "target",
    "version",
    "header",
    "drop-header",
    "separator",
    "line-end",
    "body",
    "length",
    "long-header",
    "many-headers",
)


@st.composite
def requests(draw: st.DrawFn) -> tuple[list[bytes], bool]:
    """
    One valid request with up to three things changed, sent in a few pieces;
    and whether it was changed at all.
    """
    method, target, version = b"POST", b"/v1/messages", b"HTTP/1.1"
    headers = [(b"host", b"credproxy"), (b"x-api-key", b"placeholder")]
    body = b'{"model":"claude-fuzz","max_tokens":1,"messages":[]}'
    separator, end = b": ", b"\r\n"
    declare_length = True
    mutations = draw(st.lists(st.sampled_from(MUTATIONS), max_size=3))
    for mutation in mutations:
        if mutation == "method":
            method = draw(methods)
        elif mutation == "target":
            target = draw(targets)
        elif mutation == "version":
            version = draw(versions)
        elif mutation == "header":
            headers.insert(
                draw(st.integers(0, len(headers))), draw(st.tuples(header_names, header_values))
            )
        elif mutation == "drop-header" and headers:
            del headers[draw(st.integers(0, len(headers) - 1))]
        elif mutation == "separator":
            separator = draw(st.sampled_from([b":", b" : ", b":\t", b"\t:"]))
        elif mutation == "line-end":
            end = draw(st.sampled_from([b"\n", b"\r", b"\r\r\n"]))
        elif mutation == "body":
            body = draw(bodies)
        elif mutation == "length":
            declare_length = draw(st.booleans())
            if declare_length:
                headers.append((b"content-length", b"%d" % (len(body) + draw(st.integers(-3, 3)))))
                declare_length = False
        elif mutation == "long-header":
            headers.append((b"x-long", b"v" * draw(st.integers(8180, 8200))))
        elif mutation == "many-headers":
            headers.extend((b"x-h%d" % i, b"1") for i in range(draw(st.integers(95, 105))))
    if declare_length:
        headers.append((b"content-length", b"%d" % len(body)))
    line = method + b" " + target + b" " + version
    data = line + end + b"".join(n + separator + v + end for n, v in headers) + end + body
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=3)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True) if a < b]
    return pieces, bool(mutations)


@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=requests())
def test_hostile_requests_get_one_well_formed_answer_or_a_close(
    proxy: Proxy, request: tuple[list[bytes], bool]
) -> None:
    pieces, changed = request
    received, closed = _talk(proxy.socket_path, pieces)
    final = _check_answers(received, closed)
    if not changed:
        # A valid request, in whatever pieces: forwarded and answered, never lost.
        assert [answer.status for answer in final] == [200], received[:300]
    event(f"status {final[0].status if final else None}, closed {closed}")
    assert proxy.process.poll() is None, proxy.log()


def test_valid_requests_are_forwarded_and_nothing_malformed_reached_the_upstream(
    proxy: Proxy,
) -> None:
    body = b'{"model":"claude-fuzz","max_tokens":1,"messages":[]}'
    request = (
        b"POST /v1/messages HTTP/1.1\r\nhost: credproxy\r\nx-api-key: placeholder\r\n"
        b"x_api_key: look-alike\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )
    received, _ = _talk(proxy.socket_path, [request])
    [answer] = _check_answers(received, False)
    assert answer.status == 200 and answer.body == UPSTREAM_ANSWER
    # A head right at the size limit still passes; one byte over does not.
    pads = b"".join(b"x-pad%d: %s\r\n" % (i, b"p" * 4000) for i in range(3))
    padding = MAX_HEAD - len(request.split(b"\r\n\r\n")[0]) - 4 - len(pads) - len(b"x-pad: \r\n")
    big = request.replace(b"host:", pads + b"x-pad: " + b"p" * padding + b"\r\nhost:")
    assert len(big.split(b"\r\n\r\n")[0]) + 4 == MAX_HEAD
    received, _ = _talk(proxy.socket_path, [big])
    assert _check_answers(received, False)[0].status == 200
    received, _ = _talk(proxy.socket_path, [big.replace(b"x-pad: ", b"x-pad: p")])
    assert _check_answers(received, True)[0].status == 431
    with proxy.upstream.lock:
        checked = list(proxy.upstream.checked)
    assert checked, "nothing was forwarded at all"
    assert [problems for problems in checked if problems] == []
    log = proxy.log()
    for marker in ("Traceback", "CRITICAL", "Unhandled", "critical"):
        assert marker not in log, log[-3000:]
    assert "placeholder" not in log and API_KEY not in log
