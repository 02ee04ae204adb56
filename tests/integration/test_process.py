"""
The process as users run it: C{twistd -n credproxy} holding C{ANTHROPIC_API_KEY}
is closed to another process of its own uid that is not root, and C{twistd
credproxy} without -n (a daemon) that cannot start ends at once, with one
line on stderr, instead of waiting forever or writing only its log.

Run as root (as on CI), the reading process and credproxy both run as uid
65534: root may read any process, so it would prove nothing. See
L{tests.integration.unprivileged} for the interpreter they run.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.integration import unprivileged as unprivileged_

API_KEY = "sk-ant-api03-process-integration-key-0123456789"
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def unprivileged() -> Iterator[unprivileged_.Interpreter]:
    """
    The interpreter (and its twistd and credproxy) that the reading process
    and credproxy both run with, as a uid that is not root: ourselves when
    we are not root, else uid 65534, on a venv built for it once a session
    when the project's own interpreter is out of its reach.
    """
    directory = unprivileged_.make_directory()
    try:
        found = unprivileged_.find(directory)
        if isinstance(found, str):
            pytest.skip(found)
        yield found
    finally:
        unprivileged_.remove(directory)


@pytest.fixture
def home(socket_dir: str, unprivileged: unprivileged_.Interpreter) -> str:
    """
    A private directory for credproxy's runtime and state, owned by the uid it runs as.
    """
    if unprivileged.uid is not None:
        os.chown(socket_dir, unprivileged.uid, unprivileged.uid)
    return socket_dir


def environment(home: str, **extra: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": home,
        "XDG_RUNTIME_DIR": home,
        "XDG_STATE_HOME": os.path.join(home, "state"),
        **extra,
    }


# The other process of credproxy's uid: it starts credproxy itself (so that
# even Yama's ptrace_scope 1 would let it trace its own child), waits until
# it has started, reports what /proc and ptrace let it do, and stops it
# (SIGINT: credproxy run passes it on to its command, and ends with it).
# It tries the same on a control, an ordinary child of the same uid and
# environment (this Python, sleeping), which shows the machine allows all three to a
# dumpable process. Whatever it reads, it reports only whether the key was
# in it, never the key.
PEEK = r"""
import ctypes, json, os, signal, subprocess, sys, time

argv, ready, log_path, key = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
PTRACE_ATTACH, PTRACE_DETACH = 16, 17
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


def peek(pid):
    seen = {}
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            seen["environ"] = "holds the key" if key.encode() in f.read() else "read"
    except OSError as e:
        seen["environ"] = e.errno
    try:
        os.close(os.open(f"/proc/{pid}/mem", os.O_RDONLY))
        seen["mem"] = "opened"
    except OSError as e:
        seen["mem"] = e.errno
    if libc.ptrace(PTRACE_ATTACH, pid, None, None) == -1:
        seen["ptrace"] = ctypes.get_errno()
    else:
        seen["ptrace"] = "attached"
        os.waitpid(pid, 0)  # the stop of the attach
        libc.ptrace(PTRACE_DETACH, pid, None, None)
    return seen


# Once it has said so, it runs: its environ is set up (just after exec it may not be yet).
wait = "import time; print('up', flush=True); time.sleep(60)"
control = subprocess.Popen([sys.executable, "-c", wait], stdout=subprocess.PIPE)
control.stdout.readline()
seen = {"control": peek(control.pid)}
control.kill()
control.stdout.close()
control.wait(30)
with open(log_path, "wb") as log:
    child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
try:
    deadline = time.monotonic() + 30
    while not os.path.exists(ready):
        if child.poll() is not None or time.monotonic() > deadline:
            seen["error"] = "credproxy did not start"
            break
        time.sleep(0.02)
    else:
        seen["credproxy"] = peek(child.pid)
        # The credential line follows the socket by a moment; the test reads it.
        while time.monotonic() < deadline:
            with open(log_path, "rb") as written:
                if b"HTTP face credential" in written.read():
                    break
            time.sleep(0.02)
finally:
    child.send_signal(signal.SIGINT)
    seen["status"] = child.wait(30)
print(json.dumps(seen))
"""


def command(name: str, home: str, unprivileged: unprivileged_.Interpreter) -> tuple[list[str], str]:
    """
    The command line of one of credproxy's commands, and the path that
    exists once it has started.
    """
    sock = os.path.join(home, "h.sock")
    serve = ["--store", "memory", "--http", f"unix:address={sock}"]
    if name == "twistd":
        return [unprivileged.twistd, "--pidfile=", "-n", "credproxy", *serve], sock
    if name == "serve":
        return [unprivileged.credproxy, "serve", *serve], sock
    started = os.path.join(home, "started")
    agent = ["/bin/sh", "-c", f'touch "{started}" && exec sleep 60']
    return [unprivileged.credproxy, "run", "--verbose", "--store", "memory", "--", *agent], started


@pytest.mark.parametrize("name", ["twistd", "serve", "run"])
def test_a_process_of_the_same_uid_cannot_read_credproxys_environment_or_memory(
    home: str, name: str, unprivileged: unprivileged_.Interpreter
) -> None:
    argv, ready = command(name, home, unprivileged)
    log_path = os.path.join(home, "credproxy.log")
    result = unprivileged.run(
        [unprivileged.python, "-c", PEEK, json.dumps(argv), ready, log_path, API_KEY],
        env=environment(home, ANTHROPIC_API_KEY=API_KEY),
        cwd=home,
        timeout=90,
    )
    with open(log_path, encoding="utf-8", errors="replace") as f:
        log = f.read()
    assert API_KEY not in log
    assert API_KEY not in result.stdout + result.stderr
    assert result.returncode == 0, result.stderr + log
    seen = json.loads(result.stdout)
    assert "error" not in seen, log
    # A dumpable process of that uid, with the same environment, is open to all three ...
    control = {"environ": "holds the key", "mem": "opened", "ptrace": "attached"}
    assert seen["control"] == control, "this machine refuses even a dumpable process"
    # ... and credproxy to none: the kernel refuses, though its initial
    # environment block, like the control's, still holds the key.
    assert seen["credproxy"] == {
        "environ": errno.EACCES,
        "mem": errno.EACCES,
        "ptrace": errno.EPERM,
    }, "a process of credproxy's uid could read or trace it"
    # And credproxy read its key before it dropped it from its environment.
    assert "HTTP face credential: an API key from ANTHROPIC_API_KEY" in log
    assert "credproxy stays dumpable" not in log


# -- a daemon that cannot start -----------------------------------------------------------


def twistd_daemon(
    home: str, *args: str, twistd: tuple[str, ...] = ()
) -> tuple[subprocess.CompletedProcess[str], float]:
    """
    C{twistd [TWISTD] credproxy ARGS} without -n, with its pidfile and log in
    C{home}: the result once the first process has ended, and how long that took.
    """
    started = time.monotonic()
    result = subprocess.run(
        [
            TWISTD,
            *twistd,
            f"--pidfile={home}/twistd.pid",
            f"--logfile={home}/twistd.log",
            "credproxy",
            "--store",
            "memory",
            *args,
        ],
        env=environment(home, ANTHROPIC_API_KEY=API_KEY),
        cwd=home,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result, time.monotonic() - started


@pytest.fixture(scope="module")
def startup_time() -> float:
    """
    How long twistd takes to load credproxy and end (its --version): what a
    start that fails at once may take, plus the second it is allowed.
    """
    started = time.monotonic()
    subprocess.run([TWISTD, "credproxy", "--version"], capture_output=True, timeout=60, check=True)
    return time.monotonic() - started


def write_token(home: str) -> str:
    path = os.path.join(home, "token")
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write("7e" * 32)
    return path


@pytest.fixture
def taken_port() -> Iterator[int]:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        yield taken.getsockname()[1]
    finally:
        taken.close()


@pytest.fixture
def live_socket(socket_dir: str) -> Iterator[str]:
    path = os.path.join(socket_dir, "live.sock")
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(path)
    listening.listen(1)
    try:
        yield path
    finally:
        listening.close()


def assert_one_line_at_once(
    result: subprocess.CompletedProcess[str], elapsed: float, startup_time: float, reason: str
) -> None:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("credproxy: "), result.stderr
    assert reason in lines[0]
    assert result.stdout == ""
    assert elapsed < startup_time + 1.0


def test_a_daemon_with_a_malformed_endpoint_ends_at_once_with_one_line(
    socket_dir: str, startup_time: float
) -> None:
    token = write_token(socket_dir)
    result, elapsed = twistd_daemon(
        socket_dir, "--capability-token-file", token, "--http", "nonsense:here"
    )
    assert_one_line_at_once(
        result, elapsed, startup_time, "malformed endpoint 'nonsense:here': Unknown endpoint type"
    )
    # It got as far as the daemon: the pidfile is gone, and the daemon, which
    # ends just after the first process, writes the line to its log too.
    assert not os.path.exists(os.path.join(socket_dir, "twistd.pid"))
    wait_for_log(socket_dir, result.stderr.strip())


def test_a_daemon_whose_port_is_taken_ends_at_once_with_one_line(
    socket_dir: str, startup_time: float, taken_port: int
) -> None:
    token = write_token(socket_dir)
    endpoint = f"tcp:port={taken_port}:interface=127.0.0.1"
    result, elapsed = twistd_daemon(
        socket_dir,
        "--capability-token-file",
        token,
        "--http",
        f"unix:address={socket_dir}/first.sock",
        "--http",
        endpoint,
    )
    assert_one_line_at_once(result, elapsed, startup_time, f"cannot listen on {endpoint}: ")
    assert "7e" * 32 not in result.stderr
    assert not os.path.exists(f"{socket_dir}/first.sock")
    assert not os.path.exists(os.path.join(socket_dir, "twistd.pid"))


def test_a_daemon_facing_a_live_socket_ends_at_once_with_one_line(
    socket_dir: str, startup_time: float, live_socket: str
) -> None:
    result, elapsed = twistd_daemon(socket_dir, "--http", f"unix:address={live_socket}")
    assert_one_line_at_once(
        result, elapsed, startup_time, f"another process is serving {live_socket}"
    )
    assert os.path.exists(live_socket)
    assert not os.path.exists(os.path.join(socket_dir, "twistd.pid"))


def test_an_unreadable_token_file_ends_the_start_with_one_line_before_daemonizing(
    socket_dir: str, startup_time: float
) -> None:
    result, elapsed = twistd_daemon(
        socket_dir, "--capability-token-file", os.path.join(socket_dir, "no-such-token")
    )
    assert_one_line_at_once(
        result, elapsed, startup_time, "cannot read --capability-token-file: No such file"
    )
    assert not os.path.exists(os.path.join(socket_dir, "twistd.log"))  # it never got that far


def test_twistds_own_report_of_a_failure_is_left_alone(socket_dir: str) -> None:
    # No such user: twistd's start fails, in the daemon, before credproxy's
    # own start, with an exception that twistd reports itself.
    result, _ = twistd_daemon(socket_dir, twistd=("--uid=3999999",))
    assert result.returncode == 1
    assert result.stderr.startswith("An error has occurred: ") and "3999999" in result.stderr
    assert "the daemon ended" not in result.stderr


def wait_for_log(home: str, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with open(os.path.join(home, "twistd.log"), encoding="utf-8", errors="replace") as f:
            if text in f.read():
                return
        assert time.monotonic() < deadline, f"{text!r} never reached the log"
        time.sleep(0.05)


def read_pid(home: str) -> int:
    with open(os.path.join(home, "twistd.pid")) as f:
        return int(f.read())


def wait_gone(home: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(os.path.join(home, "twistd.pid")):
        assert time.monotonic() < deadline, "the daemon did not stop"
        time.sleep(0.05)


def test_a_daemon_that_starts_still_leaves_twistd_with_status_zero(socket_dir: str) -> None:
    path = f"{socket_dir}/h.sock"
    result, _ = twistd_daemon(socket_dir, "--http", f"unix:address={path}")
    try:
        assert (result.returncode, result.stderr, result.stdout) == (0, "", "")
        assert os.path.exists(path)
        wait_for_log(socket_dir, "HTTP face credential: an API key from ANTHROPIC_API_KEY")
    finally:
        if os.path.exists(os.path.join(socket_dir, "twistd.pid")):
            os.kill(read_pid(socket_dir), signal.SIGTERM)
            wait_gone(socket_dir)
    assert not os.path.exists(path)
