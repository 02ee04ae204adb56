"""
The upstream hop's outcomes and its cap: how an exchange tells "the
upstream's answer was malformed" from "the upstream could not be reached"
(L{malformed_kind}, L{UpstreamMalformed}), and the cap on upstream requests
in flight (L{UpstreamSlots}). The client itself is
L{credproxy.http._upstream_client}.

L{malformed_kind} knows Twisted's client exceptions (the client raises the
same ones, so logs and embedders' agents read alike) and
C{twisted.web.http._MalformedChunkedDataError}, which the chunked decoder
raises; tests/http/test_upstream_screen.py pins both.
"""

from __future__ import annotations

from typing import Final

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from twisted.web._newclient import ParseError
from twisted.web.http import _MalformedChunkedDataError

from credproxy.http._config import HTTPProxyConfig

# Kinds of malformed answer beyond the screen's own HeadDefect names.
PARSER_REFUSED_HEAD: Final = "PARSER_REFUSED_HEAD"  # the parser of a Twisted Agent raised
BAD_CHUNKED_FRAMING: Final = "BAD_CHUNKED_FRAMING"  # the body's chunked framing is broken

# How UpstreamSlots says why no slot was had.
WAIT_TIMEOUT: Final = "wait_timeout"
QUEUE_FULL: Final = "queue_full"


class UpstreamMalformed(Exception):
    """
    The upstream's answer broke HTTP/1.1 (its head refused by the screen or
    the parser, or its body's framing): the upstream was reached, and what
    it sent must not be relayed. C{kind} names the defect; the message is
    never the upstream's bytes.
    """

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def malformed_kind(failure: Failure) -> str | None:
    """
    The kind of malformed answer that made an upstream request or its body
    fail, looking through Twisted's wrapper exceptions (C{ResponseFailed},
    C{ResponseNeverReceived}, C{RequestTransmissionFailed} carry their
    causes in C{reasons}); None when the failure is of another sort
    (refused connection, TLS, timeout, cancel).
    """
    pending = [failure]
    while pending:
        current = pending.pop()
        value = current.value
        if isinstance(value, UpstreamMalformed):
            return value.kind
        if isinstance(value, ParseError):  # Twisted's own, should the screen let one by
            return PARSER_REFUSED_HEAD
        if isinstance(value, _MalformedChunkedDataError):
            return BAD_CHUNKED_FRAMING
        reasons = getattr(value, "reasons", None)
        if isinstance(reasons, list):
            pending.extend(r for r in reasons if isinstance(r, Failure))
    return None


class NoUpstreamSlot(Exception):
    """
    No upstream slot came free: C{reason} is L{WAIT_TIMEOUT} or L{QUEUE_FULL}.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UpstreamSlots:
    """
    A cap on upstream requests in flight, with a bounded wait for a slot.

    A slot is asked for just before a request is sent upstream and given
    back when its exchange is done. A request that gets none within
    C{wait_timeout} seconds fails with L{NoUpstreamSlot}; so does one that
    finds C{max_waiting} requests already waiting, which bounds the queue by
    itself (each waiter is also an agent connection, so the face's own
    connection cap bounds it too). Waiters are served first come, first
    served; cancelling a waiter's Deferred (its agent left) takes it out of
    the queue at once.
    """

    def __init__(
        self, clock: IReactorTime, limit: int, wait_timeout: float, max_waiting: int
    ) -> None:
        if limit < 1 or max_waiting < 0:
            raise ValueError("the upstream slot limit must be at least 1")
        self._clock = clock
        self.limit = limit
        self.wait_timeout = wait_timeout
        self.max_waiting = max_waiting
        self.in_use = 0
        # Insertion-ordered: the first key is the longest waiter.
        self._waiters: dict[Deferred[None], IDelayedCall] = {}

    @classmethod
    def for_config(cls, clock: IReactorTime, config: HTTPProxyConfig) -> UpstreamSlots:
        """
        The slots of one face: the queue is as long as the face has connections.
        """
        return cls(
            clock,
            config.max_upstream_connections,
            config.upstream_wait_timeout,
            config.limits.max_connections,
        )

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        """
        Take a slot now if one is free and nobody waits (the usual case,
        without a Deferred); False when the caller must L{acquire}.
        """
        if self.in_use < self.limit and not self._waiters:
            self.in_use += 1
            return True
        return False

    def acquire(self) -> Deferred[None]:
        """
        Fires (at once when one is free) when the caller holds a slot, which
        it must give back with L{release}; or fails with L{NoUpstreamSlot}.
        """
        if self.try_acquire():
            return succeed(None)
        if len(self._waiters) >= self.max_waiting:
            return fail(NoUpstreamSlot(QUEUE_FULL))
        waiter: Deferred[None] = Deferred(self._cancelled)
        self._waiters[waiter] = self._clock.callLater(self.wait_timeout, self._expired, waiter)
        return waiter

    def release(self) -> None:
        """
        Give a slot back: to the longest waiter, if any, else to the pool.
        """
        if self._waiters:
            waiter = next(iter(self._waiters))
            self._waiters.pop(waiter).cancel()
            waiter.callback(None)  # the slot passes on: in_use is unchanged
            return
        if self.in_use > 0:
            self.in_use -= 1

    def _cancelled(self, waiter: Deferred[None]) -> None:
        timer = self._waiters.pop(waiter, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _expired(self, waiter: Deferred[None]) -> None:
        if self._waiters.pop(waiter, None) is not None:
            waiter.errback(NoUpstreamSlot(WAIT_TIMEOUT))
