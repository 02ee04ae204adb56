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

With C{--sandbox} the command runs in a bubblewrap sandbox with no network
(L{credproxy._sandbox}), where the two sockets are its only way out and a
relay of credproxy's own on the sandbox's loopback stands in for the TCP
endpoint (L{credproxy._sandbox_init}); the statuses, the signals, the
streams and the cleanup are the same.

Only L{main} installs signal handlers and log observers, hardens the
process (L{credproxy._process}) and runs the reactor; L{RunSession} is the
same run for a reactor of your own.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any, Final

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import (
    ProcessExitedAlready,
    ReactorNotRunning,
)
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import (
    Logger,
)
from twisted.python import usage
from twisted.python.failure import Failure

from credproxy import _process
from credproxy._bwrap import find_bwrap, probe_bwrap
from credproxy._command import (
    API_KEY_ENV,
    BASE_URL_ENV,
    EXIT_CANNOT_RUN,
    EXIT_CREDPROXY_FAILED,
    EXIT_NOT_FOUND,
    FORWARDED_SIGNALS,
    HTTP_SOCKET_ENV,
    SANDBOX_FORWARDED_SIGNALS,
    SIGNAL_EXIT_BASE,
    TOKEN_FD,
    CommandNotRunnable,
    exit_status,
    is_open,
    resolve_command,
    start_logging,
)
from credproxy._lifecycle import (
    LOOPBACK_HTTP_ENDPOINT,
    ProxyHandle,
    ProxyLaunchConfig,
    ProxyStartError,
    create_and_start_proxy,
)
from credproxy._listen import ListenError, default_runtime_dir, ensure_private_dir
from credproxy._process import CREDENTIAL_VARIABLES
from credproxy._sandbox import (
    SandboxLayout,
    SandboxRefused,
    SandboxSettings,
    plan_sandbox,
    sandbox_environment,
    sandboxed_argv,
)
from credproxy._sandbox_control import CONTROL_FD, HostControl
from credproxy._secret import Secret
from credproxy.inner._environment import CAPABILITY_TOKEN_FD_ENV, CAPABILITY_TOKEN_FILE_ENV
from credproxy.stores import default_state_dir
from credproxy.tap import Options
from credproxy.wire._spec import SOCKET_ENV_VARIABLES

log = Logger(namespace="credproxy.run")

# Every variable that may hold a real credential an SDK or CLI would use.
# None reaches the command: the proxy injects the credential upstream.
REAL_CREDENTIAL_VARIABLES: Final = CREDENTIAL_VARIABLES
# After a sandbox has ended, how long its init's last line may take to
# arrive (it was written before the command could end).
CONTROL_DRAIN_TIMEOUT: Final = 5.0


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
        "credproxy itself failed, 126 when CMD cannot run, 127 when it is not found). With "
        "--sandbox, CMD runs in a bubblewrap sandbox with no network whose only way out is the "
        "two sockets, at /run/credproxy/cred.sock and /run/credproxy/http.sock, and "
        "ANTHROPIC_BASE_URL points at a relay on the sandbox's own loopback."
    )

    optFlags: list[list[Any]] = [
        ["verbose", None, "Log credproxy's own lines to stderr (by default only errors)."],
        [
            "sandbox",
            None,
            "Run CMD in a bubblewrap sandbox with no network, the host read-only and "
            "credproxy's sockets its only way out (see the sandbox page of the docs).",
        ],
        [
            "sandbox-no-cwd",
            None,
            "With --sandbox: do not make the current directory writable in the sandbox.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["command"] = []
        self["sandbox-rw"] = []
        self["sandbox-ro"] = []
        self["sandbox-hide"] = []
        self["sandbox-env"] = []

    def opt_sandbox_rw(self, path: str) -> None:
        """
        With --sandbox: also make PATH writable in the sandbox (repeatable).
        """
        self["sandbox-rw"].append(path)

    def opt_sandbox_ro(self, path: str) -> None:
        """
        With --sandbox: also make PATH readable in the sandbox, where /tmp and /run are
        private (repeatable).
        """
        self["sandbox-ro"].append(path)

    def opt_sandbox_hide(self, path: str) -> None:
        """
        With --sandbox: also hide PATH in the sandbox (repeatable).
        """
        self["sandbox-hide"].append(path)

    def opt_sandbox_env(self, name: str) -> None:
        """
        With --sandbox: also pass the host's variable NAME into the sandbox (repeatable).
        """
        if not name or "=" in name:
            raise usage.UsageError("--sandbox-env needs a variable name")
        self["sandbox-env"].append(name)

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
        if not self["sandbox"]:
            for name in ("sandbox-rw", "sandbox-ro", "sandbox-hide", "sandbox-env"):
                if self[name]:
                    raise usage.UsageError(f"--{name} needs --sandbox")
            if self["sandbox-no-cwd"]:
                raise usage.UsageError("--sandbox-no-cwd needs --sandbox")
        super().postOptions()

    def launch_config(self) -> ProxyLaunchConfig:
        """
        The parsed options as the launched proxy's configuration: with the
        loopback TCP endpoint that C{ANTHROPIC_BASE_URL} points at, or, for
        a sandbox, which cannot reach the host's loopback, none, and the
        placeholder wanted on the HTTP socket the sandbox's relay leads to.
        """
        if self["sandbox"]:
            return ProxyLaunchConfig.from_service_config(self.config(), placeholder_on_socket=True)
        return ProxyLaunchConfig.from_service_config(
            self.config(), tcp_http_endpoint=LOOPBACK_HTTP_ENDPOINT
        )

    def sandbox_settings(self) -> SandboxSettings | None:
        """
        What C{--sandbox} and its options asked for, or None without it.
        """
        if not self["sandbox"]:
            return None
        return SandboxSettings(
            read_write=tuple(self["sandbox-rw"]),
            read_only=tuple(self["sandbox-ro"]),
            hidden=tuple(self["sandbox-hide"]),
            env_names=tuple(self["sandbox-env"]),
            share_cwd=not self["sandbox-no-cwd"],
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
        sandbox: SandboxSettings | None = None,
        cwd: str | None = None,
        verbose: bool = False,
    ) -> None:
        if not command:
            raise ValueError("a run needs a command")
        if token_fd < 3:
            raise ValueError("the token descriptor must not be a standard stream")
        if sandbox is not None and token_fd != TOKEN_FD:
            raise ValueError(f"in a sandbox the token descriptor is {TOKEN_FD}")
        self._sandbox = sandbox
        self._cwd = cwd if cwd is not None else os.getcwd()
        self._verbose = verbose
        self._control: HostControl | None = None
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

    @property
    def sandboxed(self) -> bool:
        return self._sandbox is not None

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
        if self._control is not None:
            # bubblewrap passes no signal on: the sandbox's init does.
            self._control.send_signal(signum)
        else:
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

    async def _prepare_sandbox(self, settings: SandboxSettings) -> tuple[str, SandboxLayout]:
        """
        Find bubblewrap, check that it can build a sandbox here, and plan this
        one, all before the proxy starts.

        @raise SandboxRefused: with the one line that says why not.
        """
        bwrap = find_bwrap(self._environ.get("PATH"))
        broker = self._config.broker
        state_dir = broker.state_dir or default_state_dir(self._environ)
        runtime_dir = self._config.runtime_dir or default_runtime_dir(self._environ)
        # The state directory is hidden only where it exists: made now, so
        # that a store creating it later does not create it in plain sight.
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        ensure_private_dir(runtime_dir)
        layout = plan_sandbox(
            settings,
            environ=self._environ,
            cwd=self._cwd,
            state_dir=state_dir,
            runtime_dir=runtime_dir,
            config_file=broker.oauth_config,
        )
        await probe_bwrap(self._reactor, bwrap)
        return bwrap, layout

    async def _run_with_proxy(self) -> int:
        sandbox: tuple[str, SandboxLayout] | None = None
        if self._sandbox is not None:
            try:
                sandbox = await self._prepare_sandbox(self._sandbox)
            except (SandboxRefused, ListenError) as e:
                log.error("{reason}", reason=str(e))
                return EXIT_CREDPROXY_FAILED
            except OSError as e:
                log.error("cannot prepare the sandbox: {reason}", reason=e.strerror or str(e))
                return EXIT_CREDPROXY_FAILED
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
            if sandbox is not None:
                return await self._run_sandboxed(handle, *sandbox)
            return await self._run_command(handle)
        finally:
            await handle.stop()

    def _token_pipe(self, handle: ProxyHandle) -> int:
        """
        The read end of a pipe holding the capability token, for the command.
        """
        read_end, write_end = os.pipe()
        try:
            # A few bytes into an empty pipe: written at once, never blocks.
            _write_all(write_end, handle.capability_token.reveal().encode() + b"\n")
        finally:
            os.close(write_end)
        return read_end

    async def _run_sandboxed(self, handle: ProxyHandle, bwrap: str, layout: SandboxLayout) -> int:
        settings = self._sandbox
        assert settings is not None and handle.http_token is not None
        env = sandbox_environment(
            self._environ, extra_names=settings.env_names, http_token=handle.http_token
        )
        limits = self._config.http.limits
        init_args = [
            "--max-connections",
            str(limits.max_connections),
            "--max-connections-per-peer",
            str(limits.max_per_peer),
            *(["--verbose"] if self._verbose else []),
            "--",
            *self._command,
        ]
        argv = sandboxed_argv(
            bwrap,
            layout,
            init_args,
            credential_socket=handle.credential_socket,
            http_socket=handle.http_socket,
        )
        name = self._command[0]
        child_fds: dict[int, int | str] = {fd: fd for fd in (0, 1, 2) if is_open(fd)}
        protocol = _CommandProtocol()
        control = HostControl()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        read_end = self._token_pipe(handle)
        try:
            with ours:
                self._reactor.adoptStreamConnection(
                    ours.fileno(), socket.AF_UNIX, Factory.forProtocol(lambda: control)
                )
            self._control = control
            child_fds[TOKEN_FD] = read_end
            child_fds[CONTROL_FD] = theirs.fileno()
            try:
                self._process = self._reactor.spawnProcess(
                    protocol, argv[0], argv, env=env, path=None, childFDs=child_fds
                )
            except OSError as e:
                log.error("cannot start the sandbox: {reason}", reason=e.strerror or "cannot run")
                return EXIT_CREDPROXY_FAILED
        finally:
            os.close(read_end)
            theirs.close()
        log.info("Started {command} in a sandbox", command=name)
        status = await protocol.ended
        self._ended = True
        started = control.started
        started.addTimeout(CONTROL_DRAIN_TIMEOUT, self._reactor, onTimeoutCancel=lambda *_: None)
        port = await started
        if control.transport is not None:
            control.transport.loseConnection()
        if port is None and status not in (EXIT_CREDPROXY_FAILED, EXIT_CANNOT_RUN, EXIT_NOT_FOUND):
            # bubblewrap failed before the init ran (it said why above).
            log.error(
                "the sandbox did not start: bubblewrap exited with status {status}", status=status
            )
            return EXIT_CREDPROXY_FAILED
        log.info("{command} ended with status {status}", command=name, status=status)
        return status

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
        child_fds: dict[int, int | str] = {fd: fd for fd in (0, 1, 2) if is_open(fd)}
        protocol = _CommandProtocol()
        read_end = self._token_pipe(handle)
        try:
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
    start_logging(bool(options["verbose"]), sys.stderr)
    _process.harden()
    # The proxy reads its credential from this copy, and the command's
    # environment is made from it without the credential; our own
    # environment, which anything else spawned would inherit, loses it now.
    environ = dict(os.environ)
    _process.forget_credential_variables()
    session = RunSession(
        reactor,
        options.launch_config(),
        options["command"],
        environ=environ,
        sandbox=options.sandbox_settings(),
        verbose=bool(options["verbose"]),
    )
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
        forwarded = SANDBOX_FORWARDED_SIGNALS if session.sandboxed else FORWARDED_SIGNALS
        for signum in forwarded:
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
