"""
credproxy under systemd's protocols, with Debian's own tools: the shipped
units pass C{systemd-analyze verify}; C{systemd-socket-activate} hands a
listening Unix socket to C{twistd credproxy}, which serves on it, leaves its
mode and its file alone, and still refuses peers of another uid; and
C{READY=1} reaches C{$NOTIFY_SOCKET} once both faces listen.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tests.integration.unprivileged import NOBODY, SYSTEM_PYTHON, post_as_nobody
from tests.integration.upstream import Upstream

pytestmark = pytest.mark.slow

UNITS = Path(__file__).resolve().parents[2] / "docs" / "systemd"
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
API_KEY = "sk-ant-api03-systemd-test-key-0123456789"
ACTIVATE = shutil.which("systemd-socket-activate")
ANALYZE = shutil.which("systemd-analyze")
# twistd stops cleanly on SIGTERM and then re-raises it, so its status is the signal.
STOPPED_BY_SIGTERM = (0, -signal.SIGTERM)
# What a start that chmods the socket would leave: credproxy's own mode, or Twisted's.
CHMODDED = (0o600, 0o666)

needs_activate = pytest.mark.skipif(
    ACTIVATE is None, reason="needs systemd-socket-activate (Debian package systemd)"
)


@pytest.mark.skipif(ANALYZE is None, reason="needs systemd-analyze (Debian package systemd)")
def test_the_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # ExecStart= names %h/.local/share/credproxy/venv/bin/twistd, and verify
    # checks that it is executable: lay out the documented install in a
    # throwaway home, with this test run's own virtualenv as the venv.
    home = tmp_path / "home"
    (home / ".local" / "share" / "credproxy").mkdir(parents=True)
    (home / ".local" / "share" / "credproxy" / "venv").symlink_to(Path(TWISTD).parent.parent)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    assert ANALYZE is not None
    result = subprocess.run(
        [
            ANALYZE,
            "--user",
            "verify",
            str(UNITS / "credproxy.socket"),
            str(UNITS / "credproxy.service"),
        ],
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "XDG_RUNTIME_DIR": str(runtime),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 on mere warnings (an unknown key, say): those count too.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@dataclass
class Running:
    process: subprocess.Popen[bytes]
    log_path: str

    def output(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _environ(runtime: str, **extra: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "XDG_RUNTIME_DIR": runtime,
        "HOME": runtime,
        "ANTHROPIC_API_KEY": API_KEY,
        **extra,
    }


def _spawn(runtime: str, argv: list[str], env: dict[str, str]) -> Running:
    log_path = os.path.join(runtime, f"run-{time.monotonic_ns()}.log")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=runtime)
    return Running(process, log_path)


def _activated(runtime: str, path: str, face: str, *args: str) -> Running:
    """
    C{systemd-socket-activate} binds C{path}, and on the first connection
    execs twistd in its own process (so LISTEN_PID names twistd) with the
    listening socket as descriptor 3, serving C{face} (C{--http} or C{--rpc}).

    It passes on only the variables named with C{-E}. Without C{--fdname} it
    sets no LISTEN_FDNAMES, and Twisted then ignores LISTEN_FDS; systemd
    itself always sets both.
    """
    assert ACTIVATE is not None
    environ = _environ(runtime)
    argv = [ACTIVATE, "--listen", path, "--fdname=credproxy"]
    argv += [f"--setenv={name}" for name in environ]
    argv += ["--", TWISTD, "-n", "--pidfile=", "credproxy", "--store", "memory"]
    argv += [face, "systemd:domain=UNIX:index=0", *args]
    return _spawn(runtime, argv, environ)


async def _wait_for(predicate: object, running: Running, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if running.process.poll() is not None:
            raise AssertionError(f"exited early:\n{running.output()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting:\n{running.output()}")
        await deferLater(reactor, 0.05)


async def _wait_exit(running: Running, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while running.process.poll() is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"did not exit:\n{running.output()}")
        await deferLater(reactor, 0.05)
    return running.process.returncode


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(self.path)


def post_messages(path: str) -> int:
    connection = UnixHTTPConnection(path)
    try:
        connection.request(
            "POST",
            "/v1/messages",
            body=json.dumps({"model": "m", "max_tokens": 5, "messages": []}),
            headers={"x-api-key": "placeholder", "content-type": "application/json"},
        )
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


@pytest.fixture
def runtime(socket_dir: str) -> Iterator[str]:
    yield socket_dir


@needs_activate
@pytest_twisted.ensureDeferred
async def test_an_activated_socket_is_served_and_left_as_the_activator_made_it(
    upstream: Upstream, runtime: str
) -> None:
    path = os.path.join(runtime, "http.sock")
    running = _activated(runtime, path, "--http", "--upstream", upstream.url)
    try:
        await _wait_for(lambda: os.path.exists(path), running)
        made = stat.S_IMODE(os.stat(path).st_mode)
        assert made not in CHMODDED  # so that a chmod at start would show
        # This first connection is what makes the activator exec twistd.
        assert await deferToThread(post_messages, path) == 200
        assert upstream.received[-1].header("x-api-key") == API_KEY
        assert stat.S_IMODE(os.stat(path).st_mode) == made  # never chmodded

        running.process.send_signal(signal.SIGTERM)
        assert await _wait_exit(running) in STOPPED_BY_SIGTERM
        assert stat.S_ISSOCK(os.stat(path).st_mode)  # the activator's file, not ours to remove
        assert stat.S_IMODE(os.stat(path).st_mode) == made
        output = running.output()
        assert "a socket the service manager passed" in output  # adopted, not bound anew
        assert API_KEY not in output
    finally:
        running.stop()


@needs_activate
@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON),
    reason="needs root and a system python3 to act as another uid",
)
@pytest_twisted.ensureDeferred
async def test_an_activated_socket_refuses_a_peer_of_another_uid(
    upstream: Upstream, runtime: str
) -> None:
    path = os.path.join(runtime, "http.sock")
    running = _activated(runtime, path, "--http", "--upstream", upstream.url)
    try:
        await _wait_for(lambda: os.path.exists(path), running)
        assert await deferToThread(post_messages, path) == 200  # starts twistd
        os.chmod(runtime, 0o755)  # noqa: S103 - the test's own throwaway directory
        os.chmod(path, 0o666)  # noqa: S103 - so that the kernel check, not the mode, decides
        assert await deferToThread(post_as_nobody, path) == "403"
        assert len(upstream.received) == 1  # nothing of the refused peer went upstream
        assert "peer_refused model=None" in running.output()
        assert f"peer_uid={NOBODY}" in running.output()
    finally:
        running.stop()


@needs_activate
@pytest_twisted.ensureDeferred
async def test_an_activated_credential_socket_answers(runtime: str) -> None:
    path = os.path.join(runtime, "cred.sock")
    running = _activated(runtime, path, "--rpc")
    try:
        await _wait_for(lambda: os.path.exists(path), running)
        made = stat.S_IMODE(os.stat(path).st_mode)

        def session() -> object:
            from credproxy.wire import BlockingProxySocketClient

            with BlockingProxySocketClient(path, request_timeout=30) as client:
                return client.request("list_providers", {})

        assert await deferToThread(session) == {"providers": []}
        running.process.send_signal(signal.SIGTERM)
        assert await _wait_exit(running) in STOPPED_BY_SIGTERM
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == made
    finally:
        running.stop()


def _receive(receiver: socket.socket) -> bytes:
    receiver.settimeout(30)
    return receiver.recv(4096)


@pytest_twisted.ensureDeferred
async def test_ready_reaches_notify_socket_once_both_faces_listen(runtime: str) -> None:
    notify = os.path.join(runtime, "notify")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(notify)
    http_sock = os.path.join(runtime, "credproxy", "http.sock")
    cred_sock = os.path.join(runtime, "credproxy", "cred.sock")
    argv = [TWISTD, "-n", "--pidfile=", "credproxy", "--store", "memory"]
    running = _spawn(runtime, argv, _environ(runtime, NOTIFY_SOCKET=notify))
    try:
        assert await deferToThread(_receive, receiver) == b"READY=1"
        # Sent after both faces listen: both accept a connection at once.
        for path in (http_sock, cred_sock):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.connect(path)
        running.process.send_signal(signal.SIGTERM)
        assert await _wait_exit(running) in STOPPED_BY_SIGTERM
        receiver.setblocking(False)
        with pytest.raises(BlockingIOError):
            receiver.recv(4096)  # exactly one datagram
    finally:
        running.stop()
        receiver.close()
