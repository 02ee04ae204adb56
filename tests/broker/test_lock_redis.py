"""
The fleet's refresh lock on a real Redis (calls inline, time a L{Clock}):
one holder at a time, waiters polling within a bounded wait, the expiry
extended while held, release only by the owner, and a clear error when
Redis is down.
"""

from __future__ import annotations

import contextlib

import pytest
import redis
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from credproxy.broker import (
    IHeldLock,
    IRefreshLock,
    RedisRefreshLock,
    RefreshLockError,
    RefreshLockTimeout,
)
from credproxy.stores import RedisConnection
from credproxy.stores._redis_target import parse_redis_url
from credproxy.testing import InlineBlockingCalls
from tests.logcapture import captured_log
from tests.redisserver import RedisServer, unique_prefix

TTL = 15.0


@pytest.fixture(autouse=True)
def _server(request: pytest.FixtureRequest, redis_server: RedisServer) -> None:
    if request.instance is not None:
        request.instance.server = redis_server


class RedisLockTests(SynchronousTestCase):
    server: RedisServer

    def setUp(self) -> None:
        self.clock = Clock()
        self.calls = InlineBlockingCalls()
        self.prefix = unique_prefix()
        self.raw = self.server.client()
        self.addCleanup(self.raw.close)

    def lock(self, **kwargs: float) -> RedisRefreshLock:
        connection = RedisConnection(
            self.clock, self.calls, parse_redis_url(self.server.url), prefix=self.prefix
        )
        self.addCleanup(connection.client.close)
        return RedisRefreshLock(self.clock, connection, ttl=TTL, **kwargs)

    def key(self, provider: str = "anthropic", bucket: str = "default") -> str:
        return f"{self.prefix}lock:{provider}:{bucket}"

    def held(self, lock: RedisRefreshLock, provider: str = "anthropic") -> IHeldLock:
        held: IHeldLock = self.successResultOf(lock.acquire(provider, "default"))
        return held

    def test_interface(self) -> None:
        lock = self.lock()
        self.assertTrue(verifyObject(IRefreshLock, lock))
        self.assertTrue(verifyObject(IHeldLock, self.held(lock)))

    def test_set_nx_px_with_a_random_owner(self) -> None:
        lock = self.lock()
        first = self.held(lock)
        owner = self.raw.get(self.key())
        self.assertIsNotNone(owner)
        self.assertGreater(self.raw.pttl(self.key()), (TTL - 1) * 1000)
        self.assertLessEqual(self.raw.pttl(self.key()), TTL * 1000)
        first.release()
        self.assertIsNone(self.raw.get(self.key()))
        self.held(lock).release()
        second_owner = self.raw.get(self.key())
        self.assertIsNone(second_owner)
        again = self.held(lock)
        self.assertNotEqual(self.raw.get(self.key()), owner)
        again.release()

    def test_one_holder_at_a_time_across_hosts(self) -> None:
        host_a, host_b = self.lock(), self.lock()
        held = self.held(host_a)
        waiting = host_b.acquire("anthropic", "default")
        self.clock.advance(1.0)
        self.assertNoResult(waiting)
        held.release()
        self.assertNoResult(waiting)  # it notices on its next poll
        self.clock.advance(host_b.poll_interval)
        self.successResultOf(waiting).release()

    def test_entries_do_not_share_a_lock(self) -> None:
        lock = self.lock()
        one = self.held(lock, "a:b")
        other = self.held(lock, "a")
        one.release()
        other.release()

    def test_the_wait_is_bounded(self) -> None:
        host_a, host_b = self.lock(), self.lock(timeout=2.0)
        held = self.held(host_a)
        waiting = host_b.acquire("anthropic", "default")
        self.clock.pump([host_b.poll_interval] * 25)
        failure = self.failureResultOf(waiting, RefreshLockTimeout)
        self.assertIn("anthropic/default", str(failure.value))
        held.release()

    def test_a_cancelled_wait_stops_polling(self) -> None:
        host_a, host_b = self.lock(), self.lock()
        held = self.held(host_a)
        waiting = host_b.acquire("anthropic", "default")
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.clock.advance(1.0)  # no poll is left to take the lock meanwhile
        held.release()
        self.clock.advance(1.0)
        self.assertIsNone(self.raw.get(self.key()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_extended_while_held(self) -> None:
        lock = self.lock()
        held = self.held(lock)
        self.raw.pexpire(self.key(), 2000)  # as if most of the TTL had passed
        self.clock.advance(TTL / 3)
        self.assertGreater(self.raw.pttl(self.key()), (TTL - 1) * 1000)
        held.release()
        self.assertEqual(self.clock.getDelayedCalls(), [])  # no more extending

    def test_released_only_by_its_owner(self) -> None:
        host_a, host_b = self.lock(), self.lock()
        held = self.held(host_a)
        self.raw.delete(self.key())  # as if it had expired
        theirs = self.held(host_b)
        owner = self.raw.get(self.key())
        with captured_log() as events:
            held.release()
        self.assertEqual(self.raw.get(self.key()), owner)
        self.assertEqual([formatEvent(e) for e in events], [])  # an expired lock: nothing to say
        theirs.release()
        self.assertIsNone(self.raw.get(self.key()))

    def test_a_lock_lost_while_held_is_said_once_and_not_extended(self) -> None:
        lock = self.lock()
        held = self.held(lock)
        self.raw.delete(self.key())
        with captured_log() as events:
            self.clock.advance(TTL / 3)
            self.clock.advance(TTL / 3)
        lines = [formatEvent(e) for e in events]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("expired while it was held", lines[0])
        self.assertIsNone(self.raw.get(self.key()))  # never taken again by extending
        held.release()

    def test_redis_down(self) -> None:
        connection = RedisConnection(
            self.clock, self.calls, parse_redis_url("redis://127.0.0.1:1/0"), prefix=self.prefix
        )
        lock = RedisRefreshLock(self.clock, connection)
        with captured_log():
            failure = self.failureResultOf(lock.acquire("anthropic", "default"), RefreshLockError)
        self.assertIn("anthropic/default", str(failure.value))
        self.assertIn("redis://127.0.0.1:1/0", str(failure.value))
        with contextlib.suppress(redis.RedisError):
            connection.client.close()

    def test_bad_parameters(self) -> None:
        connection = RedisConnection(
            self.clock, self.calls, parse_redis_url(self.server.url), prefix=self.prefix
        )
        for bad in ({"ttl": 0.0}, {"poll_interval": 0.0}, {"timeout": -1.0}):
            with self.assertRaises(ValueError):
                RedisRefreshLock(self.clock, connection, **bad)
