"""
The refresh coordinator on a Clock, over real stores and real locks: single
flight, the re-read under the lock, cooldown, transient retries, refusals
(invalid_grant re-reads, never deletes), C{rejected=}, C{fresh_token}'s hot
path and fallbacks, C{stop}, and that no token reaches a log line or error.

The token endpoint is a double (L{TokenEndpoint}) that rotates refresh
tokens as a real one does: a spent refresh token is refused with
invalid_grant.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import LogEvent, LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from credproxy._secret import Secret
from credproxy.broker._errors import RefreshError, RefreshFailure
from credproxy.broker._lock_file import (
    FileRefreshLock,
    IHeldLock,
    InProcessRefreshLock,
    IRefreshLock,
)
from credproxy.broker._locks import EntryLocks
from credproxy.broker._refresh import (
    DEFAULT_COOLDOWN,
    DEFAULT_RETRY_DELAYS,
    RefreshCoordinator,
)
from credproxy.broker.tokens import merge_saved
from credproxy.oauth._http import Detail
from credproxy.oauth._interfaces import FlowType, IOAuthProvider, OAuthError, OAuthErrorKind
from credproxy.stores import FileTokenStore, MemoryTokenStore, StoreError
from credproxy.stores._interfaces import IHostTokenStore
from credproxy.stores._token import Token
from credproxy.testing import InlineBlockingCalls
from tests.logcapture import captured_log, log_text

P, B = "anthropic", "default"
START = 1_700_000_000.0  # the Clock starts at a plausible Unix time
HOLD = "hold"  # a script step: answer only when the test says so


def access(n: int) -> str:
    return f"sk-ant-oat01-access-{n}"


def refresh_token(n: int) -> str:
    return f"sk-ant-ort01-refresh-{n}"


@implementer(IOAuthProvider)
class TokenEndpoint:
    """
    A provider double with a real token endpoint's rotation: each refresh
    spends its refresh token and mints the next; a spent or unknown one is
    refused with invalid_grant. C{script} overrides the next answers (an
    L{OAuthErrorKind} to fail with, or L{HOLD}); C{on_call} runs first (to
    play another process writing the store meanwhile).
    """

    flow = FlowType.PKCE_REDIRECT

    def __init__(self, clock: Clock, name: str = P) -> None:
        self.name = name
        self.clock = clock
        self.calls: list[str] = []
        self.script: list[OAuthErrorKind | OAuthError | str] = []
        self.held: list[Deferred[Token]] = []
        self.on_call: Callable[[], None] | None = None
        self.lifetime = 3600.0
        self.rotate = True
        self.minted = 0
        self.live = {refresh_token(0)}

    def mint(self) -> Token:
        self.minted += 1
        fields: dict[str, Any] = {
            "access_token": access(self.minted),
            "token_type": "Bearer",
            "expiry": self.clock.seconds() + self.lifetime,
        }
        if self.rotate:
            fields["refresh_token"] = refresh_token(self.minted)
            self.live.add(refresh_token(self.minted))
        return Token(fields)

    def refresh(self, refresh_token: Secret) -> Deferred[Token]:
        spent = refresh_token.reveal()
        self.calls.append(spent)
        if self.on_call is not None:
            self.on_call()
        step = self.script.pop(0) if self.script else None
        if isinstance(step, OAuthErrorKind):
            return fail(OAuthError(step, "400"))
        if isinstance(step, OAuthError):
            return fail(step)
        if spent not in self.live:
            return fail(OAuthError(OAuthErrorKind.INVALID_GRANT, "400"))
        if self.rotate:
            self.live.discard(spent)
        if step == HOLD:
            held: Deferred[Token] = Deferred()
            self.held.append(held)
            return held
        return succeed(self.mint())

    def answer_held(self) -> None:
        for held in self.held:
            held.callback(self.mint())
        self.held = []


@implementer(IHeldLock)
class _CountedHeld:
    def __init__(self, lock: CountingLock, held: IHeldLock) -> None:
        self.lock = lock
        self.held = held

    def release(self) -> None:
        self.lock.released += 1
        self.held.release()


@implementer(IRefreshLock)
class CountingLock:
    """
    A real lock, counted: how often the coordinator took and gave it back.
    """

    def __init__(self, inner: IRefreshLock) -> None:
        self.inner = inner
        self.acquired = 0
        self.released = 0

    def acquire(self, provider: str, bucket: str) -> Deferred[IHeldLock]:
        def held(lock: IHeldLock) -> IHeldLock:
            self.acquired += 1
            return _CountedHeld(self, lock)

        return self.inner.acquire(provider, bucket).addCallback(held)

    @property
    def holding(self) -> int:
        return self.acquired - self.released


class CountingStore(MemoryTokenStore):
    """
    The memory store, counting reads and invalidations.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.invalidations = 0
        self.fail_reads_after: int | None = None
        self.on_invalidate: Callable[[], None] | None = None

    def get_token(self, provider: str, bucket: str | None = None) -> Deferred[Token | None]:
        self.reads += 1
        if self.fail_reads_after is not None and self.reads > self.fail_reads_after:
            return fail(StoreError("memory store: reading anthropic/default failed"))
        return super().get_token(provider, bucket)

    def invalidate(self, provider: str, bucket: str | None = None) -> None:
        self.invalidations += 1
        if self.on_invalidate is not None:
            self.on_invalidate()


class Harness:
    def __init__(
        self,
        test: SynchronousTestCase,
        *,
        clock: Clock | None = None,
        store: IHostTokenStore | None = None,
        lock: IRefreshLock | None = None,
        endpoint: TokenEndpoint | None = None,
        **options: Any,
    ) -> None:
        self.test = test
        if clock is None:
            clock = Clock()
            clock.advance(START)
        self.clock = clock
        self.store: IHostTokenStore = store if store is not None else CountingStore()
        self.lock = CountingLock(lock if lock is not None else InProcessRefreshLock())
        self.endpoint = endpoint if endpoint is not None else TokenEndpoint(clock)
        self.saved: list[tuple[str, str, Token | None]] = []
        self.coordinator = RefreshCoordinator(
            clock,
            self.store,
            {P: self.endpoint},
            self.lock,
            EntryLocks(),
            lambda p, b, t: self.saved.append((p, b, t)),
            **options,
        )

    def put(self, n: int = 0, expires_in: float | None = 600.0, **fields: Any) -> Token:
        base: dict[str, Any] = {
            "access_token": access(n),
            "refresh_token": refresh_token(n),
            "token_type": "Bearer",
        }
        if expires_in is not None:
            base["expiry"] = self.clock.seconds() + expires_in
        base.update(fields)
        token = Token({k: v for k, v in base.items() if v is not None})
        self.test.successResultOf(self.store.save_token(P, token, B))
        return token

    def stored(self) -> Token | None:
        return self.test.successResultOf(self.store.get_token(P, B))

    def refresh(self, rejected: str | None = None, bucket: str = B) -> Deferred[Token]:
        return Deferred.fromCoroutine(self.coordinator.refresh(P, bucket, rejected))

    def fresh(self, min_validity: float) -> Deferred[Token | None]:
        return Deferred.fromCoroutine(self.coordinator.fresh_token(P, B, min_validity))

    def token(self, d: Deferred[Token | None]) -> Token:
        token = self.test.successResultOf(d)
        assert token is not None
        return token

    def failure(self, d: Deferred[Any], reason: RefreshFailure) -> RefreshError:
        error = self.test.failureResultOf(d, RefreshError).value
        assert isinstance(error, RefreshError)
        self.test.assertEqual(error.reason, reason)
        return error


def refresh_lines(events: list[LogEvent]) -> list[LogEvent]:
    return [e for e in events if e.get("log_format", "").startswith("Token refresh {provider}")]


class SingleFlightTests(SynchronousTestCase):
    def test_ten_concurrent_refreshes_make_one_provider_call(self) -> None:
        h = Harness(self)
        h.put(0)
        h.endpoint.script = [HOLD]
        waiting = [h.refresh() for _ in range(10)]
        self.assertEqual(h.endpoint.calls, [refresh_token(0)])
        for d in waiting:
            self.assertNoResult(d)
        h.endpoint.answer_held()
        tokens = [self.successResultOf(d) for d in waiting]
        self.assertEqual(h.endpoint.calls, [refresh_token(0)])
        self.assertTrue(all(t == tokens[0] for t in tokens))
        self.assertEqual(tokens[0].access_token, access(1))
        stored = h.stored()
        assert stored is not None
        self.assertEqual(stored.refresh_token, refresh_token(1))  # the rotated one
        self.assertEqual(stored, tokens[0])
        self.assertEqual(h.saved, [(P, B, tokens[0])])
        self.assertEqual((h.lock.acquired, h.lock.holding), (1, 0))

    def test_fresh_token_and_refresh_callers_share_the_flight(self) -> None:
        h = Harness(self)
        h.put(0, expires_in=30)
        h.endpoint.script = [HOLD]
        waiting: list[Deferred[Any]] = [h.fresh(60) for _ in range(5)]
        waiting += [h.refresh() for _ in range(5)]
        self.assertEqual(len(h.endpoint.calls), 1)
        h.endpoint.answer_held()
        results = {self.successResultOf(d).access_token for d in waiting}
        self.assertEqual(results, {access(1)})

    def test_a_cancelled_caller_leaves_the_flight_to_the_others(self) -> None:
        h = Harness(self)
        h.put(0)
        h.endpoint.script = [HOLD]
        first, second, third = h.refresh(), h.refresh(), h.refresh()
        second.cancel()
        self.failureResultOf(second, CancelledError)
        h.endpoint.answer_held()
        self.assertEqual(self.successResultOf(first).access_token, access(1))
        self.assertEqual(self.successResultOf(third).access_token, access(1))
        stored = h.stored()
        assert stored is not None
        self.assertEqual(stored.refresh_token, refresh_token(1))

    def test_entries_refresh_independently(self) -> None:
        h = Harness(self)
        h.put(0)
        other = Token({"access_token": "sk-ant-oat01-other", "refresh_token": "sk-ant-ort01-o"})
        self.successResultOf(h.store.save_token(P, other, "work"))
        h.endpoint.live.add("sk-ant-ort01-o")
        h.endpoint.script = [HOLD, HOLD]
        a, b = h.refresh(), h.refresh(bucket="work")
        self.assertEqual(h.endpoint.calls, [refresh_token(0), "sk-ant-ort01-o"])
        h.endpoint.answer_held()
        self.assertNotEqual(self.successResultOf(a), self.successResultOf(b))


class SaveTests(SynchronousTestCase):
    def test_the_new_token_is_merged_over_the_stored_one(self) -> None:
        h = Harness(self)
        h.put(0, scope="user:inference", resource_url="https://example.invalid")
        h.endpoint.rotate = False  # the answer carries no refresh token
        token = self.successResultOf(h.refresh())
        self.assertEqual(token.access_token, access(1))
        self.assertEqual(token.refresh_token, refresh_token(0))  # kept
        self.assertEqual(token["scope"], "user:inference")
        self.assertEqual(token["resource_url"], "https://example.invalid")
        self.assertEqual(token.expiry, START + 3600)
        self.assertEqual(h.stored(), token)

    def test_a_save_during_the_provider_call_keeps_its_fields(self) -> None:
        h = Harness(self)
        stored = h.put(0)
        h.endpoint.script = [HOLD]
        d = h.refresh()
        self.successResultOf(h.store.save_token(P, merge_saved(stored, {"note": "kept"}), B))
        h.endpoint.answer_held()
        token = self.successResultOf(d)
        self.assertEqual(token["note"], "kept")
        self.assertEqual(token.access_token, access(1))
        self.assertEqual(h.stored(), token)

    def test_an_entry_removed_during_the_call_stays_removed(self) -> None:
        h = Harness(self)
        h.put(0)
        h.endpoint.script = [HOLD]
        d = h.refresh()
        self.successResultOf(h.store.remove_token(P, B))
        h.endpoint.answer_held()
        error = h.failure(d, RefreshFailure.NOT_FOUND)
        self.assertEqual(error.message, "No token found for provider: anthropic")
        self.assertIsNone(h.stored())
        self.assertEqual((h.lock.holding, h.saved), (0, []))


class UnderTheLockTests(SynchronousTestCase):
    """
    Two "processes" in one test: two coordinators, each with its own file
    store (its own cache) and its own file lock, on one state directory.
    """

    def setUp(self) -> None:
        self.base = tempfile.mkdtemp(prefix="cp-refresh-")
        self.addCleanup(shutil.rmtree, self.base, True)
        self.clock = Clock()
        self.clock.advance(START)
        self.endpoint = TokenEndpoint(self.clock)

    def process(self, **lock_options: float) -> Harness:
        store = FileTokenStore(self.base, InlineBlockingCalls())
        lock = FileRefreshLock(self.clock, f"{self.base}/locks", **lock_options)
        return Harness(self, clock=self.clock, store=store, lock=lock, endpoint=self.endpoint)

    def test_a_token_rotated_while_we_waited_for_the_lock_is_used(self) -> None:
        a, b = self.process(), self.process(poll_interval=0.1)
        a.put(0)
        self.assertEqual(b.stored(), a.stored())  # b's cache now holds the old token
        self.endpoint.script = [HOLD]
        from_a = a.refresh()
        from_b = [b.refresh() for _ in range(3)]
        self.clock.advance(0.1)
        self.assertNoResult(from_b[0])  # waiting for a's lock
        self.endpoint.answer_held()
        new = self.successResultOf(from_a)
        self.clock.advance(0.1)
        for d in from_b:
            self.assertEqual(self.successResultOf(d), new)
        self.assertEqual(self.endpoint.calls, [refresh_token(0)])
        self.assertEqual(b.saved, [(P, B, new)])  # b's renewal follows the new token
        self.assertEqual(b.stored(), new)
        self.assertEqual((a.lock.holding, b.lock.holding), (0, 0))

    def test_a_stuck_holder_is_a_bounded_wait(self) -> None:
        a, b = self.process(), self.process(poll_interval=0.5, timeout=5.0)
        stored = a.put(0)
        other = FileRefreshLock(self.clock, f"{self.base}/locks")
        held = self.successResultOf(other.acquire(P, B))
        d = b.refresh()
        self.clock.advance(4.5)
        self.assertNoResult(d)
        self.clock.advance(0.5)
        error = b.failure(d, RefreshFailure.REFRESH_FAILED)
        self.assertEqual(
            error.message,
            "Timed out waiting for another process to refresh the token for anthropic",
        )
        self.assertEqual(self.endpoint.calls, [])
        self.assertEqual(b.stored(), stored)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        held.release()

    def test_stop_ends_a_lock_wait(self) -> None:
        a, b = self.process(), self.process()
        a.put(0)
        held = self.successResultOf(FileRefreshLock(self.clock, f"{self.base}/locks").acquire(P, B))
        d = b.refresh()
        b.coordinator.stop()
        b.failure(d, RefreshFailure.REFRESH_FAILED)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        held.release()
        self.successResultOf(a.refresh())  # nothing of b's wait is left holding anything


class CooldownTests(SynchronousTestCase):
    def test_within_the_cooldown_the_stored_token_is_answered(self) -> None:
        self.assertEqual(DEFAULT_COOLDOWN, 30.0)
        h = Harness(self)
        h.put(0)
        first = self.successResultOf(h.refresh())
        h.clock.advance(29.9)
        self.assertEqual(self.successResultOf(h.refresh()), first)
        self.assertEqual(len(h.endpoint.calls), 1)
        self.assertEqual(h.lock.acquired, 1)
        h.clock.advance(0.1)
        second = self.successResultOf(h.refresh())
        self.assertEqual(second.access_token, access(2))
        self.assertEqual(len(h.endpoint.calls), 2)

    def test_an_expired_token_within_the_cooldown_is_rate_limited(self) -> None:
        h = Harness(self)
        h.put(0)
        h.endpoint.lifetime = 5.0  # the provider hands out short-lived tokens
        self.successResultOf(h.refresh())
        h.clock.advance(10.0)
        error = h.failure(h.refresh(), RefreshFailure.RATE_LIMITED)
        self.assertEqual(error.retry_after, 20.0)
        self.assertIn("retry in 20 s", error.message)
        self.assertEqual(len(h.endpoint.calls), 1)
        h.clock.advance(20.0)
        self.assertEqual(self.successResultOf(h.refresh()).access_token, access(2))

    def test_the_cooldown_is_per_entry(self) -> None:
        h = Harness(self)
        h.put(0)
        self.successResultOf(h.refresh())
        other = Token({"access_token": "sk-ant-oat01-w", "refresh_token": "sk-ant-ort01-w"})
        self.successResultOf(h.store.save_token(P, other, "work"))
        h.endpoint.live.add("sk-ant-ort01-w")
        self.successResultOf(h.refresh(bucket="work"))
        self.assertEqual(len(h.endpoint.calls), 2)

    def test_a_custom_cooldown(self) -> None:
        h = Harness(self, cooldown=5.0)
        h.put(0)
        self.successResultOf(h.refresh())
        h.clock.advance(5.0)
        self.successResultOf(h.refresh())
        self.assertEqual(len(h.endpoint.calls), 2)


class RetryTests(SynchronousTestCase):
    def test_transient_failures_are_retried_at_1_and_3_seconds(self) -> None:
        self.assertEqual(DEFAULT_RETRY_DELAYS, (1.0, 3.0))
        h = Harness(self)
        stored = h.put(0)
        h.endpoint.script = [OAuthErrorKind.TRANSIENT] * 3
        d = h.refresh()
        self.assertEqual(len(h.endpoint.calls), 1)
        h.clock.advance(0.999)
        self.assertEqual(len(h.endpoint.calls), 1)
        h.clock.advance(0.001)
        self.assertEqual(len(h.endpoint.calls), 2)
        h.clock.advance(2.999)
        self.assertEqual(len(h.endpoint.calls), 2)
        self.assertNoResult(d)
        h.clock.advance(0.001)
        self.assertEqual(h.endpoint.calls, [refresh_token(0)] * 3)
        error = h.failure(d, RefreshFailure.REFRESH_FAILED)
        self.assertEqual(
            error.message,
            "Could not refresh the token for anthropic: the token endpoint failed 3 time(s)",
        )
        self.assertEqual(h.stored(), stored)
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertEqual((h.lock.holding, h.saved), (0, []))

    def test_a_retry_that_succeeds(self) -> None:
        h = Harness(self)
        h.put(0)
        h.endpoint.script = [OAuthErrorKind.TRANSIENT]
        with captured_log() as events:
            d = h.refresh()
            h.clock.advance(1.0)
            self.assertEqual(self.successResultOf(d).access_token, access(1))
        (line,) = refresh_lines(events)
        self.assertEqual((line["outcome"], line["attempts"]), ("refreshed", 2))

    def test_custom_retry_delays(self) -> None:
        h = Harness(self, retry_delays=(2.0,))
        h.put(0)
        h.endpoint.script = [OAuthErrorKind.TRANSIENT] * 2
        d = h.refresh()
        h.clock.advance(2.0)
        h.failure(d, RefreshFailure.REFRESH_FAILED)
        self.assertEqual(len(h.endpoint.calls), 2)

    def test_refusals_are_not_retried(self) -> None:
        for kind in (OAuthErrorKind.INVALID_GRANT, OAuthErrorKind.REJECTED):
            h = Harness(self)
            h.put(0)
            h.endpoint.script = [kind]
            h.failure(h.refresh(), RefreshFailure.REAUTH_REQUIRED)
            self.assertEqual(len(h.endpoint.calls), 1)
            self.assertEqual(h.clock.getDelayedCalls(), [])


class RefusalTests(SynchronousTestCase):
    def test_an_answer_that_is_not_a_token_is_a_failed_refresh_not_a_new_login(self) -> None:
        for detail in (Detail.NOT_JSON, Detail.NOT_A_TOKEN, Detail.ANSWER_TOO_LARGE):
            h = Harness(self)
            stored = h.put(0)
            h.endpoint.script = [OAuthError(OAuthErrorKind.REJECTED, detail)]
            h.failure(h.refresh(), RefreshFailure.REFRESH_FAILED)
            self.assertEqual(h.stored(), stored)
            self.assertEqual(len(h.endpoint.calls), 1)  # a bad answer is not retried

    def test_a_refusal_with_a_status_is_a_new_login(self) -> None:
        h = Harness(self)
        h.put(0)
        h.endpoint.script = [OAuthError(OAuthErrorKind.REJECTED, "401")]
        h.failure(h.refresh(), RefreshFailure.REAUTH_REQUIRED)

    def test_invalid_grant_uses_the_token_another_process_stored(self) -> None:
        h = Harness(self)
        h.put(0)
        theirs = Token(
            {
                "access_token": "sk-ant-oat01-theirs",
                "refresh_token": "sk-ant-ort01-theirs",
                "expiry": START + 3600,
            }
        )

        def another_process_rotated() -> None:
            h.endpoint.live.discard(refresh_token(0))
            self.successResultOf(h.store.save_token(P, theirs, B))

        h.endpoint.on_call = another_process_rotated
        token = self.successResultOf(h.refresh())
        self.assertEqual(token, theirs)
        self.assertEqual(h.stored(), theirs)  # nothing deleted or overwritten
        self.assertEqual(h.saved, [(P, B, theirs)])
        self.assertEqual(len(h.endpoint.calls), 1)
        store = h.store
        assert isinstance(store, CountingStore)
        self.assertEqual(store.invalidations, 2)  # before the call, and after the refusal

    def test_invalid_grant_with_nothing_new_requires_a_login_and_keeps_the_token(self) -> None:
        h = Harness(self)
        stored = h.put(0)
        h.endpoint.live.clear()  # the refresh token is dead
        error = h.failure(h.refresh(), RefreshFailure.REAUTH_REQUIRED)
        self.assertEqual(
            error.message, "The refresh token for anthropic was refused; log in again on the host"
        )
        self.assertEqual(h.stored(), stored)
        self.assertEqual(h.saved, [])
        # the dead refresh token is not sent again...
        h.failure(h.refresh(), RefreshFailure.REAUTH_REQUIRED)
        self.assertEqual(len(h.endpoint.calls), 1)
        self.assertEqual(h.stored(), stored)
        # ...until a login stores another one
        h.endpoint.live.add(refresh_token(7))
        h.put(7)
        self.assertEqual(self.successResultOf(h.refresh()).access_token, access(1))
        self.assertEqual(h.endpoint.calls, [refresh_token(0), refresh_token(7)])
        self.assertEqual(h.lock.holding, 0)

    def test_a_rejected_refresh_is_tried_again_next_time(self) -> None:
        h = Harness(self)
        stored = h.put(0)
        h.endpoint.script = [OAuthErrorKind.REJECTED]
        h.failure(h.refresh(), RefreshFailure.REAUTH_REQUIRED)
        self.assertEqual(h.stored(), stored)
        self.successResultOf(h.refresh())
        self.assertEqual(len(h.endpoint.calls), 2)

    def test_an_expired_token_from_another_process_is_not_used(self) -> None:
        h = Harness(self)
        stored = h.put(0)
        stale = Token({"access_token": "sk-ant-oat01-stale", "expiry": START - 1})

        def another_process_wrote() -> None:
            self.successResultOf(h.store.save_token(P, stale, B))

        h.endpoint.on_call = another_process_wrote
        h.endpoint.script = [OAuthErrorKind.INVALID_GRANT]
        h.failure(h.refresh(), RefreshFailure.REAUTH_REQUIRED)
        self.assertEqual(h.stored(), stale)  # theirs, untouched by us
        self.assertNotEqual(stale, stored)


class RejectedTests(SynchronousTestCase):
    def test_a_stored_token_that_differs_from_the_rejected_one_is_answered(self) -> None:
        h = Harness(self)
        stored = h.put(0)
        self.assertEqual(self.successResultOf(h.refresh(rejected="sk-ant-oat01-old")), stored)
        self.assertEqual((h.endpoint.calls, h.lock.acquired), ([], 0))

    def test_an_expired_different_token_is_refreshed(self) -> None:
        h = Harness(self)
        h.put(0, expires_in=-1)
        token = self.successResultOf(h.refresh(rejected="sk-ant-oat01-old"))
        self.assertEqual(token.access_token, access(1))

    def test_the_rejected_token_is_refreshed(self) -> None:
        h = Harness(self)
        h.put(0)
        token = self.successResultOf(h.refresh(rejected=access(0)))
        self.assertEqual(token.access_token, access(1))
        self.assertEqual(len(h.endpoint.calls), 1)

    def test_a_rejected_token_fresh_from_a_refresh_is_answered_again(self) -> None:
        h = Harness(self)
        h.put(0)
        new = self.successResultOf(h.refresh())
        h.clock.advance(10)
        self.assertEqual(self.successResultOf(h.refresh(rejected=access(1))), new)
        self.assertEqual(len(h.endpoint.calls), 1)

    def test_a_rejected_and_expired_token_within_the_cooldown_is_rate_limited(self) -> None:
        h = Harness(self)
        h.put(0)
        h.endpoint.lifetime = 5.0
        self.successResultOf(h.refresh())
        h.clock.advance(6)
        error = h.failure(h.refresh(rejected=access(1)), RefreshFailure.RATE_LIMITED)
        self.assertEqual(error.retry_after, 24.0)

    def test_a_rejected_caller_joins_the_flight_in_progress(self) -> None:
        h = Harness(self)
        h.put(0)
        h.endpoint.script = [HOLD]
        first = h.refresh()  # holds the lock while the endpoint thinks
        late = h.refresh(rejected=access(0))  # joins: one flight
        h.endpoint.answer_held()
        self.assertEqual(self.successResultOf(late), self.successResultOf(first))
        self.assertEqual(len(h.endpoint.calls), 1)


class FailureTests(SynchronousTestCase):
    def test_an_unknown_provider(self) -> None:
        h = Harness(self)
        d = Deferred.fromCoroutine(h.coordinator.refresh("nope", B))
        error = h.failure(d, RefreshFailure.PROVIDER_NOT_FOUND)
        self.assertEqual(error.message, "No OAuth provider configured for: nope")
        self.assertEqual(h.lock.acquired, 0)

    def test_nothing_stored(self) -> None:
        h = Harness(self)
        error = h.failure(h.refresh(), RefreshFailure.NOT_FOUND)
        self.assertEqual(error.message, "No token found for provider: anthropic")
        self.assertEqual((h.lock.acquired, h.lock.holding), (1, 0))

    def test_no_refresh_token(self) -> None:
        h = Harness(self)
        stored = h.put(0, refresh_token=None)
        error = h.failure(h.refresh(), RefreshFailure.REFRESH_NOT_AVAILABLE)
        self.assertEqual(error.message, "No refresh token stored for provider: anthropic")
        self.assertEqual((h.stored(), h.endpoint.calls, h.lock.holding), (stored, [], 0))

    def test_a_store_failure_under_the_lock_releases_it(self) -> None:
        store = CountingStore()
        h = Harness(self, store=store)
        h.put(0)
        store.fail_reads_after = 1  # the read before the flight works, the one under the lock not
        error = h.failure(h.refresh(), RefreshFailure.REFRESH_FAILED)
        self.assertEqual(
            error.message, "Could not refresh the token for anthropic: the token store failed"
        )
        self.assertEqual((h.lock.acquired, h.lock.holding, h.saved), (1, 0, []))

    def test_a_failing_on_saved_does_not_fail_the_refresh(self) -> None:
        h = Harness(self)
        h.put(0)

        def broken(p: str, b: str, t: Token | None) -> None:
            raise RuntimeError("renewal bug")

        h.coordinator._on_saved = broken
        with captured_log() as events:
            self.assertEqual(self.successResultOf(h.refresh()).access_token, access(1))
        self.assertIn("on_saved failed: RuntimeError", log_text(events))


class StopTests(SynchronousTestCase):
    def test_stop_cancels_a_retry_timer(self) -> None:
        h = Harness(self)
        stored = h.put(0)
        h.endpoint.script = [OAuthErrorKind.TRANSIENT]
        d = h.refresh()
        self.assertEqual(len(h.clock.getDelayedCalls()), 1)
        h.coordinator.stop()
        error = h.failure(d, RefreshFailure.REFRESH_FAILED)
        self.assertEqual(
            error.message, "Token refresh for anthropic was stopped: credproxy is shutting down"
        )
        self.assertEqual(h.clock.getDelayedCalls(), [])
        h.clock.advance(10)
        self.assertEqual(len(h.endpoint.calls), 1)
        self.assertEqual((h.stored(), h.lock.holding), (stored, 0))

    def test_a_provider_answer_after_stop_is_still_saved(self) -> None:
        h = Harness(self)
        h.put(0)
        h.endpoint.script = [HOLD]
        waiting = [h.refresh() for _ in range(3)]
        h.coordinator.stop()
        for d in waiting:
            h.failure(d, RefreshFailure.REFRESH_FAILED)
        self.assertEqual(h.lock.holding, 1)
        h.endpoint.answer_held()  # the old refresh token is spent: keep the new one
        stored = h.stored()
        assert stored is not None
        self.assertEqual(stored.refresh_token, refresh_token(1))
        self.assertEqual(h.lock.holding, 0)
        self.assertEqual(len(h.saved), 1)

    def test_a_transient_failure_after_stop_is_not_retried(self) -> None:
        h = Harness(self)
        h.put(0)
        h.endpoint.script = [HOLD]
        d = h.refresh()
        h.coordinator.stop()
        h.failure(d, RefreshFailure.REFRESH_FAILED)
        (held,) = h.endpoint.held
        held.errback(OAuthError(OAuthErrorKind.TRANSIENT, "503"))
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertEqual(h.lock.holding, 0)

    def test_refreshes_work_after_a_stop(self) -> None:
        h = Harness(self)
        h.put(0)
        h.coordinator.stop()
        self.assertEqual(self.successResultOf(h.refresh()).access_token, access(1))


class FreshTokenTests(SynchronousTestCase):
    def test_a_token_valid_long_enough_costs_one_store_read(self) -> None:
        store = CountingStore()
        h = Harness(self, store=store)
        stored = h.put(0, expires_in=600)
        before = store.reads
        d = h.fresh(300)
        self.assertEqual(self.successResultOf(d), stored)  # fired at once
        self.assertEqual(store.reads - before, 1)
        self.assertEqual((store.invalidations, h.lock.acquired, h.endpoint.calls), (0, 0, []))

    def test_nothing_stored_is_none(self) -> None:
        h = Harness(self)
        self.assertIsNone(self.successResultOf(h.fresh(300)))
        self.assertEqual(h.lock.acquired, 0)

    def test_a_token_without_expiry_is_answered_as_it_is(self) -> None:
        h = Harness(self)
        stored = h.put(0, expires_in=None)
        self.assertEqual(self.successResultOf(h.fresh(300)), stored)
        self.assertEqual(h.endpoint.calls, [])

    def test_a_token_expiring_within_min_validity_is_refreshed(self) -> None:
        h = Harness(self)
        h.put(0, expires_in=300)  # exactly min_validity left: refreshed
        self.assertEqual(h.token(h.fresh(300)).access_token, access(1))
        h2 = Harness(self)
        stored = h2.put(0, expires_in=300.5)
        self.assertEqual(self.successResultOf(h2.fresh(300)), stored)

    def test_a_failed_refresh_answers_the_current_token_while_it_lasts(self) -> None:
        h = Harness(self)
        stored = h.put(0, expires_in=60)
        h.endpoint.script = [OAuthErrorKind.TRANSIENT] * 3
        with captured_log() as events:
            d = h.fresh(300)
            h.clock.pump([1.0, 3.0])
            self.assertEqual(self.successResultOf(d), stored)
        warnings = [e for e in events if "using the current token" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["outcome"], "REFRESH_FAILED")
        self.assertEqual(warnings[0]["log_level"], LogLevel.warn)

    def test_an_expired_token_whose_refresh_fails_raises(self) -> None:
        h = Harness(self)
        h.put(0, expires_in=2)
        h.endpoint.script = [OAuthErrorKind.TRANSIENT] * 3
        d = h.fresh(300)
        h.clock.pump([1.0, 3.0])  # it expired during the retries
        h.failure(d, RefreshFailure.REFRESH_FAILED)
        h3 = Harness(self)
        h3.put(0, expires_in=-1)
        h3.endpoint.live.clear()
        h3.failure(h3.fresh(300), RefreshFailure.REAUTH_REQUIRED)

    def test_without_a_refresh_token_the_token_lasts_until_it_expires(self) -> None:
        h = Harness(self)
        stored = h.put(0, expires_in=60, refresh_token=None)
        self.assertEqual(self.successResultOf(h.fresh(300)), stored)
        self.assertEqual(h.lock.acquired, 0)  # no refresh attempted
        h.clock.advance(60)
        h.failure(h.fresh(300), RefreshFailure.REFRESH_NOT_AVAILABLE)

    def test_an_expired_token_without_refresh_token_finds_another_process_login(self) -> None:
        store = CountingStore()
        h = Harness(self, store=store)
        h.put(0, expires_in=-1, refresh_token=None)
        theirs = Token({"access_token": "sk-ant-oat01-login", "expiry": START + 3600})

        def another_process_logged_in() -> None:
            store._tokens[(P, B)] = theirs  # behind our back, as a file would change

        store.on_invalidate = another_process_logged_in
        self.assertEqual(self.successResultOf(h.fresh(300)), theirs)
        self.assertEqual(h.endpoint.calls, [])

    def test_without_a_provider_the_token_lasts_until_it_expires(self) -> None:
        clock = Clock()
        clock.advance(START)
        store = MemoryTokenStore()
        coordinator = RefreshCoordinator(
            clock, store, {}, InProcessRefreshLock(), EntryLocks(), lambda *_: None
        )
        token = Token(
            {"access_token": access(0), "refresh_token": refresh_token(0), "expiry": START + 60}
        )
        self.successResultOf(store.save_token(P, token, B))
        d = Deferred.fromCoroutine(coordinator.fresh_token(P, B, 300))
        self.assertEqual(self.successResultOf(d), token)
        clock.advance(60)
        error = self.failureResultOf(
            Deferred.fromCoroutine(coordinator.fresh_token(P, B, 300)), RefreshError
        ).value
        assert isinstance(error, RefreshError)
        self.assertEqual(error.reason, RefreshFailure.PROVIDER_NOT_FOUND)

    def test_a_refused_refresh_token_is_not_tried_while_the_token_lasts(self) -> None:
        h = Harness(self)
        stored = h.put(0, expires_in=60)
        h.endpoint.live.clear()
        h.failure(h.refresh(), RefreshFailure.REAUTH_REQUIRED)
        with captured_log() as events:
            for _ in range(5):
                self.assertEqual(self.successResultOf(h.fresh(300)), stored)
        self.assertEqual((len(h.endpoint.calls), h.lock.acquired), (1, 1))
        self.assertEqual(refresh_lines(events), [])

    def test_within_the_cooldown_a_short_lived_token_is_answered_quietly(self) -> None:
        h = Harness(self)
        h.put(0)
        h.endpoint.lifetime = 100.0  # shorter than min_validity
        new = self.successResultOf(h.refresh())
        with captured_log() as events:
            for _ in range(3):
                self.assertEqual(self.successResultOf(h.fresh(300)), new)
        self.assertEqual((len(h.endpoint.calls), h.lock.acquired), (1, 1))
        self.assertEqual([e for e in events if e["log_level"] >= LogLevel.info], [])
        h.clock.advance(30)
        self.assertEqual(h.token(h.fresh(300)).access_token, access(2))


class LogTests(SynchronousTestCase):
    def test_one_line_per_refresh_naming_kinds_only(self) -> None:
        h = Harness(self)
        with captured_log() as events:
            h.failure(h.refresh(), RefreshFailure.NOT_FOUND)
            h.put(0)
            self.successResultOf(h.refresh())
            h.clock.advance(30)
            h.endpoint.script = [OAuthErrorKind.TRANSIENT] * 3
            d = h.refresh()
            h.clock.pump([1.0, 3.0])
            h.failure(d, RefreshFailure.REFRESH_FAILED)
            h.endpoint.live.clear()
            h.failure(h.refresh(), RefreshFailure.REAUTH_REQUIRED)
        lines = refresh_lines(events)
        self.assertEqual(
            [(e["outcome"], e["attempts"]) for e in lines if e["log_level"] > LogLevel.debug],
            [("NOT_FOUND", 0), ("refreshed", 1), ("REFRESH_FAILED", 3), ("REAUTH_REQUIRED", 1)],
        )
        for e in lines:
            self.assertEqual((e["provider"], e["bucket"]), (P, B))

    def test_no_token_reaches_a_log_line_or_an_error(self) -> None:
        h = Harness(self)
        errors: list[RefreshError] = []

        def collect(d: Deferred[Any]) -> None:
            def failed(failure: Failure) -> None:
                assert isinstance(failure.value, RefreshError)
                errors.append(failure.value)

            d.addErrback(failed)

        with captured_log() as events:
            h.put(0, expires_in=60)
            h.endpoint.lifetime = 5.0
            collect(h.refresh(rejected=access(0)))
            h.clock.advance(1)
            collect(h.refresh())  # cooldown
            h.clock.advance(9)
            collect(h.refresh(rejected=access(1)))  # expired in the cooldown: rate limited
            h.clock.advance(3600)
            h.endpoint.script = [OAuthErrorKind.TRANSIENT] * 3
            collect(h.fresh(300))
            h.clock.pump([1.0, 3.0])
            h.endpoint.live.clear()
            collect(h.fresh(300))
            h.coordinator.stop()
        self.assertEqual(
            [e.reason for e in errors],
            [
                RefreshFailure.RATE_LIMITED,
                RefreshFailure.REFRESH_FAILED,
                RefreshFailure.REAUTH_REQUIRED,
            ],
        )
        minted = [access(n) for n in range(5)] + [refresh_token(n) for n in range(5)]
        text = log_text(events)
        shown = text + "".join(f"{e!s} {e!r} {e.message}" for e in errors)
        shown += repr(h.coordinator) + repr(h.lock.inner)
        for secret in [*minted, "sk-ant-"]:
            self.assertNotIn(secret, shown)
        self.assertIn("anthropic", text)
