"""
Where the faces' audit records go: twisted.logger (the default, so they
land in twistd's log with everything else), or a file of their own in JSON
lines (C{--audit-log PATH}).

A record through twisted.logger costs about 27 µs under twistd: the
observer formats the time and the event and writes and flushes the file for
every line, which is as much as a tenth of what forwarding a small request
costs. The file trail formats the time once a second, encodes a record with
C{json} in C, and writes what arrived within L{FLUSH_INTERVAL} (or
L{MAX_BUFFERED_BYTES}) in one system call, so an audit trail costs a few
microseconds a record; and a file of JSON lines is what a log pipeline wants
to read anyway.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import Interface, implementer

log = Logger(namespace="credproxy.audit")

# How long a record may wait in memory before it is written.
FLUSH_INTERVAL: Final = 0.1
# Buffered records are written at once when they reach this size.
MAX_BUFFERED_BYTES: Final = 64 * 1024
# While writes fail, records are held up to this much; past it, new records
# are dropped (and counted, in a record written once writes work again).
MAX_HELD_BYTES: Final = 4 * 1024 * 1024
# How often the path is looked at to see whether the file was rotated away.
REOPEN_CHECK_INTERVAL: Final = 1.0


class IAuditTrail(Interface):
    """
    Takes the faces' audit records.
    """

    def record(namespace: str, fields: Mapping[str, object], line: str) -> None:
        """
        One audit record. C{fields} are its structured values (fixed words,
        numbers, booleans, printable names: never a secret); C{line} is the
        same as one line of text. C{namespace} names the face.
        """


@implementer(IAuditTrail)
class LogAuditTrail:
    """
    Audit records as twisted.logger events at level info, with C{line} as
    the text and C{fields} as the event's fields.
    """

    def __init__(self) -> None:
        self._loggers: dict[str, Logger] = {}

    def record(self, namespace: str, fields: Mapping[str, object], line: str) -> None:
        logger = self._loggers.get(namespace)
        if logger is None:
            logger = self._loggers[namespace] = Logger(namespace=namespace)
        logger.info("{line}", line=line, **fields)


class AuditLogError(ValueError):
    """
    The audit log file cannot be used; the message is one line saying why.
    """


def open_audit_file(path: str) -> int:
    """
    Open (creating with mode 0600) the audit file for appending. Refused: a
    symbolic link, anything but a regular file, a file of another user, a
    file others may read or write (the records name what the host's agents
    do).
    """
    try:
        fd = os.open(
            path,
            os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise AuditLogError(f"audit log {path} is a symbolic link") from None
        raise AuditLogError(f"cannot open audit log {path}: {e.strerror}") from None
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = "is not a regular file"
    elif info.st_uid != os.geteuid():
        problem = "belongs to another user"
    elif info.st_mode & 0o077:
        problem = f"may be read or written by others (mode {info.st_mode & 0o777:o}; chmod 600 it)"
    if problem is not None:
        os.close(fd)
        raise AuditLogError(f"audit log {path} {problem}")
    return fd


@implementer(IAuditTrail)
class FileAuditTrail(Service):
    """
    Audit records as JSON lines appended to a file: C{{"time": RFC 3339 UTC,
    "log": namespace, ...fields}}.

    Records are written in batches: within L{FLUSH_INTERVAL} of the first
    one waiting, at once past L{MAX_BUFFERED_BYTES}, and when the service
    stops (so a stop loses none; a SIGKILL may lose the last
    L{FLUSH_INTERVAL}). A file rotated away (renamed or removed) is noticed
    within L{REOPEN_CHECK_INTERVAL} and a new one opened at the path; one
    truncated in place is written on at its end, as appending does. When a
    write fails, one log line says so (and one when writes work again);
    records are held meanwhile up to L{MAX_HELD_BYTES}, and those that do
    not fit are counted in an C{audit_records_dropped} record.

    C{write} is C{os.write}, replaceable in tests.
    """

    def __init__(
        self,
        clock: IReactorTime,
        path: str,
        write: Callable[[int, bytes], int] = os.write,
    ) -> None:
        self._clock = clock
        self.path = path
        self._write = write
        self._fd: int | None = open_audit_file(path)
        self._identity = _identity(os.fstat(self._fd))
        self._checked = clock.seconds()
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._flush_call: IDelayedCall | None = None
        self._second = -1
        self._stamp = ""
        self._failing = False
        self.dropped = 0

    def record(self, namespace: str, fields: Mapping[str, object], line: str) -> None:
        if self._fd is None:
            return  # stopped
        now = self._clock.seconds()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        entry: dict[str, Any] = {
            "time": f"{self._stamp}.{int((now - second) * 1000):03d}Z",
            "log": namespace,
        }
        entry.update(fields)
        data = (json.dumps(entry, separators=(",", ":"), default=str) + "\n").encode()
        if self._buffered + len(data) > MAX_HELD_BYTES:
            self.dropped += 1
            return
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered >= MAX_BUFFERED_BYTES and not self._failing:
            self.flush()
        elif self._flush_call is None:
            self._flush_call = self._clock.callLater(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        """
        Write what is buffered now.
        """
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        if self._fd is None:
            return
        self._reopen_if_rotated()
        if self.dropped and not self._failing:
            count, self.dropped = self.dropped, 0
            self._buffer.append(
                b'{"log":"credproxy.audit","event":"audit_records_dropped","count":%d}\n' % count
            )
        if not self._buffer:
            return
        data = b"".join(self._buffer)
        written = 0
        try:
            while written < len(data):
                written += self._write(self._fd, data[written:])
        except OSError as e:
            rest = data[written:]
            self._buffer, self._buffered = [rest], len(rest)
            if not self._failing:
                self._failing = True
                log.error(
                    "Cannot write the audit log {path}: {error}; holding records",
                    path=self.path,
                    error=errno.errorcode.get(e.errno or 0, "error"),
                )
            self._flush_call = self._clock.callLater(FLUSH_INTERVAL, self.flush)
            return
        self._buffer, self._buffered = [], 0
        if self._failing:
            self._failing = False
            log.info("Writing the audit log {path} again", path=self.path)
            if self.dropped:
                self.flush()  # the count of what did not fit

    def _reopen_if_rotated(self) -> None:
        now = self._clock.seconds()
        if now - self._checked < REOPEN_CHECK_INTERVAL:
            return
        self._checked = now
        try:
            current = _identity(os.stat(self.path, follow_symlinks=False))
        except OSError:
            current = None
        if current == self._identity:
            return
        try:
            fd = open_audit_file(self.path)
        except AuditLogError as e:
            log.error("Cannot reopen the rotated audit log: {why}", why=str(e))
            return
        assert self._fd is not None
        os.close(self._fd)
        self._fd, self._identity = fd, _identity(os.fstat(fd))

    def stopService(self) -> None:
        super().stopService()
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _identity(info: os.stat_result) -> tuple[int, int]:
    return (info.st_dev, info.st_ino)
