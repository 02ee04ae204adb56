"""
The control channel between C{credproxy run --sandbox} and the init it
starts inside the sandbox: a Unix socket pair, one end each, one short line
per message.

Why a channel and not a pid: bubblewrap passes no signal on, and the
command's pid inside a PID namespace means nothing outside it. So credproxy
asks the init to pass each signal on (C{signal N}), and the init says when
the command has started and which loopback port its relay serves
(C{started PORT}). Nothing secret ever crosses it.

The init runs next to the agent, which may take it over: credproxy reads
what comes from it as untrusted input (short lines, a few of them, the
known words only).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

from twisted.internet.defer import Deferred
from twisted.internet.protocol import connectionDone
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from credproxy._command import SANDBOX_FORWARDED_SIGNALS

# The init's end of the pair, in the init: the first descriptor after the
# capability token's (3).
CONTROL_FD: Final = 4
MAX_CONTROL_LINE: Final = 64
# Lines credproxy reads from the init over a whole run: it sends one.
MAX_INIT_LINES: Final = 4
_STARTED: Final = re.compile(rb"\Astarted ([0-9]{1,5})\Z")
_SIGNAL: Final = re.compile(rb"\Asignal ([0-9]{1,3})\Z")


def started_line(port: int) -> bytes:
    return b"started %d" % (port,)


def signal_line(signum: int) -> bytes:
    return b"signal %d" % (signum,)


def parse_started(line: bytes) -> int | None:
    """
    The relay's port from a C{started PORT} line, or None for anything else.
    """
    match = _STARTED.match(line)
    if match is None:
        return None
    port = int(match.group(1))
    return port if 0 < port < 65536 else None


def parse_signal(line: bytes) -> int | None:
    """
    The signal of a C{signal N} line when it is one that is passed on, else None.
    """
    match = _SIGNAL.match(line)
    if match is None:
        return None
    signum = int(match.group(1))
    return signum if signum in SANDBOX_FORWARDED_SIGNALS else None


class HostControl(LineOnlyReceiver):
    """
    credproxy's end: C{started} fires with the relay's port when the
    command has started in the sandbox, or with None when the channel
    closed, or said something else, first. Signals go the other way.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_CONTROL_LINE

    def __init__(self) -> None:
        self.started: Deferred[int | None] = Deferred()
        self._lines = 0

    def send_signal(self, signum: int) -> None:
        if self.transport is not None and self.connected:
            self.sendLine(signal_line(signum))

    def lineReceived(self, line: bytes) -> None:
        self._lines += 1
        if self._lines > MAX_INIT_LINES:
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        if not self.started.called:
            self.started.callback(parse_started(line))

    def lineLengthExceeded(self, line: bytes) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.started.called:
            self.started.callback(None)


class InitControl(LineOnlyReceiver):
    """
    The init's end: each C{signal N} line from credproxy is passed to
    C{on_signal}; anything else is ignored. C{closed} fires when credproxy's
    end is gone.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_CONTROL_LINE

    def __init__(self, on_signal: Callable[[int], None]) -> None:
        self._on_signal = on_signal
        self.closed: Deferred[None] = Deferred()

    def say_started(self, port: int) -> None:
        self.sendLine(started_line(port))

    def lineReceived(self, line: bytes) -> None:
        signum = parse_signal(line)
        if signum is not None:
            self._on_signal(signum)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.closed.called:
            self.closed.callback(None)
