"""
The server's framing and timers on a StringTransport with a Clock: bytes one
at a time, many frames in one read, frames split across reads, oversized
prefixes, the partial-frame deadline, the flood cut-off, backpressure, and
the idle and handshake deadlines.
"""

from __future__ import annotations

import struct

from twisted.trial.unittest import SynchronousTestCase

from credproxy.wire._spec import (
    CONNECTION_IDLE_TIMEOUT,
    HANDSHAKE_TIMEOUT,
    MAX_FRAME_V1,
    MAX_FRAME_V2,
    MAX_FRAMES_PER_READ,
    PARTIAL_FRAME_TIMEOUT,
)
from tests.wire.server_harness import Connection, frame, handshake, request, seed


def _open_with_token() -> Connection:
    connection = Connection()
    seed(connection.tokens, connection.keys)
    return connection.open()


class FramingTests(SynchronousTestCase):
    def test_one_byte_at_a_time(self) -> None:
        connection = Connection()
        seed(connection.tokens, connection.keys)
        stream = frame(handshake()) + frame(request("r1", "list_providers"))
        for i in range(len(stream)):
            connection.protocol.dataReceived(stream[i : i + 1])
        handshake_reply, answer = connection.replies()
        self.assertEqual(handshake_reply["data"], {"version": 2})
        self.assertEqual(answer, {"id": "r1", "ok": True, "data": {"providers": ["anthropic"]}})
        self.assertFalse(connection.closed)

    def test_many_frames_in_one_read_answer_in_order(self) -> None:
        connection = Connection()
        seed(connection.tokens, connection.keys)
        connection.send(
            handshake(), *(request(f"r{i}", "has_api_key", name="anthropic") for i in range(50))
        )
        replies = connection.replies()
        self.assertEqual(len(replies), 51)
        self.assertEqual([r["id"] for r in replies[1:]], [f"r{i}" for i in range(50)])

    def test_frame_split_inside_its_header(self) -> None:
        connection = _open_with_token()
        data = frame(request("split", "list_api_keys"))
        connection.protocol.dataReceived(data[:2])
        connection.protocol.dataReceived(data[2:7])
        self.assertEqual(connection.replies(), [])
        connection.protocol.dataReceived(data[7:])
        self.assertEqual(connection.reply()["data"], {"keys": ["anthropic"]})

    def test_oversized_prefix_aborts_and_buffers_nothing(self) -> None:
        connection = Connection()
        connection.protocol.dataReceived(struct.pack(">I", MAX_FRAME_V1 + 1) + b"{" * 100)
        self.assertTrue(connection.aborted)
        self.assertEqual(connection.transport.value(), b"")
        self.assertEqual(connection.protocol._unprocessed, b"")
        # Later bytes are not taken in either.
        connection.protocol.dataReceived(b"x" * 1000)
        self.assertEqual(connection.protocol._unprocessed, b"")

    def test_limit_is_v1_until_a_v2_handshake(self) -> None:
        big = {"v": 2, "id": "big", "op": "list_providers", "payload": {"pad": "x" * MAX_FRAME_V1}}
        v1 = Connection().open(version=1)
        v1.send(big)
        self.assertTrue(v1.aborted)
        v2 = Connection().open(version=2)
        v2.send(big)
        self.assertFalse(v2.aborted)
        self.assertEqual(v2.reply()["data"], {"providers": []})

    def test_v2_limit(self) -> None:
        connection = Connection().open()
        connection.protocol.dataReceived(struct.pack(">I", MAX_FRAME_V2 + 1))
        self.assertTrue(connection.aborted)

    def test_frame_after_handshake_in_same_read_uses_the_new_limit(self) -> None:
        big = {"v": 2, "id": "big", "op": "list_providers", "payload": {"pad": "x" * MAX_FRAME_V1}}
        connection = Connection()
        connection.send(handshake(), big)
        self.assertFalse(connection.aborted)
        self.assertEqual([r.get("id") for r in connection.replies()], [None, "big"])

    def test_invalid_json_aborts_without_reply(self) -> None:
        for body in (b"{not json", b"[1,2]", b'"text"', b"\xff\xfe", b"NaN", b'{"a":NaN}'):
            connection = _open_with_token()
            connection.send(struct.pack(">I", len(body)) + body)
            self.assertTrue(connection.aborted, body)
            self.assertEqual(connection.replies(), [])

    def test_invalid_json_handshake_aborts(self) -> None:
        connection = Connection()
        connection.send(struct.pack(">I", 3) + b"{{{")
        self.assertTrue(connection.aborted)
        self.assertEqual(connection.replies(), [])

    def test_deep_nesting_is_invalid_json_not_a_crash(self) -> None:
        connection = _open_with_token()
        body = b"[" * 60000 + b"]" * 60000
        connection.send(struct.pack(">I", len(body)) + body)
        self.assertTrue(connection.aborted)

    def test_flood_closes_before_acting_on_any_frame(self) -> None:
        connection = Connection().open()
        saves = [
            request(f"s{i}", "save_token", provider=f"p{i}", token={"access_token": "a"})
            for i in range(MAX_FRAMES_PER_READ + 1)
        ]
        connection.send(*saves)
        self.assertTrue(connection.aborted)
        self.assertEqual(connection.replies(), [])
        self.assertEqual(connection.tokens.list_providers().result, [])

    def test_exactly_the_frame_limit_per_read_is_served(self) -> None:
        connection = Connection().open()
        connection.send(*(request(f"r{i}", "list_providers") for i in range(MAX_FRAMES_PER_READ)))
        self.assertFalse(connection.aborted)
        self.assertEqual(len(connection.replies()), MAX_FRAMES_PER_READ)


class PartialFrameTimerTests(SynchronousTestCase):
    def test_fires_from_the_full_header_and_is_not_moved_by_trickling(self) -> None:
        connection = Connection()
        data = frame(handshake())
        connection.protocol.dataReceived(data[:4])
        connection.clock.advance(PARTIAL_FRAME_TIMEOUT - 1)
        connection.protocol.dataReceived(data[4:6])  # more bytes do not reset it
        self.assertFalse(connection.aborted)
        connection.clock.advance(1)
        self.assertTrue(connection.aborted)

    def test_header_bytes_alone_do_not_arm_it(self) -> None:
        connection = Connection()
        connection.protocol.dataReceived(frame(handshake())[:3])
        connection.clock.advance(PARTIAL_FRAME_TIMEOUT * 1.5)
        self.assertFalse(connection.aborted)

    def test_cancelled_when_the_frame_completes(self) -> None:
        connection = Connection()
        data = frame(handshake())
        connection.protocol.dataReceived(data[:5])
        connection.clock.advance(PARTIAL_FRAME_TIMEOUT - 1)
        connection.protocol.dataReceived(data[5:])
        connection.clock.advance(PARTIAL_FRAME_TIMEOUT)
        self.assertFalse(connection.aborted)
        self.assertEqual(connection.reply()["ok"], True)

    def test_rearmed_for_the_next_partial_frame(self) -> None:
        connection = Connection().open()
        second = frame(request("b", "list_providers"))
        connection.clock.advance(1)
        connection.protocol.dataReceived(frame(request("a", "list_providers")) + second[:6])
        self.assertEqual(connection.reply()["id"], "a")
        connection.clock.advance(PARTIAL_FRAME_TIMEOUT - 0.5)
        self.assertFalse(connection.aborted)
        connection.clock.advance(0.5)
        self.assertTrue(connection.aborted)


class BackpressureTests(SynchronousTestCase):
    def test_registered_as_streaming_producer(self) -> None:
        connection = Connection()
        self.assertIs(connection.transport.producer, connection.protocol)
        self.assertTrue(connection.transport.streaming)

    def test_requests_wait_while_the_client_does_not_read(self) -> None:
        connection = _open_with_token()
        connection.protocol.pauseProducing()
        self.assertEqual(connection.transport.producerState, "paused")
        connection.send(request("late", "list_providers"))
        self.assertEqual(connection.replies(), [])
        connection.clock.advance(PARTIAL_FRAME_TIMEOUT * 2)  # our pause, not their slowness
        self.assertFalse(connection.aborted)
        connection.protocol.resumeProducing()
        self.assertEqual(connection.transport.producerState, "producing")
        self.assertEqual(connection.reply()["id"], "late")


class IdleTests(SynchronousTestCase):
    def test_handshake_deadline(self) -> None:
        connection = Connection()
        connection.clock.advance(HANDSHAKE_TIMEOUT - 0.1)
        self.assertFalse(connection.closed)
        connection.clock.advance(0.1)
        self.assertTrue(connection.closed)
        self.assertFalse(connection.aborted)  # an orderly EOF

    def test_idle_connection_closed_after_its_timeout(self) -> None:
        connection = Connection().open()
        connection.clock.advance(CONNECTION_IDLE_TIMEOUT / 2)
        connection.send(request("r", "list_providers"))
        connection.clock.advance(CONNECTION_IDLE_TIMEOUT / 2 + 1)
        self.assertFalse(connection.closed)  # activity moved the deadline
        connection.clock.advance(CONNECTION_IDLE_TIMEOUT)
        self.assertTrue(connection.closed)
