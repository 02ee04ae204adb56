"""
What both ways of running a command share, on the host (C{credproxy run})
and inside the sandbox (C{credproxy run --sandbox}): how the command is
found, the signals passed on to it, how its end becomes a status, and
credproxy's own lines on standard error. So both runs say and return the
same things.
"""

from __future__ import annotations

import os
import shutil
import signal
from typing import Final, TextIO

from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    eventAsText,
    globalLogBeginner,
)
from twisted.python.failure import Failure

# Exit statuses of credproxy's own failures, as env(1) and timeout(1) use
# them, so they stand apart from the command's own small statuses.
EXIT_CREDPROXY_FAILED: Final = 125  # bad options, or the proxy could not start
EXIT_CANNOT_RUN: Final = 126  # found, but not executable
EXIT_NOT_FOUND: Final = 127
SIGNAL_EXIT_BASE: Final = 128  # a command killed by signal N: 128 + N
# The variables a run sets for its command, besides the sockets' (the
# credential socket's names are the wire protocol's SOCKET_ENV_VARIABLES).
HTTP_SOCKET_ENV: Final = "CREDPROXY_HTTP_SOCKET"
BASE_URL_ENV: Final = "ANTHROPIC_BASE_URL"
API_KEY_ENV: Final = "ANTHROPIC_API_KEY"
# The descriptor number the capability token is readable from in the
# command: the first one after the standard three.
TOKEN_FD: Final = 3
# Signals passed on to the command; the command decides when the run ends.
FORWARDED_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# In a sandbox, which has a session of its own, the terminal's window-size
# changes reach credproxy only: they are passed on too, for full-screen agents.
SANDBOX_FORWARDED_SIGNALS: Final = (*FORWARDED_SIGNALS, signal.SIGWINCH)


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


def is_open(fd: int) -> bool:
    """
    Whether descriptor C{fd} is open: a standard stream that is closed here
    stays closed for the command.
    """
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _format_event(event: LogEvent) -> str | None:
    text = eventAsText(event, includeTraceback=True, includeTimestamp=False, includeSystem=False)
    return f"credproxy: {text}\n"


def start_logging(verbose: bool, stream: TextIO) -> None:
    """
    credproxy's own lines, each starting C{credproxy: }, to C{stream}: only
    errors, or with C{verbose} everything from info up.
    """
    level = LogLevel.info if verbose else LogLevel.error
    observer = FilteringLogObserver(
        FileLogObserver(stream, _format_event),
        [LogLevelFilterPredicate(defaultLogLevel=level)],
    )
    # stdout and stderr are the command's too: never redirect them into the log.
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
