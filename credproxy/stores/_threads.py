"""
Where the host's stores make their blocking calls (D-Bus round trips to a
Secret Service, file I/O with fsync and fcntl locks): a small thread pool of
its own, so they never run on the reactor thread and never queue behind, or
starve, whatever else uses the reactor's shared pool.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

from credproxy.stores._interfaces import StoreError, StoreNotRunning, StoreTimeout

log = Logger(namespace="credproxy.stores")

_T = TypeVar("_T")

# Backend calls are rare (reads are cached), so a few threads are plenty; more
# would only let a stuck Secret Service tie up more of them.
MAX_THREADS = 4
# Calls accepted but not finished. Beyond this the backend is not keeping up
# (or hangs), and failing new calls at once is better than an unbounded queue.
MAX_PENDING = 256
# One backend call: a D-Bus round trip or a locked file write takes
# milliseconds; a Secret Service waiting on an unlock prompt may take forever.
CALL_TIMEOUT = 30.0
# How long stopping waits for calls in flight (a write to finish) before it
# leaves their threads behind.
STOP_TIMEOUT = 10.0
POOL_NAME = "credproxy-store"


class IBlockingCalls(Interface):
    """
    Runs blocking functions off the reactor thread and reports their result
    on it. Stores take one of these rather than a thread pool so tests can
    run the same calls synchronously.
    """

    def run(f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """
        Call C{f(*args)} where blocking is allowed; the Deferred fires on the
        reactor thread with its result or failure.
        """


class _DaemonThread(threading.Thread):
    """
    A pool thread that does not keep the process alive: a backend call that
    never returns (a keyring waiting on an unlock prompt nobody answers) must
    not stop credproxy from exiting.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.daemon = True


class _StorePool(ThreadPool):
    threadFactory = _DaemonThread


def _name_of(f: Callable[..., object]) -> str:
    name = getattr(f, "__qualname__", None)
    return name if isinstance(name, str) else type(f).__name__


@implementer(IBlockingCalls)
class BlockingCalls(Service):
    """
    A service owning a bounded thread pool for the stores' blocking calls,
    started and stopped with the service.

    Every call is bounded: at most C{max_pending} calls may be unfinished at
    once, and each one's Deferred fails with L{StoreTimeout} after
    C{timeout} seconds (its thread cannot be interrupted and finishes on its
    own; its late result is dropped). Calls made while the service is not
    running fail with L{StoreNotRunning}.

    @param reactor: provides C{IReactorFromThreads} (results come back with
        C{callFromThread}) and C{IReactorTime} (the timeouts).
    """

    def __init__(
        self,
        reactor: Any,
        *,
        name: str = POOL_NAME,
        max_threads: int = MAX_THREADS,
        max_pending: int = MAX_PENDING,
        timeout: float = CALL_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        if max_threads < 1 or max_pending < 1:
            raise ValueError("max_threads and max_pending must be at least 1")
        self.reactor = reactor
        self.name = name
        self.max_threads = max_threads
        self.max_pending = max_pending
        self.timeout = timeout
        self.stop_timeout = stop_timeout
        self.pool: ThreadPool | None = None
        self.pending = 0  # accepted and not finished in their thread
        self._drained: list[Deferred[None]] = []

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<BlockingCalls {self.name} {state} pending={self.pending}>"

    def startService(self) -> None:
        # A stopped ThreadPool cannot start again, so each start makes a new one.
        self.pool = _StorePool(minthreads=0, maxthreads=self.max_threads, name=self.name)
        self.pool.start()
        super().startService()

    def stopService(self) -> Deferred[None]:
        """
        Refuse new calls, let those in flight finish for up to
        C{stop_timeout} seconds, then stop the pool.
        """
        super().stopService()
        pool, self.pool = self.pool, None
        if pool is None:
            return succeed(None)
        if self.pending == 0:
            pool.stop()
            return succeed(None)
        drained: Deferred[None] = Deferred()
        self._drained.append(drained)
        timer = self.reactor.callLater(self.stop_timeout, self._give_up, drained, pool)

        def stop_pool(result: None) -> None:
            if timer.active():
                timer.cancel()
                pool.stop()

        return drained.addCallback(stop_pool)

    def _give_up(self, drained: Deferred[None], pool: ThreadPool) -> None:
        log.warn(
            "{count} blocking store calls still running after {timeout} s at stop;"
            " leaving their threads behind",
            count=self.pending,
            timeout=self.stop_timeout,
        )
        # Joining stuck threads would block the reactor; a daemon thread waits instead.
        _DaemonThread(target=pool.stop, name=f"{self.name}-stop").start()
        if drained in self._drained:
            self._drained.remove(drained)
        drained.callback(None)

    def run(self, f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        name = _name_of(f)
        if not self.running or self.pool is None:
            return fail(
                StoreNotRunning(
                    f"cannot run {name}: the store thread pool {self.name!r} is not running"
                    " (its service was not started, or has stopped)"
                )
            )
        if self.pending >= self.max_pending:
            return fail(
                StoreError(
                    f"cannot run {name}: {self.pending} store calls are already waiting"
                    f" (limit {self.max_pending}); the backend is not answering"
                )
            )
        self.pending += 1
        result: Deferred[_T] = Deferred()

        def timed_out() -> None:
            if not result.called:
                result.errback(StoreTimeout(f"{name} did not finish within {self.timeout:g} s"))

        timer: IDelayedCall = self.reactor.callLater(self.timeout, timed_out)

        def finished(outcome: _T | Failure) -> None:
            self.pending -= 1
            if timer.active():
                timer.cancel()
            if not result.called:
                if isinstance(outcome, Failure):
                    result.errback(outcome)
                else:
                    result.callback(outcome)
            if self.pending == 0:
                drained, self._drained = self._drained, []
                for d in drained:
                    d.callback(None)

        deferToThreadPool(self.reactor, self.pool, f, *args).addBoth(finished)
        return result
