"""
The refresh lock: whoever holds it for an entry may spend that entry's
refresh token. OAuth refresh tokens rotate, so two holders of one refresh
token that both spend it leave one of them with a dead token (and the user
with a needless login). The L{RefreshCoordinator} already lets only one
refresh per entry run inside a process; this lock extends that across the
processes that share a store.

The lock is an interface so that a fleet-wide one (Redis, later) plugs in
without touching the coordinator. Two implementations live here:
L{InProcessRefreshLock} for stores only one process can see (memory), and
L{FileRefreshLock}, C{flock(2)} on one file per entry, for stores on the
local disk.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import stat

from twisted.internet.defer import Deferred, DeferredLock, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

DEFAULT_POLL_INTERVAL = 0.05  # seconds between flock attempts while another process holds it
# The longest wait for another process's refresh: more than a holder can
# take (three token calls of at most 30 s, the retry delays, the store's
# writes), so a waiter gives up only on a stuck holder.
DEFAULT_LOCK_TIMEOUT = 120.0
LOCK_DIR_MODE = 0o700
LOCK_FILE_MODE = 0o600
READABLE_NAME_PART = 32  # characters of each name kept readable in a lock file's name


class IHeldLock(Interface):
    def release() -> None:
        """
        Give the lock back. Releasing twice is harmless.
        """


class IRefreshLock(Interface):
    def acquire(provider: str, bucket: str) -> Deferred[IHeldLock]:
        """
        Wait (without blocking the reactor) for the refresh lock of one
        entry. Cancelling the Deferred abandons the wait. Fails with
        L{RefreshLockTimeout} when a bounded wait runs out.
        """


class RefreshLockError(Exception):
    """
    The refresh lock could not be taken. The message names the entry and the
    cause, never a token (the lock never sees one).
    """


class RefreshLockTimeout(RefreshLockError):
    """
    Another holder kept the lock longer than the bounded wait allows.
    """

    def __init__(self, provider: str, bucket: str, timeout: float) -> None:
        super().__init__(
            f"timed out after {timeout:g} s waiting for the refresh lock of {provider}/{bucket}"
        )
        self.timeout = timeout


# -- in one process -----------------------------------------------------------


@implementer(IHeldLock)
class _InProcessHeld:
    def __init__(self, owner: InProcessRefreshLock, entry: tuple[str, str], lock: DeferredLock):
        self._owner = owner
        self._entry = entry
        self._lock: DeferredLock | None = lock

    def release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()
            self._owner._forget(self._entry, lock)


@implementer(IRefreshLock)
class InProcessRefreshLock:
    """
    A per-entry lock inside this process, for memory stores: no other process
    can see the store, so there is nobody else to coordinate with. The
    coordinator's own single flight means its acquire never waits; the lock
    still excludes a second coordinator sharing it. Its wait is bounded by
    the holder, which is this process's refresh with its own bounded calls.
    """

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], DeferredLock] = {}

    def __repr__(self) -> str:
        return f"<InProcessRefreshLock entries={len(self._locks)}>"

    def __len__(self) -> int:
        return len(self._locks)

    def acquire(self, provider: str, bucket: str) -> Deferred[IHeldLock]:
        entry = (provider, bucket)
        lock = self._locks.setdefault(entry, DeferredLock())
        waiting = lock.acquire()

        def held(_: object) -> IHeldLock:
            return _InProcessHeld(self, entry, lock)

        def abandoned(failure: Failure) -> Failure:
            self._forget(entry, lock)
            return failure

        return waiting.addCallbacks(held, abandoned)

    def _forget(self, entry: tuple[str, str], lock: DeferredLock) -> None:
        if not lock.locked and not lock.waiting and self._locks.get(entry) is lock:
            del self._locks[entry]


# -- across processes ---------------------------------------------------------


@implementer(IHeldLock)
class _FileHeld:
    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def __repr__(self) -> str:
        return f"<FileRefreshLock held={self._fd is not None}>"

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)  # closing alone would release it too; unlocking first says so


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def lock_file_name(provider: str, bucket: str) -> str:
    """
    A safe file name for one entry, whatever the provider and bucket contain
    (they come from the credential socket): a readable, escaped prefix for
    whoever lists the directory, and a digest of the exact pair so that two
    entries never share a file.
    """
    exact = json.dumps([provider, bucket], ensure_ascii=True).encode("ascii")
    digest = hashlib.sha256(exact).hexdigest()[:32]

    def readable(name: str) -> str:
        return _UNSAFE.sub("_", name)[:READABLE_NAME_PART]

    return f"{readable(provider)}.{readable(bucket)}.{digest}.lock"


@implementer(IRefreshLock)
class FileRefreshLock:
    """
    C{flock(2)} on one file per entry in C{directory}, shared by every
    credproxy process whose store lives on this machine.

    The wait never blocks the reactor: C{LOCK_EX | LOCK_NB} is tried at once
    and then every C{poll_interval} seconds on reactor timers, for at most
    C{timeout} seconds (then L{RefreshLockTimeout}). The kernel drops a flock
    when its holder dies, so a crashed process never leaves a stale lock, and
    lock files are never removed (removing one while another process waits
    on it would let two processes lock two different files).

    The directory is made private (0700) and must belong to this user; lock
    files are 0600 and never followed through a symlink. Opening a lock file
    is one local system call on the reactor thread, like the file store's.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        directory: str,
        *,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        timeout: float = DEFAULT_LOCK_TIMEOUT,
    ) -> None:
        if poll_interval <= 0 or timeout < 0:
            raise ValueError("poll_interval must be positive and timeout not negative")
        self._reactor = reactor
        self.directory = directory
        self.poll_interval = poll_interval
        self.timeout = timeout
        _private_directory(directory)

    def __repr__(self) -> str:
        return f"<FileRefreshLock directory={self.directory!r}>"

    def path(self, provider: str, bucket: str) -> str:
        """
        The lock file of one entry (what another process locks too).
        """
        return os.path.join(self.directory, lock_file_name(provider, bucket))

    def acquire(self, provider: str, bucket: str) -> Deferred[IHeldLock]:
        try:
            fd = _open_lock_file(self.path(provider, bucket))
        except OSError as e:
            return fail(_lock_error(provider, bucket, e))
        try:
            got = _try_lock(fd)
        except OSError as e:
            os.close(fd)
            return fail(_lock_error(provider, bucket, e))
        if got:
            held: IHeldLock = _FileHeld(fd)
            return succeed(held)
        return self._wait(provider, bucket, fd)

    def _wait(self, provider: str, bucket: str, fd: int) -> Deferred[IHeldLock]:
        reactor = self._reactor
        deadline = reactor.seconds() + self.timeout
        timer: IDelayedCall | None = None

        def cancel(_: Deferred[IHeldLock]) -> None:
            if timer is not None and timer.active():
                timer.cancel()
            os.close(fd)

        waiting: Deferred[IHeldLock] = Deferred(cancel)

        def poll() -> None:
            nonlocal timer
            timer = None
            try:
                got = _try_lock(fd)
            except OSError as e:
                os.close(fd)
                waiting.errback(_lock_error(provider, bucket, e))
                return
            if got:
                waiting.callback(_FileHeld(fd))
                return
            left = deadline - reactor.seconds()
            if left <= 0:
                os.close(fd)
                waiting.errback(RefreshLockTimeout(provider, bucket, self.timeout))
                return
            timer = reactor.callLater(min(self.poll_interval, left), poll)

        timer = reactor.callLater(min(self.poll_interval, self.timeout), poll)
        return waiting


def _private_directory(directory: str) -> None:
    os.makedirs(directory, mode=LOCK_DIR_MODE, exist_ok=True)
    st = os.stat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise RefreshLockError(f"refresh lock directory {directory!r} is not a directory")
    if st.st_uid != os.geteuid():
        raise RefreshLockError(f"refresh lock directory {directory!r} belongs to another user")
    if stat.S_IMODE(st.st_mode) != LOCK_DIR_MODE:
        os.chmod(directory, LOCK_DIR_MODE)


def _open_lock_file(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, LOCK_FILE_MODE)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if stat.S_IMODE(st.st_mode) != LOCK_FILE_MODE:
            os.fchmod(fd, LOCK_FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _lock_error(provider: str, bucket: str, error: OSError) -> RefreshLockError:
    reason = os.strerror(error.errno) if error.errno is not None else type(error).__name__
    return RefreshLockError(f"cannot take the refresh lock of {provider}/{bucket}: {reason}")
