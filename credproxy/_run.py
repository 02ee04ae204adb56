"""
C{credproxy run [options] [--] CMD [ARGS...]}: run one command as a sandbox
of its own proxy.

The proxy starts on fresh sockets with fresh tokens before the command
does, and stops (its socket files gone) after the command ends, however it
ends. The command gets the proxy's addresses and a placeholder key in its
environment, never a real credential; the credential socket's token reaches
it through an inherited descriptor, read once, so it is in no environment a
grandchild could inherit. Its standard input, output and error are
credproxy's own, untouched; INT, TERM and HUP sent to credproxy are passed
on to it, and credproxy exits with its status.

Only L{main} installs signal handlers and log observers, hardens the
process (L{credproxy._process}) and runs the reactor; L{RunSession} is the
same run for a reactor of your own.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import sys
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any, Final, TextIO

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import (
    ProcessDone,
    ProcessExitedAlready,
    ProcessTerminated,
    ReactorNotRunning,
)
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    LogEvent,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    eventAsText,
    globalLogBeginner,
)
from twisted.python import usage
from twisted.python.failure import Failure

from credproxy import _process
from credproxy._lifecycle import (
    LOOPBACK_HTTP_ENDPOINT,
    ProxyHandle,
    ProxyLaunchConfig,
    ProxyStartError,
    create_and_start_proxy,
)
from credproxy._process import CREDENTIAL_VARIABLES
from credproxy._secret import Secret
from credproxy.inner._environment import CAPABILITY_TOKEN_FD_ENV, CAPABILITY_TOKEN_FILE_ENV
from credproxy.tap import Options
from credproxy.wire._spec import SOCKET_ENV_VARIABLES

log = Logger(namespace="credproxy.run")

HTTP_SOCKET_ENV: Final = "CREDPROXY_HTTP_SOCKET"
BASE_URL_ENV: Final = "ANTHROPIC_BASE_URL"
API_KEY_ENV: Final = "ANTHROPIC_API_KEY"
# Every variable that may hold a real credential an SDK or CLI would use.
# None reaches the command: the proxy injects the credential upstream.
REAL_CREDENTIAL_VARIABLES: Final = CREDENTIAL_VARIABLES
# The descriptor number the capability token is readable from in the
# command: the first one after the standard three.
TOKEN_FD: Final = 3
# Signals passed on to the command; the command decides when the run ends.
FORWARDED_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# Exit statuses of credproxy's own failures, as env(1) and timeout(1) use
# them, so they stand apart from the command's own small statuses.
EXIT_CREDPROXY_FAILED: Final = 125  # bad options, or the proxy could not start
EXIT_CANNOT_RUN: Final = 126  # found, but not executable
EXIT_NOT_FOUND: Final = 127
SIGNAL_EXIT_BASE: Final = 128  # a command killed by signal N: 128 + N


class RunOptions(Options):
    """
    The service options of C{twistd credproxy}, except those naming where
    to listen and which token to want (a run makes fresh ones), plus
    C{--verbose} and the command.
    """

    synopsis = "Usage: credproxy run [options] [--] CMD [ARGS...]"
    longdesc = (
        "Start credproxy on fresh private sockets, run CMD with the proxy's addresses in its "
        "environment (CREDPROXY_SOCKET, LLXPRT_CREDENTIAL_SOCKET, CREDPROXY_HTTP_SOCKET, "
        "ANTHROPIC_BASE_URL with a placeholder ANTHROPIC_API_KEY) and the credential socket's "
        "capability token readable once from the descriptor CREDPROXY_CAPABILITY_TOKEN_FD, and "
        "stop the proxy when CMD ends. CMD gets no real credential. INT, TERM and HUP are passed "
        "on to CMD; the exit status is CMD's (128 + N when signal N killed it; 125 when "
        "credproxy itself failed, 126 when CMD cannot run, 127 when it is not found)."
    )

    optFlags: list[list[Any]] = [
        ["verbose", None, "Log credproxy's own lines to stderr (by default only errors)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["command"] = []

    def opt_http(self, endpoint: str) -> None:
        """
        Not an option of run: it serves the HTTP face on a fresh socket and port.
        """
        raise usage.UsageError("--http is not an option of run: it makes its own sockets")

    def opt_rpc(self, endpoint: str) -> None:
        """
        Not an option of run: it serves the credential socket on a fresh socket.
        """
        raise usage.UsageError("--rpc is not an option of run: it makes its own sockets")

    def opt_capability_token_file(self, path: str) -> None:
        """
        Not an option of run: it makes fresh capability tokens.
        """
        raise usage.UsageError(
            "--capability-token-file is not an option of run: it makes fresh tokens"
        )

    def parseArgs(self, *command: str) -> None:
        self["command"] = list(command)

    def postOptions(self) -> None:
        if not self["command"]:
            raise usage.UsageError("give the command to run: credproxy run [options] -- CMD")
        super().postOptions()

    def launch_config(self) -> ProxyLaunchConfig:
        """
        The parsed options as the launched proxy's configuration, with the
        loopback TCP endpoint that C{ANTHROPIC_BASE_URL} points at.
        """
        return ProxyLaunchConfig.from_service_config(
            self.config(), tcp_http_endpoint=LOOPBACK_HTTP_ENDPOINT
        )


def child_environment(
    environ: Mapping[str, str],
    *,
    credential_socket: str,
    http_socket: str,
    http_url: str | None,
    http_token: Secret | None,
    token_fd: int,
) -> dict[str, str]:
    """
    The command's environment: ours without any real credential or token
    pointer of our own, plus where the proxy listens, the descriptor the
    capability token is on, and, with a TCP endpoint, the base URL and its
    token as the placeholder key. The capability token itself is never in it.
    """
    env = {
        name: value
        for name, value in environ.items()
        if name not in REAL_CREDENTIAL_VARIABLES
        and name not in (CAPABILITY_TOKEN_FILE_ENV, CAPABILITY_TOKEN_FD_ENV, BASE_URL_ENV)
    }
    for name in SOCKET_ENV_VARIABLES:
        env[name] = credential_socket
    env[HTTP_SOCKET_ENV] = http_socket
    env[CAPABILITY_TOKEN_FD_ENV] = str(token_fd)
    if http_url is not None and http_token is not None:
        env[BASE_URL_ENV] = http_url
        env[API_KEY_ENV] = http_token.reveal()
    return env


class CommandNotRunnable(Exception):
    """
    The command cannot be started; C{status} is the exit status that says so.
    """

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def resolve_command(name: str, search_path: str | None) -> str:
    """
    The executable C{name} runs, found the way a shell finds it. Resolved
    before spawning because a failed exec in the child would only show up
    as a traceback on the command's stderr and a status of 1.

    @raise CommandNotRunnable: not found (127), or not executable (126).
    """
    if not name:
        raise CommandNotRunnable("the command name is empty", EXIT_NOT_FOUND)
    if "/" in name:
        if not os.path.exists(name):
            raise CommandNotRunnable(f"{name}: no such file", EXIT_NOT_FOUND)
        if os.path.isdir(name):
            raise CommandNotRunnable(f"{name}: is a directory", EXIT_CANNOT_RUN)
        if not os.access(name, os.X_OK):
            raise CommandNotRunnable(f"{name}: permission denied", EXIT_CANNOT_RUN)
        return name
    found = shutil.which(name, path=search_path if search_path is not None else os.defpath)
    if found is None:
        raise CommandNotRunnable(f"{name}: command not found", EXIT_NOT_FOUND)
    return found


def exit_status(reason: Failure) -> int:
    """
    A shell's status for how the command ended: its exit code, or 128 + N
    when signal N killed it.
    """
    value = reason.value
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            return SIGNAL_EXIT_BASE + int(value.signal)
        if value.exitCode is not None:
            return int(value.exitCode)
    if isinstance(value, ProcessDone):
        return 0
    return EXIT_CREDPROXY_FAILED


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _write_all(fd: int, data: bytes) -> None:
    while data:
        written = os.write(fd, data)
        data = data[written:]


class _CommandProtocol(ProcessProtocol):
    """
    The command's end: no pipes to us (its standard streams are ours), only
    the news that it ended.
    """

    def __init__(self) -> None:
        self.ended: Deferred[int] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(exit_status(reason))


class RunSession:
    """
    One run: start the proxy, run the command, stop the proxy, and report
    the command's status. Installs no signal handlers: whoever receives
    signals calls L{forward_signal}.
    """

    def __init__(
        self,
        reactor: Any,
        config: ProxyLaunchConfig,
        command: Sequence[str],
        *,
        environ: Mapping[str, str] = os.environ,
        token_fd: int = TOKEN_FD,
    ) -> None:
        if not command:
            raise ValueError("a run needs a command")
        if token_fd < 3:
            raise ValueError("the token descriptor must not be a standard stream")
        self._reactor = reactor
        self._config = config
        self._command = list(command)
        self._environ = environ
        self._token_fd = token_fd
        self.handle: ProxyHandle | None = None
        self._process: IProcessTransport | None = None
        self._ended = False
        self._signalled: int | None = None  # received before the command started
        self._finished = False
        self._waiting: list[Deferred[None]] = []

    def run(self) -> Deferred[int]:
        """
        Fires with the exit status once the command has ended and the proxy
        has stopped.
        """
        return Deferred.fromCoroutine(self._run())

    def forward_signal(self, signum: int) -> None:
        """
        Pass a signal on to the command. One that arrives before the command
        started means it is not started at all.
        """
        if self._process is None:
            if self._signalled is None:
                self._signalled = signum
            return
        if self._ended:
            return
        try:
            self._process.signalProcess(signum)
        except ProcessExitedAlready:
            return
        log.info(
            "Passed signal {signal} on to {command}",
            signal=signal.Signals(signum).name,
            command=self._command[0],
        )

    def shutdown(self) -> Deferred[None]:
        """
        For a reactor stop that did not come from the run ending: ask the
        command to end (it owns the proxy's lifetime) and fire once the run
        has cleaned up.
        """
        if self._finished:
            return succeed(None)
        self.forward_signal(signal.SIGTERM)
        waiter: Deferred[None] = Deferred()
        self._waiting.append(waiter)
        return waiter

    async def _run(self) -> int:
        try:
            return await self._run_with_proxy()
        finally:
            self._finished = True
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    async def _run_with_proxy(self) -> int:
        try:
            handle = await create_and_start_proxy(
                self._reactor, self._config, environ=self._environ
            )
        except ProxyStartError as e:
            log.error("cannot start the proxy: {reason}", reason=str(e))
            return EXIT_CREDPROXY_FAILED
        self.handle = handle
        try:
            if self._signalled is not None:
                return SIGNAL_EXIT_BASE + self._signalled
            return await self._run_command(handle)
        finally:
            await handle.stop()

    async def _run_command(self, handle: ProxyHandle) -> int:
        env = child_environment(
            self._environ,
            credential_socket=handle.credential_socket,
            http_socket=handle.http_socket,
            http_url=handle.http_url,
            http_token=handle.http_token,
            token_fd=self._token_fd,
        )
        name = self._command[0]
        try:
            executable = resolve_command(name, env.get("PATH"))
        except CommandNotRunnable as e:
            log.error("{reason}", reason=str(e))
            return e.status
        # Standard streams pass through as they are; one that is closed here
        # stays closed there.
        child_fds: dict[int, int | str] = {fd: fd for fd in (0, 1, 2) if _is_open(fd)}
        protocol = _CommandProtocol()
        read_end, write_end = os.pipe()
        try:
            try:
                # A few bytes into an empty pipe: written at once, never blocks.
                _write_all(write_end, handle.capability_token.reveal().encode() + b"\n")
            finally:
                os.close(write_end)
            child_fds[self._token_fd] = read_end
            try:
                self._process = self._reactor.spawnProcess(
                    protocol, executable, self._command, env=env, path=None, childFDs=child_fds
                )
            except OSError as e:
                status = EXIT_NOT_FOUND if e.errno == errno.ENOENT else EXIT_CANNOT_RUN
                log.error("{name}: {reason}", name=name, reason=e.strerror or "cannot run")
                return status
        finally:
            os.close(read_end)
        log.info("Started {command} (pid {pid})", command=name, pid=self._process.pid)
        status = await protocol.ended
        self._ended = True
        log.info("{command} ended with status {status}", command=name, status=status)
        return status


def _format_event(event: LogEvent) -> str | None:
    text = eventAsText(event, includeTraceback=True, includeTimestamp=False, includeSystem=False)
    return f"credproxy: {text}\n"


def _start_logging(verbose: bool, stream: TextIO) -> None:
    level = LogLevel.info if verbose else LogLevel.error
    observer = FilteringLogObserver(
        FileLogObserver(stream, _format_event),
        [LogLevelFilterPredicate(defaultLogLevel=level)],
    )
    # stdout and stderr are the command's too: never redirect them into the log.
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def _stop_reactor(reactor: Any) -> None:
    with contextlib.suppress(ReactorNotRunning):
        reactor.stop()


def main(argv: list[str], *, reactor: Any = None) -> int:
    """
    C{credproxy run ARGS...} (C{argv} without the word C{run}): returns the
    exit status. Runs the reactor (the global one by default) until the
    command has ended and the proxy has stopped.
    """
    options = RunOptions()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        sys.stderr.write(f"credproxy run: {e}\n(credproxy run --help shows the options)\n")
        return EXIT_CREDPROXY_FAILED
    except SystemExit as e:  # --help and --version print and exit
        return e.code if isinstance(e.code, int) else 0
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    _start_logging(bool(options["verbose"]), sys.stderr)
    _process.harden()
    # The proxy reads its credential from this copy, and the command's
    # environment is made from it without the credential; our own
    # environment, which anything else spawned would inherit, loses it now.
    environ = dict(os.environ)
    _process.forget_credential_variables()
    session = RunSession(reactor, options.launch_config(), options["command"], environ=environ)
    outcome: list[int] = []
    previous: dict[int, Any] = {}

    def forward(signum: int, frame: FrameType | None) -> None:
        reactor.callFromThread(session.forward_signal, signum)

    def finished(status: int) -> None:
        outcome.append(status)
        _stop_reactor(reactor)

    def failed(failure: Failure) -> None:
        log.failure("credproxy run failed", failure)
        finished(EXIT_CREDPROXY_FAILED)

    def start() -> None:
        # After the reactor's own handlers (which would stop it on INT and
        # TERM): the command, not the signal, ends the run. The reactor
        # keeps its SIGCHLD handling, which tells us the command ended.
        for signum in FORWARDED_SIGNALS:
            previous[signum] = signal.signal(signum, forward)
        session.run().addCallbacks(finished, failed)

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", session.shutdown)
    try:
        reactor.run()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
    return outcome[0] if outcome else EXIT_CREDPROXY_FAILED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
