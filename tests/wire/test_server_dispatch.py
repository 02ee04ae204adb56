"""
Requests on one connection (wire-protocol.md section 3): concurrent ops
answered by id in any order, the in-flight limit, duplicate ids, unknown
ops, cancel, the handling deadline, safe internal errors, and answers too
large for the peer's version.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.logger import LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from credproxy.broker.tokens import Token
from credproxy.stores import ITokenStore, MemoryTokenStore, StoreCorrupt, StoreDown
from credproxy.wire._spec import MAX_FRAME_V1, MAX_FRAME_V2, MAX_IN_FLIGHT, REQUEST_HANDLING_TIMEOUT
from tests.wire.server_harness import (
    REFRESH,
    Connection,
    captured_log,
    frame,
    log_text,
    request,
)


@implementer(ITokenStore)
class ControlledTokenStore(MemoryTokenStore):
    """
    Memory tokens, except that reading a provider named C{wait-*} answers
    only when the test fires it, and C{boom} fails with a secret in its text.
    """

    def __init__(self) -> None:
        super().__init__()
        self.waiting: dict[str, Deferred[Token | None]] = {}
        self.cancelled: list[str] = []

    def get_token(self, provider: str, bucket: str | None = None) -> Deferred[Token | None]:
        if provider == "boom":
            return fail(RuntimeError(f"backend exploded holding {REFRESH}"))
        if provider == "down":
            return fail(StoreDown("Redis store redis://127.0.0.1:6379/0 is unavailable"))
        if provider == "corrupt":
            return fail(StoreCorrupt("Redis key credproxy:token:corrupt:default does not decrypt"))
        if provider.startswith("wait-"):
            d: Deferred[Token | None] = Deferred(lambda _: self.cancelled.append(provider))
            self.waiting[provider] = d
            return d
        return super().get_token(provider, bucket)

    def release(self, provider: str, access: str) -> None:
        self.waiting.pop(provider).callback(Token({"access_token": access, "refresh_token": "r"}))


def _connection(version: int = 2) -> tuple[Connection, ControlledTokenStore]:
    store = ControlledTokenStore()
    return Connection(tokens=store).open(version), store


def _ask_waiting(connection: Connection, request_id: str, provider: str) -> None:
    connection.send(request(request_id, "get_token", provider=provider))


class ConcurrencyTests(SynchronousTestCase):
    def test_answers_correlate_out_of_order(self) -> None:
        connection, store = _connection()
        for i in range(3):
            _ask_waiting(connection, f"id-{i}", f"wait-{i}")
        self.assertEqual(connection.replies(), [])
        self.assertEqual(connection.protocol.in_flight, 3)
        for i in (2, 0, 1):
            store.release(f"wait-{i}", f"access-{i}")
        replies = connection.replies()
        self.assertEqual([r["id"] for r in replies], ["id-2", "id-0", "id-1"])
        for reply in replies:
            suffix = reply["id"].removeprefix("id-")
            self.assertEqual(reply["data"], {"access_token": f"access-{suffix}"})
        self.assertEqual(connection.protocol.in_flight, 0)

    def test_seventeenth_request_is_refused_but_cancel_is_exempt(self) -> None:
        connection, store = _connection()
        for i in range(MAX_IN_FLIGHT):
            _ask_waiting(connection, f"id-{i}", f"wait-{i}")
        connection.send(request("id-16", "list_providers"))
        self.assertEqual(
            connection.reply(),
            {
                "id": "id-16",
                "ok": False,
                "code": "RESOURCE_EXHAUSTED",
                "error": "Too many concurrent requests",
            },
        )
        connection.send(request("c", "cancel", targetId="id-3"))
        self.assertEqual(
            connection.replies(),
            [
                {"id": "c", "ok": True, "data": {"cancelled": True}},
                {"id": "id-3", "ok": False, "code": "CANCELLED", "error": "Operation cancelled"},
            ],
        )
        self.assertEqual(store.cancelled, ["wait-3"])
        connection.send(request("id-17", "list_providers"))  # a slot is free again
        self.assertEqual(connection.reply()["ok"], True)

    def test_duplicate_in_flight_id(self) -> None:
        connection, store = _connection()
        _ask_waiting(connection, "same", "wait-a")
        connection.send(request("same", "list_providers"))
        self.assertEqual(
            connection.reply(),
            {"id": "same", "ok": False, "code": "INVALID_REQUEST", "error": "Duplicate request id"},
        )
        store.release("wait-a", "a")
        self.assertEqual(connection.reply()["data"], {"access_token": "a"})
        connection.send(request("same", "list_providers"))  # reusable once answered
        self.assertTrue(connection.reply()["ok"])

    def test_lost_connection_cancels_running_ops(self) -> None:
        connection, store = _connection()
        _ask_waiting(connection, "a", "wait-a")
        _ask_waiting(connection, "b", "wait-b")
        connection.lose()
        self.assertEqual(sorted(store.cancelled), ["wait-a", "wait-b"])
        self.assertEqual(connection.replies(), [])
        self.assertEqual(connection.clock.getDelayedCalls(), [])


class ValidationTests(SynchronousTestCase):
    def test_missing_or_empty_id_or_op(self) -> None:
        connection = Connection().open()
        missing = {"ok": False, "code": "INVALID_REQUEST", "error": "Missing request id or op"}
        cases = [
            ({"op": "list_providers"}, "unknown"),
            ({"id": "", "op": "list_providers"}, ""),
            ({"id": 0, "op": "list_providers"}, "0"),
            ({"id": None, "op": "list_providers"}, "unknown"),
            ({"id": "x"}, "x"),
            ({"id": "x", "op": ""}, "x"),
            ({"id": "x", "op": 5}, "x"),
        ]
        for message, echoed in cases:
            connection.send(message)
            self.assertEqual(connection.reply(), {"id": echoed, **missing}, message)

    def test_numeric_id_is_echoed_as_a_string(self) -> None:
        connection = Connection().open()
        connection.send({"id": 42, "op": "list_providers"})
        self.assertEqual(connection.reply(), {"id": "42", "ok": True, "data": {"providers": []}})

    def test_only_registered_names_are_ops(self) -> None:
        connection = Connection().open()
        for op in ("__class__", "toString", "constructor", "__init__", "get_token ", "GET_TOKEN"):
            self.assertEqual(
                connection.ask("u", op),
                {
                    "id": "u",
                    "ok": False,
                    "code": "INVALID_REQUEST",
                    "error": f"Unknown operation: {op}",
                },
            )

    def test_non_object_payload_counts_as_empty(self) -> None:
        connection = Connection().open()
        connection.send({"id": "p", "op": "get_token", "payload": ["provider"]})
        self.assertEqual(
            connection.reply(),
            {"id": "p", "ok": False, "code": "INVALID_REQUEST", "error": "Missing provider"},
        )
        connection.send({"id": "q", "op": "list_providers"})
        self.assertTrue(connection.reply()["ok"])


class CancelTests(SynchronousTestCase):
    def test_cancel_without_target(self) -> None:
        connection = Connection().open()
        self.assertEqual(
            connection.ask("c", "cancel"),
            {"id": "c", "ok": False, "code": "INVALID_REQUEST", "error": "Missing targetId"},
        )

    def test_cancel_of_nothing(self) -> None:
        connection = Connection().open()
        self.assertEqual(
            connection.ask("c", "cancel", targetId="ghost"),
            {"id": "c", "ok": True, "data": {"cancelled": False}},
        )

    def test_cancel_reaches_only_its_own_connection(self) -> None:
        first, store = _connection()
        second = Connection(factory=first.factory, clock=first.clock).open()
        _ask_waiting(first, "mine", "wait-x")
        self.assertEqual(second.ask("c", "cancel", targetId="mine")["data"], {"cancelled": False})
        self.assertEqual(store.cancelled, [])
        store.release("wait-x", "x")
        self.assertEqual(first.reply()["data"], {"access_token": "x"})


class DeadlineAndFailureTests(SynchronousTestCase):
    def test_handling_deadline_answers_and_frees_the_slot(self) -> None:
        connection, store = _connection()
        _ask_waiting(connection, "slow", "wait-slow")
        connection.clock.advance(REQUEST_HANDLING_TIMEOUT)
        self.assertEqual(
            connection.reply(),
            {"id": "slow", "ok": False, "code": "INTERNAL_ERROR", "error": "Operation timed out"},
        )
        self.assertEqual(store.cancelled, ["wait-slow"])
        self.assertEqual(connection.protocol.in_flight, 0)

    def test_a_fast_op_leaves_no_timer(self) -> None:
        connection = Connection().open()
        connection.ask("f", "list_providers")
        self.assertEqual(len(connection.clock.getDelayedCalls()), 1)  # only the idle deadline

    def test_handler_failure_is_a_safe_internal_error(self) -> None:
        connection, _ = _connection()
        with captured_log() as events:
            reply = connection.ask("b", "get_token", provider="boom")
        self.assertEqual(
            reply, {"id": "b", "ok": False, "code": "INTERNAL_ERROR", "error": "Internal error"}
        )
        text = log_text(events)
        self.assertIn("RuntimeError", text)
        self.assertNotIn(REFRESH, text)

    def test_a_store_failure_is_credential_store_unavailable(self) -> None:
        """
        The agent can tell a store that fails from a bug. An outage of a
        shared store is the store's to log (once); a store holding what it
        cannot read is logged with the store's own value-free message.
        """
        connection, _ = _connection()
        with captured_log() as events:
            down = connection.ask("d", "get_token", provider="down")
            corrupt = connection.ask("c", "get_token", provider="corrupt")
        for reply, request_id in ((down, "d"), (corrupt, "c")):
            self.assertEqual(
                reply,
                {
                    "id": request_id,
                    "ok": False,
                    "code": "INTERNAL_ERROR",
                    "error": "Credential store unavailable",
                },
            )
        errors = [formatEvent(e) for e in events if e["log_level"] == LogLevel.error]
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("does not decrypt", errors[0])


class AnswerSizeTests(SynchronousTestCase):
    def _key_store_with(self, size: int) -> Any:
        from credproxy._secret import Secret
        from credproxy.stores import MemoryProviderKeyStore

        keys = MemoryProviderKeyStore()
        keys.save_key("big", Secret("k" * size))
        return keys

    def test_v1_answer_over_the_frame_limit(self) -> None:
        connection = Connection(keys=self._key_store_with(MAX_FRAME_V1)).open(version=1)
        self.assertEqual(
            connection.ask("k", "get_api_key", name="big"),
            {
                "id": "k",
                "ok": False,
                "code": "RESPONSE_TOO_LARGE",
                "error": "Response exceeds maximum frame size for protocol version 1",
            },
        )
        self.assertFalse(connection.closed)
        self.assertTrue(connection.ask("n", "list_providers")["ok"])

    def test_v1_answer_exactly_at_the_limit_is_sent(self) -> None:
        overhead = len(frame({"id": "k", "ok": True, "data": {"key": ""}}))
        keys = self._key_store_with(MAX_FRAME_V1 - overhead)
        connection = Connection(keys=keys).open(version=1)
        connection.send(request("k", "get_api_key", name="big"))
        raw = connection.raw_replies()
        self.assertEqual(len(raw), MAX_FRAME_V1)
        over = Connection(keys=self._key_store_with(MAX_FRAME_V1 - overhead + 1)).open(version=1)
        self.assertEqual(over.ask("k", "get_api_key", name="big")["code"], "RESPONSE_TOO_LARGE")

    def test_v2_answer_over_the_frame_limit(self) -> None:
        connection = Connection(keys=self._key_store_with(MAX_FRAME_V2)).open()
        self.assertEqual(
            connection.ask("k", "get_api_key", name="big"),
            {
                "id": "k",
                "ok": False,
                "code": "INTERNAL_ERROR",
                "error": "Frame exceeds maximum size",
            },
        )
        self.assertFalse(connection.closed)

    def test_v1_unknown_op_echo_too_large(self) -> None:
        connection = Connection().open(version=1)
        op = "x" * (MAX_FRAME_V1 - 50)  # the request fits; the answer, echoing it, does not
        self.assertEqual(connection.ask("u", op)["code"], "RESPONSE_TOO_LARGE")
