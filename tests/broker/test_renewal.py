"""
Proactive renewal: when the timers fire, what a firing does on the wall
clock, backoff and giving up, following saves, stopping, and logs without
values. A double stands in for the refresh coordinator; the scheduler and the
store are the real ones.
"""

from __future__ import annotations

import random

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogEvent, LogLevel
from twisted.trial.unittest import SynchronousTestCase

from credproxy.broker._errors import RefreshError, RefreshFailure
from credproxy.broker._renewal import (
    BACKOFF_BASE,
    MAX_BACKOFF,
    MAX_CONSECUTIVE_FAILURES,
    MAX_JITTER,
    MIN_MARGIN,
    MIN_RENEWAL_INTERVAL,
    MIN_RETRY_DELAY,
    NOT_RETRIED,
    RECHECK_INTERVAL,
    RenewalScheduler,
    renewal_time,
)
from credproxy.stores import MemoryTokenStore
from credproxy.stores._token import Token
from tests.logcapture import captured_log, log_text

NOW = 1_700_000_000.0
P, B = "anthropic", "default"
ENTRY = (P, B)
NAMESPACE = "credproxy.broker.renewal"
RUNAWAY = 100  # more refreshes than any test asks for
SECRETS = ("sk-ant-oat01-ACCESS-VALUE", "sk-ant-ort01-REFRESH-VALUE", "sk-ant-NEW-VALUE")


def oauth(
    expiry: float | None, *, refresh: str | None = SECRETS[1], access: str = SECRETS[0]
) -> Token:
    fields: dict[str, object] = {"access_token": access, "token_type": "Bearer"}
    if expiry is not None:
        fields["expiry"] = expiry
    if refresh is not None:
        fields["refresh_token"] = refresh
    return Token(fields)


def failure(reason: RefreshFailure, retry_after: float | None = None) -> RefreshError:
    return RefreshError(reason, "fixed text", retry_after=retry_after)


class FakeRefresher:
    """
    Stands in for the refresh coordinator: records each call and answers with
    C{result} (a token it saves and reports through C{on_saved}, as the
    coordinator does, or an exception it raises), or, with C{hold}, with a
    Deferred the test fires later.
    """

    def __init__(self, store: MemoryTokenStore) -> None:
        self.store = store
        self.calls: list[tuple[str, str, str | None]] = []
        self.result: Token | Exception = failure(RefreshFailure.REFRESH_FAILED)
        self.hold = False
        self.held: list[Deferred[Token | Exception]] = []
        self.on_saved: list[RenewalScheduler] = []

    async def refresh(self, provider: str, bucket: str, rejected: str | None = None) -> Token:
        self.calls.append((provider, bucket, rejected))
        result: Token | Exception
        if len(self.calls) > RUNAWAY:  # a scheduler refreshing in a loop ends, and fails its test
            result = failure(RefreshFailure.PROVIDER_NOT_FOUND)
        elif self.hold:
            held: Deferred[Token | Exception] = Deferred()
            self.held.append(held)
            result = await held
        else:
            result = self.result
        if isinstance(result, Exception):
            raise result
        await self.store.save_token(provider, result, bucket)
        for scheduler in self.on_saved:
            scheduler.changed(provider, bucket, result)
        return result


class Harness:
    def __init__(self, seed: int = 1, store: MemoryTokenStore | None = None) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = store if store is not None else MemoryTokenStore()
        self.refresher = FakeRefresher(self.store)
        self.scheduler = RenewalScheduler(
            self.clock, self.store, self.refresher, rng=random.Random(seed)
        )
        self.refresher.on_saved.append(self.scheduler)  # the broker's on_saved path

    def seed(self, token: Token, provider: str = P, bucket: str = B) -> None:
        self.store.save_token(provider, token, bucket)

    def start(self) -> None:
        result = self.scheduler.start()
        assert result.called

    def due(self, entry: tuple[str, str] = ENTRY) -> float:
        return self.scheduler.scheduled()[entry]

    def advance_to(self, when: float) -> None:
        self.clock.advance(max(when - self.clock.seconds(), 0.0))

    def timers(self) -> int:
        return len(self.clock.getDelayedCalls())


def jitters(seed: int, count: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(0.0, MAX_JITTER) for _ in range(count)]


def ours(events: list[LogEvent], level: LogLevel | None = None) -> list[LogEvent]:
    return [
        e
        for e in events
        if e.get("log_namespace") == NAMESPACE and (level is None or e["log_level"] == level)
    ]


class FireTimeTests(SynchronousTestCase):
    def test_long_lived_token_renews_ten_percent_before_expiry(self) -> None:
        h = Harness(seed=3)
        h.seed(oauth(NOW + 36_000))
        h.start()
        self.assertAlmostEqual(h.due(), NOW + 36_000 - 3_600 - jitters(3, 1)[0], places=6)

    def test_short_lived_token_renews_five_minutes_before_expiry(self) -> None:
        h = Harness(seed=4)
        h.seed(oauth(NOW + 1_000))
        h.start()
        self.assertAlmostEqual(h.due(), NOW + 1_000 - 300 - jitters(4, 1)[0], places=6)

    def test_margin_formula_at_the_crossover(self) -> None:
        self.assertEqual(renewal_time(NOW + 3_000, NOW, 0.0), NOW + 3_000 - MIN_MARGIN)
        self.assertAlmostEqual(renewal_time(NOW + 3_010, NOW, 0.0), NOW + 3_010 - 301, places=6)
        self.assertAlmostEqual(renewal_time(NOW + 2_990, NOW, 5.0), NOW + 2_990 - 305, places=6)

    def test_jitter_stays_within_bounds_and_comes_from_the_rng(self) -> None:
        offsets = []
        for seed in range(200):
            h = Harness(seed=seed)
            h.seed(oauth(NOW + 1_000))
            h.start()
            offset = (NOW + 700) - h.due()
            self.assertGreaterEqual(offset, 0.0)
            self.assertLessEqual(offset, 30.0)
            offsets.append(offset)
        self.assertGreater(max(offsets) - min(offsets), 25.0)  # spread over the range
        again = Harness(seed=7)
        again.seed(oauth(NOW + 1_000))
        again.start()
        self.assertAlmostEqual((NOW + 700) - again.due(), offsets[7], places=6)

    def test_time_already_past_renews_at_once(self) -> None:
        h = Harness()
        h.seed(oauth(NOW + 100))  # inside the margin
        h.start()
        [call] = h.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), NOW)
        self.assertEqual(h.refresher.calls, [])  # via the reactor, not inside start
        h.clock.advance(0)
        self.assertEqual(h.refresher.calls, [(P, B, None)])

    def test_expired_token_renews_at_once(self) -> None:
        h = Harness()
        h.seed(oauth(NOW - 5_000))
        h.start()
        self.assertEqual(h.due(), NOW)
        h.clock.advance(0)
        self.assertEqual(len(h.refresher.calls), 1)


class WallClockTests(SynchronousTestCase):
    def test_no_single_timer_waits_longer_than_the_recheck_interval(self) -> None:
        self.assertLessEqual(RECHECK_INTERVAL, MIN_MARGIN)  # a resume is noticed within the margin
        h = Harness()
        h.seed(oauth(NOW + 36_000))
        h.start()
        [call] = h.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), NOW + RECHECK_INTERVAL)

    def test_early_wake_up_reschedules_instead_of_refreshing(self) -> None:
        h = Harness()
        h.seed(oauth(NOW + 36_000))
        h.start()
        due = h.due()
        h.clock.advance(RECHECK_INTERVAL)
        self.assertEqual(h.refresher.calls, [])
        [call] = h.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), NOW + 2 * RECHECK_INTERVAL)
        self.assertEqual(h.due(), due)

    def test_wake_up_shortly_before_due_waits_exactly_until_due(self) -> None:
        h = Harness()
        h.seed(oauth(NOW + 36_000))
        h.start()
        due = h.due()
        h.advance_to(due - 10)  # one jump: the pending recheck fires late, still early
        self.assertEqual(h.refresher.calls, [])
        [call] = h.clock.getDelayedCalls()
        self.assertAlmostEqual(call.getTime(), due, places=6)
        h.advance_to(due)
        self.assertEqual(len(h.refresher.calls), 1)

    def test_suspend_past_expiry_renews_at_once_on_firing(self) -> None:
        h = Harness()
        h.seed(oauth(NOW + 36_000))
        h.start()
        h.clock.advance(40_000)  # the machine slept through the expiry
        self.assertEqual(h.refresher.calls, [(P, B, None)])

    def test_due_timer_refreshes(self) -> None:
        h = Harness()
        h.seed(oauth(NOW + 1_000))
        h.start()
        due = h.due()
        h.advance_to(due - 1)
        self.assertEqual(h.refresher.calls, [])
        h.advance_to(due)
        self.assertEqual(len(h.refresher.calls), 1)


class SuccessTests(SynchronousTestCase):
    def test_reschedules_from_the_new_token_with_one_timer(self) -> None:
        h = Harness()
        h.seed(oauth(NOW - 1))
        h.start()
        new_expiry = NOW + 36_000
        h.refresher.result = oauth(new_expiry, access=SECRETS[2])
        h.clock.advance(0)
        self.assertEqual(len(h.refresher.calls), 1)
        due = h.due()
        self.assertGreaterEqual(due, new_expiry - 3_600 - MAX_JITTER)
        self.assertLessEqual(due, new_expiry - 3_600)
        self.assertEqual(h.timers(), 1)

    def test_a_save_reported_after_the_refresh_still_leaves_one_timer(self) -> None:
        h = Harness()
        h.refresher.on_saved.clear()  # the coordinator reports nothing during the refresh...
        h.seed(oauth(NOW - 1))
        h.start()
        renewed = oauth(NOW + 36_000, access=SECRETS[2])
        h.refresher.result = renewed
        h.clock.advance(0)
        self.assertEqual(h.timers(), 1)
        h.scheduler.changed(P, B, renewed)  # ...but after it
        self.assertEqual(h.timers(), 1)
        self.assertEqual(list(h.scheduler.scheduled()), [ENTRY])

    def test_a_token_still_inside_the_margin_is_not_renewed_in_a_loop(self) -> None:
        h = Harness()
        h.seed(oauth(NOW - 1))
        h.start()
        h.refresher.result = oauth(NOW + 100)  # the provider's tokens live under the margin
        h.clock.advance(0)
        self.assertEqual(len(h.refresher.calls), 1)
        self.assertEqual(h.due(), NOW + 60)  # at most once a minute
        self.assertEqual(MIN_RENEWAL_INTERVAL, 60)
        h.clock.advance(MIN_RENEWAL_INTERVAL - 1)
        self.assertEqual(len(h.refresher.calls), 1)
        h.clock.advance(1)
        self.assertEqual(len(h.refresher.calls), 2)

    def test_success_resets_the_backoff(self) -> None:
        h = Harness()
        h.seed(oauth(NOW - 1))
        h.start()
        for _ in range(3):
            h.advance_to(h.due())
        self.assertEqual(h.due() - h.clock.seconds(), 4 * BACKOFF_BASE)
        h.refresher.result = oauth(NOW - 1)  # renewed, but still due: next try at the floor
        h.advance_to(h.due())
        self.assertEqual(h.due() - h.clock.seconds(), MIN_RENEWAL_INTERVAL)
        h.refresher.result = failure(RefreshFailure.REFRESH_FAILED)
        h.advance_to(h.due())
        self.assertEqual(h.due() - h.clock.seconds(), BACKOFF_BASE)

    def test_one_info_line_per_renewal(self) -> None:
        h = Harness()
        h.seed(oauth(NOW - 1))
        h.start()
        h.refresher.result = oauth(NOW + 36_000, access=SECRETS[2])
        with captured_log() as events:
            h.clock.advance(0)
        [line] = ours(events)
        self.assertEqual(line["log_level"], LogLevel.info)
        self.assertEqual((line["provider"], line["bucket"], line["outcome"]), (P, B, "renewed"))


class FailureTests(SynchronousTestCase):
    def failing(self, error: Exception) -> Harness:
        h = Harness()
        h.seed(oauth(NOW - 1))
        h.start()
        h.refresher.result = error
        h.clock.advance(0)
        return h

    def test_backoff_doubles_from_thirty_seconds_up_to_thirty_minutes(self) -> None:
        h = self.failing(failure(RefreshFailure.REFRESH_FAILED))
        delays = []
        while ENTRY in h.scheduler.scheduled():
            delays.append(h.due() - h.clock.seconds())
            h.advance_to(h.due())
        self.assertEqual(delays, [30, 60, 120, 240, 480, 960, 1800, 1800, 1800])
        self.assertEqual((BACKOFF_BASE, MAX_BACKOFF), (30.0, 1800.0))

    def test_gives_up_after_ten_failures_with_one_error_line(self) -> None:
        h = Harness()
        h.seed(oauth(NOW - 1))
        h.start()
        with captured_log() as events:
            for _ in range(MAX_CONSECUTIVE_FAILURES):
                h.advance_to(h.due())
            h.clock.advance(10 * MAX_BACKOFF)
        self.assertEqual(MAX_CONSECUTIVE_FAILURES, 10)
        self.assertEqual(len(h.refresher.calls), 10)
        self.assertEqual(h.scheduler.scheduled(), {})
        self.assertEqual(h.clock.getDelayedCalls(), [])
        [error] = ours(events, LogLevel.error)
        self.assertEqual((error["provider"], error["bucket"]), (P, B))
        self.assertEqual(error["outcome"], "REFRESH_FAILED")
        self.assertEqual(len(ours(events, LogLevel.info)), 9)  # one line per attempt
        self.assertEqual(ours(events, LogLevel.warn), [])

    def test_a_save_after_giving_up_schedules_again(self) -> None:
        h = self.failing(failure(RefreshFailure.REFRESH_FAILED))
        for _ in range(MAX_CONSECUTIVE_FAILURES - 1):
            h.advance_to(h.due())
        self.assertEqual(h.scheduler.scheduled(), {})
        h.scheduler.changed(P, B, oauth(NOW + 36_000))
        self.assertIn(ENTRY, h.scheduler.scheduled())

    def test_rate_limited_waits_the_retry_after(self) -> None:
        h = self.failing(failure(RefreshFailure.RATE_LIMITED, retry_after=7.0))
        self.assertEqual(h.due(), NOW + 7.0)

    def test_rate_limited_without_retry_after_backs_off(self) -> None:
        h = self.failing(failure(RefreshFailure.RATE_LIMITED))
        self.assertEqual(h.due(), NOW + BACKOFF_BASE)

    def test_rate_limited_retry_after_is_kept_within_bounds(self) -> None:
        self.assertEqual(
            self.failing(failure(RefreshFailure.RATE_LIMITED, retry_after=1e9)).due(),
            NOW + MAX_BACKOFF,
        )
        for tiny in (0.0, -5.0):
            self.assertEqual(
                self.failing(failure(RefreshFailure.RATE_LIMITED, retry_after=tiny)).due(),
                NOW + MIN_RETRY_DELAY,
            )
        self.assertEqual(
            self.failing(failure(RefreshFailure.RATE_LIMITED, retry_after=float("nan"))).due(),
            NOW + BACKOFF_BASE,
        )

    def test_retry_after_is_ignored_for_other_reasons(self) -> None:
        h = self.failing(failure(RefreshFailure.REFRESH_FAILED, retry_after=7.0))
        self.assertEqual(h.due(), NOW + BACKOFF_BASE)

    def test_unexpected_exception_is_retried_and_logged_by_type_only(self) -> None:
        h = Harness()
        h.seed(oauth(NOW - 1))
        h.start()
        h.refresher.result = ValueError(f"provider said {SECRETS[1]}")
        with captured_log() as events:
            h.clock.advance(0)
        self.assertEqual(h.due(), NOW + BACKOFF_BASE)
        [line] = ours(events)
        self.assertEqual(line["outcome"], "ValueError")
        self.assertNotIn(SECRETS[1], log_text(events))

    def test_reasons_that_waiting_cannot_cure_are_not_retried(self) -> None:
        self.assertEqual(
            NOT_RETRIED,
            {
                RefreshFailure.REAUTH_REQUIRED,
                RefreshFailure.REFRESH_NOT_AVAILABLE,
                RefreshFailure.NOT_FOUND,
                RefreshFailure.PROVIDER_NOT_FOUND,
            },
        )
        for reason in sorted(NOT_RETRIED, key=lambda r: r.value):
            h = Harness()
            h.seed(oauth(NOW - 1))
            h.start()
            h.refresher.result = failure(reason)
            with captured_log() as events:
                h.clock.advance(0)
                h.clock.advance(10 * MAX_BACKOFF)
            self.assertEqual(len(h.refresher.calls), 1, reason)
            self.assertEqual(h.scheduler.scheduled(), {})
            self.assertEqual(h.clock.getDelayedCalls(), [])
            [warning] = ours(events)
            self.assertEqual(warning["log_level"], LogLevel.warn)
            self.assertEqual(
                (warning["provider"], warning["bucket"], warning["outcome"]), (P, B, reason.value)
            )
            h.scheduler.changed(P, B, oauth(NOW + 36_000))  # until the next save
            self.assertIn(ENTRY, h.scheduler.scheduled())


class ChangedTests(SynchronousTestCase):
    def test_a_save_reschedules_with_one_timer(self) -> None:
        h = Harness()
        h.seed(oauth(NOW + 36_000))
        h.start()
        h.scheduler.changed(P, B, oauth(NOW + 1_000))
        self.assertLessEqual(h.due(), NOW + 700)
        self.assertGreaterEqual(h.due(), NOW + 700 - MAX_JITTER)
        self.assertEqual(h.timers(), 1)
        for _ in range(20):
            h.scheduler.changed(P, B, oauth(NOW + 1_000))
        self.assertEqual(h.timers(), 1)
        self.assertEqual(list(h.scheduler.scheduled()), [ENTRY])

    def test_a_save_of_a_new_entry_schedules_it(self) -> None:
        h = Harness()
        h.start()
        h.scheduler.changed("other", "work", oauth(NOW + 1_000))
        self.assertEqual(list(h.scheduler.scheduled()), [("other", "work")])

    def test_removal_cancels(self) -> None:
        h = Harness()
        h.seed(oauth(NOW + 1_000))
        h.start()
        h.scheduler.changed(P, B, None)
        self.assertEqual(h.scheduler.scheduled(), {})
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_a_save_without_refresh_token_or_expiry_cancels(self) -> None:
        for token in (
            oauth(NOW + 1_000, refresh=None),
            oauth(NOW + 1_000, refresh=""),
            oauth(None),
        ):
            h = Harness()
            h.seed(oauth(NOW + 1_000))
            h.start()
            h.scheduler.changed(P, B, token)
            self.assertEqual(h.scheduler.scheduled(), {})
            self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_a_save_resets_the_failure_count(self) -> None:
        h = Harness()
        h.seed(oauth(NOW - 1))
        h.start()
        h.clock.advance(0)
        h.advance_to(h.due())
        self.assertEqual(h.due() - h.clock.seconds(), 2 * BACKOFF_BASE)
        h.scheduler.changed(P, B, oauth(NOW - 1))  # due now, but not before the floor
        self.assertEqual(h.due() - h.clock.seconds(), MIN_RENEWAL_INTERVAL)
        h.advance_to(h.due())
        self.assertEqual(h.due() - h.clock.seconds(), BACKOFF_BASE)

    def test_a_save_during_the_refresh_arms_nothing_until_it_completes(self) -> None:
        h = Harness()
        h.seed(oauth(NOW - 1))
        h.start()
        h.refresher.hold = True
        h.clock.advance(0)
        h.scheduler.changed(P, B, oauth(NOW + 1_000))
        self.assertEqual(h.clock.getDelayedCalls(), [])
        h.refresher.held[0].callback(failure(RefreshFailure.REAUTH_REQUIRED))
        # the failure concerned the token before that save: the save's token is renewed
        self.assertLessEqual(h.due(), NOW + 700)
        self.assertEqual(h.timers(), 1)

    def test_a_removal_during_the_refresh_wins_over_its_result(self) -> None:
        h = Harness()
        h.seed(oauth(NOW - 1))
        h.start()
        h.refresher.hold = True
        h.refresher.on_saved.clear()
        h.clock.advance(0)
        h.scheduler.changed(P, B, None)
        h.refresher.held[0].callback(oauth(NOW + 36_000))
        self.assertEqual(h.scheduler.scheduled(), {})
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_changes_before_start_and_after_stop_are_ignored(self) -> None:
        h = Harness()
        h.scheduler.changed(P, B, oauth(NOW + 1_000))
        self.assertEqual(h.clock.getDelayedCalls(), [])
        h.start()
        h.scheduler.stop()
        h.scheduler.changed(P, B, oauth(NOW + 1_000))
        self.assertEqual(h.clock.getDelayedCalls(), [])


class HeldReadsStore(MemoryTokenStore):
    """
    Reads the token at once but answers only when C{release} is called, so
    a test can act while the scheduler's scan is waiting on the store.
    """

    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple[Deferred[Token | None], Token | None]] = []

    def get_token(self, provider: str, bucket: str | None = None) -> Deferred[Token | None]:
        values: list[Token | None] = []
        super().get_token(provider, bucket).addCallback(values.append)  # fired already
        waiting: Deferred[Token | None] = Deferred()
        self.held.append((waiting, values[0]))
        return waiting

    def release(self) -> None:
        while self.held:
            waiting, value = self.held.pop(0)
            waiting.callback(value)


class BrokenStore(MemoryTokenStore):
    def list_providers(self) -> Deferred[list[str]]:
        raise OSError("keyring locked")


class StartTests(SynchronousTestCase):
    def test_schedules_every_renewable_stored_token(self) -> None:
        h = Harness()
        h.seed(oauth(NOW + 1_000), "anthropic", "default")
        h.seed(oauth(NOW + 2_000), "anthropic", "work")
        h.seed(oauth(NOW + 3_000), "gemini", "default")
        h.seed(oauth(NOW + 1_000, refresh=None), "qwen", "default")  # no refresh token
        h.seed(oauth(None), "codex", "default")  # no expiry
        h.seed(Token({**oauth(0.0), "expiry": float("inf")}), "kimi", "default")
        h.start()
        self.assertEqual(
            set(h.scheduler.scheduled()),
            {("anthropic", "default"), ("anthropic", "work"), ("gemini", "default")},
        )
        self.assertEqual(h.timers(), 3)

    def test_a_save_during_the_scan_wins_over_what_the_scan_read(self) -> None:
        store = HeldReadsStore()
        h = Harness(store=store)
        h.seed(oauth(NOW + 36_000))
        started = h.scheduler.start()
        h.scheduler.changed(P, B, oauth(NOW + 1_000))
        store.release()
        self.assertIsNone(self.successResultOf(started))
        self.assertLessEqual(h.due(), NOW + 700)
        self.assertEqual(h.timers(), 1)

    def test_a_removal_during_the_scan_is_not_undone(self) -> None:
        store = HeldReadsStore()
        h = Harness(store=store)
        h.seed(oauth(NOW + 36_000))
        started = h.scheduler.start()
        h.scheduler.changed(P, B, None)
        store.release()
        self.successResultOf(started)
        self.assertEqual(h.scheduler.scheduled(), {})

    def test_stop_during_the_scan_schedules_nothing(self) -> None:
        store = HeldReadsStore()
        h = Harness(store=store)
        h.seed(oauth(NOW + 1_000))
        started = h.scheduler.start()
        h.scheduler.stop()
        store.release()
        self.successResultOf(started)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_an_unreadable_store_is_logged_not_raised(self) -> None:
        h = Harness(store=BrokenStore())
        with captured_log() as events:
            started = h.scheduler.start()
        self.assertIsNone(self.successResultOf(started))
        [warning] = ours(events)
        self.assertEqual(warning["log_level"], LogLevel.warn)
        self.assertEqual(warning["error_type"], "OSError")
        h.scheduler.changed(P, B, oauth(NOW + 1_000))  # saves are still followed
        self.assertIn(ENTRY, h.scheduler.scheduled())


class StopTests(SynchronousTestCase):
    def test_stop_cancels_every_timer(self) -> None:
        h = Harness()
        h.seed(oauth(NOW + 1_000), "anthropic", "default")
        h.seed(oauth(NOW + 36_000), "anthropic", "work")
        h.seed(oauth(NOW - 1), "gemini", "default")
        h.start()
        self.assertEqual(h.timers(), 3)
        h.scheduler.stop()
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertEqual(h.scheduler.scheduled(), {})
        h.clock.advance(100_000)
        self.assertEqual(h.refresher.calls, [])

    def test_a_refresh_completing_after_stop_schedules_nothing(self) -> None:
        outcomes: list[Token | Exception] = [
            oauth(NOW + 36_000, access=SECRETS[2]),
            failure(RefreshFailure.REFRESH_FAILED),
            failure(RefreshFailure.REAUTH_REQUIRED),
        ]
        for outcome in outcomes:
            h = Harness()
            h.seed(oauth(NOW - 1))
            h.start()
            h.refresher.hold = True
            h.clock.advance(0)
            self.assertEqual(len(h.refresher.held), 1)
            h.scheduler.stop()
            with captured_log() as events:
                h.refresher.held[0].callback(outcome)
            self.assertEqual(h.clock.getDelayedCalls(), [], outcome)
            self.assertEqual(h.scheduler.scheduled(), {})
            self.assertEqual(ours(events), [])

    def test_a_refresh_from_before_a_restart_does_not_touch_the_new_run(self) -> None:
        h = Harness()
        h.seed(oauth(NOW - 1))
        h.start()
        h.refresher.hold = True
        h.clock.advance(0)
        h.scheduler.stop()
        h.store.save_token(P, oauth(NOW + 36_000), B)
        h.start()
        due = h.due()
        h.refresher.held[0].callback(failure(RefreshFailure.REFRESH_FAILED))
        self.assertEqual(h.scheduler.scheduled(), {ENTRY: due})
        self.assertEqual(h.timers(), 1)


class LogTests(SynchronousTestCase):
    def test_no_token_value_in_any_log_line(self) -> None:
        with captured_log() as events:
            h = Harness()
            h.seed(oauth(NOW - 1), "anthropic", "default")
            h.seed(oauth(NOW - 1), "anthropic", "work")
            h.start()
            h.refresher.result = oauth(NOW + 1_000, access=SECRETS[2])
            h.clock.advance(0)  # both renewed
            h.refresher.result = failure(RefreshFailure.REFRESH_FAILED)
            for _ in range(MAX_CONSECUTIVE_FAILURES + 1):
                h.clock.advance(MAX_BACKOFF)  # failures, then giving up
            h.scheduler.changed(P, B, oauth(NOW - 1))
            h.refresher.result = failure(RefreshFailure.REAUTH_REQUIRED)
            h.clock.advance(MAX_BACKOFF)
            h.scheduler.stop()
        levels = {e["log_level"] for e in ours(events)}
        self.assertEqual(levels, {LogLevel.info, LogLevel.warn, LogLevel.error})
        text = log_text(events)
        self.assertIn("anthropic", text)
        for secret in SECRETS:
            self.assertNotIn(secret, text)
        self.assertNotIn(SECRETS[0], repr(h.scheduler))
