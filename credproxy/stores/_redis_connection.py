"""
The connection a host's Redis stores and the fleet's refresh lock share:
the client, the outage state, and the subscriber to the invalidation
channel.

Every Redis call blocks, so it runs on L{IBlockingCalls}. While Redis is
known to be down, L{RedisConnection.call} fails at once, so requests get a
clear error instead of waiting on connection timeouts: one log line when an
outage starts, a background probe with backoff, one line when it ends.

The subscriber is a thread of its own (it blocks for as long as it runs).
It hands each announcement to the stores on the reactor thread, and tells
them to clear their caches whenever it subscribes again, since what was
announced meanwhile is lost.
"""

from __future__ import annotations

import contextlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from credproxy._secret import Secret
from credproxy.stores._interfaces import StoreDown, StoreError, StoreTimeout
from credproxy.stores._redis_target import RedisTarget
from credproxy.stores._threads import IBlockingCalls

if TYPE_CHECKING:
    import redis

log = Logger(namespace="credproxy.stores.redis")

_T = TypeVar("_T")

DEFAULT_PREFIX = "credproxy:"
MAX_PREFIX_CHARS = 64
MAX_ANNOUNCEMENT_BYTES = 8192
# The background probe while Redis is down: first delay, doubling up to the last.
BACKOFF_FIRST = 0.2
BACKOFF_MAX = 5.0
SUBSCRIBER_POLL = 0.5  # seconds the subscriber waits for a message before checking for stop


class AnnouncementListener(ABC):
    """
    What the connection tells a store: announcements and cache clears.
    """

    @abstractmethod
    def announced(self, kind: str, member: str, version: int) -> None:
        """
        Some host changed C{member} of C{kind}; the change has C{version}.
        """

    @abstractmethod
    def clear(self) -> None:
        """
        Forget every cached read.
        """


class RedisConnection(Service):
    """
    One Redis target shared by a host's token store, key store and refresh
    lock: the client, the invalidation subscriber (a thread of its own, since
    it blocks for as long as it runs) and the outage state.

    Started and stopped as a service (the broker starts it): the subscriber
    runs only while it runs. L{call} works whether or not it runs, so short
    commands (C{credproxy set-key}) need no subscriber.
    """

    def __init__(
        self,
        reactor: Any,
        calls: IBlockingCalls,
        target: RedisTarget,
        *,
        password: Secret | None = None,
        ca_file: str | None = None,
        prefix: str = DEFAULT_PREFIX,
        client: redis.Redis | None = None,
    ) -> None:
        if not prefix or len(prefix) > MAX_PREFIX_CHARS or not prefix.isprintable():
            raise ValueError(f"a Redis key prefix has 1 to {MAX_PREFIX_CHARS} printable characters")
        self.reactor = reactor
        self.calls = calls
        self.target = target
        self.prefix = prefix
        self.description = target.description
        self.client = client if client is not None else target.client(password, ca_file)
        self.channel = f"{prefix}invalidate"
        self.down_since: float | None = None
        self.subscribed = False
        self._backoff = BACKOFF_FIRST
        self._probe: IDelayedCall | None = None
        self._listeners: list[AnnouncementListener] = []
        self._stopping = threading.Event()
        self._subscriber: threading.Thread | None = None

    def __repr__(self) -> str:
        state = "down" if self.down_since is not None else "up"
        return f"<RedisConnection {self.description} {state}>"

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(quote(part, safe="") for part in parts)

    def listen(self, listener: AnnouncementListener) -> None:
        self._listeners.append(listener)

    # -- lifecycle -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping.clear()
        self._subscriber = threading.Thread(
            target=self._subscribe, name="credproxy-redis-subscriber", daemon=True
        )
        self._subscriber.start()

    def stopService(self) -> None:
        super().stopService()
        self._stopping.set()  # the thread ends within SUBSCRIBER_POLL; it is a daemon
        self._subscriber = None
        if self._probe is not None and self._probe.active():
            self._probe.cancel()
        self._probe = None

    # -- calls -----------------------------------------------------------------

    def unavailable(self) -> StoreDown:
        return StoreDown(f"Redis store {self.description} is unavailable")

    def call(self, f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """
        C{f(*args)} on the store's threads; at once a L{StoreError} while
        Redis is known to be down. A Redis failure becomes a L{StoreError}
        naming only the failure's type (a server's message may quote a
        command, and so a value).
        """
        if self.down_since is not None:
            return fail(self.unavailable())
        return self.calls.run(f, *args).addErrback(self._failed)

    def _failed(self, failure: Failure) -> Failure:
        import redis  # loaded already: a client made the call

        if failure.check(redis.ConnectionError, redis.TimeoutError, StoreTimeout, OSError):
            self._went_down(failure.type.__name__ if failure.type else "unknown")
            raise self.unavailable()
        if failure.check(redis.RedisError):
            kind = failure.type.__name__ if failure.type else "unknown"
            raise StoreError(f"Redis store {self.description}: the call failed ({kind})")
        return failure

    def _went_down(self, kind: str) -> None:
        if self.down_since is not None:
            return
        self.down_since = self.reactor.seconds()
        log.error(
            "Redis store {store} is unavailable ({kind}): answering reads from the cache while"
            " it is fresh, errors otherwise; retrying in the background",
            store=self.description,
            kind=kind,
        )
        self._backoff = BACKOFF_FIRST
        self._schedule_probe()

    def _schedule_probe(self) -> None:
        self._probe = self.reactor.callLater(self._backoff, self._try_again)

    def _try_again(self) -> None:
        self._probe = None

        def answered(_: object) -> None:
            down_since, self.down_since = self.down_since, None
            if down_since is not None:
                log.info(
                    "Redis store {store} answers again after {seconds:.1f} s",
                    store=self.description,
                    seconds=self.reactor.seconds() - down_since,
                )
            self._clear_all()  # what was cached may have changed meanwhile

        def still_down(_: Failure) -> None:
            self._backoff = min(self._backoff * 2, BACKOFF_MAX)
            if self.down_since is not None:
                self._schedule_probe()

        self.calls.run(self.client.ping).addCallbacks(answered, still_down)

    def ping(self) -> Deferred[bool]:
        """
        Whether Redis answers now (for status): never raises.
        """
        return self.calls.run(self.client.ping).addCallbacks(lambda _: True, lambda _: False)

    # -- announcements ---------------------------------------------------------

    def _subscribe(self) -> None:
        """
        The subscriber thread: listens on the channel until stopped,
        subscribing again with backoff whenever the connection is lost.
        """
        import redis  # loaded already: the connection has a client

        backoff = BACKOFF_FIRST
        while not self._stopping.is_set():
            pubsub = self.client.pubsub()
            try:
                pubsub.subscribe(self.channel)
                while not self._stopping.is_set():
                    message = pubsub.get_message(timeout=SUBSCRIBER_POLL)
                    if message is None:
                        continue
                    if message.get("type") == "subscribe":
                        backoff = BACKOFF_FIRST
                        self.reactor.callFromThread(self._subscription_up)
                    elif message.get("type") == "message":
                        self.reactor.callFromThread(self._announced, message.get("data"))
            except (redis.RedisError, OSError):
                self.reactor.callFromThread(self._subscription_lost)
            finally:
                with contextlib.suppress(redis.RedisError, OSError):
                    pubsub.close()
            self._stopping.wait(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _subscription_up(self) -> None:
        self.subscribed = True
        self._clear_all()  # announcements made while it was not subscribed are lost

    def _subscription_lost(self) -> None:
        self.subscribed = False

    def _announced(self, data: object) -> None:
        if not isinstance(data, bytes) or len(data) > MAX_ANNOUNCEMENT_BYTES:
            return
        try:
            version_text, kind, member = data.decode("utf-8").split(" ", 2)
            version = int(version_text)
        except ValueError:
            return  # not ours (anyone who may publish can send anything)
        for listener in self._listeners:
            listener.announced(kind, member, version)

    def _clear_all(self) -> None:
        for listener in self._listeners:
            listener.clear()
