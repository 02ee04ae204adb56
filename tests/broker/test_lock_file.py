"""
The refresh locks: C{FileRefreshLock} (flock on one file per entry, polled
on reactor timers, bounded) on a Clock, against a second instance on the
same directory and against a real second process; and C{InProcessRefreshLock}.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock, LoopingCall, deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from credproxy.broker._lock_file import (
    DEFAULT_LOCK_TIMEOUT,
    DEFAULT_POLL_INTERVAL,
    LOCK_DIR_MODE,
    LOCK_FILE_MODE,
    READABLE_NAME_PART,
    FileRefreshLock,
    IHeldLock,
    InProcessRefreshLock,
    RefreshLockError,
    RefreshLockTimeout,
    lock_file_name,
)

HOLDER = os.path.join(os.path.dirname(__file__), "flock_holder.py")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


class FileLockTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = tempfile.mkdtemp(prefix="cp-lock-")
        self.addCleanup(shutil.rmtree, self.base, True)
        self.directory = os.path.join(self.base, "locks")
        self.clock = Clock()

    def lock(self, **kwargs: float) -> FileRefreshLock:
        return FileRefreshLock(self.clock, self.directory, **kwargs)


class ExclusionTests(FileLockTestCase):
    def test_a_second_instance_waits_until_the_first_releases(self) -> None:
        first, second = self.lock(poll_interval=0.5), self.lock(poll_interval=0.5)
        held = self.successResultOf(first.acquire("anthropic", "default"))
        waiting = second.acquire("anthropic", "default")
        self.assertNoResult(waiting)
        self.clock.advance(0.5)
        self.clock.advance(0.5)
        self.assertNoResult(waiting)
        held.release()
        self.assertNoResult(waiting)  # noticed at the next poll, not before
        self.clock.advance(0.49)
        self.assertNoResult(waiting)
        self.clock.advance(0.01)
        second_held = self.successResultOf(waiting)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # and now the first one must wait for the second
        again = first.acquire("anthropic", "default")
        self.assertNoResult(again)
        second_held.release()
        self.clock.advance(0.5)
        self.successResultOf(again).release()

    def test_polls_at_the_interval_on_the_reactor(self) -> None:
        holder, waiter = self.lock(), self.lock(poll_interval=0.25, timeout=10.0)
        held = self.successResultOf(holder.acquire("p", "b"))
        waiting = waiter.acquire("p", "b")
        for n in range(1, 5):
            (call,) = self.clock.getDelayedCalls()
            self.assertAlmostEqual(call.getTime(), 0.25 * n)
            self.clock.advance(0.25)
        self.assertNoResult(waiting)
        held.release()
        self.clock.advance(0.25)
        self.successResultOf(waiting).release()

    def test_entries_do_not_exclude_each_other(self) -> None:
        lock = self.lock()
        a = self.successResultOf(lock.acquire("anthropic", "default"))
        b = self.successResultOf(lock.acquire("anthropic", "work"))
        c = self.successResultOf(lock.acquire("other", "default"))
        for held in (a, b, c):
            held.release()

    def test_release_unlocks_and_closes_and_is_idempotent(self) -> None:
        lock = self.lock()
        before = open_fds()
        held = self.successResultOf(lock.acquire("p", "b"))
        self.assertEqual(open_fds(), before + 1)
        held.release()
        self.assertEqual(open_fds(), before)
        held.release()
        self.assertEqual(open_fds(), before)
        self.successResultOf(self.lock().acquire("p", "b")).release()

    def test_an_acquire_that_fires_holds_an_IHeldLock(self) -> None:
        held = self.successResultOf(self.lock().acquire("p", "b"))
        self.assertTrue(IHeldLock.providedBy(held))
        self.assertNotIn(self.directory, repr(held))
        held.release()


class BoundedWaitTests(FileLockTestCase):
    def test_the_wait_times_out_with_a_clear_error(self) -> None:
        holder, waiter = self.lock(), self.lock(poll_interval=0.3, timeout=1.0)
        held = self.successResultOf(holder.acquire("anthropic", "work"))
        before = open_fds()
        waiting = waiter.acquire("anthropic", "work")
        self.assertEqual(open_fds(), before + 1)
        self.clock.advance(0.9)
        self.assertNoResult(waiting)
        self.clock.advance(0.1)  # the last poll falls exactly on the deadline
        failure = self.failureResultOf(waiting, RefreshLockTimeout)
        self.assertEqual(
            str(failure.value),
            "timed out after 1 s waiting for the refresh lock of anthropic/work",
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(open_fds(), before)
        held.release()

    def test_a_release_just_before_the_deadline_is_taken(self) -> None:
        holder, waiter = self.lock(), self.lock(poll_interval=0.3, timeout=1.0)
        held = self.successResultOf(holder.acquire("p", "b"))
        waiting = waiter.acquire("p", "b")
        self.clock.advance(0.95)
        held.release()
        self.clock.advance(0.05)
        self.successResultOf(waiting).release()

    def test_the_defaults_are_the_named_constants(self) -> None:
        self.assertEqual(DEFAULT_POLL_INTERVAL, 0.05)
        self.assertEqual(DEFAULT_LOCK_TIMEOUT, 120.0)
        holder, waiter = self.lock(), self.lock()
        held = self.successResultOf(holder.acquire("p", "b"))
        waiting = waiter.acquire("p", "b")
        (call,) = self.clock.getDelayedCalls()
        self.assertAlmostEqual(call.getTime(), DEFAULT_POLL_INTERVAL)
        self.clock.advance(DEFAULT_LOCK_TIMEOUT - 0.001)
        self.assertNoResult(waiting)
        self.clock.advance(0.002)
        self.failureResultOf(waiting, RefreshLockTimeout)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        held.release()

    def test_cancelling_stops_polling_and_closes(self) -> None:
        holder, waiter = self.lock(), self.lock()
        held = self.successResultOf(holder.acquire("p", "b"))
        before = open_fds()
        waiting = waiter.acquire("p", "b")
        self.clock.advance(DEFAULT_POLL_INTERVAL)
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(open_fds(), before)
        held.release()
        # the abandoned waiter took nothing
        self.successResultOf(holder.acquire("p", "b")).release()

    def test_bad_intervals_are_refused(self) -> None:
        self.assertRaises(ValueError, self.lock, poll_interval=0)
        self.assertRaises(ValueError, self.lock, timeout=-1)


class FileSafetyTests(FileLockTestCase):
    def test_directory_and_files_are_private_whatever_the_umask(self) -> None:
        with umask(0):
            lock = self.lock()
            held = self.successResultOf(lock.acquire("anthropic", "default"))
        self.assertEqual(stat.S_IMODE(os.stat(self.directory).st_mode), LOCK_DIR_MODE)
        self.assertEqual(LOCK_DIR_MODE, 0o700)
        path = lock.path("anthropic", "default")
        self.assertEqual(os.path.dirname(path), self.directory)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), LOCK_FILE_MODE)
        self.assertEqual(LOCK_FILE_MODE, 0o600)
        held.release()

    def test_loose_existing_directory_and_file_are_tightened(self) -> None:
        os.mkdir(self.directory, 0o755)
        os.chmod(self.directory, 0o755)  # noqa: S103 - testing that it is tightened
        lock = self.lock()
        self.assertEqual(stat.S_IMODE(os.stat(self.directory).st_mode), LOCK_DIR_MODE)
        path = lock.path("p", "b")
        with open(path, "w"):
            pass
        os.chmod(path, 0o644)
        self.successResultOf(lock.acquire("p", "b")).release()
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), LOCK_FILE_MODE)

    def test_a_symlinked_lock_file_is_not_followed(self) -> None:
        lock = self.lock()
        target = os.path.join(self.base, "target")
        with open(target, "w"):
            pass
        os.chmod(target, 0o644)
        os.symlink(target, lock.path("p", "b"))
        failure = self.failureResultOf(lock.acquire("p", "b"), RefreshLockError)
        self.assertIn("refresh lock of p/b", str(failure.value))
        self.assertEqual(stat.S_IMODE(os.stat(target).st_mode), 0o644)

    def test_a_file_in_place_of_the_directory_is_refused(self) -> None:
        with open(self.directory, "w"):
            pass
        self.assertRaises((RefreshLockError, OSError), self.lock)

    def test_a_directory_of_another_user_is_refused(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("needs root to give a directory to another uid")
        os.mkdir(self.directory, 0o700)
        os.chown(self.directory, 65534, 65534)
        failure = self.assertRaises(RefreshLockError, self.lock)
        self.assertIn("belongs to another user", str(failure))

    def test_hostile_names_stay_inside_the_directory(self) -> None:
        lock = self.lock()
        names = [
            ("../../etc", "passwd"),
            ("a/b", "c"),
            ("a", "b/c"),
            ("a.b", "c"),
            ("a", "b.c"),
            ("nul\0byte", "x"),
            ("", ""),
            (".", ".."),
            ("ü" * 300, "b" * 300),
        ]
        files = set()
        for provider, bucket in names:
            path = lock.path(provider, bucket)
            name = os.path.basename(path)
            self.assertEqual(os.path.dirname(path), self.directory)
            self.assertRegex(name, r"^[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[0-9a-f]{32}\.lock$")
            self.assertLessEqual(len(name), 2 * READABLE_NAME_PART + 40)
            files.add(name)
            self.successResultOf(lock.acquire(provider, bucket)).release()
        self.assertEqual(len(files), len(names))
        self.assertEqual(sorted(os.listdir(self.directory)), sorted(files))

    def test_the_name_is_readable_and_stable(self) -> None:
        name = lock_file_name("anthropic", "default")
        self.assertTrue(name.startswith("anthropic.default."))
        self.assertEqual(name, lock_file_name("anthropic", "default"))
        self.assertNotEqual(name, lock_file_name("anthropic", "default2"))


class InProcessLockTests(SynchronousTestCase):
    def test_excludes_per_entry_and_forgets_unused_entries(self) -> None:
        lock = InProcessRefreshLock()
        first = self.successResultOf(lock.acquire("p", "b"))
        other = self.successResultOf(lock.acquire("p", "other"))
        waiting = lock.acquire("p", "b")
        self.assertNoResult(waiting)
        first.release()
        second = self.successResultOf(waiting)
        self.assertTrue(IHeldLock.providedBy(second))
        first.release()  # a second release gives nothing away
        third = lock.acquire("p", "b")
        self.assertNoResult(third)
        second.release()
        self.successResultOf(third).release()
        other.release()
        self.assertEqual(len(lock), 0)

    def test_a_cancelled_wait_takes_nothing(self) -> None:
        lock = InProcessRefreshLock()
        held = self.successResultOf(lock.acquire("p", "b"))
        waiting = lock.acquire("p", "b")
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        held.release()
        self.assertEqual(len(lock), 0)
        self.successResultOf(lock.acquire("p", "b")).release()


# -- a real second process ---------------------------------------------------------


class Holder(ProcessProtocol):
    """
    The flock_holder child: C{locked} fires once it holds the lock.
    """

    def __init__(self) -> None:
        self.locked: Deferred[None] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.output = b""

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if b"locked\n" in self.output and not self.locked.called:
            self.locked.callback(None)

    def processEnded(self, reason: Failure) -> None:
        if not self.locked.called:
            self.locked.errback(reason)
        self.ended.callback(None)


def spawn_holder(path: str) -> Holder:
    holder = Holder()
    process_reactor: IReactorProcess = reactor
    process_reactor.spawnProcess(
        holder, sys.executable, [sys.executable, HOLDER, path], env=dict(os.environ)
    )
    return holder


def real_clock() -> IReactorTime:
    clock: IReactorTime = reactor
    return clock


async def wait_while_ticking(lock: FileRefreshLock, holder: Holder) -> tuple[int, IHeldLock]:
    """
    Acquire while the child holds the lock and count reactor ticks meanwhile;
    answers the ticks seen before the child was told to let go.
    """
    ticks = 0

    def tick() -> None:
        nonlocal ticks
        ticks += 1

    ticker = LoopingCall(tick)
    ticker.clock = real_clock()
    ticker.start(0.01)
    try:
        waiting = lock.acquire("anthropic", "default")
        await deferLater(real_clock(), 0.3, lambda: None)
        assert not waiting.called, "acquired while another process held the lock"
        seen = ticks
        holder.transport.write(b"release\n")  # type: ignore[union-attr]
        held = await waiting.addTimeout(10, real_clock())
    finally:
        ticker.stop()
    return seen, held


@pytest_twisted.ensureDeferred
async def test_another_process_excludes_us_and_the_reactor_keeps_running(
    tmp_path: pytest.TempPathFactory,
) -> None:
    lock = FileRefreshLock(real_clock(), f"{tmp_path}/locks", poll_interval=0.01, timeout=10.0)
    holder = spawn_holder(lock.path("anthropic", "default"))
    await holder.locked.addTimeout(10, real_clock())
    seen, held = await wait_while_ticking(lock, holder)
    assert seen >= 10  # the reactor ran its timers throughout the wait
    held.release()
    await holder.ended.addTimeout(10, real_clock())
    assert b"released" in holder.output


@pytest_twisted.ensureDeferred
async def test_a_killed_holder_leaves_no_stale_lock(tmp_path: pytest.TempPathFactory) -> None:
    lock = FileRefreshLock(real_clock(), f"{tmp_path}/locks", poll_interval=0.01, timeout=10.0)
    holder = spawn_holder(lock.path("anthropic", "default"))
    await holder.locked.addTimeout(10, real_clock())
    waiting = lock.acquire("anthropic", "default")
    await deferLater(real_clock(), 0.1, lambda: None)
    assert not waiting.called
    holder.transport.signalProcess("KILL")  # type: ignore[union-attr]
    held = await waiting.addTimeout(10, real_clock())
    held.release()
    await holder.ended.addTimeout(10, real_clock())
    assert b"released" not in holder.output
