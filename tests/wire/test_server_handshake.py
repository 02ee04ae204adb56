"""
The handshake matrix (wire-protocol.md section 2): version negotiation, the
capability token and what a rejection does to the connection.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from credproxy.wire._spec import REJECTED_HANDSHAKE_CLOSE_DELAY
from tests.wire.server_harness import (
    CAPABILITY,
    Connection,
    captured_log,
    frame,
    handshake,
    log_text,
    request,
    seed,
)

UNKNOWN_VERSION = {
    "v": 2,
    "op": "handshake",
    "ok": False,
    "code": "UNKNOWN_VERSION",
    "error": "Unsupported protocol version",
}
UNAUTHORIZED = {
    "v": 2,
    "op": "handshake",
    "ok": False,
    "code": "UNAUTHORIZED",
    "error": "Invalid or missing capability token",
}


def _first_frame(
    message: dict[str, Any], token: str | None = None
) -> tuple[Connection, dict[str, Any]]:
    connection = Connection(token, half_closeable=True)
    connection.send(message)
    return connection, connection.reply()


class VersionTests(SynchronousTestCase):
    def assertNegotiates(self, message: dict[str, Any], version: int | None) -> None:
        _, reply = _first_frame(message)
        if version is None:
            self.assertEqual(reply, UNKNOWN_VERSION, message)
        else:
            expected = {"v": version, "op": "handshake", "ok": True, "data": {"version": version}}
            self.assertEqual(reply, expected, message)

    def test_matrix(self) -> None:
        cases: list[tuple[dict[str, Any], int | None]] = [
            ({"v": 2, "op": "handshake", "payload": {"minVersion": 1, "maxVersion": 2}}, 2),
            ({"v": 1, "op": "handshake", "payload": {"minVersion": 1, "maxVersion": 1}}, 1),
            ({"v": 9, "op": "handshake", "payload": {"minVersion": 1, "maxVersion": 7}}, 2),
            ({"v": 2, "op": "handshake", "payload": {"minVersion": 2, "maxVersion": 2}}, 2),
            ({"v": 2, "op": "handshake", "payload": {"minVersion": 2.0, "maxVersion": 3.0}}, 2),
            ({"v": 2, "op": "handshake", "payload": {"minVersion": -4, "maxVersion": 1}}, 1),
            # A numeric pair decides on its own: no fallback to v.
            ({"v": 2, "op": "handshake", "payload": {"minVersion": 3, "maxVersion": 5}}, None),
            ({"v": 2, "op": "handshake", "payload": {"minVersion": 2, "maxVersion": 1}}, None),
            ({"v": 2, "op": "handshake", "payload": {"minVersion": 0, "maxVersion": 0}}, None),
            ({"v": 2, "op": "handshake", "payload": {"minVersion": 1.5, "maxVersion": 2}}, None),
            # Otherwise the top-level v, if it is 1 or 2.
            ({"v": 2, "op": "handshake", "payload": {"minVersion": "1", "maxVersion": 2}}, 2),
            ({"v": 1, "op": "handshake", "payload": {"minVersion": 1}}, 1),
            ({"v": 2.0, "op": "handshake"}, 2),
            ({"v": 1, "op": "handshake", "payload": "nonsense"}, 1),
            ({"v": 3, "op": "handshake"}, None),
            ({"v": True, "op": "handshake"}, None),
            ({"v": "2", "op": "handshake"}, None),
            ({"op": "handshake"}, None),
            ({}, None),
            # The first frame is the handshake, whatever its op says.
            ({"v": 1, "id": "x", "op": "get_token", "payload": {"provider": "p"}}, 1),
        ]
        for message, version in cases:
            self.assertNegotiates(message, version)

    def test_number_beyond_a_double_is_invalid_json(self) -> None:
        # JavaScript would read 1e400 as Infinity (not an integer, so
        # incompatible); the decoder refuses it outright, which also ends
        # the connection without a version.
        body = b'{"v":2,"op":"handshake","payload":{"minVersion":1,"maxVersion":1e400}}'
        connection = Connection()
        connection.send(len(body).to_bytes(4, "big") + body)
        self.assertEqual(connection.replies(), [])
        self.assertTrue(connection.aborted)

    def test_v1_reply_bytes(self) -> None:
        connection = Connection()
        connection.send({"v": 1, "op": "handshake", "payload": {"minVersion": 1, "maxVersion": 1}})
        self.assertEqual(
            connection.raw_replies(),
            frame({"v": 1, "op": "handshake", "ok": True, "data": {"version": 1}}),
        )

    def test_later_handshake_is_an_unknown_op(self) -> None:
        connection = Connection().open()
        connection.send({"v": 2, "id": "again", "op": "handshake", "payload": {}})
        self.assertEqual(
            connection.reply(),
            {
                "id": "again",
                "ok": False,
                "code": "INVALID_REQUEST",
                "error": "Unknown operation: handshake",
            },
        )


class CapabilityTokenTests(SynchronousTestCase):
    def test_right_token_makes_a_sandbox_connection(self) -> None:
        connection, reply = _first_frame(handshake(token=CAPABILITY), CAPABILITY)
        self.assertTrue(reply["ok"])
        self.assertTrue(connection.protocol.sandbox)

    def test_missing_wrong_or_non_string_token_is_refused(self) -> None:
        for presented in (None, "", "cd" * 32, CAPABILITY.upper(), CAPABILITY + "0", 12345):
            message = handshake()
            if presented is not None:
                message["payload"]["capabilityToken"] = presented
            connection, reply = _first_frame(message, CAPABILITY)
            self.assertEqual(reply, UNAUTHORIZED, presented)
            self.assertIsNone(connection.protocol.version)

    def test_version_is_checked_before_the_token(self) -> None:
        message = {"v": 7, "op": "handshake", "payload": {"capabilityToken": "wrong"}}
        _, reply = _first_frame(message, CAPABILITY)
        self.assertEqual(reply, UNKNOWN_VERSION)

    def test_without_a_server_token_everyone_is_a_host(self) -> None:
        connection, reply = _first_frame(handshake(token=CAPABILITY))
        self.assertTrue(reply["ok"])
        self.assertFalse(connection.protocol.sandbox)

    def test_token_never_logged(self) -> None:
        with captured_log() as events:
            _first_frame(handshake(token=CAPABILITY), CAPABILITY)
            _first_frame(handshake(token="cd" * 32), CAPABILITY)
        text = log_text(events)
        self.assertIn("handshake", text)
        self.assertNotIn(CAPABILITY, text)
        self.assertNotIn("cd" * 32, text)


class RejectionTests(SynchronousTestCase):
    def test_reply_half_close_then_hard_close(self) -> None:
        connection, reply = _first_frame({"v": 9, "op": "handshake"})
        self.assertEqual(reply, UNKNOWN_VERSION)
        self.assertTrue(connection.transport.write_closed)
        self.assertFalse(connection.aborted)
        connection.clock.advance(REJECTED_HANDSHAKE_CLOSE_DELAY - 0.01)
        self.assertFalse(connection.aborted)
        connection.clock.advance(0.01)
        self.assertTrue(connection.aborted)

    def test_frames_after_a_rejection_are_ignored(self) -> None:
        connection = Connection(CAPABILITY, half_closeable=True)
        seed(connection.tokens, connection.keys)
        connection.send(handshake(), request("r1", "get_token", provider="anthropic"))
        connection.send(request("r2", "get_token", provider="anthropic"))
        self.assertEqual(connection.replies(), [UNAUTHORIZED])
        self.assertEqual(connection.protocol._unprocessed, b"")

    def test_peer_closing_first_cancels_the_hard_close(self) -> None:
        connection, _ = _first_frame({"v": 9, "op": "handshake"})
        connection.lose()
        self.assertEqual(connection.clock.getDelayedCalls(), [])

    def test_without_half_close_support_the_connection_is_closed(self) -> None:
        connection = Connection()
        connection.send({"v": 9})
        self.assertEqual(connection.reply(), UNKNOWN_VERSION)
        self.assertTrue(connection.closed)
