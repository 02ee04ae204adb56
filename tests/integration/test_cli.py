"""
The installed C{credproxy} command as people run it, each in a subprocess:
C{serve} runs both faces and stops cleanly on SIGTERM and SIGHUP, its JSON
log is one object a line, a start failure is one line; C{login} against a
real OAuth server on loopback (the pasted code fed on standard input, or a
device code approved meanwhile) stores the token, refresh token included,
where a running service sees it at once, and Ctrl-C calls a login off with
status 130; C{set-key} and C{delete-key} reach a running service without a
restart.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from credproxy.oauth._device import DEVICE_CODE_GRANT
from credproxy.testing import FakeOAuthServer
from tests.integration.test_twistd import post_messages
from tests.integration.upstream import Upstream

pytestmark = pytest.mark.slow

CREDPROXY = os.path.join(os.path.dirname(sys.executable), "credproxy")
API_KEY = "sk-ant-api03-cli-serve-key-0123456789abcdef"
STORED_KEY = "sk-ant-api03-cli-stored-key-fedcba9876543210"
WAIT = 30.0


def environment(base: str, **extra: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": base,
        "XDG_RUNTIME_DIR": base,
        "XDG_STATE_HOME": os.path.join(base, "state-home"),
        "LANG": "C.UTF-8",
        **extra,
    }


@dataclass
class Serving:
    process: subprocess.Popen[bytes]
    base: str
    log_path: str

    @property
    def http_sock(self) -> str:
        return os.path.join(self.base, "credproxy", "http.sock")

    @property
    def cred_sock(self) -> str:
        return os.path.join(self.base, "credproxy", "cred.sock")

    def output(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(WAIT)


def serve(base: str, *args: str, env: dict[str, str] | None = None) -> Serving:
    log_path = os.path.join(base, f"serve-{time.monotonic_ns()}.log")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [CREDPROXY, "serve", *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env if env is not None else environment(base),
            cwd=base,
        )
    return Serving(process, base, log_path)


async def wait_for(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        await deferLater(reactor, 0.05)


async def wait_serving(serving: Serving, *paths: str) -> None:
    def ready() -> bool:
        if serving.process.poll() is not None:
            raise AssertionError(f"credproxy serve exited early:\n{serving.output()}")
        return all(os.path.exists(p) for p in paths) and "credproxy serving" in serving.output()

    await wait_for(ready)


async def wait_exit(serving: Serving) -> int:
    await wait_for(lambda: serving.process.poll() is not None)
    code = serving.process.returncode
    assert code is not None
    return code


def post_message(path: str) -> tuple[int, bytes]:
    return post_messages(path, stream=False)


def credential_request(path: str, op: str, payload: dict[str, Any]) -> Any:
    from credproxy.wire import BlockingProxySocketClient, ProxyRequestError

    with BlockingProxySocketClient(path, request_timeout=WAIT) as client:
        try:
            return client.request(op, payload)
        except ProxyRequestError as e:
            return e.code


def command(base: str, *args: str, input: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CREDPROXY, *args],
        input=input,
        capture_output=True,
        text=True,
        env=environment(base),
        cwd=base,
        timeout=WAIT * 2,
        check=False,
    )


# -- serve ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_serve_runs_both_faces_and_stops_cleanly_on_sigterm(
    upstream: Upstream, socket_dir: str
) -> None:
    state = os.path.join(socket_dir, "state")
    running = serve(
        socket_dir,
        "--store",
        "file",
        "--state-dir",
        state,
        "--upstream",
        upstream.url,
        env=environment(socket_dir, ANTHROPIC_API_KEY=API_KEY),
    )
    try:
        await wait_serving(running, running.http_sock, running.cred_sock)
        status, body = await deferToThread(post_message, running.http_sock)
        assert status == 200, body
        assert upstream.received[-1].header("x-api-key") == API_KEY
        providers = await deferToThread(credential_request, running.cred_sock, "list_providers", {})
        assert providers == {"providers": []}

        running.process.send_signal(signal.SIGTERM)
        assert await wait_exit(running) == 0
        assert not os.path.exists(running.http_sock)
        assert not os.path.exists(running.cred_sock)
        output = running.output()
        assert f"Credential store: file ({state}/tokens.json, {state}/keys.json)" in output
        assert "credproxy stopping" in output
        assert "/v1/messages" in output  # the audit line reached standard error
        assert API_KEY not in output and "placeholder" not in output
    finally:
        running.kill()


@pytest_twisted.ensureDeferred
async def test_sighup_stops_it_cleanly_too(socket_dir: str) -> None:
    running = serve(socket_dir, "--store", "memory")
    try:
        await wait_serving(running, running.http_sock, running.cred_sock)
        running.process.send_signal(signal.SIGHUP)
        assert await wait_exit(running) == 0  # not killed by the signal: stopped
        assert not os.path.exists(running.http_sock)
        assert not os.path.exists(running.cred_sock)
        output = running.output()
        assert "Received SIGHUP, shutting down." in output
        assert "credproxy stopping" in output
    finally:
        running.kill()


@pytest_twisted.ensureDeferred
async def test_the_json_log_is_one_object_a_line(socket_dir: str) -> None:
    running = serve(socket_dir, "--store", "memory", "--log-format", "json")
    try:
        await wait_serving(running, running.http_sock, running.cred_sock)
        await deferToThread(credential_request, running.cred_sock, "list_providers", {})
        running.process.send_signal(signal.SIGTERM)
        assert await wait_exit(running) == 0
        lines = running.output().splitlines()
        events = [json.loads(line) for line in lines]  # every line, or this fails
        assert len(events) > 3
        assert all(isinstance(e, dict) for e in events)
        texts = [e["log_text"] for e in events]
        assert any(t.startswith("credproxy serving: ") for t in texts)
        assert any("op=list_providers" in t for t in texts)
        assert {e["log_level"]["name"] for e in events} >= {"info"}
    finally:
        running.kill()


@pytest_twisted.ensureDeferred
async def test_a_start_failure_is_one_line_and_status_1(socket_dir: str) -> None:
    first = serve(socket_dir, "--store", "memory")
    try:
        await wait_serving(first, first.http_sock, first.cred_sock)
        second = serve(socket_dir, "--store", "memory")
        try:
            assert await wait_exit(second) == 1
            output = second.output()
            errors = [line for line in output.splitlines() if line.startswith("credproxy: ")]
            assert len(errors) == 1, output
            assert "another process is serving" in errors[0]
            assert "Traceback" not in output
        finally:
            second.kill()
        status, _ = await deferToThread(post_message, first.http_sock)  # the first one serves on
        assert status == 401
    finally:
        first.process.send_signal(signal.SIGTERM)
        await wait_exit(first)
        first.kill()


@pytest_twisted.ensureDeferred
async def test_a_bad_store_is_one_line_and_status_1(socket_dir: str) -> None:
    result = await deferToThread(command, socket_dir, "serve", "--store", "keyring")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("credproxy: ")]
    assert len(errors) == 1 and "--store keyring: no usable Secret Service" in errors[0]
    assert "Traceback" not in result.stderr


# -- set-key and delete-key reach a running service ---------------------------------------------


@pytest_twisted.ensureDeferred
async def test_set_key_reaches_a_running_service_without_a_restart(
    upstream: Upstream, socket_dir: str
) -> None:
    state = os.path.join(socket_dir, "state")
    stores = ("--store", "file", "--state-dir", state)
    running = serve(socket_dir, *stores, "--upstream", upstream.url)  # no key in its environment
    try:
        await wait_serving(running, running.http_sock, running.cred_sock)
        status, _ = await deferToThread(post_message, running.http_sock)
        assert status == 401 and upstream.received == []

        stored = await deferToThread(
            command, socket_dir, "set-key", "anthropic", *stores, input=f"{STORED_KEY}\n"
        )
        assert stored.returncode == 0, stored.stderr
        status, _ = await deferToThread(post_message, running.http_sock)
        assert status == 200
        assert upstream.received[-1].header("x-api-key") == STORED_KEY
        answer = await deferToThread(
            credential_request, running.cred_sock, "get_api_key", {"name": "anthropic"}
        )
        assert answer == {"key": STORED_KEY}

        deleted = await deferToThread(command, socket_dir, "delete-key", "anthropic", *stores)
        assert deleted.returncode == 0, deleted.stderr
        status, _ = await deferToThread(post_message, running.http_sock)
        assert status == 401
        again = await deferToThread(command, socket_dir, "delete-key", "anthropic", *stores)
        assert again.returncode == 1 and again.stderr.startswith("credproxy: no API key named")

        running.process.send_signal(signal.SIGTERM)
        assert await wait_exit(running) == 0
        for shown in (running.output(), stored.stdout, stored.stderr, deleted.stdout):
            assert STORED_KEY not in shown
    finally:
        running.kill()


# -- login ------------------------------------------------------------------------------------


def read_until(fd: int, wanted: Callable[[str], bool], seen: bytearray) -> str:
    """
    Read the pipe C{fd} into C{seen} until a whole line is C{wanted}; that
    line. Raw reads, so nothing waits in a buffer that select cannot see.
    """
    deadline = time.monotonic() + WAIT
    while True:
        for line in seen.decode(errors="replace").splitlines(keepends=True):
            if line.endswith("\n") and wanted(line):
                return line.strip()
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out; the login printed: {bytes(seen)!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            raise AssertionError(f"the login ended early; it printed: {bytes(seen)!r}")
        seen.extend(chunk)


def finish(process: subprocess.Popen[bytes], code: str, seen: bytearray) -> tuple[int, str, str]:
    out, err = process.communicate(code.encode() + b"\n", timeout=WAIT)
    return process.returncode, (bytes(seen) + out).decode(), err.decode()


def _oauth_server(
    socket_dir: str, device_interval: float | None = None
) -> tuple[FakeOAuthServer, str]:
    """
    A token endpoint on loopback, and the providers' file pointing at it.
    """
    server = FakeOAuthServer(reactor)
    if device_interval is not None:
        server.device_interval = device_interval
    server.listen(reactor)
    config = os.path.join(socket_dir, "oauth.toml")
    with open(config, "w") as f:
        f.write(server.oauth_toml())
    return server, config


@pytest_twisted.ensureDeferred
async def test_login_stores_the_token_where_a_running_service_sees_it(socket_dir: str) -> None:
    server, config = _oauth_server(socket_dir)
    state = os.path.join(socket_dir, "state")
    stores = ("--store", "file", "--state-dir", state, "--config", config)
    running = serve(socket_dir, *stores)
    login = subprocess.Popen(
        [CREDPROXY, "login", "anthropic", *stores],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment(socket_dir),
        cwd=socket_dir,
    )
    try:
        await wait_serving(running, running.cred_sock)
        assert login.stdout is not None
        seen = bytearray()
        url = await deferToThread(
            read_until, login.stdout.fileno(), lambda line: line.startswith(server.base_url), seen
        )
        pasted = server.authorize(url)  # the person's browser: code#state
        code, printed, errors = await deferToThread(finish, login, pasted, seen)
        assert code == 0, printed + errors
        assert "Logged in to anthropic." in printed
        assert f"The token is stored in file ({state}/tokens.json" in printed
        assert server.grants["authorization_code"] == 1

        status = await deferToThread(command, socket_dir, "status", "--json", *stores)
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        (token,) = report["tokens"]
        assert (token["provider"], token["bucket"]) == ("anthropic", "default")
        assert token["has_refresh_token"] is True and token["expired"] is False
        text = await deferToThread(command, socket_dir, "status", *stores)
        assert "anthropic/default  expires " in text.stdout and "refresh token: yes" in text.stdout

        # The running service sees the new token at once, sanitized.
        answer = await deferToThread(
            credential_request, running.cred_sock, "get_token", {"provider": "anthropic"}
        )
        assert answer["access_token"] == server.access_tokens[-1]
        assert "refresh_token" not in answer

        out = await deferToThread(command, socket_dir, "logout", "anthropic", *stores)
        assert out.returncode == 0, out.stderr
        gone = await deferToThread(
            credential_request, running.cred_sock, "get_token", {"provider": "anthropic"}
        )
        assert gone == "NOT_FOUND"

        running.process.send_signal(signal.SIGTERM)
        assert await wait_exit(running) == 0
        shown = "".join(
            [printed, errors, status.stdout, status.stderr, text.stdout, running.output()]
        )
        for secret in server.minted:  # codes, access and refresh tokens
            assert secret not in shown
    finally:
        if login.poll() is None:
            login.kill()
            login.wait(WAIT)
        running.kill()
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_a_login_whose_input_closes_ends_with_status_1(socket_dir: str) -> None:
    server, config = _oauth_server(socket_dir)
    state = os.path.join(socket_dir, "state")
    try:
        result = await deferToThread(
            command,
            socket_dir,
            "login",
            "anthropic",
            "--store",
            "file",
            "--state-dir",
            state,
            "--config",
            config,
        )
        assert result.returncode == 1
        assert "Login cancelled: the input closed before a code was pasted." in result.stdout
        assert server.grants["authorization_code"] == 0
        assert not os.path.exists(os.path.join(state, "tokens.json"))
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_a_device_code_login_waits_for_the_approval(socket_dir: str) -> None:
    # Polls a fifth of a second apart, not five seconds.
    server, config = _oauth_server(socket_dir, device_interval=0.2)
    stores = ("--store", "file", "--state-dir", os.path.join(socket_dir, "state"))
    login = subprocess.Popen(
        [CREDPROXY, "login", "fake-device", "--bucket", "team", *stores, "--config", config],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment(socket_dir),
        cwd=socket_dir,
    )
    try:
        assert login.stdout is not None
        seen = bytearray()
        line = await deferToThread(
            read_until, login.stdout.fileno(), lambda line: "enter the code" in line, seen
        )
        user_code = line.rsplit(" ", 1)[-1]
        assert server.grants[DEVICE_CODE_GRANT] == 0
        await deferLater(reactor, 0.5)  # a few polls while nobody has approved yet
        server.approve(user_code)
        out, err = await deferToThread(login.communicate, None, WAIT)
        printed = bytes(seen).decode() + out.decode()
        assert login.returncode == 0, printed + err.decode()
        assert "Logged in to fake-device (bucket team)." in printed
        assert server.grants[DEVICE_CODE_GRANT] >= 2  # it waited, polling

        status = await deferToThread(command, socket_dir, "status", "--json", *stores)
        (token,) = json.loads(status.stdout)["tokens"]
        assert (token["provider"], token["bucket"], token["has_refresh_token"]) == (
            "fake-device",
            "team",
            True,
        )
        for secret in server.minted:
            assert secret not in printed + err.decode() + status.stdout
    finally:
        if login.poll() is None:
            login.kill()
            login.wait(WAIT)
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_ctrl_c_during_a_login_calls_it_off_with_status_130(socket_dir: str) -> None:
    server, config = _oauth_server(socket_dir)
    state = os.path.join(socket_dir, "state")
    stores = ("--store", "file", "--state-dir", state, "--config", config)
    login = subprocess.Popen(
        [CREDPROXY, "login", "anthropic", *stores],
        stdin=subprocess.PIPE,  # open, and nothing is ever pasted
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment(socket_dir),
        cwd=socket_dir,
    )
    try:
        assert login.stdout is not None
        seen = bytearray()
        await deferToThread(
            read_until, login.stdout.fileno(), lambda line: line.startswith(server.base_url), seen
        )
        login.send_signal(signal.SIGINT)
        # Wait with standard input still open: communicate() would close it,
        # and an end of input that reaches the login before the signal does
        # ends it as "input closed" (status 1), a different, correct ending.
        await deferToThread(login.wait, WAIT)
        assert login.stderr is not None
        out, err = login.stdout.read(), login.stderr.read()
        assert login.returncode == 130
        assert "Login cancelled." in bytes(seen).decode() + out.decode()
        assert err.decode().splitlines()[-1] == "credproxy: interrupted"
        assert "Traceback" not in err.decode()
        assert not os.path.exists(os.path.join(state, "tokens.json"))
    finally:
        if login.poll() is None:
            login.kill()
            login.wait(WAIT)
        await server.stop()
