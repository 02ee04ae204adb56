"""
C{python -m credproxy._sandbox_init [options] -- CMD [ARGS...]}: what
C{credproxy run --sandbox} runs inside bubblewrap, before and around the
command.

It serves the TCP relay (L{credproxy._relay}) on a free port of the
sandbox's own loopback, runs the command with C{ANTHROPIC_BASE_URL}
pointing at it, passes on the signals credproxy sends over the control
channel (L{credproxy._sandbox_control}), and exits with the command's
status (128 + N when signal N killed it), so that bubblewrap, and so
credproxy, exit with it too. The command's standard streams and the
capability token's descriptor are passed through untouched; the init never
reads the token.

It is the sandbox's process, not the host's: it holds no secret, and the
agent may kill it, which only ends the run.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from types import FrameType
from typing import Any, Final

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from credproxy._command import (
    BASE_URL_ENV,
    EXIT_CREDPROXY_FAILED,
    FORWARDED_SIGNALS,
    TOKEN_FD,
    CommandNotRunnable,
    exit_status,
    is_open,
    resolve_command,
    start_logging,
)
from credproxy._limits import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_PEER,
    ConnectionLimits,
)
from credproxy._relay import RelayFactory
from credproxy._sandbox_control import CONTROL_FD, InitControl
from credproxy._transports import lean_reactor

log = Logger(namespace="credproxy.sandbox")

# Where credproxy bind-mounts its two sockets inside the sandbox.
SANDBOX_SOCKET_DIR: Final = "/run/credproxy"
SANDBOX_CREDENTIAL_SOCKET: Final = SANDBOX_SOCKET_DIR + "/cred.sock"
SANDBOX_HTTP_SOCKET: Final = SANDBOX_SOCKET_DIR + "/http.sock"
RELAY_INTERFACE: Final = "127.0.0.1"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="credproxy-sandbox-init", add_help=False)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS)
    parser.add_argument(
        "--max-connections-per-peer", type=int, default=DEFAULT_MAX_CONNECTIONS_PER_PEER
    )
    parser.add_argument("command", nargs=argparse.REMAINDER)
    return parser


class _CommandEnded(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[int] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(exit_status(reason))


class SandboxInit:
    """
    The relay and the command, for one reactor.
    """

    def __init__(
        self,
        reactor: Any,
        command: list[str],
        limits: ConnectionLimits,
        *,
        environ: dict[str, str],
        http_socket: str = SANDBOX_HTTP_SOCKET,
    ) -> None:
        self._reactor = reactor
        self._command = command
        self._limits = limits
        self._environ = environ
        self._http_socket = http_socket
        self._process: IProcessTransport | None = None
        self._pending: list[int] = []  # signals that came before the command started
        self._ended = False

    def forward_signal(self, signum: int) -> None:
        if self._process is None:
            self._pending.append(signum)
            return
        if self._ended:
            return
        try:
            self._process.signalProcess(signum)
        except ProcessExitedAlready:
            return

    async def run(self, control: InitControl | None) -> int:
        # The relay's connections are the lean ones the faces use (they send
        # at once when nothing is queued, and pause reading lazily).
        reactor = lean_reactor(self._reactor)
        relay = RelayFactory(reactor, self._http_socket, self._limits)
        port = reactor.listenTCP(0, relay, interface=RELAY_INTERFACE)
        try:
            return await self._run_command(port.getHost().port, control)
        finally:
            await port.stopListening()

    async def _run_command(self, relay_port: int, control: InitControl | None) -> int:
        env = dict(self._environ)
        env[BASE_URL_ENV] = f"http://{RELAY_INTERFACE}:{relay_port}"
        name = self._command[0]
        try:
            executable = resolve_command(name, env.get("PATH"))
        except CommandNotRunnable as e:
            log.error("{reason}", reason=str(e))
            return e.status
        child_fds: dict[int, int | str] = {fd: fd for fd in (0, 1, 2, TOKEN_FD) if is_open(fd)}
        protocol = _CommandEnded()
        self._process = self._reactor.spawnProcess(
            protocol, executable, self._command, env=env, path=None, childFDs=child_fds
        )
        if TOKEN_FD in child_fds:
            os.close(TOKEN_FD)  # the command's now; never read here
        if control is not None:
            control.say_started(relay_port)
        log.info(
            "Started {command} in the sandbox, relay on port {port}", command=name, port=relay_port
        )
        pending, self._pending = self._pending, []
        for signum in pending:
            self.forward_signal(signum)
        status = await protocol.ended
        self._ended = True
        return status


def _adopt_control(reactor: Any, on_signal: Any) -> InitControl | None:
    if not is_open(CONTROL_FD):
        return None
    control = InitControl(on_signal)
    factory = Factory.forProtocol(lambda: control)
    reactor.adoptStreamConnection(CONTROL_FD, socket.AF_UNIX, factory)
    os.close(CONTROL_FD)  # the reactor holds its own copy
    return control


def main(argv: list[str], *, reactor: Any = None) -> int:
    """
    Run the relay and the command; return the command's status.
    """
    args = _parser().parse_args(argv)
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    start_logging(bool(args.verbose), sys.stderr)
    if not command:
        log.error("the sandbox's init needs a command")
        return EXIT_CREDPROXY_FAILED
    try:
        limits = ConnectionLimits(args.max_connections, args.max_connections_per_peer)
    except ValueError as e:
        log.error("{reason}", reason=str(e))
        return EXIT_CREDPROXY_FAILED
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    init = SandboxInit(reactor, command, limits, environ=dict(os.environ))
    outcome: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        reactor.callFromThread(init.forward_signal, signum)

    def finished(status: int) -> None:
        outcome.append(status)
        reactor.stop()

    def failed(failure: Failure) -> None:
        log.failure("the sandbox's init failed", failure)
        finished(EXIT_CREDPROXY_FAILED)

    def start() -> None:
        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, forward)
        control = _adopt_control(reactor, init.forward_signal)
        Deferred.fromCoroutine(init.run(control)).addCallbacks(finished, failed)

    reactor.callWhenRunning(start)
    reactor.run()
    return outcome[0] if outcome else EXIT_CREDPROXY_FAILED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
