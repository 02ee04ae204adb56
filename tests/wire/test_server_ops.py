"""
Every op of this issue, as a host and as a sandbox connection
(wire-protocol.md sections 4 to 6 and 9): answers, refusals, the sandbox
matrix, sanitizing and merging tokens, and what the audit lines say.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from credproxy.broker.tokens import Token
from credproxy.stores import MemoryTokenStore
from credproxy.wire._spec import Message
from tests.wire.server_harness import (
    ACCESS,
    CAPABILITY,
    KEY,
    REFRESH,
    Connection,
    captured_log,
    log_text,
    seed,
)

FORBIDDEN: dict[str, Any] = {"ok": False, "code": "FORBIDDEN", "error": "Access denied"}


def host() -> Connection:
    connection = Connection()
    seed(connection.tokens, connection.keys)
    return connection.open()


def sandbox() -> Connection:
    connection = Connection(CAPABILITY)
    seed(connection.tokens, connection.keys)
    return connection.open(token=CAPABILITY)


def error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "code": code, "error": message}


class HostOpsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.c = host()

    def check(self, op: str, payload: dict[str, Any], expected: dict[str, Any]) -> None:
        self.assertEqual(self.c.ask("i", op, **payload), {"id": "i", **expected}, (op, payload))

    def test_get_token_is_sanitized(self) -> None:
        reply = self.c.ask("i", "get_token", provider="anthropic", bucket="work")
        self.assertEqual(
            reply["data"],
            {
                "access_token": ACCESS,
                "expiry": 1900000000,
                "token_type": "Bearer",
                "scope": None,
                "resource_url": "https://example.test",
            },
        )
        self.assertNotIn(REFRESH, repr(reply))

    def test_get_token_refusals(self) -> None:
        self.check("get_token", {}, error("INVALID_REQUEST", "Missing provider"))
        self.check("get_token", {"provider": ""}, error("INVALID_REQUEST", "Missing provider"))
        self.check(
            "get_token",
            {"provider": "nope"},
            error("NOT_FOUND", "No token found for provider: nope"),
        )
        self.check(
            "get_token",
            {"provider": "anthropic", "bucket": "other"},
            error("NOT_FOUND", "No token found for provider: anthropic"),
        )

    def test_save_token_merges_and_keeps_the_stored_refresh_token(self) -> None:
        self.check(
            "save_token",
            {"provider": "anthropic", "token": {"access_token": "new", "refresh_token": "planted"}},
            {"ok": True, "data": {}},
        )
        stored = self.c.tokens.get_token("anthropic").result
        self.assertEqual(stored["access_token"], "new")
        self.assertEqual(stored["refresh_token"], REFRESH)
        self.assertEqual(stored["resource_url"], "https://example.test")
        self.check(
            "save_token",
            {"provider": "anthropic"},
            error("INVALID_REQUEST", "Missing provider or token"),
        )
        self.check(
            "save_token",
            {"provider": "anthropic", "token": "text"},
            error("INVALID_REQUEST", "Missing provider or token"),
        )
        self.check(
            "save_token", {"token": {}}, error("INVALID_REQUEST", "Missing provider or token")
        )

    def test_save_into_a_new_bucket(self) -> None:
        self.c.ask("i", "save_token", provider="openai", bucket="b2", token={"access_token": "o"})
        self.assertEqual(self.c.tokens.get_token("openai", "b2").result, {"access_token": "o"})

    def test_remove_token(self) -> None:
        self.check(
            "remove_token", {"provider": "anthropic", "bucket": "work"}, {"ok": True, "data": {}}
        )
        self.assertIsNone(self.c.tokens.get_token("anthropic", "work").result)
        self.check("remove_token", {"provider": "ghost"}, {"ok": True, "data": {}})
        self.check("remove_token", {}, error("INVALID_REQUEST", "Missing provider"))

    def test_lists(self) -> None:
        self.check("list_providers", {}, {"ok": True, "data": {"providers": ["anthropic"]}})
        self.check(
            "list_buckets",
            {"provider": "anthropic"},
            {"ok": True, "data": {"buckets": ["default", "work"]}},
        )
        self.check("list_buckets", {}, error("INVALID_REQUEST", "Missing provider"))
        self.check("list_api_keys", {}, {"ok": True, "data": {"keys": ["anthropic"]}})

    def test_bucket_stats(self) -> None:
        self.c.tokens.record_request("anthropic", None, 1700000000.5)
        self.c.tokens.record_request("anthropic", "work", 1700000001.0)
        self.c.tokens.record_request("anthropic", "work", 1700000002.0)
        self.check(
            "get_bucket_stats",
            {"provider": "anthropic", "bucket": "work"},
            {
                "ok": True,
                "data": {
                    "bucket": "work",
                    "requestCount": 2,
                    "percentage": 200 / 3,
                    "lastUsed": 1700000002000,
                },
            },
        )
        self.assertEqual(
            self.c.ask("i", "get_bucket_stats", provider="anthropic")["data"]["requestCount"], 1
        )
        self.check(
            "get_bucket_stats",
            {"provider": "anthropic", "bucket": "none"},
            error("NOT_FOUND", "No stats found for anthropic/none"),
        )
        self.check("get_bucket_stats", {}, error("INVALID_REQUEST", "Missing provider"))

    def test_api_keys(self) -> None:
        self.check("get_api_key", {"name": "anthropic"}, {"ok": True, "data": {"key": KEY}})
        self.check("get_api_key", {"name": "x"}, error("NOT_FOUND", "No API key found for: x"))
        self.check("get_api_key", {}, error("INVALID_REQUEST", "Missing name"))
        self.check("has_api_key", {"name": "anthropic"}, {"ok": True, "data": {"exists": True}})
        self.check("has_api_key", {"name": "x"}, {"ok": True, "data": {"exists": False}})
        self.check("has_api_key", {"name": ""}, error("INVALID_REQUEST", "Missing name"))

    def test_refresh_and_login_without_a_configured_provider(self) -> None:
        self.check(
            "refresh_token",
            {"provider": "anthropic"},
            error("PROVIDER_NOT_FOUND", "No OAuth provider configured for: anthropic"),
        )
        self.check("oauth_initiate", {}, error("INVALID_REQUEST", "Missing provider"))
        self.assertEqual(
            self.c.ask("i", "oauth_initiate", provider="a")["code"], "PROVIDER_NOT_CONFIGURED"
        )
        self.check("oauth_exchange", {"session_id": "s"}, error("INVALID_REQUEST", "Missing code"))
        self.assertEqual(
            self.c.ask("i", "oauth_exchange", session_id="s", code="c")["code"], "SESSION_NOT_FOUND"
        )
        self.assertEqual(self.c.ask("i", "oauth_poll", session_id="s")["code"], "SESSION_NOT_FOUND")
        self.check("oauth_cancel", {}, error("INVALID_REQUEST", "Missing session_id"))
        self.check("oauth_cancel", {"session_id": "s"}, {"ok": True, "data": {}})


class SandboxMatrixTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.c = sandbox()

    def test_reads_of_named_entries(self) -> None:
        token = self.c.ask("i", "get_token", provider="anthropic")
        self.assertEqual(token["data"]["access_token"], ACCESS)
        self.assertNotIn("refresh_token", token["data"])
        self.assertEqual(self.c.ask("i", "get_api_key", name="anthropic")["data"], {"key": KEY})

    def test_misses_look_like_refusals_and_come_before_validation(self) -> None:
        cases: list[tuple[str, dict[str, Any]]] = [
            ("get_token", {"provider": "nope"}),
            ("get_token", {"provider": "anthropic", "bucket": "nope"}),
            ("get_token", {}),
            ("get_api_key", {"name": "nope"}),
            ("get_api_key", {}),
        ]
        for op, payload in cases:
            self.assertEqual(
                self.c.ask("i", op, **payload), {"id": "i", **FORBIDDEN}, (op, payload)
            )

    def test_ops_a_sandbox_may_never_use_are_refused_with_their_own_text(self) -> None:
        cases: list[tuple[str, dict[str, Any], str]] = [
            (
                "save_token",
                {"provider": "anthropic", "token": {"access_token": "x"}},
                Message.SANDBOX_CANNOT_MODIFY_TOKENS,
            ),
            ("save_token", {}, Message.SANDBOX_CANNOT_MODIFY_TOKENS),
            ("remove_token", {"provider": "anthropic"}, Message.SANDBOX_CANNOT_REMOVE_TOKENS),
            ("remove_token", {}, Message.SANDBOX_CANNOT_REMOVE_TOKENS),
            ("has_api_key", {"name": "anthropic"}, Message.SANDBOX_CANNOT_CHECK_KEYS),
            ("has_api_key", {}, Message.SANDBOX_CANNOT_CHECK_KEYS),
            ("refresh_token", {"provider": "anthropic"}, Message.SANDBOX_CANNOT_REFRESH),
            ("refresh_token", {}, Message.SANDBOX_CANNOT_REFRESH),
            ("oauth_initiate", {}, Message.SANDBOX_CANNOT_INITIATE_OAUTH),
            ("oauth_exchange", {}, Message.SANDBOX_CANNOT_EXCHANGE_OAUTH),
            ("oauth_poll", {"session_id": "s"}, Message.SANDBOX_CANNOT_POLL_OAUTH),
            ("oauth_cancel", {}, Message.SANDBOX_CANNOT_CANCEL_OAUTH),
        ]
        for op, payload, message in cases:
            self.assertEqual(
                self.c.ask("i", op, **payload),
                {"id": "i", "ok": False, "code": "FORBIDDEN", "error": message},
                (op, payload),
            )
        stored = self.c.tokens.get_token("anthropic").result
        self.assertEqual(stored["access_token"], ACCESS)

    def test_cannot_enumerate(self) -> None:
        self.assertEqual(self.c.ask("i", "list_providers")["data"], {"providers": []})
        self.assertEqual(
            self.c.ask("i", "list_buckets", provider="anthropic")["data"], {"buckets": []}
        )
        self.assertEqual(self.c.ask("i", "list_buckets")["data"], {"buckets": []})
        self.assertEqual(self.c.ask("i", "list_api_keys")["data"], {"keys": []})
        self.assertEqual(
            self.c.ask("i", "get_bucket_stats", provider="anthropic", bucket="work")["data"],
            {"bucket": "work", "requestCount": 0, "percentage": 0},
        )
        self.assertEqual(
            self.c.ask("i", "get_bucket_stats")["data"],
            {"bucket": "default", "requestCount": 0, "percentage": 0},
        )

    def test_cancel_works(self) -> None:
        self.assertEqual(self.c.ask("c", "cancel", targetId="t")["data"], {"cancelled": False})


class AuditTests(SynchronousTestCase):
    def test_lines_name_ops_never_secrets(self) -> None:
        with captured_log() as events:
            c = host()
            c.ask("i", "get_token", provider="anthropic", bucket="work")
            c.ask("i", "get_api_key", name="anthropic")
            c.ask("i", "save_token", provider="anthropic", token={"access_token": "new-access-xyz"})
            c.ask("i", "list_providers")
            c.lose()
        lines = [e for e in events if e.get("log_namespace") == "credproxy.wire.audit"]
        ops = [
            (e.get("op"), e.get("provider"), e.get("bucket"), e.get("key"), e.get("status"))
            for e in lines
            if "op" in e
        ]
        self.assertEqual(
            ops,
            [
                ("get_token", "anthropic", "work", None, "ok"),
                ("get_api_key", None, None, "anthropic", "ok"),
                ("save_token", "anthropic", "default", None, "ok"),
                ("list_providers", None, None, None, "ok"),
            ],
        )
        self.assertEqual([e.get("count") for e in lines if e.get("op") == "list_providers"], [1])
        events_seen = [e["event"] for e in lines if "event" in e]
        self.assertEqual(events_seen, ["connected", "handshake", "closed"])
        text = log_text(events)
        for secret in (ACCESS, REFRESH, KEY, "new-access-xyz"):
            self.assertNotIn(secret, text)

    def test_sandbox_miss_names_nothing(self) -> None:
        with captured_log() as events:
            c = sandbox()
            c.ask("i", "get_token", provider="secret-provider-name")
            c.ask("i", "get_api_key", name="secret-key-name")
        text = log_text(events)
        self.assertIn("blocked_sandbox", text)
        self.assertNotIn("secret-provider-name", text)
        self.assertNotIn("secret-key-name", text)
        self.assertNotIn(CAPABILITY, text)

    def test_names_cannot_forge_lines(self) -> None:
        with captured_log() as events:
            host().ask("i", "get_token", provider="evil\nconn=1 op=get_token status=ok" + "x" * 500)
        (line,) = [e for e in events if e.get("op") == "get_token"]
        self.assertNotIn("\n", line["provider"])
        self.assertLess(len(line["provider"]), 200)


class SaveSerializationTests(SynchronousTestCase):
    def test_concurrent_saves_of_one_entry_do_not_lose_fields(self) -> None:
        class SlowReads(MemoryTokenStore):
            def __init__(self) -> None:
                super().__init__()
                self.reads: list[Deferred[Token | None]] = []

            def get_token(self, provider: str, bucket: str | None = None) -> Deferred[Token | None]:
                inner = super().get_token(provider, bucket).result
                d: Deferred[Token | None] = Deferred()
                self.reads.append(d)
                d.addCallback(lambda _: inner)
                return d

        store = SlowReads()
        c = Connection(tokens=store).open()
        c.send({"id": "a", "op": "save_token", "payload": {"provider": "p", "token": {"a": 1}}})
        c.send({"id": "b", "op": "save_token", "payload": {"provider": "p", "token": {"b": 2}}})
        self.assertEqual(len(store.reads), 1)  # the second waits for the first's write
        store.reads[0].callback(None)
        self.assertEqual(len(store.reads), 2)
        store.reads[1].callback(None)
        self.assertEqual([r["id"] for r in c.replies()], ["a", "b"])
        stored = MemoryTokenStore.get_token(store, "p").result
        assert isinstance(stored, Token)
        self.assertEqual(dict(stored), {"a": 1, "b": 2})
        self.assertEqual(len(c.factory.broker.locks), 0)
