"""
The refresh coordinator: the one place that spends a stored refresh token.

OAuth refresh tokens rotate: a refresh answers a new one and kills the old.
Two refreshes of one entry that both spend the same refresh token therefore
leave one of them with C{invalid_grant} and, if it then gave up, the user
with a needless login. So a refresh of an entry runs once at a time: callers
inside this process share one flight, and the flight takes the refresh lock
(L{IRefreshLock}), which other processes sharing the store take too. Under
the lock it re-reads the store, because whoever held the lock before may
have rotated the token already; then that token is used and the provider is
not called.

A failed refresh never deletes or overwrites the stored token: an
C{invalid_grant} usually means another process rotated it, so the store is
re-read before the broker concludes that the user must log in again.

The store and the lock are interfaces, so the fleet's Redis store and lock
plug in without touching this module; its one read-merge-write goes through
L{merge_into_store}, a compare-and-set on a store several hosts write.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from credproxy._secret import Secret
from credproxy.broker._errors import RefreshError, RefreshFailure
from credproxy.broker._lock_file import IRefreshLock, RefreshLockError, RefreshLockTimeout
from credproxy.broker._locks import EntryLocks, merge_into_store
from credproxy.broker.tokens import merge_refreshed
from credproxy.oauth._http import Detail
from credproxy.oauth._interfaces import IOAuthProvider, OAuthError, OAuthErrorKind
from credproxy.stores._interfaces import IHostTokenStore, StoreError
from credproxy.stores._token import Token

log = Logger(namespace="credproxy.broker.refresh")

DEFAULT_COOLDOWN = 30.0  # seconds after a successful refresh with no new refresh of the entry
DEFAULT_RETRY_DELAYS = (1.0, 3.0)  # seconds before the 2nd and 3rd attempt after transient failures

Entry = tuple[str, str]

# Outcome kinds in the one log line per refresh (besides the failure reasons).
REFRESHED = "refreshed"  # the provider answered a new token, which was stored
ADOPTED = "adopted"  # the store already held a newer token (another process refreshed)
COOLDOWN = "cooldown"  # refreshed moments ago: the stored token was answered
SUPERSEDED = "superseded"  # the rejected token was already replaced in the store

_REFUSED_KINDS = (OAuthErrorKind.INVALID_GRANT, OAuthErrorKind.REJECTED)
# A REJECTED call with one of these details was not a refusal of the refresh
# token: the provider answered with something that is not a token. Logging in
# again would not help, so it is a failed refresh, not REAUTH_REQUIRED.
_BAD_ANSWERS = frozenset(
    {Detail.ANSWER_TOO_LARGE, Detail.CONTENT_ENCODING, Detail.NOT_JSON, Detail.NOT_A_TOKEN}
)


def _refuses_refresh_token(error: OAuthError) -> bool:
    """
    Whether the provider refused the refresh token itself.
    """
    return error.kind in _REFUSED_KINDS and error.detail not in _BAD_ANSWERS


class _Stopped(Exception):
    """
    The coordinator was stopped while this flight waited.
    """


class _Flight:
    """
    One refresh of one entry, shared by every caller that asks meanwhile.
    C{prompt} is the access token that prompted it (the stored or the
    rejected one): a token under the lock that differs from it is newer.
    """

    __slots__ = ("attempts", "entry", "pending", "prompt", "stopped", "waiters")

    def __init__(self, entry: Entry, prompt: Secret | None) -> None:
        self.entry = entry
        self.prompt = prompt
        self.waiters: list[Deferred[Token]] = []
        self.pending: Deferred[Any] | None = None  # the lock wait or retry timer now running
        self.stopped = False
        self.attempts = 0  # provider calls made

    def __repr__(self) -> str:
        return f"<refresh {self.entry[0]}/{self.entry[1]} waiters={len(self.waiters)}>"

    def join(self) -> Deferred[Token]:
        """
        A Deferred for one caller; cancelling it leaves the flight running
        for the others (and for the store: a rotated token must be saved).
        """

        def leave(waiter: Deferred[Token]) -> None:
            if waiter in self.waiters:
                self.waiters.remove(waiter)

        waiter: Deferred[Token] = Deferred(leave)
        self.waiters.append(waiter)
        return waiter

    def settle(self, result: Token | RefreshError) -> None:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if waiter.called:
                continue
            if isinstance(result, Token):
                waiter.callback(result)
            else:  # a fresh exception per caller: each raise grows its own traceback
                waiter.errback(RefreshError(result.reason, result.message, result.retry_after))


class RefreshCoordinator:
    """
    Refreshes stored OAuth tokens: one flight per entry, the refresh lock
    around it, a cooldown after success, retries after transient failures,
    and a re-read of the store before any conclusion.

    C{on_saved(provider, bucket, token)} is called whenever a refresh
    changed the entry's token: with the token it saved, or with the newer
    token it found stored by someone else (so renewal timers follow either).
    """

    def __init__(
        self,
        reactor: IReactorTime,
        store: IHostTokenStore,
        providers: Mapping[str, IOAuthProvider],
        lock: IRefreshLock,
        entry_locks: EntryLocks,
        on_saved: Callable[[str, str, Token | None], None],
        *,
        cooldown: float = DEFAULT_COOLDOWN,
        retry_delays: tuple[float, ...] = DEFAULT_RETRY_DELAYS,
    ) -> None:
        self._reactor = reactor
        self.store = store
        self.providers = providers
        self.lock = lock
        self.entry_locks = entry_locks
        self._on_saved = on_saved
        self.cooldown = cooldown
        self.retry_delays = tuple(retry_delays)
        self._flights: dict[Entry, _Flight] = {}
        self._cooldown_until: dict[Entry, float] = {}
        # The refresh token the provider last refused with invalid_grant, per
        # entry: it is dead for good, so it is not sent again (each agent
        # request would otherwise spend a token-endpoint call on it).
        self._refused: dict[Entry, Secret] = {}

    def __repr__(self) -> str:
        return f"<RefreshCoordinator store={self.store!r} in_flight={len(self._flights)}>"

    # -- the two ways in ------------------------------------------------------------

    async def refresh(self, provider: str, bucket: str, rejected: str | None = None) -> Token:
        """
        Refresh the entry's token now and answer the new one. With
        C{rejected} (an access token the upstream refused), a stored token
        that differs from it is answered without a refresh.

        Within the cooldown after a successful refresh, the stored token is
        answered if it has not expired (also when it is the rejected one:
        the caller then passes the second refusal on), else
        L{RefreshFailure.RATE_LIMITED} is raised with the seconds left.

        Raises L{RefreshError}.
        """
        if provider not in self.providers:
            raise self._unknown_provider(provider, bucket)
        entry = (provider, bucket)
        flight = self._flights.get(entry)
        if flight is None:
            stored = await self.store.get_token(provider, bucket)
            flight = self._flights.get(entry)  # one may have started during the read
            if flight is None:
                answer = self._answer_without_refresh(entry, stored, rejected)
                if answer is not None:
                    return answer
                prompt = Secret(rejected) if rejected is not None else _access(stored)
                flight = _Flight(entry, prompt)
                self._flights[entry] = flight
                waiter = flight.join()  # before the flight starts: it may end at once
                Deferred.fromCoroutine(self._run(flight)).addBoth(self._landed, flight)
                return await waiter
        return await flight.join()

    async def fresh_token(self, provider: str, bucket: str, min_validity: float) -> Token | None:
        """
        The stored token, refreshed first when it expires within
        C{min_validity} seconds; None when nothing is stored.

        This is on every proxied request's path: when no refresh is due it
        costs one store read and nothing else. When a refresh is due but
        fails, the current token is still answered while it has not expired
        (with a warning naming the failure's kind); an expired token that
        cannot be refreshed raises the L{RefreshError}.

        A token without an expiry is answered as it is (the upstream's 401
        then leads to L{refresh} with C{rejected}). So is, until it expires,
        a token that cannot be refreshed now (no refresh token, no provider
        configured, a refresh token the provider refused, or an entry within
        its cooldown), without a lock or a log line. Once it has expired the
        refresh is attempted and its failure raised: C{PROVIDER_NOT_FOUND}
        at once; C{REFRESH_NOT_AVAILABLE} or C{REAUTH_REQUIRED} after a
        re-read under the lock, which answers a token another process stored
        meanwhile instead; C{RATE_LIMITED} within the cooldown.
        """
        token = await self.store.get_token(provider, bucket)
        if token is None:
            return None
        expiry = token.expiry
        if expiry is None:
            return token
        now = self._reactor.seconds()
        if expiry - now > min_validity:
            return token
        if expiry > now and not self._may_refresh(provider, bucket, token, now):
            return token
        try:
            return await self.refresh(provider, bucket)
        except RefreshError as e:
            if expiry <= self._reactor.seconds():
                raise
            log.warn(
                "Token refresh {provider}/{bucket} failed ({outcome}); "
                "using the current token until it expires",
                provider=provider,
                bucket=bucket,
                outcome=e.reason.value,
            )
            return token

    def stop(self) -> None:
        """
        Fail every waiting caller with C{REFRESH_FAILED} and cancel the
        flights' lock waits and retry timers. A provider call already under
        way is left to finish and its token is saved: the provider may have
        rotated the refresh token, and dropping the answer would lose it.
        """
        flights = list(self._flights.values())
        self._flights.clear()
        for flight in flights:
            flight.stopped = True
            provider = flight.entry[0]
            flight.settle(
                RefreshError(
                    RefreshFailure.REFRESH_FAILED,
                    f"Token refresh for {provider} was stopped: credproxy is shutting down",
                )
            )
            if flight.pending is not None:
                flight.pending.cancel()

    # -- before a flight ------------------------------------------------------------

    def _answer_without_refresh(
        self, entry: Entry, stored: Token | None, rejected: str | None
    ) -> Token | None:
        """
        The stored token when it answers the request without a refresh, None
        when a flight must start; raises C{RATE_LIMITED}. Nothing stored
        starts a flight too: only the read under the lock is authoritative.
        """
        if stored is None:
            return None
        now = self._reactor.seconds()
        if rejected is not None and _replaces(stored, Secret(rejected), now):
            self._log_early(entry, SUPERSEDED)
            return stored
        until = self._cooldown_until.get(entry)
        if until is None:
            return None
        if now >= until:
            del self._cooldown_until[entry]
            return None
        if not _expired(stored, now):
            self._log_early(entry, COOLDOWN)
            return stored
        retry_after = until - now
        self._log_early(entry, RefreshFailure.RATE_LIMITED.value)
        raise RefreshError(
            RefreshFailure.RATE_LIMITED,
            f"The token for {entry[0]} was refreshed moments ago and has expired; "
            f"retry in {math.ceil(retry_after)} s",
            retry_after=retry_after,
        )

    def _may_refresh(self, provider: str, bucket: str, token: Token, now: float) -> bool:
        """
        Whether a refresh of this not yet expired token could give a newer
        one; if not, L{fresh_token} answers it without asking.
        """
        refresh_token = token.refresh_token
        if refresh_token is None or provider not in self.providers:
            return False
        entry = (provider, bucket)
        refused = self._refused.get(entry)
        if refused is not None and refused.matches(refresh_token):
            return False
        until = self._cooldown_until.get(entry)
        return until is None or now >= until

    # -- the flight -----------------------------------------------------------------

    def _landed(self, result: Token | Failure, flight: _Flight) -> None:
        if self._flights.get(flight.entry) is flight:
            del self._flights[flight.entry]
        if isinstance(result, Failure):
            error = result.value
            if not isinstance(error, RefreshError):  # _run converts everything; be sure
                error = _failed(flight.entry[0], "internal error")
            flight.settle(error)
        else:
            flight.settle(result)

    async def _run(self, flight: _Flight) -> Token:
        """
        The flight, with its one log line. Every failure leaves as a
        L{RefreshError} with the broker's fixed text.
        """
        provider_name, bucket = flight.entry
        try:
            token, outcome = await self._locked(flight)
        except RefreshError as e:
            self._log_flight(flight, e.reason.value, failed=True)
            raise
        except (_Stopped, CancelledError):
            if not flight.stopped:  # a cancellation from below us, not from stop()
                self._log_flight(flight, RefreshFailure.REFRESH_FAILED.value, failed=True)
                raise _failed(provider_name, "the provider call was cancelled") from None
            self._log_flight(flight, "stopped", failed=True)
            raise RefreshError(
                RefreshFailure.REFRESH_FAILED,
                f"Token refresh for {provider_name} was stopped: credproxy is shutting down",
            ) from None
        except StoreError as e:  # its message names the store and entry, never a value
            log.error(
                "Token refresh {provider}/{bucket}: the token store failed: {error}",
                provider=provider_name,
                bucket=bucket,
                error=str(e),
            )
            self._log_flight(flight, RefreshFailure.REFRESH_FAILED.value, failed=True)
            raise _failed(provider_name, "the token store failed") from None
        except Exception as e:
            log.error(
                "Token refresh {provider}/{bucket}: internal error {kind}",
                provider=provider_name,
                bucket=bucket,
                kind=type(e).__name__,
            )
            self._log_flight(flight, RefreshFailure.REFRESH_FAILED.value, failed=True)
            raise _failed(provider_name, "internal error") from None
        self._log_flight(flight, outcome, failed=False)
        return token

    async def _locked(self, flight: _Flight) -> tuple[Token, str]:
        provider_name, bucket = flight.entry
        waiting = self.lock.acquire(provider_name, bucket)
        flight.pending = waiting
        try:
            held = await waiting
        except RefreshLockTimeout:
            raise RefreshError(
                RefreshFailure.REFRESH_FAILED,
                f"Timed out waiting for another process to refresh the token for {provider_name}",
            ) from None
        except RefreshLockError:
            raise _failed(provider_name, "the refresh lock could not be taken") from None
        finally:
            flight.pending = None
        try:
            return await self._refresh_holding_lock(flight)
        finally:
            try:
                held.release()
            except Exception as e:
                log.error(
                    "Releasing the refresh lock of {provider}/{bucket} failed: {kind}",
                    provider=provider_name,
                    bucket=bucket,
                    kind=type(e).__name__,
                )

    async def _refresh_holding_lock(self, flight: _Flight) -> tuple[Token, str]:
        entry = flight.entry
        provider_name, bucket = entry
        provider = self.providers.get(provider_name)
        if provider is None:
            raise self._unknown_provider(provider_name, bucket)
        if flight.stopped:
            raise _Stopped()
        # Whoever held the lock before us may have rotated the token.
        self.store.invalidate(provider_name, bucket)
        stored = await self.store.get_token(provider_name, bucket)
        if flight.stopped:
            raise _Stopped()
        if stored is None:
            raise _not_found(provider_name)
        if _replaces(stored, flight.prompt, self._reactor.seconds()):
            self._changed(provider_name, bucket, stored)
            return stored, ADOPTED
        refresh_token = stored.refresh_token
        if refresh_token is None:
            raise RefreshError(
                RefreshFailure.REFRESH_NOT_AVAILABLE,
                f"No refresh token stored for provider: {provider_name}",
            )
        spent = Secret(refresh_token)
        refused = self._refused.get(entry)
        if refused is not None:
            if refused == spent:
                raise _reauth(provider_name)
            del self._refused[entry]  # a new login replaced the refused token
        try:
            new = await self._call(flight, provider, spent)
        except OAuthError as e:
            if _refuses_refresh_token(e):
                return await self._after_refusal(flight, stored, spent, e.kind)
            raise RefreshError(
                RefreshFailure.REFRESH_FAILED,
                f"Could not refresh the token for {provider_name}: "
                f"the token endpoint failed {flight.attempts} time(s)",
            ) from None
        merged = await self._save(entry, new)
        self._cooldown_until[entry] = self._reactor.seconds() + self.cooldown
        self._changed(provider_name, bucket, merged)
        return merged, REFRESHED

    async def _call(self, flight: _Flight, provider: IOAuthProvider, spent: Secret) -> Token:
        """
        The provider call, retried after each of C{retry_delays} while it
        fails transiently (the same refresh token: we hold the lock, so
        nobody else can have spent it).
        """
        delays = iter(self.retry_delays)
        while True:
            flight.attempts += 1
            try:
                new: Token = await provider.refresh(spent)
            except OAuthError as e:
                delay = next(delays, None)
                if e.kind is not OAuthErrorKind.TRANSIENT or delay is None or flight.stopped:
                    raise
            else:
                return new
            sleep: Deferred[None] = deferLater(self._reactor, delay, lambda: None)
            flight.pending = sleep
            try:
                await sleep
            finally:
                flight.pending = None

    async def _after_refusal(
        self, flight: _Flight, stored: Token, spent: Secret, kind: OAuthErrorKind
    ) -> tuple[Token, str]:
        """
        The provider refused the refresh token. Usually another process
        rotated it (its lock may have been lost, or it logged in anew): if
        the store now holds a different token that has not expired, that one
        is the answer. Otherwise the user must log in again; the stored token
        stays as it is either way.
        """
        provider_name, bucket = flight.entry
        self.store.invalidate(provider_name, bucket)
        current = await self.store.get_token(provider_name, bucket)
        if current is not None and _replaces(current, _access(stored), self._reactor.seconds()):
            self._changed(provider_name, bucket, current)
            return current, ADOPTED
        if kind is OAuthErrorKind.INVALID_GRANT:
            self._refused[flight.entry] = spent
        raise _reauth(provider_name)

    async def _save(self, entry: Entry, new: Token) -> Token:
        """
        Merge the new token over what is stored now (re-read inside the entry
        lock, so a C{save_token} that landed during the provider call keeps
        its fields) and store it. An entry removed meanwhile stays removed.
        """
        provider_name, bucket = entry

        def merge(current: Token | None) -> Token | None:
            return None if current is None else merge_refreshed(current, new)

        async def merge_and_store() -> Token | None:
            return await merge_into_store(
                self.store, provider_name, bucket, merge, clock=self._reactor, fresh=True
            )

        merged = await self.entry_locks.run(entry, merge_and_store)
        if merged is None:
            raise _not_found(provider_name)
        self._refused.pop(entry, None)
        return merged

    # -- helpers ----------------------------------------------------------------------

    def _changed(self, provider: str, bucket: str, token: Token) -> None:
        try:
            self._on_saved(provider, bucket, token)
        except Exception as e:
            log.error(
                "After refreshing {provider}/{bucket}, on_saved failed: {kind}",
                provider=provider,
                bucket=bucket,
                kind=type(e).__name__,
            )

    def _unknown_provider(self, provider: str, bucket: str) -> RefreshError:
        self._log_early((provider, bucket), RefreshFailure.PROVIDER_NOT_FOUND.value)
        return RefreshError(
            RefreshFailure.PROVIDER_NOT_FOUND, f"No OAuth provider configured for: {provider}"
        )

    def _log_flight(self, flight: _Flight, outcome: str, *, failed: bool) -> None:
        emit = log.warn if failed else log.info
        emit(
            "Token refresh {provider}/{bucket}: {outcome} after {attempts} provider call(s)",
            provider=flight.entry[0],
            bucket=flight.entry[1],
            outcome=outcome,
            attempts=flight.attempts,
        )

    def _log_early(self, entry: Entry, outcome: str) -> None:
        """
        A refresh answered without a flight: at debug level, since a cooled
        down entry may answer this on every request.
        """
        log.debug(
            "Token refresh {provider}/{bucket}: {outcome} after {attempts} provider call(s)",
            provider=entry[0],
            bucket=entry[1],
            outcome=outcome,
            attempts=0,
        )


def _access(token: Token | None) -> Secret | None:
    access = token.access_token if token is not None else None
    return Secret(access) if access is not None else None


def _expired(token: Token, now: float) -> bool:
    expiry = token.expiry
    return expiry is not None and expiry <= now


def _replaces(token: Token, prompt: Secret | None, now: float) -> bool:
    """
    Whether C{token} is a usable successor of the access token C{prompt}: it
    has an access token, a different one, and it has not expired.
    """
    access = token.access_token
    if access is None or _expired(token, now):
        return False
    return prompt is None or not prompt.matches(access)


def _not_found(provider: str) -> RefreshError:
    return RefreshError(RefreshFailure.NOT_FOUND, f"No token found for provider: {provider}")


def _reauth(provider: str) -> RefreshError:
    return RefreshError(
        RefreshFailure.REAUTH_REQUIRED,
        f"The refresh token for {provider} was refused; log in again on the host",
    )


def _failed(provider: str, why: str) -> RefreshError:
    return RefreshError(
        RefreshFailure.REFRESH_FAILED, f"Could not refresh the token for {provider}: {why}"
    )
