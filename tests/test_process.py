"""
credproxy's own process (credproxy._process): non-dumpable and core-less,
with one warning line where that is impossible; the credential variables
gone from the environment once the service has read them; and a start
under twistd that fails with one line, also from a daemon.

Whatever acts on a whole process runs in a subprocess of its own, never in
the test process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent
from twisted.python.usage import UsageError
from twisted.scripts._twistd_unix import ServerOptions  # what twistd parses with on Unix

from credproxy import _process
from credproxy.broker.credentials import EnvironmentCredentialSource
from credproxy.cli import STOP_SIGNALS
from credproxy.tap import Options, makeService
from tests.logcapture import captured_log

API_KEY = "sk-ant-api03-process-test-key-0123456789"
ON_LINUX = sys.platform.startswith("linux")


def run_python(script: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# -- non-dumpable, no core ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not ON_LINUX, reason="PR_SET_DUMPABLE is Linux's")
def test_harden_makes_a_fresh_process_non_dumpable_without_core_dumps() -> None:
    result = run_python(
        """
        import ctypes, json, resource
        from credproxy import _process

        def dumpable():  # prctl(PR_GET_DUMPABLE), asked without the code under test
            return ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)

        soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
        if hard != 0:
            resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
        before = [dumpable(), resource.getrlimit(resource.RLIMIT_CORE)]
        problems = _process.harden()
        after = [dumpable(), resource.getrlimit(resource.RLIMIT_CORE), _process.is_dumpable()]
        print(json.dumps([before, problems, after, hard]))
        """
    )
    assert result.returncode == 0, result.stderr
    before, problems, after, hard = json.loads(result.stdout)
    assert before[0] == 1  # a fresh process is dumpable: the change below is harden's
    assert problems == []
    assert after[0] == 0
    assert after[1] == [0, hard]  # the soft limit only: a run's command may raise its own
    assert after[2] is False
    if hard != 0:
        assert before[1] == [hard, hard]


def test_a_failing_prctl_is_one_warning_line_and_not_fatal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refused(option: int, argument: int = 0) -> int:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(_process, "_prctl", refused)
    monkeypatch.setattr(sys, "platform", "linux")
    # The core limit is the test process's own: leave it.
    monkeypatch.setattr(_process, "disable_core_dumps", lambda: None)
    with captured_log() as events:
        problems = _process.harden()
    assert problems == ["prctl(PR_SET_DUMPABLE) failed: Operation not permitted"]
    warnings = [e for e in events if e.get("log_namespace") == "credproxy.process"]
    assert len(warnings) == 1
    text = formatEvent(warnings[0])
    assert "\n" not in text
    assert "credproxy stays dumpable (prctl(PR_SET_DUMPABLE) failed" in text


def test_not_on_linux_there_is_no_flag_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(option: int, argument: int = 0) -> int:
        raise AssertionError("prctl is Linux's")

    monkeypatch.setattr(_process, "_prctl", never)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert _process.make_non_dumpable() == "not on Linux (darwin), so there is no PR_SET_DUMPABLE"
    assert _process.is_dumpable() is None


# -- the credential variables ---------------------------------------------------------------


def test_forgetting_the_variables_removes_exactly_the_credentials() -> None:
    environ = {
        "ANTHROPIC_API_KEY": API_KEY,
        "ANTHROPIC_AUTH_TOKEN": "bearer",
        "PATH": "/usr/bin",
        "ANTHROPIC_BASE_URL": "http://localhost",
    }
    assert _process.forget_credential_variables(environ) == [
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_AUTH_TOKEN",
    ]
    assert environ == {"PATH": "/usr/bin", "ANTHROPIC_BASE_URL": "http://localhost"}
    assert _process.forget_credential_variables(environ) == []


def test_the_credential_source_keeps_what_it_read_before_the_variables_went() -> None:
    environ = {"ANTHROPIC_API_KEY": API_KEY}
    source = EnvironmentCredentialSource(environ)
    _process.forget_credential_variables(environ)
    assert environ == {}
    credential = source.credential
    assert credential is not None and credential.secret.reveal() == API_KEY


@pytest.fixture
def untouched_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """
    makeService and startService under twistd act on the whole process:
    here they record what they would do to it instead.
    """
    done: list[str] = []

    def harden() -> list[str]:
        done.append("harden")
        return []

    def make_non_dumpable() -> None:
        done.append("flag")

    monkeypatch.setattr(_process, "harden", harden)
    monkeypatch.setattr(_process, "make_non_dumpable", make_non_dumpable)
    yield done


def twistd_options(*argv: str) -> Options:
    """
    credproxy's options as twistd parses them: its own options are their parent.
    """
    config = ServerOptions()
    config.parseOptions(list(argv))
    options = config.subOptions
    assert isinstance(options, Options) and options.parent is config
    return options


def test_make_service_under_twistd_forgets_the_variables_once_it_has_read_them(
    monkeypatch: pytest.MonkeyPatch, socket_dir: str, untouched_process: list[str]
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", API_KEY)
    monkeypatch.setenv("CLAUDE_CODE_OAUTH_TOKEN", "oauth-token")
    monkeypatch.setenv("ANTHROPIC_AUTH_TOKEN", "auth-token")
    options = twistd_options(
        "-n", "--pidfile=", "credproxy", "--store", "memory", "--http", f"unix:{socket_dir}/h.sock"
    )
    service = makeService(options, reactor=MemoryReactorClock())
    assert untouched_process == ["harden"]
    for name in _process.CREDENTIAL_VARIABLES:
        assert name not in os.environ
    credential = service.credentials.current_credential()  # type: ignore[attr-defined]
    found: list[object] = []
    credential.addCallback(found.append)
    assert found and found[0].secret.reveal() == API_KEY  # type: ignore[attr-defined]


def test_make_service_not_under_twistd_leaves_the_process_alone(
    monkeypatch: pytest.MonkeyPatch, socket_dir: str, untouched_process: list[str]
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", API_KEY)
    options = Options()
    options.parseOptions(["--store", "memory", "--http", f"unix:{socket_dir}/h.sock"])
    makeService(options, reactor=MemoryReactorClock())
    assert untouched_process == []
    assert os.environ["ANTHROPIC_API_KEY"] == API_KEY


# -- starting under twistd ------------------------------------------------------------------


def test_a_bad_option_under_twistd_is_one_line_not_the_usage(tmp_path: object) -> None:
    missing = os.path.join(str(tmp_path), "missing")
    with pytest.raises(SystemExit) as stopped:
        twistd_options("credproxy", "--capability-token-file", missing)
    assert str(stopped.value) == (
        "credproxy: cannot read --capability-token-file: No such file or directory (see --help)"
    )
    # Anywhere else (credproxy serve, credproxy run, tests) it stays a UsageError.
    with pytest.raises(UsageError):
        Options().parseOptions(["--capability-token-file", missing])


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


@pytest.mark.parametrize(("written", "kept"), [("self", False), ("other", True)])
def test_a_failed_start_under_twistd_removes_its_own_pidfile(
    socket_dir: str, live_socket: str, untouched_process: list[str], written: str, kept: bool
) -> None:
    pidfile = os.path.join(socket_dir, "twistd.pid")
    with open(pidfile, "w") as f:
        f.write(str(os.getpid() if written == "self" else os.getpid() + 1))
    options = twistd_options(
        "-n",
        f"--pidfile={pidfile}",
        "credproxy",
        "--store",
        "memory",
        "--http",
        f"unix:address={live_socket}",
    )
    service = makeService(options, reactor=MemoryReactorClock())
    with pytest.raises(SystemExit) as stopped:
        service.startService()
    assert str(stopped.value) == f"credproxy: another process is serving {live_socket}"
    assert untouched_process == ["harden", "flag"]  # the flag again, after twistd's --uid
    assert os.path.exists(pidfile) is kept


Handler = Callable[[int, FrameType | None], Any] | int | None  # what signal.getsignal answers


class SignalRecordingReactor(MemoryReactorClock):
    """
    A memory reactor with the stop-signal methods of Twisted's own reactors,
    recording each signal they are given.
    """

    def __init__(self) -> None:
        super().__init__()
        self.signals: list[tuple[str, int]] = []
        self.from_threads: list[Callable[[], object]] = []

    def sigInt(self, number: int, frame: object = None) -> None:
        self.signals.append(("sigInt", number))

    def sigTerm(self, number: int, frame: object = None) -> None:
        self.signals.append(("sigTerm", number))

    def callFromThread(self, f: Callable[..., object], *args: object) -> None:
        self.from_threads.append(lambda: f(*args))


@pytest.fixture
def stop_handlers() -> Iterator[dict[int, Handler]]:
    """
    The SIGINT, SIGTERM and SIGHUP handlers before the test, put back after it.
    """
    before: dict[int, Handler] = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        yield before
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def test_a_stop_signal_before_the_reactor_runs_is_not_lost(
    socket_dir: str, untouched_process: list[str], stop_handlers: dict[int, Handler]
) -> None:
    """
    twistd starts the service before the reactor runs and installs its
    handlers: a Ctrl-C in between must still stop it, by way of the
    reactor's own handling, not raise KeyboardInterrupt into the start.
    """
    reactor = SignalRecordingReactor()
    options = twistd_options(
        "-n", "--pidfile=", "credproxy", "--store", "memory", "--http", f"unix:{socket_dir}/h.sock"
    )
    service = makeService(options, reactor=reactor)
    service.startService()
    signal.raise_signal(signal.SIGINT)  # a real signal: no KeyboardInterrupt
    signal.raise_signal(signal.SIGTERM)
    assert reactor.signals == [("sigInt", signal.SIGINT), ("sigTerm", signal.SIGTERM)]
    signal.raise_signal(signal.SIGHUP)
    assert reactor.signals == [("sigInt", signal.SIGINT), ("sigTerm", signal.SIGTERM)]
    (stop,) = reactor.from_threads  # SIGHUP: a stop, once the reactor runs
    reactor.running = True
    stop()
    assert reactor.hasStopped

    # A handler the reactor installed in the meantime is the reactor's to keep.
    def reactors(signum: int, frame: object) -> None: ...

    signal.signal(signal.SIGTERM, reactors)
    stopped = service.stopService()
    assert stopped.called
    assert signal.getsignal(signal.SIGINT) == stop_handlers[signal.SIGINT]
    assert signal.getsignal(signal.SIGHUP) == stop_handlers[signal.SIGHUP]
    assert signal.getsignal(signal.SIGTERM) is reactors


def test_not_under_twistd_the_stop_signals_are_left_to_the_caller(
    socket_dir: str, untouched_process: list[str], stop_handlers: dict[int, Handler]
) -> None:
    """
    credproxy serve installs its own handlers before it runs the reactor,
    so startService leaves SIGINT and SIGTERM alone (SIGHUP it still takes).
    """
    options = Options()
    options.parseOptions(["--store", "memory", "--http", f"unix:{socket_dir}/h.sock"])
    service = makeService(options, reactor=SignalRecordingReactor())
    service.startService()
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            assert signal.getsignal(signum) == stop_handlers[signum]
        assert signal.getsignal(signal.SIGHUP) != stop_handlers[signal.SIGHUP]
    finally:
        service.stopService()
    assert signal.getsignal(signal.SIGHUP) == stop_handlers[signal.SIGHUP]


def test_a_failed_start_puts_the_stop_handlers_back(
    socket_dir: str,
    live_socket: str,
    untouched_process: list[str],
    stop_handlers: dict[int, Handler],
) -> None:
    options = twistd_options(
        "-n",
        "--pidfile=",
        "credproxy",
        "--store",
        "memory",
        "--http",
        f"unix:address={live_socket}",
    )
    service = makeService(options, reactor=SignalRecordingReactor())
    with pytest.raises(SystemExit):
        service.startService()
    assert {signum: signal.getsignal(signum) for signum in STOP_SIGNALS} == stop_handlers


def relay_run(child: str, first: str = "time.sleep(20)") -> tuple[int, str, float]:
    """
    A first process with a relay, and a forked "daemon" that runs C{child};
    the first process then runs C{first}, by default waiting, as twistd's
    does, for longer than any test.
    """
    started = time.monotonic()
    result = run_python(
        f"""
        import os, sys, time
        from credproxy._process import _StartRelay

        relay = _StartRelay(grace=0.2)
        pid = os.fork()
        if pid == 0:
            {child}
            os._exit(3)
        {first}
        """
    )
    return result.returncode, result.stderr, time.monotonic() - started


@pytest.mark.slow
def test_the_relay_brings_the_daemons_line_to_the_first_process() -> None:
    code, stderr, elapsed = relay_run('relay.report("credproxy: cannot listen on x: busy")')
    assert (code, stderr) == (1, "credproxy: cannot listen on x: busy\n")
    assert elapsed < 10


@pytest.mark.slow
def test_the_relay_stays_quiet_when_the_daemon_has_nothing_to_say() -> None:
    # The first process outlives the grace, then ends by itself, as twistd's does on "0".
    code, stderr, _ = relay_run("relay.report(None)", "os.waitpid(pid, 0); time.sleep(1)")
    assert (code, stderr) == (0, "")


@pytest.mark.slow
def test_the_relay_notices_a_daemon_that_ends_without_a_word() -> None:
    code, stderr, elapsed = relay_run("pass")
    assert code == 1
    assert stderr == "credproxy: the daemon ended while it started; see the twistd log\n"
    assert elapsed < 10


def _in_a_child(code: str) -> dict[str, object]:
    """
    Run C{code} in a fresh interpreter (resource limits are process-wide)
    and return the JSON object it prints.
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    answer: dict[str, object] = json.loads(result.stdout)
    return answer


def test_the_open_file_limit_is_raised_to_what_the_caps_need() -> None:
    seen = _in_a_child(
        """
        import json, resource
        from credproxy import _process
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        problem = _process.raise_open_file_limit(600)
        soft, after = resource.getrlimit(resource.RLIMIT_NOFILE)
        print(json.dumps({"problem": problem, "soft": soft, "hard_kept": after == hard}))
        """
    )
    assert seen == {"problem": None, "soft": 600, "hard_kept": True}


def test_a_limit_that_cannot_be_raised_enough_is_one_clear_line() -> None:
    seen = _in_a_child(
        """
        import json, resource
        from credproxy import _process
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, 300))
        problem = _process.raise_open_file_limit(2000)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        print(json.dumps({"problem": problem, "soft": soft}))
        """
    )
    assert seen["soft"] == 300
    assert "open-file limit (300) is below the 2000 descriptors" in str(seen["problem"])
    assert "--max-connections" in str(seen["problem"])


def test_a_higher_limit_is_never_lowered() -> None:
    seen = _in_a_child(
        """
        import json, resource
        from credproxy import _process
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
        problem = _process.raise_open_file_limit(600)
        print(json.dumps({"problem": problem, "soft": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                          "expected": min(hard, 4096)}))
        """
    )
    assert seen["problem"] is None and seen["soft"] == seen["expected"]


def test_the_service_asks_for_descriptors_for_every_cap() -> None:
    from credproxy import CredproxyConfig, CredproxyService

    both = CredproxyService(
        MemoryReactorClock(),
        CredproxyConfig(
            http_endpoints=("unix:address=/x/h",), rpc_endpoints=("unix:address=/x/r",)
        ),
        environ={},
    )
    # 1024 HTTP connections, 512 upstream, 1024 credential socket, 32 handshaking,
    # 64 lingering refusals per face, and the reserve.
    assert (
        both.descriptors_needed() == 1024 + 512 + 1024 + 32 + 2 * 64 + _process.DESCRIPTOR_RESERVE
    )
    http_only = CredproxyService(
        MemoryReactorClock(), CredproxyConfig(http_endpoints=("unix:address=/x/h",)), environ={}
    )
    assert http_only.descriptors_needed() == 1024 + 512 + 64 + _process.DESCRIPTOR_RESERVE
