"""
C{twistd -n credproxy} as users run it: a subprocess of the installed package,
with a real upstream in the test process, the default Unix socket, and the
lifecycle (stale sockets, live sockets, SIGTERM drain).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

API_KEY = "sk-ant-api03-twistd-test-key-0123456789"
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")

pytestmark = pytest.mark.slow


@dataclass
class Recorded:
    headers: list[dict[str, str]] = field(default_factory=list)


class SlowMessages(Resource):
    """
    Answers /v1/messages with a short SSE stream spread over C{delay} seconds,
    so a stop can arrive while it is in flight.
    """

    isLeaf = True

    def __init__(self, recorded: Recorded, delay: float) -> None:
        super().__init__()
        self.recorded = recorded
        self.delay = delay

    def render_POST(self, request: Request) -> object:
        self.recorded.headers.append(
            {
                k.decode().lower(): v[0].decode()
                for k, v in request.requestHeaders.getAllRawHeaders()
            }
        )
        request.setHeader(b"content-type", b"text/event-stream")
        events = [
            b'event: message_start\ndata: {"type":"message_start","message":{"usage":'
            b'{"input_tokens":3,"output_tokens":1}}}\n\n',
            b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":5}}\n\n',
            b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
        ]
        step = self.delay / len(events)
        for i, event in enumerate(events):
            reactor.callLater(step * i, request.write, event)
        reactor.callLater(self.delay, request.finish)
        return NOT_DONE_YET


@dataclass
class Upstream:
    url: str
    recorded: Recorded
    resource: SlowMessages


@pytest_twisted.async_yield_fixture
async def upstream() -> AsyncIterator[Upstream]:
    recorded = Recorded()
    resource = SlowMessages(recorded, delay=0.0)
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")  # type: ignore[arg-type]
    try:
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        yield Upstream(f"http://127.0.0.1:{address.port}", recorded, resource)
    finally:
        await maybeDeferred(port.stopListening)


@dataclass
class Running:
    process: subprocess.Popen[bytes]
    runtime: str
    log_path: str

    @property
    def http_sock(self) -> str:
        return os.path.join(self.runtime, "credproxy", "http.sock")

    @property
    def cred_sock(self) -> str:
        return os.path.join(self.runtime, "credproxy", "cred.sock")

    def output(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


def start(runtime: str, *args: str, env: dict[str, str] | None = None) -> Running:
    log_path = os.path.join(runtime, f"twistd-{time.monotonic_ns()}.log")
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "XDG_RUNTIME_DIR": runtime,
        "ANTHROPIC_API_KEY": API_KEY,
        "HOME": runtime,
        **(env or {}),
    }
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [TWISTD, "--pidfile=", "-n", "credproxy", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environ,
            cwd=runtime,
        )
    return Running(process, runtime, log_path)


async def wait_for(predicate: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        await deferLater(reactor, 0.05)


async def wait_serving(running: Running, *paths: str) -> None:
    def ready() -> bool:
        if running.process.poll() is not None:
            raise AssertionError(f"twistd exited early:\n{running.output()}")
        return all(os.path.exists(p) for p in paths)

    await wait_for(ready)


# twistd stops cleanly on SIGTERM and then re-raises it, so its status is the signal.
STOPPED_BY_SIGTERM = (0, -signal.SIGTERM)


async def wait_exit(running: Running, timeout: float = 20.0) -> int:
    await wait_for(lambda: running.process.poll() is not None, timeout)
    code = running.process.returncode
    assert code is not None
    return code


def write_token(directory: str, token: str) -> str:
    """
    A capability token file as the service accepts one: private, 32 bytes or more.
    """
    path = os.path.join(directory, "token")
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(token)
    return path


@pytest.fixture
def runtime(socket_dir: str) -> Iterator[str]:
    yield socket_dir


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=20)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(self.path)


def post_messages(path: str, stream: bool = True) -> tuple[int, bytes]:
    connection = UnixHTTPConnection(path)
    try:
        body = json.dumps(
            {
                "model": "claude-test",
                "max_tokens": 5,
                "stream": stream,
                "messages": [{"role": "user", "content": "hi"}],
            }
        )
        connection.request(
            "POST",
            "/v1/messages",
            body=body,
            headers={
                "x-api-key": "placeholder",
                "content-type": "application/json",
                "anthropic-version": "2023-06-01",
            },
        )
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest_twisted.ensureDeferred
async def test_serves_and_stops_cleanly_on_sigterm(upstream: Upstream, runtime: str) -> None:
    running = start(runtime, "--upstream", upstream.url)
    try:
        await wait_serving(running, running.http_sock)
        directory = os.path.dirname(running.http_sock)
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(running.http_sock).st_mode) == 0o600

        status, body = await deferToThread(post_messages, running.http_sock)
        assert status == 200
        assert b"message_stop" in body
        assert upstream.recorded.headers[-1]["x-api-key"] == API_KEY

        running.process.send_signal(signal.SIGTERM)
        assert await wait_exit(running) in STOPPED_BY_SIGTERM
        assert not os.path.exists(running.http_sock)
        output = running.output()
        assert API_KEY not in output
        assert "placeholder" not in output
        assert "/v1/messages" in output  # the audit line reached twistd's log
    finally:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait()


@pytest_twisted.ensureDeferred
async def test_sighup_stops_cleanly_too(runtime: str) -> None:
    running = start(runtime)
    try:
        await wait_serving(running, running.http_sock, running.cred_sock)
        running.process.send_signal(signal.SIGHUP)
        assert await wait_exit(running) == 0
        assert not os.path.exists(running.http_sock)
        assert not os.path.exists(running.cred_sock)
        assert "Server Shut Down." in running.output()
    finally:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait()


@pytest_twisted.ensureDeferred
async def test_sigterm_lets_an_inflight_stream_finish(upstream: Upstream, runtime: str) -> None:
    upstream.resource.delay = 1.5
    running = start(
        runtime,
        "--upstream",
        upstream.url,
        "--http",
        f"unix:address={runtime}/h.sock",
        "--grace",
        "10",
    )
    try:
        await wait_serving(running, f"{runtime}/h.sock")
        answer = deferToThread(post_messages, f"{runtime}/h.sock")
        await wait_for(lambda: upstream.recorded.headers)
        running.process.send_signal(signal.SIGTERM)
        status, body = await answer
        assert status == 200
        assert body.count(b"event: ") == 3  # nothing cut off
        assert await wait_exit(running) in STOPPED_BY_SIGTERM
        assert not os.path.exists(f"{runtime}/h.sock")
    finally:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait()


@pytest_twisted.ensureDeferred
async def test_live_socket_is_never_replaced_and_the_refusal_is_clear(
    upstream: Upstream, runtime: str
) -> None:
    first = start(runtime, "--upstream", upstream.url)
    try:
        await wait_serving(first, first.http_sock)
        second = start(runtime, "--upstream", upstream.url)
        code = await wait_exit(second)
        assert code != 0
        assert "credproxy: another process is serving" in second.output()
        assert "Traceback" not in second.output()
        # The first one is untouched and still serves.
        assert os.path.exists(first.http_sock)
        status, _ = await deferToThread(post_messages, first.http_sock)
        assert status == 200
    finally:
        first.process.send_signal(signal.SIGTERM)
        await wait_exit(first)


@pytest_twisted.ensureDeferred
async def test_stale_sockets_of_a_killed_process_are_replaced(
    upstream: Upstream, runtime: str
) -> None:
    first = start(runtime, "--upstream", upstream.url)
    await wait_serving(first, first.http_sock)
    first.process.kill()  # SIGKILL: no cleanup, the socket files stay
    await wait_exit(first)
    assert os.path.exists(first.http_sock)

    second = start(runtime, "--upstream", upstream.url)
    try:
        await wait_serving(second, second.http_sock)
        await wait_for(lambda: "credproxy serving" in second.output())
        status, _ = await deferToThread(post_messages, second.http_sock)
        assert status == 200
    finally:
        second.process.send_signal(signal.SIGTERM)
        assert await wait_exit(second) in STOPPED_BY_SIGTERM


@pytest_twisted.ensureDeferred
async def test_a_bind_failure_on_the_second_face_cleans_up_the_first(runtime: str) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    token_path = write_token(runtime, "a" * 64)
    try:
        running = start(
            runtime,
            "--capability-token-file",
            token_path,
            "--http",
            f"unix:address={runtime}/first.sock",
            "--http",
            f"tcp:port={port}:interface=127.0.0.1",
        )
        assert await wait_exit(running) != 0
        output = running.output()
        assert f"credproxy: cannot listen on tcp:port={port}" in output
        assert "a" * 64 not in output
        assert not os.path.exists(f"{runtime}/first.sock")
    finally:
        taken.close()


@pytest_twisted.ensureDeferred
async def test_tcp_without_a_capability_token_is_refused(runtime: str) -> None:
    running = start(runtime, "--http", "tcp:port=0:interface=127.0.0.1")
    assert await wait_exit(running) != 0
    assert "without a capability token" in running.output()


def credential_session(path: str, token: str | None = None) -> list[object]:
    """
    A host's (or, with C{token}, a sandbox's) few requests over the blocking client.
    """
    from credproxy._secret import Secret
    from credproxy.wire import BlockingProxySocketClient, ProxyRequestError

    outcomes: list[object] = []
    with BlockingProxySocketClient(
        path, capability_token=Secret(token) if token else None, request_timeout=10
    ) as client:
        for op, payload in (
            (
                "save_token",
                {
                    "provider": "anthropic",
                    "token": {"access_token": "acc-twistd", "refresh_token": "ref-twistd"},
                },
            ),
            ("get_token", {"provider": "anthropic"}),
            ("list_providers", {}),
        ):
            try:
                outcomes.append(client.request(op, payload))
            except ProxyRequestError as e:
                outcomes.append(e.code)
    return outcomes


@pytest_twisted.ensureDeferred
async def test_both_faces_by_default_and_the_credential_socket_answers(runtime: str) -> None:
    running = start(runtime)
    try:
        await wait_serving(running, running.http_sock, running.cred_sock)
        assert stat.S_IMODE(os.stat(running.cred_sock).st_mode) == 0o600
        outcomes = await deferToThread(credential_session, running.cred_sock)
        assert outcomes == [{}, {"access_token": "acc-twistd"}, {"providers": ["anthropic"]}]
        running.process.send_signal(signal.SIGTERM)
        assert await wait_exit(running) in STOPPED_BY_SIGTERM
        assert not os.path.exists(running.cred_sock)
        assert not os.path.exists(running.http_sock)
        output = running.output()
        assert "credential socket conn=1 op=get_token provider=anthropic" in output
        for secret in ("acc-twistd", "ref-twistd"):
            assert secret not in output
    finally:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait()


@pytest_twisted.ensureDeferred
async def test_rpc_only_with_a_capability_token_serves_sandboxes(runtime: str) -> None:
    token = "5a" * 32
    token_path = write_token(runtime, token)
    cred = os.path.join(runtime, "c.sock")
    running = start(runtime, "--rpc", f"unix:address={cred}", "--capability-token-file", token_path)
    try:
        await wait_serving(running, cred)
        assert not os.path.exists(running.http_sock)
        outcomes = await deferToThread(credential_session, cred, token)
        assert outcomes == ["FORBIDDEN", "FORBIDDEN", {"providers": []}]
        refused = await deferToThread(credential_session, cred)
        assert refused == ["UNAUTHORIZED"] * 3
        running.process.send_signal(signal.SIGTERM)
        assert await wait_exit(running) in STOPPED_BY_SIGTERM
        assert not os.path.exists(cred)
        assert token not in running.output()
    finally:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait()


def save_then_read(path: str) -> list[object]:
    from credproxy.wire import BlockingProxySocketClient

    with BlockingProxySocketClient(path) as client:
        client.request(
            "save_token",
            {"provider": "anthropic", "token": {"access_token": "acc-kept", "expiry": 1.9e9}},
        )
        return [client.request("get_token", {"provider": "anthropic"})]


def read_back(path: str) -> list[object]:
    from credproxy.wire import BlockingProxySocketClient

    with BlockingProxySocketClient(path) as client:
        return [client.request("get_token", {"provider": "anthropic"})]


@pytest_twisted.ensureDeferred
async def test_the_file_store_keeps_tokens_across_a_restart(runtime: str) -> None:
    state = os.path.join(runtime, "state")
    args = ("--store", "file", "--state-dir", state)
    running = start(runtime, *args, env={"ANTHROPIC_API_KEY": ""})
    try:
        await wait_serving(running, running.cred_sock)
        saved = await deferToThread(save_then_read, running.cred_sock)
        assert saved == [{"access_token": "acc-kept", "expiry": 1900000000}]
        running.process.send_signal(signal.SIGTERM)
        assert await wait_exit(running) in STOPPED_BY_SIGTERM
        first_output = running.output()
        assert f"Credential store: file ({state}/tokens.json, {state}/keys.json)" in first_output
        assert "NO CREDENTIAL: every request to the HTTP face will get a 401" in first_output
        assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(os.path.join(state, "tokens.json")).st_mode) == 0o600

        again = start(runtime, *args, env={"ANTHROPIC_API_KEY": ""})
        try:
            await wait_serving(again, again.cred_sock)
            assert await deferToThread(read_back, again.cred_sock) == saved
            again.process.send_signal(signal.SIGTERM)
            assert await wait_exit(again) in STOPPED_BY_SIGTERM
            # The stored token is now the HTTP face's credential; its value is never logged.
            output = again.output()
            assert "HTTP face credential: an OAuth token from" in output
            assert "acc-kept" not in output
        finally:
            if again.process.poll() is None:
                again.process.kill()
                again.process.wait()
    finally:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait()


@pytest_twisted.ensureDeferred
async def test_store_keyring_without_a_secret_service_exits_with_one_line(runtime: str) -> None:
    running = start(runtime, "--store", "keyring")
    code = await wait_exit(running)
    assert code != 0
    lines = [line for line in running.output().splitlines() if "credproxy:" in line]
    assert len(lines) == 1 and "--store keyring: no usable Secret Service" in lines[0]
    assert not os.path.exists(running.http_sock)


@pytest_twisted.ensureDeferred
async def test_audit_log_gets_both_faces_records_as_json_lines(
    upstream: Upstream, runtime: str
) -> None:
    audit_path = os.path.join(runtime, "audit.jsonl")
    running = start(runtime, "--upstream", upstream.url, "--audit-log", "audit.jsonl")
    try:
        await wait_serving(running, running.http_sock, running.cred_sock)
        assert stat.S_IMODE(os.stat(audit_path).st_mode) == 0o600
        status, _ = await deferToThread(post_messages, running.http_sock, False)
        assert status == 200
        outcomes = await deferToThread(credential_session, running.cred_sock)
        assert outcomes[1] == {"access_token": "acc-twistd"}
        running.process.send_signal(signal.SIGTERM)
        assert await wait_exit(running) in STOPPED_BY_SIGTERM
        with open(audit_path, encoding="utf-8") as f:
            text = f.read()
        records = [json.loads(line) for line in text.splitlines()]
        http_records = [r for r in records if r["log"] == "credproxy.http.audit"]
        assert [(r["method"], r["path"], r["status"], r["outcome"]) for r in http_records] == [
            ("POST", "/v1/messages", 200, "ok")
        ]
        ops = [r["op"] for r in records if r["log"] == "credproxy.wire.audit" and "op" in r]
        assert ops == ["save_token", "get_token", "list_providers"]
        assert all(r["time"].endswith("Z") for r in records)
        output = running.output()
        assert "/v1/messages" not in output  # the records went to the file instead
        assert "op=get_token" not in output
        for secret in (API_KEY, "placeholder", "acc-twistd", "ref-twistd"):
            assert secret not in text
            assert secret not in output
    finally:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait()


@pytest_twisted.ensureDeferred
async def test_an_audit_log_others_may_read_is_refused_with_one_line(runtime: str) -> None:
    audit_path = os.path.join(runtime, "audit.jsonl")
    with open(os.open(audit_path, os.O_WRONLY | os.O_CREAT, 0o600), "w"):
        pass
    os.chmod(audit_path, 0o644)
    running = start(runtime, "--audit-log", audit_path)
    code = await wait_exit(running)
    assert code != 0
    output = running.output().strip()
    assert output.splitlines()[-1] == (
        f"credproxy: audit log {audit_path} may be read or written by others "
        "(mode 644; chmod 600 it)"
    )
    assert not os.path.exists(running.http_sock)
