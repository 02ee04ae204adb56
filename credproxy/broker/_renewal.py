"""
Proactive renewal on the host (issue 7 §4). Every stored OAuth token that has
a refresh token and an expiry is refreshed a while before it expires, so that
no request has to wait for a refresh on its way upstream and a sandbox that
reads a token gets one with life left in it. Renewal is an optimization: a
token it misses is still refreshed on demand, so it never fails the broker.

How the timers are chosen, and why:

 - Renewal is due at C{expiry - max(MIN_MARGIN, MARGIN_FRACTION x remaining
   life) - jitter}. The fraction leaves long-lived tokens room for a few
   retries; the minimum keeps short-lived ones from being renewed at the last
   second. The jitter (uniform in 0..MAX_JITTER, from the injected rng) keeps
   processes sharing a store from all refreshing in the same second.
 - No timer waits longer than RECHECK_INTERVAL. A reactor waits with a
   timeout that the kernel counts on the monotonic clock, which stands still
   while the machine is suspended; one long timer would then fire hours late.
   Each firing compares the wall clock (C{reactor.seconds()}) with the due
   time: still early means wait again, due or long past (a suspend beyond the
   expiry) means renew now.
 - After any attempt the next renewal from a token is at least
   MIN_RENEWAL_INTERVAL away, so a provider whose tokens live shorter than
   the margin is not refreshed in a tight loop.
 - Failures back off from BACKOFF_BASE, doubling up to MAX_BACKOFF, or wait
   the C{retry_after} a RATE_LIMITED failure names; after
   MAX_CONSECUTIVE_FAILURES the entry is given up with one error line. The
   reasons in NOT_RETRIED cannot be cured by waiting (log in again, no
   refresh token, nothing stored, no such provider), so they drop the timer
   until the entry is saved again.

The scheduler holds one record per renewable stored entry, with at most one
timer each: a save that the broker reports while that entry's refresh is in
flight (the refresh's own save, reported through the coordinator's
C{on_saved}) is remembered and applied when the refresh completes, instead of
arming a second timer. Log lines name the provider, the bucket and the
outcome, never a token's value.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from credproxy.broker._errors import RefreshError, RefreshFailure
from credproxy.stores._interfaces import IHostTokenStore
from credproxy.stores._token import Token

log = Logger(namespace="credproxy.broker.renewal")

MIN_MARGIN = 300.0  # renew at least this long (seconds) before the expiry
MARGIN_FRACTION = 0.1  # ... or this fraction of the remaining life, if that is longer
MAX_JITTER = 30.0  # renew up to this much earlier still, at random
RECHECK_INTERVAL = 300.0  # longest single timer: the wall clock is checked this often
MIN_RENEWAL_INTERVAL = 60.0  # shortest time from one attempt to the next token-based renewal
BACKOFF_BASE = 30.0  # delay after the first failure, doubling with each further one
MAX_BACKOFF = 1800.0  # longest delay after a failure, retry_after included
MIN_RETRY_DELAY = 1.0  # shortest delay a RATE_LIMITED retry_after can ask for
MAX_CONSECUTIVE_FAILURES = 10  # failed attempts in a row before an entry is given up

NOT_RETRIED = frozenset(
    {
        RefreshFailure.REAUTH_REQUIRED,
        RefreshFailure.REFRESH_NOT_AVAILABLE,
        RefreshFailure.NOT_FOUND,
        RefreshFailure.PROVIDER_NOT_FOUND,
    }
)

Entry = tuple[str, str]  # (provider, bucket)


class Refresher(Protocol):
    """
    What the scheduler needs of L{credproxy.broker._refresh.RefreshCoordinator}:
    a refresh that saves the new token (and reports the save) or raises
    L{RefreshError}. A protocol, so tests can stand in for the coordinator.
    """

    async def refresh(self, provider: str, bucket: str, rejected: str | None = None) -> Token: ...


def renewal_time(expiry: float, now: float, jitter: float) -> float:
    """
    When a token expiring at C{expiry} should be renewed, seen at C{now}
    (both Unix seconds); may lie in the past.
    """
    margin = max(MIN_MARGIN, MARGIN_FRACTION * (expiry - now))
    return expiry - margin - jitter


def backoff_delay(failures: int) -> float:
    """
    How long to wait after the C{failures}-th consecutive failure (1-based).
    """
    doublings = min(max(failures - 1, 0), 32)  # 2**32 x 30 s is far past the cap already
    return min(BACKOFF_BASE * 2.0**doublings, MAX_BACKOFF)


def retry_delay(reason: RefreshFailure | None, retry_after: float | None, failures: int) -> float:
    """
    How long to wait before retrying a failed renewal: the C{retry_after} a
    RATE_LIMITED failure gives (within MIN_RETRY_DELAY..MAX_BACKOFF, so that
    neither a zero nor an absurd value decides the pace), else the backoff.
    """
    if (
        reason is RefreshFailure.RATE_LIMITED
        and retry_after is not None
        and math.isfinite(retry_after)
    ):
        return min(max(retry_after, MIN_RETRY_DELAY), MAX_BACKOFF)
    return backoff_delay(failures)


def renewable_expiry(token: Token | None) -> float | None:
    """
    The expiry to renew C{token} by, or None when it cannot be renewed (no
    token, no refresh token, or no usable expiry).
    """
    if token is None or token.refresh_token is None:
        return None
    expiry = token.expiry
    if expiry is None or not math.isfinite(expiry):
        return None
    return expiry


@dataclass(eq=False)
class _Record:
    """
    One renewable entry: its timer (None while a refresh is in flight), when
    its renewal or retry is due, and what happened since.
    """

    due: float = 0.0
    timer: IDelayedCall | None = None
    failures: int = 0
    in_flight: bool = False
    not_before: float = 0.0
    saved_meanwhile: bool = False  # a save was reported while the refresh was in flight
    latest: Token | None = field(default=None, repr=False)  # ...and what it saved


class RenewalScheduler:
    """
    Renews stored OAuth tokens before they expire; see the module docstring.
    It follows saves (L{changed}) only between L{start} and L{stop}.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        store: IHostTokenStore,
        refresher: Refresher,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._reactor = reactor
        self._store = store
        self._refresher = refresher
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 (jitter, not a secret)
        self._records: dict[Entry, _Record] = {}
        self._running = False
        self._run = 0  # bumped by start and stop, so a scan or refresh can tell it is stale
        self._touched: set[Entry] | None = None  # entries changed while start's scan runs

    def __repr__(self) -> str:
        return f"<RenewalScheduler entries={len(self._records)} running={self._running}>"

    # -- the contract -------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """
        Schedule every stored token that has a refresh token and an expiry.
        The Deferred fires once the store has been read; a store that cannot
        be read is logged, not raised, since on-demand refresh still works.
        """
        self._run += 1
        self._running = True
        touched: set[Entry] = set()
        self._touched = touched
        return Deferred.fromCoroutine(self._scan(self._run, touched))

    def changed(self, provider: str, bucket: str, token: Token | None) -> None:
        """
        The entry was saved (C{token}) or removed (None): renew the new token,
        or forget the entry when there is nothing left to renew.
        """
        if not self._running:
            return
        entry = (provider, bucket)
        if self._touched is not None:
            self._touched.add(entry)
        record = self._records.get(entry)
        if record is not None and record.in_flight:
            record.saved_meanwhile = True
            record.latest = token
            return
        self._follow(entry, record, token)

    def stop(self) -> None:
        """
        Cancel every timer. A refresh in flight finishes but schedules nothing.
        """
        self._running = False
        self._run += 1
        self._touched = None
        for record in self._records.values():
            _cancel(record)
        self._records.clear()

    def scheduled(self) -> dict[Entry, float]:
        """
        When each entry's renewal or retry is due (Unix seconds); an entry
        whose refresh is in flight has none.
        """
        return {
            entry: record.due for entry, record in self._records.items() if record.timer is not None
        }

    # -- scheduling ------------------------------------------------------------------

    async def _scan(self, run: int, touched: set[Entry]) -> None:
        try:
            for provider in await self._store.list_providers():
                if self._run != run:
                    return
                for bucket in await self._store.list_buckets(provider):
                    if self._run != run:
                        return
                    token = await self._store.get_token(provider, bucket)
                    entry = (provider, bucket)
                    # A save reported meanwhile is newer than what was read.
                    if self._run != run or entry in touched or entry in self._records:
                        continue
                    self._follow(entry, None, token)
        except Exception as error:
            if self._run == run:
                log.warn(
                    "Could not read the stored tokens to schedule their renewal ({error_type})",
                    error_type=type(error).__name__,
                )
        finally:
            if self._touched is touched:
                self._touched = None

    def _follow(self, entry: Entry, record: _Record | None, token: Token | None) -> None:
        """
        Schedule the renewal of C{token}, or forget the entry.
        """
        expiry = renewable_expiry(token)
        if expiry is None:
            self._forget(entry)
            return
        if record is None:
            record = self._records[entry] = _Record()
        record.failures = 0
        now = self._reactor.seconds()
        due = renewal_time(expiry, now, self._rng.uniform(0.0, MAX_JITTER))
        self._arm(entry, record, max(due, record.not_before, now))

    def _arm(self, entry: Entry, record: _Record, due: float) -> None:
        _cancel(record)
        record.due = due
        delay = min(max(due - self._reactor.seconds(), 0.0), RECHECK_INTERVAL)
        record.timer = self._reactor.callLater(delay, self._fire, entry, record)

    def _forget(self, entry: Entry) -> None:
        record = self._records.pop(entry, None)
        if record is not None:
            _cancel(record)

    def _fire(self, entry: Entry, record: _Record) -> None:
        record.timer = None
        if self._records.get(entry) is not record:
            return
        if self._reactor.seconds() < record.due:  # woke early: only a recheck
            self._arm(entry, record, record.due)
            return
        record.in_flight = True
        record.saved_meanwhile = False
        record.latest = None
        Deferred.fromCoroutine(self._renew(entry, record)).addErrback(self._broken, entry)

    # -- outcomes ---------------------------------------------------------------------

    async def _renew(self, entry: Entry, record: _Record) -> None:
        provider, bucket = entry
        token: Token | None = None
        reason: RefreshFailure | None = None
        retry_after: float | None = None
        try:
            token = await self._refresher.refresh(provider, bucket)
        except RefreshError as error:
            outcome = error.reason.value
            reason = error.reason
            retry_after = error.retry_after
        except Exception as error:  # an unexpected failure is retried like REFRESH_FAILED
            outcome = type(error).__name__  # the type only: a message might quote a value
        else:
            outcome = "renewed"
        record.in_flight = False
        if self._records.get(entry) is not record:
            return  # stopped meanwhile
        now = self._reactor.seconds()
        record.not_before = now + MIN_RENEWAL_INTERVAL
        fields = {"provider": provider, "bucket": bucket, "outcome": outcome}
        if record.saved_meanwhile:  # what was saved is what the store holds now
            token = record.latest
            record.saved_meanwhile = False
            record.latest = None
            self._follow(entry, record, token)
            log.info("Renewal of {provider} bucket {bucket}: {outcome}", **fields)
        elif token is not None:
            self._follow(entry, record, token)
            log.info("Renewal of {provider} bucket {bucket}: {outcome}", **fields)
        elif reason in NOT_RETRIED:
            self._forget(entry)
            log.warn(
                "Renewal of {provider} bucket {bucket}: {outcome}; "
                "not retried until the token is saved again",
                **fields,
            )
        else:
            record.failures += 1
            if record.failures >= MAX_CONSECUTIVE_FAILURES:
                self._forget(entry)
                log.error(
                    "Renewal of {provider} bucket {bucket} failed {failures} times in a row "
                    "(last: {outcome}); given up until the token is saved again",
                    failures=record.failures,
                    **fields,
                )
                return
            delay = retry_delay(reason, retry_after, record.failures)
            self._arm(entry, record, now + delay)
            log.info(
                "Renewal of {provider} bucket {bucket}: {outcome}; retrying in {delay:.0f} s",
                delay=delay,
                **fields,
            )

    def _broken(self, failure: Failure, entry: Entry) -> None:
        """
        A bug in the scheduler's own bookkeeping: log it and forget the entry,
        so that one broken entry neither stalls nor loops.
        """
        self._forget(entry)
        log.failure(
            "Renewal of {provider} bucket {bucket} broke",
            failure,
            provider=entry[0],
            bucket=entry[1],
        )


def _cancel(record: _Record) -> None:
    if record.timer is not None and record.timer.active():
        record.timer.cancel()
    record.timer = None
