"""
The broker as the one place both faces go through: writes are merged and
serialized and the renewal timers follow them; the sandbox policy narrows
what a sandbox may read; the refresh op answers in the protocol's shape.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from credproxy._secret import Secret
from credproxy.broker import Broker, SandboxPolicy
from credproxy.stores import MemoryProviderKeyStore, MemoryTokenStore, Token
from credproxy.wire import CredentialServerFactory
from tests.broker.test_refresh import TokenEndpoint, access, refresh_token
from tests.wire.server_harness import CAPABILITY, Connection

T = TypeVar("T")

P = "anthropic"


def d(coroutine: Coroutine[Any, Any, T]) -> Deferred[T]:
    return Deferred.fromCoroutine(coroutine)


NOW = 1_800_000_000.0
HOUR = 3600.0


def make_broker(clock: Clock, **kwargs: Any) -> tuple[Broker, MemoryTokenStore, TokenEndpoint]:
    tokens = MemoryTokenStore()
    endpoint = TokenEndpoint(clock)
    broker = Broker(clock, tokens, MemoryProviderKeyStore(), providers={P: endpoint}, **kwargs)
    return broker, tokens, endpoint


def stored_token(expiry: float) -> dict[str, Any]:
    return {
        "access_token": access(0),
        "refresh_token": refresh_token(0),
        "expiry": expiry,
        "token_type": "Bearer",
    }


class WriteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.broker, self.tokens, self.endpoint = make_broker(self.clock)
        self.broker.startService()

    def tearDown(self) -> None:
        self.broker.stopService()

    def test_a_socket_save_merges_and_never_sets_the_refresh_token(self) -> None:
        self.successResultOf(d(self.broker.store_login(P, Token(stored_token(NOW + HOUR)))))
        incoming = {"access_token": "new", "refresh_token": "planted", "scope": "x"}
        self.successResultOf(d(self.broker.save_token(P, incoming)))
        stored = self.successResultOf(self.tokens.get_token(P))
        assert stored is not None
        self.assertEqual(stored.refresh_token, refresh_token(0))
        self.assertEqual((stored["access_token"], stored["scope"]), ("new", "x"))

    def test_a_login_schedules_renewal_and_a_removal_cancels_it(self) -> None:
        renewal = self.broker.renewal
        assert renewal is not None
        self.successResultOf(d(self.broker.store_login(P, Token(stored_token(NOW + HOUR)))))
        self.assertIn((P, "default"), renewal.scheduled())
        self.successResultOf(d(self.broker.remove_token(P)))
        self.assertEqual(renewal.scheduled(), {})

    def test_a_socket_save_reschedules_renewal(self) -> None:
        renewal = self.broker.renewal
        assert renewal is not None
        self.successResultOf(d(self.broker.store_login(P, Token(stored_token(NOW + HOUR)))))
        first = renewal.scheduled()[(P, "default")]
        self.successResultOf(d(self.broker.save_token(P, {"expiry": NOW + 10 * HOUR})))
        self.assertGreater(renewal.scheduled()[(P, "default")], first + 8 * HOUR)

    def test_renewal_fires_a_refresh_and_stores_the_rotated_token(self) -> None:
        self.successResultOf(d(self.broker.store_login(P, Token(stored_token(NOW + HOUR)))))
        self.clock.advance(HOUR)
        self.assertEqual(self.endpoint.calls, [refresh_token(0)])
        stored = self.successResultOf(self.tokens.get_token(P))
        assert stored is not None
        self.assertEqual(stored.refresh_token, refresh_token(1))

    def test_stopping_cancels_every_timer(self) -> None:
        self.successResultOf(d(self.broker.store_login(P, Token(stored_token(NOW + HOUR)))))
        self.broker.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.broker.startService()  # for tearDown

    def test_requests_count_against_their_bucket(self) -> None:
        self.successResultOf(d(self.broker.store_login(P, Token(stored_token(NOW + HOUR)), "w")))
        self.broker.record_request(P, "w")
        self.broker.record_request(P, "w")
        stats = self.successResultOf(self.broker.get_bucket_stats(P, "w"))
        assert stats is not None
        self.assertEqual((stats.request_count, stats.last_used), (2, NOW))


def sandbox(policy: SandboxPolicy) -> Connection:
    clock = Clock()
    tokens, keys = MemoryTokenStore(), MemoryProviderKeyStore()
    tokens.save_token(P, Token(stored_token(NOW + HOUR)))
    tokens.save_token("other", Token(stored_token(NOW + HOUR)))
    keys.save_key("anthropic", Secret("sk-ant-api03-sandbox-readable-key"))
    keys.save_key("openai", Secret("sk-openai-not-for-the-sandbox-key"))
    broker = Broker(clock, tokens, keys, sandbox=policy)
    factory = CredentialServerFactory(clock, broker, Secret(CAPABILITY))
    return Connection(factory=factory, clock=clock).open(token=CAPABILITY)


class SandboxReadTests(SynchronousTestCase):
    def test_without_a_list_every_named_entry_is_readable(self) -> None:
        c = sandbox(SandboxPolicy())
        for op, payload in (
            ("get_token", {"provider": "other"}),
            ("get_api_key", {"name": "openai"}),
        ):
            self.assertTrue(c.ask("i", op, **payload)["ok"], op)

    def test_a_list_narrows_what_a_sandbox_reads_and_looks_like_a_miss(self) -> None:
        c = sandbox(SandboxPolicy(readable=frozenset({"anthropic"})))
        self.assertTrue(c.ask("i", "get_token", provider=P)["ok"])
        self.assertTrue(c.ask("i", "get_api_key", name="anthropic")["ok"])
        refused = {"id": "i", "ok": False, "code": "FORBIDDEN", "error": "Access denied"}
        self.assertEqual(c.ask("i", "get_token", provider="other"), refused)
        self.assertEqual(c.ask("i", "get_api_key", name="openai"), refused)
        self.assertEqual(c.ask("i", "get_token", provider="absent"), refused)


def host(clock: Clock, expiry: float) -> tuple[Connection, TokenEndpoint, MemoryTokenStore]:
    tokens = MemoryTokenStore()
    tokens.save_token(P, Token(stored_token(expiry)))
    endpoint = TokenEndpoint(clock)
    broker = Broker(clock, tokens, MemoryProviderKeyStore(), providers={P: endpoint})
    factory = CredentialServerFactory(clock, broker)
    return Connection(factory=factory, clock=clock).open(), endpoint, tokens


class RefreshOpTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)

    def test_refresh_answers_the_sanitized_rotated_token(self) -> None:
        c, _, tokens = host(self.clock, NOW - 1)
        answer = c.ask("r", "refresh_token", provider=P)
        self.assertEqual(answer["ok"], True)
        self.assertEqual(answer["data"]["access_token"], access(1))
        self.assertNotIn("refresh_token", answer["data"])
        stored = self.successResultOf(tokens.get_token(P))
        assert stored is not None
        self.assertEqual(stored.refresh_token, refresh_token(1))

    def test_rate_limited_carries_retry_after_in_seconds(self) -> None:
        c, endpoint, _ = host(self.clock, NOW - 1)
        self.assertTrue(c.ask("r1", "refresh_token", provider=P)["ok"])
        # The API says the fresh token is expired already: the next refresh is
        # within the cooldown and the current token is expired.
        endpoint.lifetime = -1.0
        self.clock.advance(31)
        self.assertTrue(c.ask("r2", "refresh_token", provider=P)["ok"])
        self.clock.advance(10)
        answer = c.ask("r3", "refresh_token", provider=P)
        self.assertEqual((answer["code"], answer["retryAfter"]), ("RATE_LIMITED", 20))
        self.assertNotIn("v", answer)

    def test_reference_codes_for_what_cannot_be_refreshed(self) -> None:
        c, endpoint, tokens = host(self.clock, NOW - 1)
        self.assertEqual(c.ask("a", "refresh_token", provider="nope")["code"], "PROVIDER_NOT_FOUND")
        self.assertEqual(
            c.ask("b", "refresh_token", provider=P, bucket="empty")["code"], "NOT_FOUND"
        )
        endpoint.live.clear()  # the refresh token was spent elsewhere: invalid_grant
        answer = c.ask("c", "refresh_token", provider=P)
        self.assertEqual(answer["code"], "REAUTH_REQUIRED")
        self.assertIsNotNone(self.successResultOf(tokens.get_token(P)))  # never deleted
        self.assertEqual(c.ask("d", "refresh_token")["code"], "INVALID_REQUEST")
