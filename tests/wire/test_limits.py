"""
The credential socket against hostile local peers, with a Clock and
StringTransports: the handshake deadline counted from the moment of
connecting; the pending-handshake pool and the face's slots (in all and per
peer) that only a successful handshake draws from; the refusal frame and
close past every limit; every path giving back exactly what it took; and the
flood-gated refusal lines.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.logger import LogEvent
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from credproxy._limits import FLOOD_LOG_INTERVAL, ConnectionLimits, SlotRefusal
from credproxy._secret import Secret
from credproxy.broker import Broker
from credproxy.stores import MemoryProviderKeyStore, MemoryTokenStore
from credproxy.wire import CredentialServerFactory, ProxyRequestError, ProxySocketClient, RPCFace
from credproxy.wire._spec import (
    CONNECTION_IDLE_TIMEOUT,
    HANDSHAKE_TIMEOUT,
    MAX_LINGERING_REFUSALS,
    MAX_PENDING_HANDSHAKES,
    PARTIAL_FRAME_TIMEOUT,
    REJECTED_HANDSHAKE_CLOSE_DELAY,
    SHUTDOWN_HARD_CLOSE_DELAY,
    Message,
)
from tests.wire.server_harness import (
    CAPABILITY,
    Connection,
    captured_log,
    handshake,
    log_text,
    request,
)


def _refusal(error: str) -> dict[str, Any]:
    return {"v": 2, "op": "handshake", "ok": False, "code": "RESOURCE_EXHAUSTED", "error": error}


FACE_FULL = _refusal("Too many connections")
PEER_FULL = _refusal("Too many connections from this peer")
PENDING_FULL = _refusal("Too many connections waiting for a handshake")


def _factory(
    clock: Clock,
    token: str | None = None,
    *,
    max_connections: int = 8,
    max_per_peer: int = 8,
    pending: int = 4,
) -> CredentialServerFactory:
    return CredentialServerFactory(
        clock,
        Broker(clock, MemoryTokenStore(), MemoryProviderKeyStore()),
        Secret(token) if token is not None else None,
        limits=ConnectionLimits(max_connections=max_connections, max_per_peer=max_per_peer),
        max_pending_handshakes=pending,
    )


def _counts(factory: CredentialServerFactory) -> tuple[int, int, int]:
    """
    (pending handshakes, handshaken slots, lingering refusals).
    """
    return factory.pending_handshakes, factory.slots.total, factory.lingering_refusals


def _connect(factory: CredentialServerFactory, peer: str = "10.0.0.1", **kw: Any) -> Connection:
    assert isinstance(factory.reactor, Clock)
    return Connection(factory=factory, clock=factory.reactor, half_closeable=True, peer=peer, **kw)


def _events(events: list[LogEvent], event: str) -> list[LogEvent]:
    return [e for e in events if e.get("event") == event]


class DefaultsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        factory = CredentialServerFactory(
            Clock(), Broker(Clock(), MemoryTokenStore(), MemoryProviderKeyStore())
        )
        self.assertEqual(factory.limits, ConnectionLimits(1024, 256))
        self.assertEqual(factory.max_pending_handshakes, MAX_PENDING_HANDSHAKES)
        self.assertEqual(MAX_PENDING_HANDSHAKES, 32)

    def test_pending_pool_must_hold_one(self) -> None:
        with self.assertRaises(ValueError):
            _factory(Clock(), pending=0)

    def test_face_passes_its_limits_to_the_factory(self) -> None:
        clock = Clock()
        limits = ConnectionLimits(max_connections=5, max_per_peer=2)
        face = RPCFace(
            clock,
            [],
            Broker(clock, MemoryTokenStore(), MemoryProviderKeyStore()),
            limits=limits,
            max_pending_handshakes=3,
        )
        self.assertEqual(face.factory.limits, limits)
        self.assertEqual(face.factory.max_pending_handshakes, 3)


class HandshakeDeadlineTests(SynchronousTestCase):
    def test_a_prefix_trickled_before_each_deadline_does_not_stretch_it(self) -> None:
        factory = _factory(Clock())
        connection = _connect(factory)
        for _ in range(3):  # one byte of the length prefix every 3 s
            connection.clock.advance(3)
            connection.send(b"\x00")
        connection.clock.advance(HANDSHAKE_TIMEOUT - 9 - 0.5)
        self.assertFalse(connection.closed)
        with captured_log() as events:
            connection.clock.advance(0.5)
            self.assertTrue(connection.closed)
            connection.lose()
        (closed,) = _events(events, "closed")
        self.assertEqual(closed["reason"], "handshake_timeout")

    def test_bytes_every_second_never_stretch_it_past_ten_seconds(self) -> None:
        factory = _factory(Clock())
        connection = _connect(factory)
        # Starting late enough that the partial-frame deadline (5 s from the
        # header) would come after the handshake deadline.
        connection.clock.advance(5)
        prefix = (1000).to_bytes(4, "big")
        sent = 0
        while not connection.closed:
            connection.send(prefix[sent : sent + 1] if sent < 4 else b"x")
            sent += 1
            connection.clock.advance(1)
            self.assertLessEqual(connection.clock.seconds(), HANDSHAKE_TIMEOUT)
        self.assertEqual(connection.clock.seconds(), HANDSHAKE_TIMEOUT)
        self.assertEqual(connection.protocol._close_reason, "handshake_timeout")

    def test_a_started_frame_still_has_its_own_deadline(self) -> None:
        connection = _connect(_factory(Clock()))
        connection.send((1000).to_bytes(4, "big"))
        connection.clock.advance(PARTIAL_FRAME_TIMEOUT)
        self.assertTrue(connection.aborted)

    def test_a_timed_out_connection_that_never_closes_is_hard_closed(self) -> None:
        connection = _connect(_factory(Clock()))
        connection.clock.advance(HANDSHAKE_TIMEOUT)
        self.assertTrue(connection.closed)
        self.assertFalse(connection.aborted)
        connection.clock.advance(SHUTDOWN_HARD_CLOSE_DELAY)
        self.assertTrue(connection.aborted)

    def test_after_the_handshake_the_idle_deadline_follows_activity(self) -> None:
        connection = _connect(_factory(Clock())).open()
        connection.clock.advance(CONNECTION_IDLE_TIMEOUT - 100)
        connection.ask("1", "list_providers")
        connection.clock.advance(CONNECTION_IDLE_TIMEOUT - 1)
        self.assertFalse(connection.closed)
        connection.clock.advance(1)
        self.assertTrue(connection.closed)

    def test_a_handshake_cancels_the_handshake_deadline(self) -> None:
        connection = _connect(_factory(Clock()))
        connection.clock.advance(HANDSHAKE_TIMEOUT - 1)
        connection.open()
        connection.clock.advance(HANDSHAKE_TIMEOUT)
        self.assertFalse(connection.closed)


class CountingTests(SynchronousTestCase):
    """
    What each path takes and gives back: the pending pool until the
    handshake, a face slot after it, a lingering place while refused.
    """

    def test_handshaking_counts_in_the_pending_pool_only(self) -> None:
        factory = _factory(Clock())
        connection = _connect(factory)
        self.assertEqual(_counts(factory), (1, 0, 0))
        connection.open()
        self.assertEqual(_counts(factory), (0, 1, 0))
        self.assertEqual(factory.slots.held_by(connection.protocol.peer), 1)

    def test_normal_close_while_handshaking(self) -> None:
        factory = _factory(Clock())
        _connect(factory).lose()
        self.assertEqual(_counts(factory), (0, 0, 0))

    def test_normal_close_after_the_handshake(self) -> None:
        factory = _factory(Clock())
        connection = _connect(factory).open()
        connection.ask("1", "list_providers")
        connection.lose()
        self.assertEqual(_counts(factory), (0, 0, 0))
        self.assertEqual(factory.slots.held_by(connection.protocol.peer), 0)

    def test_rejected_version(self) -> None:
        factory = _factory(Clock())
        connection = _connect(factory)
        connection.send({"v": 9, "op": "handshake"})
        self.assertEqual(connection.reply()["code"], "UNKNOWN_VERSION")
        self.assertEqual(_counts(factory), (0, 0, 1))  # no slot while it waits to close
        connection.clock.advance(REJECTED_HANDSHAKE_CLOSE_DELAY)
        self.assertTrue(connection.aborted)
        connection.lose()
        self.assertEqual(_counts(factory), (0, 0, 0))

    def test_rejected_token(self) -> None:
        factory = _factory(Clock(), CAPABILITY)
        connection = _connect(factory)
        connection.send(handshake(token="cd" * 32))
        self.assertEqual(connection.reply()["code"], "UNAUTHORIZED")
        self.assertEqual(_counts(factory), (0, 0, 1))
        connection.lose()
        self.assertEqual(_counts(factory), (0, 0, 0))

    def test_handshake_timeout(self) -> None:
        factory = _factory(Clock())
        connection = _connect(factory)
        connection.clock.advance(HANDSHAKE_TIMEOUT)
        self.assertTrue(connection.closed)
        connection.lose()
        self.assertEqual(_counts(factory), (0, 0, 0))

    def test_idle_timeout(self) -> None:
        factory = _factory(Clock())
        connection = _connect(factory).open()
        connection.clock.advance(CONNECTION_IDLE_TIMEOUT)
        self.assertTrue(connection.closed)
        connection.lose()
        self.assertEqual(_counts(factory), (0, 0, 0))

    def test_abort_while_handshaking(self) -> None:
        factory = _factory(Clock())
        connection = _connect(factory)
        connection.send(b"\x00\x00\x00\x02{]")  # invalid JSON
        self.assertTrue(connection.aborted)
        connection.lose()
        self.assertEqual(_counts(factory), (0, 0, 0))

    def test_abort_after_the_handshake(self) -> None:
        factory = _factory(Clock())
        connection = _connect(factory).open()
        connection.send((64 * 1024 * 1024).to_bytes(4, "big"))  # oversized frame
        self.assertTrue(connection.aborted)
        connection.lose()
        self.assertEqual(_counts(factory), (0, 0, 0))

    def test_shutdown(self) -> None:
        factory = _factory(Clock())
        connections = [_connect(factory).open(), _connect(factory)]
        refused = _connect(factory)
        refused.send({"v": 9})
        factory.end_connections()
        for connection in (*connections, refused):
            connection.lose()
        self.assertEqual(_counts(factory), (0, 0, 0))

    def test_refused_for_want_of_a_slot(self) -> None:
        factory = _factory(Clock(), max_connections=1)
        _connect(factory).open()
        refused = _connect(factory)
        self.assertEqual(_counts(factory), (0, 1, 1))
        refused.lose()
        self.assertEqual(_counts(factory), (0, 1, 0))

    def test_evicted(self) -> None:
        factory = _factory(Clock(), pending=1)
        first = _connect(factory)
        _connect(factory)
        self.assertEqual(_counts(factory), (1, 0, 1))
        first.lose()
        self.assertEqual(_counts(factory), (1, 0, 0))

    def test_refused_at_the_handshake_for_want_of_a_slot(self) -> None:
        factory = _factory(Clock(), max_connections=1)
        first, second = _connect(factory), _connect(factory)
        first.open()
        second.send(handshake())
        self.assertEqual(second.reply(), FACE_FULL)
        self.assertEqual(_counts(factory), (0, 1, 1))
        second.lose()
        first.lose()
        self.assertEqual(_counts(factory), (0, 0, 0))


class PendingPoolTests(SynchronousTestCase):
    def test_silent_connections_never_take_a_handshaken_slot(self) -> None:
        factory = _factory(Clock(), max_connections=2, pending=4)
        silent = [_connect(factory) for _ in range(10)]
        self.assertEqual(_counts(factory), (4, 0, 6))
        client = _connect(factory).open()  # evicts the oldest silent one
        self.assertEqual(client.ask("1", "list_providers")["ok"], True)
        self.assertEqual(factory.slots.total, 1)
        self.assertEqual(sum(not c.transport.write_closed for c in silent), 3)

    def test_a_full_pool_refuses_its_oldest_to_make_room(self) -> None:
        factory = _factory(Clock(), pending=2)
        oldest, younger = _connect(factory), _connect(factory)
        newcomer = _connect(factory)
        self.assertEqual(oldest.reply(), PENDING_FULL)
        self.assertTrue(oldest.transport.write_closed)
        self.assertEqual(younger.replies(), [])
        self.assertEqual(newcomer.replies(), [])
        self.assertEqual(factory.pending_handshakes, 2)
        newcomer.open()

    def test_the_peer_holding_most_of_the_pool_is_evicted_first(self) -> None:
        factory = _factory(Clock(), pending=3)
        other = _connect(factory, peer="10.0.0.2")  # the oldest of all
        flood = [_connect(factory, peer="10.0.0.9") for _ in range(2)]
        _connect(factory, peer="10.0.0.3")
        self.assertEqual(other.replies(), [])
        self.assertEqual(flood[0].reply(), PENDING_FULL)
        self.assertEqual(flood[1].replies(), [])

    def test_frames_after_an_eviction_are_dropped(self) -> None:
        factory = _factory(Clock(), pending=1)
        evicted = _connect(factory)
        _connect(factory)
        evicted.replies()
        evicted.send(handshake(), request("1", "list_providers"))
        self.assertEqual(evicted.replies(), [])
        self.assertEqual(evicted.protocol._unprocessed, b"")


class SlotRefusalTests(SynchronousTestCase):
    def test_face_full_is_answered_and_closed_at_once(self) -> None:
        factory = _factory(Clock(), max_connections=2)
        for _ in range(2):
            _connect(factory).open()
        newcomer = _connect(factory)
        self.assertEqual(newcomer.reply(), FACE_FULL)
        self.assertTrue(newcomer.transport.write_closed)  # EOF now, input still read
        newcomer.send(handshake())
        self.assertEqual(newcomer.replies(), [])
        newcomer.clock.advance(REJECTED_HANDSHAKE_CLOSE_DELAY)
        self.assertTrue(newcomer.aborted)

    def test_peer_full_refuses_only_that_peer(self) -> None:
        factory = _factory(Clock(), max_connections=8, max_per_peer=2)
        for _ in range(2):
            _connect(factory, peer="10.0.0.1").open()
        self.assertEqual(_connect(factory, peer="10.0.0.1").reply(), PEER_FULL)
        _connect(factory, peer="10.0.0.2").open()

    def test_unix_peers_are_counted_by_uid(self) -> None:
        me, friend = os.getuid(), os.getuid() + 1000
        factory = CredentialServerFactory(
            Clock(),
            Broker(Clock(), MemoryTokenStore(), MemoryProviderKeyStore()),
            allowed_uids=frozenset({friend}),
            limits=ConnectionLimits(max_connections=8, max_per_peer=1),
        )
        _connect(factory, uid=me).open()
        refused = _connect(factory, uid=me)
        self.assertEqual(refused.reply(), PEER_FULL)
        _connect(factory, uid=friend).open()
        self.assertEqual(factory.slots.held_by(("uid", me)), 1)
        self.assertEqual(factory.slots.held_by(("uid", friend)), 1)

    def test_a_foreign_uid_is_closed_without_a_reply_or_a_slot(self) -> None:
        factory = _factory(Clock())
        with captured_log() as events:
            foreign = _connect(factory, uid=os.getuid() + 1000)
        self.assertEqual(foreign.replies(), [])
        self.assertTrue(foreign.closed)
        self.assertEqual(_counts(factory), (0, 0, 0))
        (refused,) = _events(events, "refused")
        self.assertEqual(refused["reason"], "peer_uid")
        self.assertEqual(_events(events, "connected"), [])

    def test_the_face_check_comes_before_the_peer_check(self) -> None:
        factory = _factory(Clock(), max_connections=1, max_per_peer=1)
        _connect(factory).open()
        self.assertEqual(_connect(factory).reply(), FACE_FULL)

    def test_slots_come_back_when_connections_close(self) -> None:
        factory = _factory(Clock(), max_connections=1)
        first = _connect(factory).open()
        self.assertEqual(_connect(factory).reply(), FACE_FULL)
        first.lose()
        _connect(factory).open()

    def test_past_the_lingering_bound_a_refusal_closes_at_once(self) -> None:
        factory = _factory(Clock(), max_connections=1)
        _connect(factory).open()
        lingering = [_connect(factory) for _ in range(MAX_LINGERING_REFUSALS)]
        self.assertTrue(all(c.transport.write_closed for c in lingering))
        late = _connect(factory)
        self.assertEqual(late.reply(), FACE_FULL)
        self.assertFalse(late.transport.write_closed)
        self.assertTrue(late.closed)  # a full close once the frame is out
        self.assertEqual(factory.lingering_refusals, MAX_LINGERING_REFUSALS)
        lingering[0].lose()
        self.assertTrue(_connect(factory).transport.write_closed)

    def test_message_texts(self) -> None:
        self.assertEqual(FACE_FULL["error"], Message.TOO_MANY_CONNECTIONS)
        self.assertEqual(PEER_FULL["error"], Message.TOO_MANY_PEER_CONNECTIONS)
        self.assertEqual(PENDING_FULL["error"], Message.TOO_MANY_PENDING_HANDSHAKES)


class RefusalAuditTests(SynchronousTestCase):
    def _full(self, token: str | None = None) -> CredentialServerFactory:
        factory = _factory(Clock(), token, max_connections=1)
        self.holder = _connect(factory).open(token=token)
        return factory

    def test_one_line_per_second_per_kind_and_the_next_counts_the_rest(self) -> None:
        factory = self._full()
        clock = factory.reactor
        assert isinstance(clock, Clock)
        with captured_log() as events:
            _connect(factory)  # written at 0
            clock.advance(0.1)
            for _ in range(49):  # left out; a summary would be due at 1.1
                _connect(factory)
            clock.advance(FLOOD_LOG_INTERVAL - 0.1)
            _connect(factory)  # written at 1.0, counting the 49
        lines = _events(events, "refused")
        self.assertEqual(
            [(e["reason"], e["code"], e["suppressed"]) for e in lines],
            [
                (SlotRefusal.FACE_FULL, "RESOURCE_EXHAUSTED", 0),
                (SlotRefusal.FACE_FULL, "RESOURCE_EXHAUSTED", 49),
            ],
        )
        self.assertEqual(_events(events, "connected"), [])  # refused ones write nothing else
        self.assertEqual(_events(events, "refusals_suppressed"), [])

    def test_kinds_are_gated_apart(self) -> None:
        factory = _factory(Clock(), CAPABILITY, pending=2)
        with captured_log() as events:
            for _ in range(5):
                _connect(factory).send(handshake(token="cd" * 32))
            for _ in range(5):
                _connect(factory)
        reasons = [e["reason"] for e in _events(events, "refused")]
        self.assertEqual(reasons, ["bad_capability_token", "too_many_pending_handshakes"])

    def test_the_tail_of_a_flood_is_counted_after_an_interval(self) -> None:
        factory = self._full()
        clock = factory.reactor
        assert isinstance(clock, Clock)
        with captured_log() as events:
            for _ in range(4):
                _connect(factory)
            clock.advance(FLOOD_LOG_INTERVAL - 0.01)
            self.assertEqual(_events(events, "refusals_suppressed"), [])
            clock.advance(1)
        (summary,) = _events(events, "refusals_suppressed")
        self.assertEqual((summary["reason"], summary["suppressed"]), (SlotRefusal.FACE_FULL, 3))
        with captured_log() as events:
            clock.advance(10 * FLOOD_LOG_INTERVAL)
            _connect(factory)
        (line,) = _events(events, "refused")
        self.assertEqual(line["suppressed"], 0)

    def test_a_line_carrying_the_count_cancels_the_summary(self) -> None:
        factory = self._full()
        clock = factory.reactor
        assert isinstance(clock, Clock)
        with captured_log() as events:
            _connect(factory)
            clock.advance(0.5)
            _connect(factory)  # suppressed: a summary is due at 1.5
            clock.advance(0.5)
            _connect(factory)  # written at 1.0, counting the one before
            clock.advance(5)
        self.assertEqual([e["suppressed"] for e in _events(events, "refused")], [0, 1])
        self.assertEqual(_events(events, "refusals_suppressed"), [])

    def test_shutdown_writes_the_owed_count_and_leaves_no_timer(self) -> None:
        factory = self._full()
        clock = factory.reactor
        assert isinstance(clock, Clock)
        connections = [_connect(factory) for _ in range(3)]
        with captured_log() as events:
            factory.end_connections()
        (summary,) = _events(events, "refusals_suppressed")
        self.assertEqual(summary["suppressed"], 2)
        for connection in (*connections, self.holder):
            connection.lose()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_refusal_lines_hold_no_secret(self) -> None:
        factory = self._full(CAPABILITY)
        with captured_log() as events:
            _connect(factory).send(handshake(token=CAPABILITY))
            other = _factory(Clock(), CAPABILITY)
            _connect(other).send(handshake(token="cd" * 32))
        text = log_text(events)
        self.assertIn("refused", text)
        self.assertNotIn(CAPABILITY, text)
        self.assertNotIn("cd" * 32, text)
        self.assertNotIn(CAPABILITY, repr(factory))


@implementer(IStreamClientEndpoint)
class _InMemoryEndpoint:
    """
    Connects a client factory to a server factory through iosim's pumped
    in-memory transports.
    """

    def __init__(self, server: CredentialServerFactory, clock: Clock) -> None:
        self._server = server
        self._clock = clock
        self.pumps: list[iosim.IOPump] = []

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        server = self._server.buildProtocol(None)
        client = protocolFactory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 0))
        assert server is not None and client is not None
        self.pumps.append(
            iosim.connect(
                server,
                iosim.FakeTransport(server, isServer=True),
                client,
                iosim.FakeTransport(client, isServer=False),
                greet=False,
                clock=self._clock,
            )
        )
        return succeed(client)

    def flush(self) -> None:
        for pump in self.pumps:
            pump.flush()


class RealClientTests(SynchronousTestCase):
    """
    The Twisted client against the real server: a refusal for want of a
    slot is an error naming its code and text at once, not a hang.
    """

    def test_the_client_surfaces_a_refusal_at_connect(self) -> None:
        clock = Clock()
        factory = _factory(clock, max_connections=1)
        endpoint = _InMemoryEndpoint(factory, clock)
        first = ProxySocketClient(clock, endpoint)
        listed = first.request("list_providers")
        endpoint.flush()
        self.assertEqual(self.successResultOf(listed), {"providers": []})
        second = ProxySocketClient(clock, endpoint)
        refused = second.request("list_providers")
        endpoint.flush()
        error = self.failureResultOf(refused, ProxyRequestError).value
        self.assertEqual(
            (error.code, error.message), ("RESOURCE_EXHAUSTED", "Too many connections")
        )
        self.assertEqual(_counts(factory), (0, 1, 0))  # the refused one is gone

    def test_the_client_surfaces_a_refusal_of_its_handshake(self) -> None:
        clock = Clock()
        factory = _factory(clock, max_connections=1)
        endpoint = _InMemoryEndpoint(factory, clock)
        clients = [ProxySocketClient(clock, endpoint) for _ in range(2)]
        answers = [client.request("list_providers") for client in clients]  # both pending
        endpoint.flush()
        self.assertEqual(self.successResultOf(answers[0]), {"providers": []})
        error = self.failureResultOf(answers[1], ProxyRequestError).value
        self.assertEqual(error.code, "RESOURCE_EXHAUSTED")


class UnhandshakenLineTests(SynchronousTestCase):
    def test_connections_that_never_handshake_are_a_trickle_in_the_log(self) -> None:
        factory = _factory(Clock(), pending=100)
        clock = factory.reactor
        assert isinstance(clock, Clock)
        with captured_log() as events:
            for _ in range(50):  # connect and go, within the caps
                _connect(factory).lose()
            clock.advance(FLOOD_LOG_INTERVAL)
        self.assertEqual(_events(events, "connected"), [])
        closed = _events(events, "closed")
        self.assertEqual([(e["reason"], e["handshaken"]) for e in closed], [("peer", False)])
        [tail] = _events(events, "refusals_suppressed")
        self.assertEqual(tail["suppressed"], 49)
        self.assertEqual(_counts(factory), (0, 0, 0))

    def test_a_handshaken_connection_writes_its_three_lines(self) -> None:
        factory = _factory(Clock())
        with captured_log() as events:
            connection = _connect(factory).open()
            connection.lose()
        self.assertEqual(
            [e["event"] for e in events if e.get("event") in ("connected", "handshake", "closed")],
            ["connected", "handshake", "closed"],
        )
