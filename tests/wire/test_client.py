"""
The Twisted credential-socket client against an in-memory server: handshake
bytes and negotiation, correlation, timeouts with cancel, idle close,
connection loss, reconnect, limits, and that no secret leaks.
"""

from __future__ import annotations

import struct
import uuid
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from credproxy._secret import Secret
from credproxy.wire._client import ProxySocketClient
from credproxy.wire._client_errors import (
    FrameTooLargeError,
    ProxyClientClosed,
    ProxyConnectionLost,
    ProxyRequestError,
    ProxyTimeoutError,
)
from credproxy.wire._spec import MAX_FRAME_V1, MAX_FRAME_V2, MAX_IN_FLIGHT, Message
from tests.wire.client_fakes import FakeEndpoint, FakeServerConnection, frame

TOKEN = "ab" * 32


class ClientTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.endpoint = FakeEndpoint()
        self.client = ProxySocketClient(self.clock, self.endpoint)

    def request(
        self, op: str = "get_token", payload: dict[str, Any] | None = None, **kwargs: Any
    ) -> Deferred[dict[str, Any]]:
        return self.client.request(
            op, payload if payload is not None else {"provider": "p"}, **kwargs
        )

    def started(
        self, version: int = 2, **kwargs: Any
    ) -> tuple[Deferred[dict[str, Any]], FakeServerConnection, dict[str, Any]]:
        d = self.request(**kwargs)
        server = self.endpoint.last
        server.accept(version)
        (sent,) = server.read()
        return d, server, sent


class HandshakeTests(ClientTestCase):
    def test_lazy(self) -> None:
        """
        Nothing connects until the first request.
        """
        self.assertEqual(self.endpoint.connections, [])
        self.assertIsNone(self.client.version)
        self.request()
        self.assertEqual(len(self.endpoint.connections), 1)

    def test_handshake_bytes_without_token(self) -> None:
        self.request()
        body = b'{"v":2,"op":"handshake","payload":{"minVersion":1,"maxVersion":2}}'
        self.assertEqual(self.endpoint.last.raw(), struct.pack(">I", len(body)) + body)

    def test_handshake_bytes_with_token(self) -> None:
        client = ProxySocketClient(self.clock, self.endpoint, capability_token=Secret(TOKEN))
        client.request("list_providers")
        body = (
            '{"v":2,"op":"handshake","payload":{"minVersion":1,"maxVersion":2,'
            f'"capabilityToken":"{TOKEN}"}}}}'
        ).encode()
        self.assertEqual(self.endpoint.last.raw(), struct.pack(">I", len(body)) + body)

    def test_requests_wait_for_the_handshake(self) -> None:
        self.request()
        server = self.endpoint.last
        self.assertEqual([m["op"] for m in server.read()], ["handshake"])
        server.send({"v": 2, "op": "handshake", "ok": True, "data": {"version": 2}})
        (sent,) = server.read()
        self.assertEqual(sent["op"], "get_token")

    def test_version_2(self) -> None:
        _, _, sent = self.started(2)
        self.assertEqual(self.client.version, 2)
        self.assertEqual(sent["v"], 2)
        self.assertEqual(sorted(sent), ["id", "op", "payload", "v"])
        self.assertEqual(sent["payload"], {"provider": "p"})

    def test_version_1(self) -> None:
        _, _, sent = self.started(1)
        self.assertEqual(self.client.version, 1)
        self.assertEqual(sent["v"], 1)

    def test_reply_without_numeric_version_means_1(self) -> None:
        for data in ({}, {"version": "2"}, {"version": None}, {"version": True}):
            client = ProxySocketClient(self.clock, self.endpoint)
            client.request("list_providers")
            server = self.endpoint.last
            server.read()
            server.send({"op": "handshake", "ok": True, "data": data})
            (sent,) = server.read()
            self.assertEqual((client.version, sent["v"]), (1, 1), data)
        client = ProxySocketClient(self.clock, self.endpoint)
        client.request("list_providers")
        self.endpoint.last.read()
        self.endpoint.last.send({"op": "handshake", "ok": True})
        self.assertEqual(client.version, 1)

    def test_rejection_surfaces_code(self) -> None:
        d1, d2 = self.request(), self.request()
        server = self.endpoint.last
        server.send(
            {
                "v": 2,
                "op": "handshake",
                "ok": False,
                "code": "UNAUTHORIZED",
                "error": "Invalid or missing capability token",
            }
        )
        for d in (d1, d2):
            error = self.failureResultOf(d, ProxyRequestError).value
            self.assertEqual(
                (error.code, str(error)), ("UNAUTHORIZED", "Invalid or missing capability token")
            )
        self.assertTrue(server.client_closed)
        server.deliver_close()
        self.request()
        self.assertEqual(len(self.endpoint.connections), 2)
        self.assertEqual(self.endpoint.last.read()[0]["op"], "handshake")

    def test_unknown_version_rejection(self) -> None:
        d = self.request()
        self.endpoint.last.send(
            {
                "v": 2,
                "op": "handshake",
                "ok": False,
                "code": "UNKNOWN_VERSION",
                "error": Message.UNSUPPORTED_VERSION,
            }
        )
        self.assertEqual(self.failureResultOf(d, ProxyRequestError).value.code, "UNKNOWN_VERSION")

    def test_unsupported_version_number(self) -> None:
        d = self.request()
        self.endpoint.last.send({"op": "handshake", "ok": True, "data": {"version": 3}})
        self.assertEqual(self.failureResultOf(d, ProxyRequestError).value.code, "UNKNOWN_VERSION")

    def test_handshake_timeout(self) -> None:
        """
        A server that never answers the handshake: the request times out and
        the half-open connection is dropped.
        """
        d = self.request()
        self.clock.advance(30)
        self.failureResultOf(d, ProxyTimeoutError)
        self.assertTrue(self.endpoint.last.transport.disconnected)

    def test_connect_refused(self) -> None:
        self.endpoint.refuse = True
        d = self.request()
        self.assertEqual(
            str(self.failureResultOf(d, ProxyConnectionLost).value), Message.CONNECTION_LOST
        )
        self.endpoint.refuse = False
        self.request()
        self.assertEqual(len(self.endpoint.connections), 1)

    def test_unix_path(self) -> None:
        reactor = MemoryReactorClock()
        client = ProxySocketClient(reactor, "/tmp/cp-x/cred.sock")
        self.assertEqual(reactor.unixClients, [])
        client.request("list_providers")
        self.assertEqual(reactor.unixClients[0][0], "/tmp/cp-x/cred.sock")

    def test_unix_path_needs_unix_reactor(self) -> None:
        self.assertRaises(TypeError, ProxySocketClient, self.clock, "/tmp/x.sock")


class RequestTests(ClientTestCase):
    def test_answer(self) -> None:
        d, server, sent = self.started()
        server.answer(sent, {"access_token": "x"})
        self.assertEqual(self.successResultOf(d), {"access_token": "x"})

    def test_failure_answer(self) -> None:
        d, server, sent = self.started()
        server.send(
            {
                "id": sent["id"],
                "ok": False,
                "code": "RATE_LIMITED",
                "error": "slow down",
                "retryAfter": 12,
            }
        )
        error = self.failureResultOf(d, ProxyRequestError).value
        self.assertEqual(
            (error.code, error.message, error.retry_after), ("RATE_LIMITED", "slow down", 12.0)
        )
        self.assertEqual(str(error), "slow down")

    def test_ids_are_unique_uuid4(self) -> None:
        for _ in range(10):
            self.request()
        server = self.endpoint.last
        server.accept()
        ids = [m["id"] for m in server.read()]
        self.assertEqual(len(set(ids)), 10)
        for request_id in ids:
            self.assertEqual(uuid.UUID(request_id).version, 4)
            self.assertEqual(str(uuid.UUID(request_id)), request_id)

    def test_out_of_order(self) -> None:
        ds = [self.request(payload={"provider": str(i)}) for i in range(3)]
        server = self.endpoint.last
        server.accept()
        sent = server.read()
        for message in reversed(sent):
            server.answer(message, {"echo": message["payload"]["provider"]})
        self.assertEqual(
            [self.successResultOf(d) for d in ds], [{"echo": "0"}, {"echo": "1"}, {"echo": "2"}]
        )

    def test_payload_defaults_to_empty_object(self) -> None:
        self.client.request("list_providers")
        server = self.endpoint.last
        server.accept()
        self.assertEqual(server.read()[0]["payload"], {})

    def test_unknown_ids_and_idless_frames_ignored(self) -> None:
        d, server, sent = self.started()
        server.send({"id": str(uuid.uuid4()), "ok": True, "data": {}})
        server.send({"ok": False, "code": "INVALID_REQUEST", "error": Message.MISSING_ID_OR_OP})
        self.assertNoResult(d)
        self.assertFalse(server.client_closed)
        server.answer(sent, {"a": 1})
        self.assertEqual(self.successResultOf(d), {"a": 1})

    def test_many_frames_in_one_read(self) -> None:
        ds = [self.request() for _ in range(3)]
        server = self.endpoint.last
        server.accept()
        sent = server.read()
        server.send_bytes(
            b"".join(
                frame({"id": m["id"], "ok": True, "data": {"n": i}}) for i, m in enumerate(sent)
            )
        )
        self.assertEqual([self.successResultOf(d)["n"] for d in ds], [0, 1, 2])

    def test_byte_at_a_time(self) -> None:
        d, server, sent = self.started()
        for byte in frame({"id": sent["id"], "ok": True, "data": {"k": "é"}}):
            server.send_bytes(bytes([byte]))
        self.assertEqual(self.successResultOf(d), {"k": "é"})


class TimeoutTests(ClientTestCase):
    def test_default_timeout_sends_cancel_and_ignores_late_answer(self) -> None:
        d, server, sent = self.started()
        self.clock.advance(29.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        error = self.failureResultOf(d, ProxyTimeoutError).value
        self.assertIsInstance(error, TimeoutError)
        (cancel,) = server.read()
        self.assertEqual(cancel["op"], "cancel")
        self.assertEqual(cancel["v"], 2)
        self.assertEqual(cancel["payload"], {"targetId": sent["id"]})
        self.assertNotEqual(cancel["id"], sent["id"])
        self.assertEqual(uuid.UUID(cancel["id"]).version, 4)
        self.assertEqual(sorted(cancel), ["id", "op", "payload", "v"])
        server.answer(cancel, {"cancelled": True})
        server.refuse(sent, "CANCELLED", Message.CANCELLED)
        server.answer(sent, {"late": True})
        self.assertFalse(server.client_closed)
        self.assertEqual(self.client.pending, 0)

    def test_cancel_frame_uses_negotiated_version(self) -> None:
        d, server, _sent = self.started(1)
        self.clock.advance(30)
        self.failureResultOf(d, ProxyTimeoutError)
        self.assertEqual(server.read()[0]["v"], 1)

    def test_per_call_override(self) -> None:
        d, _server, _ = self.started(timeout=5)
        self.clock.advance(5)
        self.failureResultOf(d, ProxyTimeoutError)

    def test_override_capped_at_an_hour(self) -> None:
        d, _server, _ = self.started(timeout=7200)
        self.clock.advance(3599)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.assertEqual(self.failureResultOf(d, ProxyTimeoutError).value.seconds, 3600)

    def test_client_default_override(self) -> None:
        client = ProxySocketClient(self.clock, self.endpoint, request_timeout=2)
        d = client.request("list_providers")
        self.endpoint.last.accept()
        self.clock.advance(2)
        self.failureResultOf(d, ProxyTimeoutError)

    def test_bad_timeouts(self) -> None:
        for bad in (0, -1, float("nan"), True):
            self.assertRaises(ValueError, self.client.request, "list_providers", {}, bad)

    def test_cancelling_the_deferred_sends_cancel(self) -> None:
        d, server, sent = self.started()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        (cancel,) = server.read()
        self.assertEqual((cancel["op"], cancel["payload"]), ("cancel", {"targetId": sent["id"]}))

    def test_timeout_before_handshake_sends_nothing(self) -> None:
        d = self.request(timeout=1)
        server = self.endpoint.last
        server.read()
        self.clock.advance(1)
        self.failureResultOf(d, ProxyTimeoutError)
        server.send({"v": 2, "op": "handshake", "ok": True, "data": {"version": 2}})
        self.assertEqual(server.read(), [])


class IdleTests(ClientTestCase):
    def test_idle_close_after_five_minutes(self) -> None:
        d, server, sent = self.started()
        server.answer(sent)
        self.successResultOf(d)
        self.clock.advance(299)
        self.assertFalse(server.client_closed)
        self.clock.advance(1)
        self.assertTrue(server.client_closed)
        server.deliver_close()
        self.assertIsNone(self.client.version)

    def test_no_idle_close_while_pending(self) -> None:
        _d, server, sent = self.started(timeout=3600)
        self.clock.advance(600)
        self.assertFalse(server.client_closed)
        server.answer(sent)
        self.clock.advance(299)
        self.assertFalse(server.client_closed)
        self.clock.advance(1)
        self.assertTrue(server.client_closed)

    def test_activity_restarts_idle(self) -> None:
        _d, server, sent = self.started()
        server.answer(sent)
        self.clock.advance(200)
        self.request()
        server.answer(server.read()[0])
        self.clock.advance(200)
        self.assertFalse(server.client_closed)
        self.clock.advance(100)
        self.assertTrue(server.client_closed)

    def test_reconnects_after_idle_close_with_new_handshake(self) -> None:
        d, server, sent = self.started()
        server.answer(sent)
        self.clock.advance(300)
        server.deliver_close()
        d = self.request()
        self.assertEqual(len(self.endpoint.connections), 2)
        fresh = self.endpoint.last
        handshake = fresh.accept()
        self.assertEqual(handshake["op"], "handshake")
        fresh.answer(fresh.read()[0], {"again": True})
        self.assertEqual(self.successResultOf(d), {"again": True})

    def test_request_between_idle_close_and_its_completion(self) -> None:
        """
        The idle close is asynchronous; a request issued meanwhile goes to a
        new connection rather than to the closing one.
        """
        d, server, sent = self.started()
        server.answer(sent)
        self.clock.advance(300)
        d = self.request()
        self.assertEqual(len(self.endpoint.connections), 2)
        server.deliver_close()
        self.assertNoResult(d)
        fresh = self.endpoint.last
        fresh.accept()
        fresh.answer(fresh.read()[0])
        self.successResultOf(d)


class ConnectionLossTests(ClientTestCase):
    def test_all_pending_fail_at_once_with_the_message(self) -> None:
        ds = [self.request() for _ in range(3)]
        server = self.endpoint.last
        server.accept()
        server.read()
        server.drop()
        for d in ds:
            error = self.failureResultOf(d, ProxyConnectionLost).value
            self.assertEqual(str(error), "Credential proxy connection lost. Restart the session.")
        self.assertEqual(self.client.pending, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_loss_during_handshake(self) -> None:
        d = self.request()
        self.endpoint.last.drop()
        self.assertEqual(str(self.failureResultOf(d).value), Message.CONNECTION_LOST)

    def test_next_call_reconnects(self) -> None:
        d, server, _ = self.started()
        server.drop()
        self.failureResultOf(d, ProxyConnectionLost)
        d = self.request()
        fresh = self.endpoint.last
        self.assertIsNot(fresh, server)
        self.assertEqual(fresh.accept()["op"], "handshake")
        fresh.answer(fresh.read()[0], {"ok": 1})
        self.assertEqual(self.successResultOf(d), {"ok": 1})

    def test_loss_while_idle_fails_nothing(self) -> None:
        _d, server, sent = self.started()
        server.answer(sent)
        server.drop()
        self.assertIsNone(self.client.version)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_close(self) -> None:
        d, server, _ = self.started()
        closed = self.client.close()
        self.failureResultOf(d, ProxyClientClosed)
        self.assertTrue(server.transport.disconnected)
        self.assertNoResult(closed)
        server.deliver_close()
        self.successResultOf(closed)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.request()
        self.assertEqual(len(self.endpoint.connections), 2)

    def test_close_without_connection(self) -> None:
        self.successResultOf(self.client.close())


class LimitTests(ClientTestCase):
    def test_at_most_max_in_flight_on_the_wire(self) -> None:
        ds = [self.request() for _ in range(MAX_IN_FLIGHT + 4)]
        server = self.endpoint.last
        server.accept()
        sent = server.read()
        self.assertEqual(len(sent), MAX_IN_FLIGHT)
        self.assertEqual(self.client.pending, MAX_IN_FLIGHT + 4)
        server.answer(sent[0])
        self.successResultOf(ds[0])
        self.assertEqual(len(server.read()), 1)

    def test_waiting_queue_is_bounded(self) -> None:
        client = ProxySocketClient(self.clock, self.endpoint, max_waiting=2)
        client.request("a")
        client.request("b")
        d = client.request("c")
        error = self.failureResultOf(d, ProxyRequestError).value
        self.assertEqual(error.code, "RESOURCE_EXHAUSTED")

    def test_refuses_to_send_over_the_v2_limit(self) -> None:
        d, server, sent = self.started()
        big = self.request(payload={"provider": "x" * MAX_FRAME_V2})
        self.failureResultOf(big, FrameTooLargeError)
        self.assertEqual(server.read(), [])
        self.assertFalse(server.client_closed)
        server.answer(sent)
        self.successResultOf(d)

    def test_refuses_to_send_over_the_v1_limit(self) -> None:
        _d, server, _sent = self.started(1)
        big = self.request(payload={"provider": "x" * MAX_FRAME_V1})
        self.failureResultOf(big, FrameTooLargeError)
        self.assertEqual(server.read(), [])

    def test_v2_accepts_large_inbound(self) -> None:
        d, server, sent = self.started(2)
        server.answer(sent, {"blob": "x" * (MAX_FRAME_V1 * 2)})
        self.assertEqual(len(self.successResultOf(d)["blob"]), MAX_FRAME_V1 * 2)

    def assertDropped(self, data: bytes, version: int = 2) -> None:
        d, server, sent = self.started(version)
        server.send_bytes(data.replace(b"ID", sent["id"].encode()))
        self.assertTrue(server.transport.disconnected, data[:60])
        server.deliver_close()
        self.assertEqual(
            str(self.failureResultOf(d, ProxyConnectionLost).value), Message.CONNECTION_LOST
        )

    def test_oversized_inbound_v1(self) -> None:
        self.assertDropped(struct.pack(">I", MAX_FRAME_V1 + 1), version=1)

    def test_oversized_inbound_v2(self) -> None:
        self.assertDropped(struct.pack(">I", MAX_FRAME_V2 + 1))

    def test_huge_prefix(self) -> None:
        self.assertDropped(b"\xff\xff\xff\xff")

    def test_invalid_json(self) -> None:
        self.assertDropped(struct.pack(">I", 5) + b"{nope")

    def test_invalid_utf8(self) -> None:
        self.assertDropped(struct.pack(">I", 3) + b'"\xff"')

    def test_non_object_frame(self) -> None:
        self.assertDropped(frame([1, 2]))

    def test_data_not_an_object(self) -> None:
        for data in ([1], "s", 3, None):
            self.setUp()
            self.assertDropped(frame({"id": "ID", "ok": True, "data": data}))

    def test_missing_data(self) -> None:
        self.assertDropped(frame({"id": "ID", "ok": True}))

    def test_ok_not_boolean(self) -> None:
        self.assertDropped(frame({"id": "ID", "ok": "yes", "data": {}}))

    def test_error_fields_not_strings(self) -> None:
        self.assertDropped(frame({"id": "ID", "ok": False, "code": 5, "error": "x"}))

    def test_frames_after_a_violation_are_ignored(self) -> None:
        d1 = self.request()
        d2 = self.request()
        server = self.endpoint.last
        server.accept()
        _a, b = server.read()
        server.send_bytes(frame([]) + frame({"id": b["id"], "ok": True, "data": {}}))
        server.deliver_close()
        self.failureResultOf(d1, ProxyConnectionLost)
        self.failureResultOf(d2, ProxyConnectionLost)


class SecrecyTests(ClientTestCase):
    def test_no_token_in_repr_errors_or_logs(self) -> None:
        events = EventLoggingObserver()
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)
        client = ProxySocketClient(self.clock, self.endpoint, capability_token=Secret(TOKEN))
        failures: list[Failure] = []
        d = client.request("get_token", {"provider": "p"})
        d.addErrback(failures.append)
        self.endpoint.last.send(
            {
                "op": "handshake",
                "ok": False,
                "code": "UNAUTHORIZED",
                "error": Message.BAD_CAPABILITY_TOKEN,
            }
        )
        d = client.request("get_token", {"provider": "p"})
        d.addErrback(failures.append)
        self.endpoint.last.accept()
        self.endpoint.last.send_bytes(b"\xff\xff\xff\xff")
        self.endpoint.last.deliver_close()
        self.endpoint.refuse = True
        client.request("x").addErrback(failures.append)
        self.assertEqual(len(failures), 3)
        texts = [repr(client), *(formatEvent(e) for e in events)]
        texts += [repr(f.value) + str(f.value) + f.getTraceback() for f in failures]
        self.assertTrue(events)
        for text in texts:
            self.assertNotIn(TOKEN, text)
        self.assertIn("with capability token", repr(client))
