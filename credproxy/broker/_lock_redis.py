"""
The fleet's refresh lock on Redis: for stores every host of a fleet shares
(L{credproxy.stores.RedisTokenStore}), whoever holds it for an entry may
spend that entry's refresh token.

It is the C{redis} package's L{Lock}: C{SET NX PX} with a random owner
token, extended only by its owner, released only by its owner (a Lua
compare-and-delete). Its expiry (L{DEFAULT_TTL}) is what frees it when its
holder dies; while the holder lives, a timer extends it every third of
that. Nothing blocks a thread while it waits: each try is one
non-blocking C{SET NX} on the store's threads, repeated on reactor timers.

The lock is an optimisation of who refreshes, not the only guard: a holder
that lost it (Redis failed over, or it stalled past the expiry) still saves
with a compare-and-set, and a host whose refresh is refused with
C{invalid_grant} re-reads the store before concluding anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from credproxy.broker._lock_file import (
    DEFAULT_LOCK_TIMEOUT,
    IHeldLock,
    IRefreshLock,
    RefreshLockError,
    RefreshLockTimeout,
)
from credproxy.stores._interfaces import StoreError
from credproxy.stores._redis_connection import RedisConnection

if TYPE_CHECKING:
    from redis.lock import Lock

log = Logger(namespace="credproxy.broker.refresh")

# How long a lock outlives a holder that died: longer than a stall of the
# holder's reactor, short enough that the fleet is not kept waiting long.
DEFAULT_TTL = 15.0
DEFAULT_POLL_INTERVAL = 0.1


def _failure_kind(failure: Failure) -> str:
    return failure.type.__name__ if failure.type else "unknown"


@implementer(IHeldLock)
class _RedisHeld:
    """
    A held lock: extended every C{ttl / 3} seconds until released.
    """

    def __init__(self, owner: RedisRefreshLock, lock: Lock, entry: tuple[str, str]) -> None:
        self._owner = owner
        self._lock: Lock | None = lock
        self._entry = entry
        self._extender = LoopingCall(self._extend)
        self._extender.clock = owner.reactor
        self._extender.start(owner.ttl / 3, now=False)

    def __repr__(self) -> str:
        return f"<RedisRefreshLock held {self._entry[0]}/{self._entry[1]}>"

    def _extend(self) -> None:
        lock = self._lock
        if lock is None:
            return

        def extended(owned: bool) -> None:
            if owned or self._lock is None:
                return
            log.warn(
                "The fleet refresh lock of {provider}/{bucket} expired while it was held;"
                " the compare-and-set save still guards the token",
                provider=self._entry[0],
                bucket=self._entry[1],
            )
            self._stop()

        def failed(failure: Failure) -> None:
            log.warn(
                "Could not extend the fleet refresh lock of {provider}/{bucket}: {kind}",
                provider=self._entry[0],
                bucket=self._entry[1],
                kind=_failure_kind(failure),
            )

        self._owner.connection.call(_extend, lock).addCallbacks(extended, failed)

    def _stop(self) -> None:
        self._lock = None
        if self._extender.running:
            self._extender.stop()

    def release(self) -> None:
        lock = self._lock
        if lock is None:
            return
        self._stop()

        def failed(failure: Failure) -> None:
            log.warn(
                "Releasing the fleet refresh lock of {provider}/{bucket} failed ({kind});"
                " it expires on its own",
                provider=self._entry[0],
                bucket=self._entry[1],
                kind=_failure_kind(failure),
            )

        # Not owned any more (it expired): whoever has it now keeps it.
        self._owner.connection.call(_release, lock).addErrback(failed)


@implementer(IRefreshLock)
class RedisRefreshLock:
    """
    Per-entry refresh locks at C{<prefix>lock:<provider>:<bucket>} on the
    store's Redis.

    @param ttl: seconds the lock outlives a holder that stopped extending it.
    @param timeout: the longest wait for another holder.
    """

    def __init__(
        self,
        reactor: Any,
        connection: RedisConnection,
        *,
        ttl: float = DEFAULT_TTL,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        timeout: float = DEFAULT_LOCK_TIMEOUT,
    ) -> None:
        if ttl <= 0 or poll_interval <= 0 or timeout < 0:
            raise ValueError("ttl and poll_interval must be positive and timeout not negative")
        self.reactor = reactor
        self.connection = connection
        self.ttl = ttl
        self.poll_interval = poll_interval
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"<RedisRefreshLock {self.connection.description} ttl={self.ttl:g}>"

    def name(self, provider: str, bucket: str) -> str:
        return self.connection.key("lock", provider, bucket)

    def acquire(self, provider: str, bucket: str) -> Deferred[IHeldLock]:
        from redis.lock import Lock  # loaded with the store's client, never without it

        entry = (provider, bucket)
        lock = Lock(
            self.connection.client,
            self.name(provider, bucket),
            timeout=self.ttl,
            blocking=False,
            thread_local=False,  # taken, extended and released on different pool threads
        )
        deadline = self.reactor.seconds() + self.timeout
        timer: IDelayedCall | None = None

        def cancel(_: Deferred[IHeldLock]) -> None:
            # A try under way is left to finish: if it took the lock, tried()
            # gives it back at once.
            if timer is not None and timer.active():
                timer.cancel()

        waiting: Deferred[IHeldLock] = Deferred(cancel)

        def tried(got: bool) -> None:
            nonlocal timer
            if waiting.called:  # cancelled meanwhile: give back what we may have got
                if got:
                    _RedisHeld(self, lock, entry).release()
                return
            if got:
                waiting.callback(_RedisHeld(self, lock, entry))
                return
            left = deadline - self.reactor.seconds()
            if left <= 0:
                waiting.errback(RefreshLockTimeout(provider, bucket, self.timeout))
                return
            timer = self.reactor.callLater(min(self.poll_interval, left), attempt_now)

        def failed(failure: Failure) -> None:
            if waiting.called:
                return
            if failure.check(StoreError):
                waiting.errback(
                    RefreshLockError(
                        f"cannot take the refresh lock of {provider}/{bucket}:"
                        f" Redis store {self.connection.description} failed"
                    )
                )
                return
            waiting.errback(failure)

        def attempt_now() -> None:
            nonlocal timer
            timer = None
            self.connection.call(_try, lock).addCallbacks(tried, failed)

        attempt_now()
        return waiting


def _try(lock: Lock) -> bool:
    """
    Blocking: one C{SET NX PX} with a fresh random owner token.
    """
    return bool(lock.acquire(blocking=False))


def _extend(lock: Lock) -> bool:
    """
    Blocking: reset the expiry to the full TTL if we still own it.
    """
    from redis.exceptions import LockNotOwnedError

    try:
        lock.reacquire()
    except LockNotOwnedError:
        return False
    return True


def _release(lock: Lock) -> bool:
    """
    Blocking: delete the lock if we still own it; whether we did.
    """
    from redis.exceptions import LockNotOwnedError

    try:
        lock.release()
    except LockNotOwnedError:
        return False
    return True
