"""
C{credproxy run --sandbox} as users run it: credproxy in a subprocess,
bubblewrap building the sandbox, the fake API on the host's loopback as its
C{--upstream}, and an agent inside that uses the official SDK through
C{ANTHROPIC_BASE_URL} (the relay) and the credential socket.

One probe (tests/integration/sandbox_probe.py) runs once in one sandbox
and tries every way out; each test below judges one property of what it
saw. The statuses, signals and cleanup get runs of their own, with
tests/integration/run_agent.py as the agent, as in test_run.py.
"""

from __future__ import annotations

import json
import os
import pty
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred
from twisted.internet.threads import deferToThread

from credproxy._sandbox import ENV_ALLOWLIST, RUN_VARIABLES
from tests.integration import unprivileged as unprivileged_
from tests.integration.conftest import REAL_API_KEY, REAL_OAUTH_TOKEN
from tests.integration.test_run import (
    AGENT,
    STORED_ACCESS,
    Run,
    wait_exit,
    wait_for,
    write_stored_token,
)
from tests.integration.upstream import Upstream

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap (bwrap)"),
]

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_probe.py")
HOST_ONLY = "HOST_ONLY_VARIABLE"
PLANTED_CREDENTIALS = '{"claudeAiOauth": {"accessToken": "planted-claude-credential-9876"}}'
PLANTED_RUNTIME = "planted in the runtime directory"
NOTES = "the user's notes, readable in the sandbox"
HOME_SOCKETS = ("ssh-agent.sock", "bus.sock", "other.sock")
# TEST-NET-1 (RFC 5737): an address off the loopback that routes nowhere.
OUTSIDE_ADDRESS = "192.0.2.1"


@dataclass
class Layout:
    """
    A throwaway host for one run: a working directory (the run's current
    directory), a home with credential files in it, an extra writable and
    an extra readable directory, and the runtime directory inside the
    working directory, so that only its cover keeps it out of sight.
    """

    base: str

    def path(self, *parts: str) -> str:
        return os.path.join(self.base, *parts)

    @property
    def work(self) -> str:
        return self.path("work")

    @property
    def home(self) -> str:
        return self.path("home")

    @property
    def runtime_base(self) -> str:
        return self.path("work", "run")

    @property
    def runtime(self) -> str:
        return self.path("work", "run", "credproxy")

    @property
    def state(self) -> str:
        return self.path("home", ".local", "state", "credproxy")

    def make(self) -> None:
        for name in ("work", "rw", "ro", "tmp", "logs", "home/.claude"):
            os.makedirs(self.path(name), mode=0o700, exist_ok=True)
        os.makedirs(self.runtime, mode=0o700)
        with open(self.path("home", ".claude", ".credentials.json"), "w") as f:
            f.write(PLANTED_CREDENTIALS)
        with open(self.path("home", "notes.txt"), "w") as f:
            f.write(NOTES)
        with open(os.path.join(self.runtime, "planted.txt"), "w") as f:
            f.write(PLANTED_RUNTIME)
        write_stored_token(self.state)

    def environ(self, path: str | None = None) -> dict[str, str]:
        return {
            "PATH": path if path is not None else os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": self.home,
            "XDG_RUNTIME_DIR": self.runtime_base,
            "TMPDIR": self.path("tmp"),
            "LANG": "C.UTF-8",
            "TERM": "xterm",
            HOST_ONLY: "seen only on the host",
            "DBUS_SESSION_BUS_ADDRESS": f"unix:path={self.path('home', 'bus.sock')},guid=0",
            "SSH_AUTH_SOCK": self.path("home", "ssh-agent.sock"),
            "ANTHROPIC_API_KEY": REAL_API_KEY,
            "CLAUDE_CODE_OAUTH_TOKEN": REAL_OAUTH_TOKEN,
        }


def start_sandboxed(
    layout: Layout,
    upstream_url: str,
    agent: list[str],
    *args: str,
    path: str | None = None,
    stdin: bytes | None = None,
) -> Run:
    stamp = time.monotonic_ns()
    out_path = layout.path("logs", f"{stamp}.out")
    err_path = layout.path("logs", f"{stamp}.err")
    argv = [
        sys.executable,
        "-m",
        "credproxy._run",
        "--sandbox",
        "--upstream",
        upstream_url,
        "--store",
        "file",
        *args,
        "--",
        *agent,
    ]
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=layout.environ(path),
            cwd=layout.work,
        )
    if stdin is not None:
        assert process.stdin is not None
        process.stdin.write(stdin)
        process.stdin.close()
    return Run(process, layout.base, out_path, err_path)


def left_behind(layout: Layout) -> list[str]:
    return sorted(set(os.listdir(layout.runtime)) - {"planted.txt"})


@pytest.fixture
def layout() -> Iterator[Layout]:
    base = tempfile.mkdtemp(prefix="cps-", dir="/tmp")
    made = Layout(base)
    made.make()
    try:
        yield made
    finally:
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class Probed:
    layout: Layout
    upstream: Upstream
    status: int
    stderr: str
    report: dict[str, Any]
    leftovers: list[str]
    tmp_marker: str


@pytest_twisted.async_yield_fixture(scope="module")
async def probed() -> AsyncIterator[Probed]:
    """
    The probe, run once in one sandbox, with the host's loopback serving
    the fake API (which the sandbox must reach only through credproxy).
    """
    base = tempfile.mkdtemp(prefix="cps-", dir="/tmp")
    layout = Layout(base)
    layout.make()
    upstream = Upstream()
    upstream.port = reactor.listenTCP(0, upstream.site(), interface="127.0.0.1")  # type: ignore[arg-type]
    host_port = upstream.port.getHost().port  # type: ignore[attr-defined]
    tmp_marker = f"/tmp/{os.path.basename(base)}-from-the-sandbox"
    # An abstract Unix socket (X11 and D-Bus listen on such) on the host;
    # the SSH agent's and the session bus's sockets, and another one, in the
    # home, which the sandbox sees (read-only).
    abstract_name = f"credproxy-test-{os.path.basename(base)}"
    listeners = {
        name: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        for name in ("\0" + abstract_name, *(layout.path("home", n) for n in HOME_SOCKETS))
    }
    for address, listener in listeners.items():
        listener.bind(address)
        listener.listen(8)
    plan = {
        "host_port": host_port,
        "outside": OUTSIDE_ADDRESS,
        "abstract": abstract_name,
        "unix": [layout.path("home", n) for n in HOME_SOCKETS],
        "read": [
            layout.path("home", ".claude", ".credentials.json"),
            os.path.join(layout.state, "tokens.json"),
            os.path.join(layout.runtime, "planted.txt"),
            layout.path("home", "notes.txt"),
        ],
        "list": [layout.runtime, layout.runtime_base, layout.path("home", ".claude"), layout.state],
        "write": [
            layout.path("work", "new.txt"),
            layout.path("rw", "new.txt"),
            tmp_marker,
            layout.path("home", "new.txt"),
            layout.path("home", ".claude", "new.txt"),
            "/usr/credproxy-sandbox-new.txt",
        ],
        "cover": layout.path("home", ".claude"),
    }
    try:
        run = start_sandboxed(
            layout,
            upstream.url,
            [sys.executable, PROBE, json.dumps(plan)],
            "--sandbox-rw",
            layout.path("rw"),
            "--sandbox-ro",
            layout.home,
            stdin=b"from-stdin",
        )
        status = await wait_exit(run)
        stdout = run.stdout()
        yield Probed(
            layout=layout,
            upstream=upstream,
            status=status,
            stderr=run.stderr(),
            report=json.loads(stdout) if stdout.strip() else {},
            leftovers=left_behind(layout),
            tmp_marker=tmp_marker,
        )
    finally:
        for listener in listeners.values():
            listener.close()
        await maybeDeferred(upstream.port.stopListening)
        shutil.rmtree(base, ignore_errors=True)


def test_the_probe_ran_to_its_end(probed: Probed) -> None:
    assert probed.status == 0, probed.stderr
    assert probed.report, probed.stderr


def test_the_sdk_reaches_the_upstream_with_the_real_key_through_the_relay(probed: Probed) -> None:
    assert probed.report["relay_text"] == "ok"
    assert probed.report["environ"]["ANTHROPIC_BASE_URL"].startswith("http://127.0.0.1:")
    received = probed.upstream.received
    assert received and all(r.header("x-api-key") == REAL_API_KEY for r in received)
    placeholder = probed.report["environ"]["ANTHROPIC_API_KEY"]
    assert len(placeholder) == 64 and placeholder != REAL_API_KEY
    assert all(placeholder not in json.dumps(r.headers) for r in received)


def test_the_bind_mounted_http_socket_serves_with_the_placeholder(probed: Probed) -> None:
    assert probed.report["environ"]["CREDPROXY_HTTP_SOCKET"] == "/run/credproxy/http.sock"
    assert probed.report["socket_text"] == "ok"
    assert len(probed.upstream.received) == 2  # the relay's request and the socket's


def test_a_request_without_the_runs_placeholder_is_refused_on_both_ways_in(
    probed: Probed,
) -> None:
    assert probed.report["relay_without_placeholder"] == 401
    assert probed.report["socket_without_placeholder"] == 401


def test_get_token_works_through_the_credential_socket_inside(probed: Probed) -> None:
    environ = probed.report["environ"]
    assert environ["CREDPROXY_SOCKET"] == environ["LLXPRT_CREDENTIAL_SOCKET"]
    assert environ["CREDPROXY_SOCKET"] == "/run/credproxy/cred.sock"
    assert probed.report["get_token"] == {"access_token": STORED_ACCESS, "expiry": 4_000_000_000}


def test_a_listener_on_the_hosts_loopback_is_unreachable(probed: Probed) -> None:
    assert probed.report["host_loopback"] == "ECONNREFUSED"


def test_there_is_no_network_beyond_the_sandboxs_own_loopback(probed: Probed) -> None:
    assert probed.report["outside"] == "ENETUNREACH"


def test_the_hosts_abstract_unix_sockets_are_unreachable(probed: Probed) -> None:
    assert probed.report["abstract"] == "ECONNREFUSED"


def test_the_ssh_agent_and_session_bus_sockets_are_covered(probed: Probed) -> None:
    connected = probed.report["unix"]
    home = probed.layout.home
    assert connected[os.path.join(home, "ssh-agent.sock")] == "ECONNREFUSED"
    assert connected[os.path.join(home, "bus.sock")] == "ECONNREFUSED"
    # A socket nobody hid, in a directory the sandbox may read, still
    # answers (a read-only mount does not stop a connect): the covers did it.
    assert connected[os.path.join(home, "other.sock")] == "connected"


def test_no_host_process_is_visible(probed: Probed) -> None:
    processes = probed.report["processes"]
    own = str(probed.report["own_pid"])
    # bubblewrap's pid 1, the init (relay and all), and the probe itself.
    assert sorted(processes) == sorted({"1", "2", own})
    assert "credproxy._sandbox_init" in processes["2"]
    assert not any("credproxy._run" in cmdline for cmdline in processes.values())


def test_credproxys_state_and_the_users_credentials_are_not_readable(probed: Probed) -> None:
    layout = probed.layout
    read = probed.report["read"]
    assert read[layout.path("home", ".claude", ".credentials.json")] == "ENOENT"
    assert read[os.path.join(layout.state, "tokens.json")] == "ENOENT"
    listed = probed.report["list"]
    assert listed[layout.path("home", ".claude")] == []
    assert listed[layout.state] == []
    # The covers hide those paths, not the whole home, which is readable.
    assert read[layout.path("home", "notes.txt")] == "read:" + NOTES
    assert PLANTED_CREDENTIALS not in json.dumps(probed.report)


def test_the_runtime_directorys_other_files_are_not_visible(probed: Probed) -> None:
    layout = probed.layout
    assert probed.report["read"][os.path.join(layout.runtime, "planted.txt")] == "ENOENT"
    # $XDG_RUNTIME_DIR is covered whole, credproxy's directory in it too.
    assert probed.report["list"][layout.runtime_base] == []
    assert probed.report["list"][layout.runtime] == "ENOENT"
    assert PLANTED_RUNTIME not in json.dumps(probed.report)


def test_only_the_read_write_paths_and_a_private_tmp_can_be_written(probed: Probed) -> None:
    layout = probed.layout
    written = probed.report["write"]
    assert written[layout.path("work", "new.txt")] == "written"
    assert written[layout.path("rw", "new.txt")] == "written"
    assert written[probed.tmp_marker] == "written"
    assert written[layout.path("home", "new.txt")] == "EROFS"
    assert written[layout.path("home", ".claude", "new.txt")] == "EROFS"
    assert written["/usr/credproxy-sandbox-new.txt"] == "EROFS"
    with open(layout.path("work", "new.txt")) as f:
        assert f.read() == "from the sandbox"
    assert not os.path.exists(probed.tmp_marker)
    assert not os.path.exists(layout.path("home", "new.txt"))


def test_the_environment_holds_only_the_allowlist_and_credproxys_variables(
    probed: Probed,
) -> None:
    environ = probed.report["environ"]
    allowed = ENV_ALLOWLIST | RUN_VARIABLES | {"PWD"}
    assert {name for name in environ if not name.startswith("LC_")} <= allowed
    for name in (
        HOST_ONLY,
        "XDG_RUNTIME_DIR",
        "TMPDIR",
        "DBUS_SESSION_BUS_ADDRESS",
        "SSH_AUTH_SOCK",
    ):
        assert name not in environ
    assert "CLAUDE_CODE_OAUTH_TOKEN" not in environ
    for secret in (REAL_API_KEY, REAL_OAUTH_TOKEN):
        assert secret not in json.dumps(environ)
    assert environ["HOME"] == probed.layout.home and environ["TERM"] == "xterm"
    assert environ["CREDPROXY_CAPABILITY_TOKEN_FD"] == "3"


def test_the_sandbox_has_no_capabilities_and_cannot_lift_a_cover(probed: Probed) -> None:
    assert int(probed.report["capabilities"], 16) == 0
    assert probed.report["unmount"] == "EPERM"


def test_the_standard_streams_pass_through(probed: Probed) -> None:
    assert probed.report["stdin"] == "from-stdin"
    # Only the agent's own line: nothing of credproxy's without --verbose.
    assert probed.stderr == "probe-stderr\n"


def test_the_run_leaves_nothing_behind(probed: Probed) -> None:
    assert probed.leftovers == []


# -- statuses, signals and cleanup, as for credproxy run ---------------------------------------


_SAYS_ITS_KEY_AND_EXITS_3 = "import os, sys; print(os.environ['ANTHROPIC_API_KEY']); sys.exit(3)"


@pytest_twisted.ensureDeferred
async def test_the_exit_status_is_the_agents_and_verbose_lines_hold_no_secret(
    layout: Layout, upstream: Upstream
) -> None:
    agent = [sys.executable, "-c", _SAYS_ITS_KEY_AND_EXITS_3]
    run = start_sandboxed(layout, upstream.url, agent, "--verbose")
    assert await wait_exit(run) == 3
    err = run.stderr()
    placeholder = run.stdout().strip()
    assert len(placeholder) == 64 and placeholder not in err
    assert "credproxy: Started" in err and "in a sandbox" in err
    assert "relay on port" in err  # the init's own line, from inside
    assert "ended with status 3" in err
    for secret in (REAL_API_KEY, REAL_OAUTH_TOKEN):
        assert secret not in err
    assert left_behind(layout) == []


@pytest.mark.parametrize(
    ("signum", "handled", "status"),
    [
        (signal.SIGTERM, True, 100 + signal.SIGTERM),
        (signal.SIGTERM, False, 128 + signal.SIGTERM),
        (signal.SIGINT, True, 100 + signal.SIGINT),
        (signal.SIGWINCH, True, 100 + signal.SIGWINCH),
    ],
)
@pytest_twisted.ensureDeferred
async def test_signals_reach_the_agent_and_the_run_ends_with_its_status(
    layout: Layout, upstream: Upstream, signum: int, handled: bool, status: int
) -> None:
    ready = layout.path("work", "ready")
    agent = [sys.executable, AGENT, "wait", ready, *(["handle"] if handled else [])]
    run = start_sandboxed(layout, upstream.url, agent)
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
    assert left_behind(layout) == []


@pytest_twisted.ensureDeferred
async def test_an_agent_killed_by_sigkill_is_137_and_cleaned_up(
    layout: Layout, upstream: Upstream
) -> None:
    run = start_sandboxed(layout, upstream.url, [sys.executable, AGENT, "crash"])
    assert await wait_exit(run) == 128 + signal.SIGKILL
    assert run.stderr() == ""
    assert left_behind(layout) == []


def _host_pids_running(marker: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if marker.encode() in cmdline and b"credproxy._run" not in cmdline:
            found.append(int(name))
    return found


@pytest_twisted.ensureDeferred
async def test_the_sandbox_dies_with_credproxy(layout: Layout, upstream: Upstream) -> None:
    ready = layout.path("work", "ready-to-be-orphaned")
    run = start_sandboxed(layout, upstream.url, [sys.executable, AGENT, "wait", ready, "handle"])
    try:
        await wait_for(lambda: os.path.exists(ready) or run.process.poll() is not None)
        assert run.process.poll() is None, run.stderr()
        assert _host_pids_running(ready) != []  # bubblewrap, the init, the agent
        run.process.kill()
    finally:
        await wait_exit(run)
    await wait_for(lambda: _host_pids_running(ready) == [], timeout=10)


# An interactive agent: raw mode on its terminal, one key read, answered.
_READS_A_KEY = (
    "import sys, tty; tty.setraw(0); key = sys.stdin.read(1); "
    "sys.stdout.write('got ' + key + '\\r\\n'); sys.stdout.flush()"
)


def _converse(master: int, key: bytes, timeout: float = 30.0) -> bytes:
    """
    Type C{key} until the agent answers (what it gets before its terminal
    is raw is flushed by tty.setraw), and read until the answer or the end.
    """
    deadline = time.monotonic() + timeout
    seen = b""
    os.set_blocking(master, False)
    while time.monotonic() < deadline and b"got " not in seen:
        try:
            os.write(master, key)
            time.sleep(0.2)
            seen += os.read(master, 4096)
        except BlockingIOError:
            continue
        except OSError:  # the other side closed: the run is over
            break
    return seen


@pytest_twisted.ensureDeferred
async def test_an_interactive_agent_reads_its_terminal_in_raw_mode(
    layout: Layout, upstream: Upstream
) -> None:
    master, slave = pty.openpty()
    try:
        argv = [
            sys.executable,
            "-m",
            "credproxy._run",
            "--sandbox",
            "--upstream",
            upstream.url,
            "--store",
            "memory",
            "--",
            sys.executable,
            "-c",
            _READS_A_KEY,
        ]
        process = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=layout.environ(), cwd=layout.work
        )
        os.close(slave)
        slave = -1
        seen = await deferToThread(_converse, master, b"k")
        run = Run(process, layout.base, os.devnull, os.devnull)
        assert await wait_exit(run) == 0
    finally:
        os.close(master)
        if slave != -1:
            os.close(slave)
    assert b"got k" in seen


# Holds one connection to the relay, then asks on a second and prints the answer.
_TWO_CONNECTIONS = """
import os, socket
host, port = os.environ["ANTHROPIC_BASE_URL"].removeprefix("http://").split(":")
held = socket.create_connection((host, int(port)), timeout=10)
second = socket.create_connection((host, int(port)), timeout=10)
data = b""
while chunk := second.recv(65536):
    data += chunk
print(data.decode())
"""


@pytest_twisted.ensureDeferred
async def test_the_relay_keeps_the_connection_limits_of_the_run(
    layout: Layout, upstream: Upstream
) -> None:
    agent = [sys.executable, "-c", _TWO_CONNECTIONS]
    run = start_sandboxed(layout, upstream.url, agent, "--max-connections-per-peer", "1")
    assert await wait_exit(run) == 0, run.stderr()
    answer = run.stdout()
    assert answer.startswith("HTTP/1.1 503 ")
    assert "overloaded_error" in answer and "the sandbox's relay" in answer
    assert upstream.received == []


# An agent that leaves a process of its own running, in a session of its
# own, and exits at once.
_LEAVES_A_DAEMON = (
    "import subprocess, sys; subprocess.Popen([sys.executable, '-c', "
    "'import time; time.sleep(30)', sys.argv[1]], start_new_session=True)"
)


@pytest_twisted.ensureDeferred
async def test_nothing_the_agent_started_outlives_the_run(
    layout: Layout, upstream: Upstream
) -> None:
    marker = layout.path("work", "daemon-marker")
    run = start_sandboxed(layout, upstream.url, [sys.executable, "-c", _LEAVES_A_DAEMON, marker])
    assert await wait_exit(run) == 0, run.stderr()
    await wait_for(lambda: _host_pids_running(marker) == [], timeout=5)


@pytest_twisted.ensureDeferred
async def test_a_command_not_found_in_the_sandbox_is_127_in_one_line(
    layout: Layout, upstream: Upstream
) -> None:
    run = start_sandboxed(layout, upstream.url, ["no-such-agent"])
    assert await wait_exit(run) == 127
    assert run.stderr() == "credproxy: no-such-agent: command not found\n"
    assert left_behind(layout) == []


# -- refusals: never a run without the sandbox --------------------------------------------------


def _path_without_bwrap(layout: Layout) -> str:
    """
    A PATH with python but no bwrap: a directory of links to what the run needs.
    """
    bin_dir = layout.path("bin-without-bwrap")
    os.makedirs(bin_dir)
    for name in ("sh", "env"):
        found = shutil.which(name)
        assert found is not None
        os.symlink(found, os.path.join(bin_dir, name))
    return bin_dir


@pytest_twisted.ensureDeferred
async def test_without_bubblewrap_the_run_is_refused_in_one_line(
    layout: Layout, upstream: Upstream
) -> None:
    ran = layout.path("work", "ran")
    agent = [sys.executable, AGENT, "wait", ran]
    run = start_sandboxed(layout, upstream.url, agent, path=_path_without_bwrap(layout))
    assert await wait_exit(run) == 125
    [line] = run.stderr().splitlines()
    assert line.startswith("credproxy: --sandbox needs bubblewrap (bwrap), which is not on PATH")
    assert "apt install bubblewrap" in line
    assert not os.path.exists(ran)
    assert os.listdir(layout.runtime) == ["planted.txt"]


# What bubblewrap 0.8 prints, and its status, when the kernel refuses an
# ordinary user a user namespace.
_NO_USERNS_BWRAP = """#!/bin/sh
echo "bwrap: No permissions to creating new namespace, likely because the kernel does not \
allow non-privileged user namespaces. On e.g. debian this can be enabled with \
'sysctl kernel.unprivileged_userns_clone=1'." >&2
exit 1
"""


@pytest_twisted.ensureDeferred
async def test_without_user_namespaces_the_run_is_refused_in_one_line(
    layout: Layout, upstream: Upstream
) -> None:
    bin_dir = layout.path("bin-no-userns")
    os.makedirs(bin_dir)
    fake = os.path.join(bin_dir, "bwrap")
    with open(fake, "w") as f:
        f.write(_NO_USERNS_BWRAP)
    os.chmod(fake, stat.S_IRWXU)
    ran = layout.path("work", "ran")
    agent = [sys.executable, AGENT, "wait", ran]
    path = bin_dir + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin")
    run = start_sandboxed(layout, upstream.url, agent, path=path)
    assert await wait_exit(run) == 125
    [line] = run.stderr().splitlines()
    assert line.startswith(
        "credproxy: --sandbox needs unprivileged user namespaces, which are not available here"
    )
    assert "run credproxy as root, or enable them" in line
    assert not os.path.exists(ran)


@pytest_twisted.ensureDeferred
async def test_a_path_to_share_inside_a_hidden_one_is_refused_in_one_line(
    layout: Layout, upstream: Upstream
) -> None:
    ran = layout.path("work", "ran")
    run = start_sandboxed(
        layout,
        upstream.url,
        [sys.executable, AGENT, "wait", ran],
        "--sandbox-ro",
        layout.path("home", ".claude"),
    )
    assert await wait_exit(run) == 125
    [line] = run.stderr().splitlines()
    assert line == (
        f"credproxy: --sandbox-ro {layout.path('home', '.claude')}: inside "
        f"{layout.path('home', '.claude')}, which the sandbox hides"
    )
    assert not os.path.exists(ran)


# -- an ordinary user's sandbox: bubblewrap through a user namespace ------------------------

# The agent of the unprivileged run: one request through the relay with the
# SDK as an agent configures it, and the uid it runs as in the sandbox.
_UID_AGENT = """
import json, os
import anthropic
with anthropic.Anthropic(max_retries=0) as sdk:
    message = sdk.messages.create(
        model="claude-sonnet-4-6", max_tokens=16, messages=[{"role": "user", "content": "Hi"}]
    )
print(json.dumps({"text": message.content[0].text, "uid": os.getuid()}))
"""


@pytest.fixture(scope="module")
def unprivileged() -> Iterator[unprivileged_.Interpreter]:
    directory = unprivileged_.make_directory()
    try:
        found = unprivileged_.find(directory)
        if isinstance(found, str):
            pytest.skip(found)
        yield found
    finally:
        unprivileged_.remove(directory)


@pytest.mark.skipif(os.geteuid() != 0, reason="the other tests are this one when not root")
@pytest_twisted.ensureDeferred
async def test_an_ordinary_users_agent_passes_the_uid_check_from_its_user_namespace(
    unprivileged: unprivileged_.Interpreter, upstream: Upstream
) -> None:
    assert unprivileged.uid is not None
    base = tempfile.mkdtemp(prefix="cpsu-", dir="/tmp")
    try:
        for name in ("work", "run", "state", "home"):
            os.makedirs(os.path.join(base, name))
        for root, dirs, _ in os.walk(base):
            for name in ["", *dirs]:
                os.chown(os.path.join(root, name), unprivileged.uid, unprivileged.uid)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.path.join(base, "home"),
            "XDG_RUNTIME_DIR": os.path.join(base, "run"),
            "XDG_STATE_HOME": os.path.join(base, "state"),
            "ANTHROPIC_API_KEY": REAL_API_KEY,
        }
        argv = [
            unprivileged.credproxy,
            "run",
            "--sandbox",
            "--upstream",
            upstream.url,
            "--store",
            "memory",
            "--",
            unprivileged.python,
            "-c",
            _UID_AGENT,
        ]
        done = await deferToThread(
            unprivileged.run, argv, timeout=60, cwd=os.path.join(base, "work"), env=env
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"text": "ok", "uid": unprivileged.uid}
    assert [r.header("x-api-key") for r in upstream.received] == [REAL_API_KEY]
