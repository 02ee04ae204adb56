"""
C{credproxy run -- python run_agent.py ...} as users run it: credproxy in a
subprocess, the fake API in the test process as its C{--upstream}, and an
agent (tests/integration/run_agent.py) that uses the official SDK through
C{ANTHROPIC_BASE_URL} and the credential socket through its descriptor.
Every run must leave nothing on disk, however the agent ends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from tests.integration.conftest import REAL_API_KEY, REAL_OAUTH_TOKEN
from tests.integration.upstream import Upstream

pytestmark = pytest.mark.slow

AGENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run_agent.py")
REAL_AUTH_TOKEN = "sk-ant-REAL-auth-token-for-run-tests-0123456789"
STORED_ACCESS = "sk-ant-oat01-stored-access-for-run-0123456789"
STORED_REFRESH = "sk-ant-ort01-stored-refresh-for-run-0123456789"
REAL_SECRETS = (REAL_API_KEY, REAL_OAUTH_TOKEN, REAL_AUTH_TOKEN, STORED_REFRESH)
EXIT_TIMEOUT = 30.0


@dataclass
class Run:
    process: subprocess.Popen[bytes]
    base: str
    out_path: str
    err_path: str

    @property
    def runtime(self) -> str:
        return os.path.join(self.base, "run", "credproxy")

    @property
    def tmp(self) -> str:
        return os.path.join(self.base, "tmp")

    def stdout(self) -> str:
        with open(self.out_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stderr(self) -> str:
        with open(self.err_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def left_on_disk(self) -> list[str]:
        """
        Whatever the run left in its runtime and temporary directories.
        """
        found: list[str] = []
        for directory in (self.runtime, self.tmp):
            if os.path.isdir(directory):
                found += [os.path.join(directory, name) for name in os.listdir(directory)]
        return found


@pytest.fixture
def base() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="cpr-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def start(
    base: str,
    upstream: Upstream,
    agent: list[str],
    *args: str,
    stdin: bytes | None = None,
    runtime_base: str | None = None,
) -> Run:
    for name in ("run", "tmp", "home", "logs"):
        os.makedirs(os.path.join(base, name), mode=0o700, exist_ok=True)
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.path.join(base, "home"),
        "XDG_RUNTIME_DIR": runtime_base or os.path.join(base, "run"),
        "XDG_STATE_HOME": os.path.join(base, "home", "state"),
        "TMPDIR": os.path.join(base, "tmp"),
        "ANTHROPIC_API_KEY": REAL_API_KEY,
        "CLAUDE_CODE_OAUTH_TOKEN": REAL_OAUTH_TOKEN,
        "ANTHROPIC_AUTH_TOKEN": REAL_AUTH_TOKEN,
    }
    stamp = time.monotonic_ns()
    out_path = os.path.join(base, "logs", f"{stamp}.out")
    err_path = os.path.join(base, "logs", f"{stamp}.err")
    argv = [sys.executable, "-m", "credproxy._run", "--upstream", upstream.url, *args]
    if "--store" not in args:
        argv += ["--store", "memory"]
    argv += ["--", sys.executable, AGENT, *agent]
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=environ,
            cwd=base,
        )
    if stdin is not None:
        assert process.stdin is not None
        process.stdin.write(stdin)
        process.stdin.close()
    return Run(process, base, out_path, err_path)


async def wait_for(predicate: Callable[[], Any], timeout: float = EXIT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        await deferLater(reactor, 0.02)


async def wait_exit(run: Run) -> int:
    try:
        await wait_for(lambda: run.process.poll() is not None)
    finally:
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait()
    code = run.process.returncode
    assert code is not None
    return code


def write_stored_token(state_dir: str) -> None:
    os.makedirs(state_dir, mode=0o700)
    tokens = {
        "version": 1,
        "tokens": {
            "anthropic": {
                "default": {
                    "access_token": STORED_ACCESS,
                    "refresh_token": STORED_REFRESH,
                    "expiry": 4_000_000_000,
                }
            }
        },
    }
    path = os.path.join(state_dir, "tokens.json")
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        json.dump(tokens, f)


@pytest_twisted.ensureDeferred
async def test_the_agent_works_through_the_proxy_with_no_credential_of_its_own(
    base: str, upstream: Upstream
) -> None:
    state = os.path.join(base, "state")
    write_stored_token(state)
    run = start(
        base,
        upstream,
        ["report", "0"],
        "--store",
        "file",
        "--state-dir",
        state,
        stdin=b"from-stdin",
    )
    assert await wait_exit(run) == 0, run.stderr()
    # Nothing of credproxy's on stderr without --verbose: only the agent's own line.
    assert run.stderr() == "agent-stderr\n"
    report = json.loads(run.stdout())

    environ, proc_environ = report["environ"], report["proc_environ"]
    for secret in REAL_SECRETS:
        assert secret not in json.dumps(environ)
        assert secret not in proc_environ
    for name in ("CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_AUTH_TOKEN"):
        assert name not in environ
    assert environ["CREDPROXY_SOCKET"] == environ["LLXPRT_CREDENTIAL_SOCKET"]
    assert os.path.dirname(environ["CREDPROXY_SOCKET"]) == run.runtime
    assert os.path.dirname(environ["CREDPROXY_HTTP_SOCKET"]) == run.runtime
    assert environ["CREDPROXY_CAPABILITY_TOKEN_FD"] == "3"
    assert environ["ANTHROPIC_BASE_URL"].startswith("http://127.0.0.1:")
    placeholder = environ["ANTHROPIC_API_KEY"]
    capability = report["capability_token"]
    assert len(placeholder) == len(capability) == 64 and placeholder != capability
    assert capability not in json.dumps(environ) and capability not in proc_environ
    assert report["modes"] == {
        "CREDPROXY_SOCKET": 0o600,
        "CREDPROXY_HTTP_SOCKET": 0o600,
        "dir": 0o700,
    }

    # The token came once from the descriptor, which is closed, its variable gone.
    assert report["token_fd_variable_left"] is False
    assert report["token_fd_open_after_reading"] is False
    # A sandbox connection: it reads the stored token without its refresh
    # token, and may not write.
    assert report["get_token"] == {"access_token": STORED_ACCESS, "expiry": 4_000_000_000}
    assert report["save_token"] == "FORBIDDEN"

    # Both SDK routes reached the upstream with the real key, and the
    # credential socket's token was refused on the TCP endpoint.
    assert report["tcp_text"] == report["unix_text"] == "ok"
    assert report["tcp_with_capability_token"] == 401
    assert [r.header("x-api-key") for r in upstream.received] == [REAL_API_KEY, REAL_API_KEY]
    for received in upstream.received:
        headers = json.dumps(received.headers)
        assert placeholder not in headers and capability not in headers

    assert report["stdin"] == "from-stdin"
    assert run.left_on_disk() == []


@pytest_twisted.ensureDeferred
async def test_the_exit_status_is_the_agents_and_verbose_lines_hold_no_secret(
    base: str, upstream: Upstream
) -> None:
    run = start(base, upstream, ["exit", "3"], "--verbose")
    assert await wait_exit(run) == 3
    err = run.stderr()
    assert "credproxy: credproxy run: credential socket" in err
    assert "credproxy: Started" in err and "ended with status 3" in err
    for secret in REAL_SECRETS:
        assert secret not in err
    assert run.left_on_disk() == []


@pytest.mark.parametrize(
    ("signum", "handled", "status"),
    [
        (signal.SIGTERM, True, 100 + signal.SIGTERM),
        (signal.SIGTERM, False, 128 + signal.SIGTERM),
        (signal.SIGHUP, True, 100 + signal.SIGHUP),
        (signal.SIGINT, True, 100 + signal.SIGINT),
    ],
)
@pytest_twisted.ensureDeferred
async def test_signals_reach_the_agent_and_the_run_ends_with_its_status(
    base: str, upstream: Upstream, signum: int, handled: bool, status: int
) -> None:
    ready = os.path.join(base, "ready")
    run = start(base, upstream, ["wait", ready, *(["handle"] if handled else [])])
    try:
        await wait_for(lambda: os.path.exists(ready) or run.process.poll() is not None)
        assert run.process.poll() is None, run.stderr()
        run.process.send_signal(signum)
    finally:
        code = await wait_exit(run)
    assert code == status
    if handled:
        assert run.stdout() == f"got {signal.Signals(signum).name}\n"
    assert run.stderr() == ""
    assert run.left_on_disk() == []


@pytest_twisted.ensureDeferred
async def test_an_agent_killed_by_sigkill_is_137_and_cleaned_up(
    base: str, upstream: Upstream
) -> None:
    run = start(base, upstream, ["crash"])
    assert await wait_exit(run) == 128 + signal.SIGKILL
    assert run.stderr() == ""
    assert run.left_on_disk() == []


@pytest_twisted.ensureDeferred
async def test_a_command_that_is_not_there_is_127_in_one_line(
    base: str, upstream: Upstream
) -> None:
    for name in ("run", "tmp", "home", "logs"):
        os.makedirs(os.path.join(base, name), mode=0o700, exist_ok=True)
    err_path = os.path.join(base, "logs", "err")
    with open(err_path, "wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "credproxy._run", "--store", "memory", "--", "no-such-agent"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "XDG_RUNTIME_DIR": os.path.join(base, "run"),
                "TMPDIR": os.path.join(base, "tmp"),
                "HOME": os.path.join(base, "home"),
            },
            cwd=base,
        )
    run = Run(process, base, os.devnull, err_path)
    assert await wait_exit(run) == 127
    assert run.stderr() == "credproxy: no-such-agent: command not found\n"
    assert run.left_on_disk() == []


@pytest_twisted.ensureDeferred
async def test_a_proxy_that_cannot_start_runs_nothing_and_says_why_in_one_line(
    base: str, upstream: Upstream
) -> None:
    deep = os.path.join(base, "d" * 60)  # + /credproxy/PID-NONCE-http.sock: over 107 bytes
    ran = os.path.join(base, "ran")
    run = start(base, upstream, ["wait", ran], runtime_base=deep)
    assert await wait_exit(run) == 125
    [line] = run.stderr().splitlines()
    assert line.startswith("credproxy: cannot start the proxy: the socket path in ")
    assert "bytes long" in line and "at most 107" in line
    assert not os.path.exists(ran)
    assert not os.path.exists(deep)
