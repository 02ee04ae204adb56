"""
BlockingCalls: calls run on its own named, bounded, daemon threads and come
back through the reactor; calls while stopped, beyond the pending bound or
past their timeout fail clearly; stopping waits (boundedly) for calls in
flight. And the synchronous double that tests inject instead.

The unit tests use real threads with a Clock whose C{callFromThread} queues
what the threads hand back, so the test decides when the "reactor" runs it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from credproxy.stores import (
    BlockingCalls,
    IBlockingCalls,
    StoreError,
    StoreNotRunning,
    StoreTimeout,
)
from credproxy.stores._threads import CALL_TIMEOUT, MAX_PENDING, MAX_THREADS, STOP_TIMEOUT
from credproxy.testing import InlineBlockingCalls
from tests.logcapture import captured_log, log_text

WAIT = 10.0  # seconds a test waits for a thread before it fails


class ThreadedClock(Clock):
    """
    A Clock that also takes calls from threads, queued until L{deliver}.
    """

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: queue.Queue[tuple[Callable[..., object], tuple[Any, ...]]] = (
            queue.Queue()
        )

    def callFromThread(self, f: Callable[..., object], *args: Any) -> None:
        self.from_threads.put((f, args))

    def deliver(self) -> None:
        f, args = self.from_threads.get(timeout=WAIT)
        f(*args)


class Gate:
    """
    A function that blocks its thread until opened, and says when it started.
    """

    def __init__(self) -> None:
        self.started = threading.Semaphore(0)
        self.opened = threading.Event()
        self.threads: list[threading.Thread] = []

    def __call__(self, value: str) -> str:
        self.threads.append(threading.current_thread())
        self.started.release()
        if not self.opened.wait(WAIT):
            raise RuntimeError("gate never opened")
        return value

    def wait_started(self) -> None:
        assert self.started.acquire(timeout=WAIT), "the call never started"


class BlockingCallsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = ThreadedClock()
        self.calls = BlockingCalls(self.clock, max_threads=2, max_pending=3, timeout=5.0)
        self.gate = Gate()
        self.addCleanup(self.gate.opened.set)

    def start(self) -> None:
        self.calls.startService()
        self.addCleanup(self._stop)

    def _stop(self) -> None:
        if self.calls.running:
            d = self.calls.stopService()
            while not d.called:
                self.clock.deliver()

    def test_interface_and_defaults(self) -> None:
        calls = BlockingCalls(Clock())
        self.assertTrue(verifyObject(IBlockingCalls, calls))
        self.assertEqual(
            (calls.max_threads, calls.max_pending, calls.timeout, calls.stop_timeout),
            (MAX_THREADS, MAX_PENDING, CALL_TIMEOUT, STOP_TIMEOUT),
        )
        self.assertRaises(ValueError, BlockingCalls, Clock(), max_threads=0)

    def test_runs_on_a_named_daemon_pool_thread(self) -> None:
        self.start()
        d = self.calls.run(lambda: threading.current_thread())
        self.assertNoResult(d)  # nothing comes back until the reactor runs it
        self.clock.deliver()
        thread = self.successResultOf(d)
        self.assertIsNot(thread, threading.current_thread())
        self.assertIn("credproxy-store", thread.name)
        self.assertTrue(thread.daemon)
        self.assertEqual(self.calls.pending, 0)

    def test_failure(self) -> None:
        self.start()

        def broken() -> None:
            raise OSError("disk on fire")

        d = self.calls.run(broken)
        self.clock.deliver()
        self.assertEqual(str(self.failureResultOf(d, OSError).value), "disk on fire")

    def test_not_started(self) -> None:
        error = self.failureResultOf(self.calls.run(len, "abc"), StoreNotRunning).value
        self.assertIn("len", str(error))
        self.assertIn("not running", str(error))

    def test_after_stop(self) -> None:
        self.start()
        self.successResultOf(self.calls.stopService())
        self.failureResultOf(self.calls.run(len, "abc"), StoreNotRunning)

    def test_restart(self) -> None:
        self.start()
        self.successResultOf(self.calls.stopService())
        self.start()
        d = self.calls.run(len, "abcd")
        self.clock.deliver()
        self.assertEqual(self.successResultOf(d), 4)

    def test_threads_bounded(self) -> None:
        self.start()
        results = [self.calls.run(self.gate, f"v{i}") for i in range(3)]
        self.gate.wait_started()
        self.gate.wait_started()
        # Two threads at most: the third call waits for one of them.
        self.assertFalse(self.gate.started.acquire(timeout=0.2))
        self.gate.opened.set()
        for _ in range(3):
            self.clock.deliver()
        self.assertEqual([self.successResultOf(d) for d in results], ["v0", "v1", "v2"])
        self.assertEqual(len({t.ident for t in self.gate.threads}), 2)

    def test_pending_bounded(self) -> None:
        self.start()
        waiting = [self.calls.run(self.gate, f"v{i}") for i in range(3)]
        error = self.failureResultOf(self.calls.run(self.gate, "one too many"), StoreError).value
        self.assertIn("limit 3", str(error))
        self.gate.opened.set()
        for _ in range(3):
            self.clock.deliver()
        for d in waiting:
            self.successResultOf(d)
        again = self.calls.run(len, "ab")  # room again
        self.clock.deliver()
        self.assertEqual(self.successResultOf(again), 2)

    def test_timeout(self) -> None:
        self.start()
        d = self.calls.run(self.gate, "late")
        self.gate.wait_started()
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        error = self.failureResultOf(d, StoreTimeout).value
        self.assertIn("did not finish within 5 s", str(error))
        self.assertEqual(self.calls.pending, 1)  # its thread still runs, and still counts
        self.gate.opened.set()
        self.clock.deliver()  # the late result is dropped, without an unhandled error
        self.assertEqual(self.calls.pending, 0)

    def test_stop_waits_for_calls_in_flight(self) -> None:
        self.start()
        d = self.calls.run(self.gate, "finishing")
        self.gate.wait_started()
        stopped = self.calls.stopService()
        self.assertNoResult(stopped)
        self.failureResultOf(self.calls.run(len, "x"), StoreNotRunning)
        self.gate.opened.set()
        self.clock.deliver()
        self.assertEqual(self.successResultOf(d), "finishing")
        self.successResultOf(stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_gives_up_after_its_timeout(self) -> None:
        calls = BlockingCalls(self.clock, stop_timeout=2.0, timeout=60.0)
        calls.startService()
        d = calls.run(self.gate, "stuck")
        self.gate.wait_started()
        with captured_log() as events:
            stopped = calls.stopService()
            self.clock.advance(1.9)
            self.assertNoResult(stopped)
            self.clock.advance(0.1)
            self.successResultOf(stopped)
        self.assertIn("1 blocking store calls still running after 2.0 s", log_text(events))
        self.gate.opened.set()
        self.clock.deliver()
        self.assertEqual(self.successResultOf(d), "stuck")


class InlineBlockingCallsTests(SynchronousTestCase):
    def test_runs_at_once_and_counts(self) -> None:
        calls = InlineBlockingCalls()
        self.assertTrue(verifyObject(IBlockingCalls, calls))
        self.assertEqual(self.successResultOf(calls.run(len, "abc")), 3)
        self.assertEqual(
            self.successResultOf(calls.run(threading.current_thread)), threading.current_thread()
        )
        self.assertEqual((calls.calls, calls.names), (2, ["len", "current_thread"]))

    def test_failure(self) -> None:
        calls = InlineBlockingCalls()
        self.failureResultOf(calls.run(int, "not a number"), ValueError)
        self.assertEqual(calls.calls, 1)

    def test_stopped(self) -> None:
        calls = InlineBlockingCalls()
        calls.running = False
        self.failureResultOf(calls.run(len, "abc"), StoreNotRunning)
        self.assertEqual(calls.calls, 0)


@pytest.fixture
def real_calls() -> Any:
    calls = BlockingCalls(reactor)
    calls.startService()
    yield calls
    pytest_twisted.blockon(calls.stopService())


@pytest_twisted.ensureDeferred
async def test_on_the_real_reactor(real_calls: BlockingCalls) -> None:
    reactor_thread = threading.current_thread()
    results = await real_calls.run(lambda: threading.current_thread())
    assert results is not reactor_thread
    values = [real_calls.run(pow, 2, i) for i in range(20)]
    assert [await d for d in values] == [2**i for i in range(20)]
