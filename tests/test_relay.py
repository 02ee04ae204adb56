"""
The sandbox's TCP relay, in memory: its slots, its timers, its refusals and
the producer wiring that keeps it from buffering. Its real-socket run is
the sandbox's end-to-end test (tests/integration/test_sandbox.py).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.interfaces import IHalfCloseableDescriptor
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from credproxy._limits import ConnectionLimits
from credproxy._relay import (
    RELAY_CONNECT_TIMEOUT,
    RELAY_IDLE_TIMEOUT,
    RelayClient,
    RelayFactory,
    RelayServer,
)
from credproxy.http._channel import MAX_LINGERING_REFUSALS, NO_SLOT_LINGER_SECONDS

SOCKET = "/run/credproxy/http.sock"


@implementer(IHalfCloseableDescriptor)
class HalfCloseableTransport(StringTransport):
    write_closed = False
    aborted = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True

    def readConnectionLost(self, reason: Failure) -> None:
        """
        Not used: the relay half-closes only its writing side.
        """

    def writeConnectionLost(self, reason: Failure) -> None:
        """
        Not used: the relay half-closes only its writing side.
        """


def answer(transport: StringTransport) -> tuple[int, dict[str, Any]]:
    head, _, body = transport.value().partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


class RelayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.relay = RelayFactory(self.reactor, SOCKET, ConnectionLimits(4, 2))

    def agent(self, host: str = "127.0.0.1") -> tuple[RelayServer, HalfCloseableTransport]:
        server = self.relay.buildProtocol(None)
        assert server is not None
        transport = HalfCloseableTransport(peerAddress=IPv4Address("TCP", host, 40000))
        server.makeConnection(transport)
        return server, transport

    def face_accepts(self, index: int = -1) -> tuple[RelayClient, StringTransport]:
        _, factory, _, _ = self.reactor.unixClients[index]
        client = factory.buildProtocol(None)
        transport = StringTransport()
        client.makeConnection(transport)
        return client, transport

    def test_each_agent_connection_goes_to_the_faces_socket_with_a_connect_timeout(self) -> None:
        self.agent()
        [(address, _, timeout, _)] = self.reactor.unixClients
        self.assertEqual((address, timeout), (SOCKET, RELAY_CONNECT_TIMEOUT))

    def test_nothing_is_read_from_the_agent_until_the_face_accepted(self) -> None:
        _, agent = self.agent()
        self.assertEqual(agent.producerState, "paused")
        self.face_accepts()
        self.assertEqual(agent.producerState, "producing")

    def test_bytes_pass_both_ways_unchanged(self) -> None:
        server, agent = self.agent()
        client, face = self.face_accepts()
        server.dataReceived(b"POST /v1/messages HTTP/1.1\r\n")
        client.dataReceived(b"HTTP/1.1 200 OK\r\n")
        self.assertEqual(face.value(), b"POST /v1/messages HTTP/1.1\r\n")
        self.assertEqual(agent.value(), b"HTTP/1.1 200 OK\r\n")

    def test_each_side_is_the_others_streaming_producer(self) -> None:
        # A side whose writes back up pauses the other side's reads: the
        # relay never buffers more than a transport's own write buffer.
        _, agent = self.agent()
        _, face = self.face_accepts()
        self.assertIs(agent.producer, face)
        self.assertIs(face.producer, agent)
        self.assertTrue(agent.streaming and face.streaming)

    def test_a_close_on_either_side_closes_the_other(self) -> None:
        _server, agent = self.agent()
        client, _face = self.face_accepts()
        client.connectionLost(Failure(ConnectionRefusedError()))
        self.assertTrue(agent.disconnecting)
        server2, _agent2 = self.agent()
        _client2, face2 = self.face_accepts()
        server2.connectionLost(Failure(ConnectionRefusedError()))
        self.assertTrue(face2.disconnecting)

    def test_an_agent_gone_before_the_face_accepted_stops_the_connect(self) -> None:
        server, _ = self.agent()
        server.connectionLost(Failure(ConnectionRefusedError()))
        self.assertEqual(self.reactor.connectors[0].stoppedConnecting, True)
        self.assertEqual(self.relay.slots.total, 0)

    def test_more_connections_than_the_face_limit_get_503(self) -> None:
        self.relay = RelayFactory(self.reactor, SOCKET, ConnectionLimits(2, 2))
        self.agent()
        self.agent()
        _, third = self.agent()
        status, body = answer(third)
        self.assertEqual(status, 503)
        self.assertEqual(body["error"]["type"], "overloaded_error")
        self.assertIn(b"retry-after: 1", third.value())
        self.assertEqual(len(self.reactor.unixClients), 2)  # the third never reached the face

    def test_more_connections_of_one_peer_than_its_limit_get_503(self) -> None:
        self.agent()
        self.agent()
        _, third = self.agent()
        self.assertEqual(answer(third)[0], 503)
        self.assertIn(b"as one client may", third.value())
        _, other_peer = self.agent(host="127.0.0.2")
        self.assertEqual(other_peer.value(), b"")

    def test_a_closed_connection_gives_its_slot_back(self) -> None:
        server, _ = self.agent()
        self.agent()
        server.connectionLost(Failure(ConnectionRefusedError()))
        _, third = self.agent()
        self.assertEqual(third.value(), b"")
        self.assertEqual(self.relay.slots.total, 2)

    def test_a_face_that_does_not_answer_is_502(self) -> None:
        _, agent = self.agent()
        _, factory, _, _ = self.reactor.unixClients[0]
        factory.clientConnectionFailed(
            self.reactor.connectors[0], Failure(ConnectionRefusedError())
        )
        status, body = answer(agent)
        self.assertEqual(status, 502)
        self.assertIn("does not answer", body["error"]["message"])
        self.assertEqual(self.relay.slots.total, 0)

    def test_a_connect_that_times_out_is_504(self) -> None:
        _, agent = self.agent()
        _, factory, _, _ = self.reactor.unixClients[0]
        factory.clientConnectionFailed(self.reactor.connectors[0], Failure(ConnectTimeout()))
        self.assertEqual(answer(agent)[0], 504)

    def test_a_refused_agent_is_read_until_it_closes_or_the_linger_ends(self) -> None:
        self.relay = RelayFactory(self.reactor, SOCKET, ConnectionLimits(1, 1))
        self.agent()
        server, refused = self.agent()
        self.assertTrue(refused.write_closed)
        self.assertEqual(refused.producerState, "producing")
        server.dataReceived(b"dropped")  # read and dropped, nowhere to go
        self.assertEqual(self.relay.lingering, 1)
        self.reactor.advance(NO_SLOT_LINGER_SECONDS)
        self.assertTrue(refused.aborted)
        server.connectionLost(Failure(ConnectionRefusedError()))
        self.assertEqual(self.relay.lingering, 0)

    def test_past_the_lingering_bound_a_refused_agent_is_closed_at_once(self) -> None:
        self.relay = RelayFactory(self.reactor, SOCKET, ConnectionLimits(1, 1))
        self.agent()
        for _ in range(MAX_LINGERING_REFUSALS):
            self.agent()
        self.assertEqual(self.relay.lingering, MAX_LINGERING_REFUSALS)
        _, one_more = self.agent()
        self.assertFalse(one_more.write_closed)
        self.assertTrue(one_more.disconnecting)
        self.assertEqual(answer(one_more)[0], 503)

    def test_a_connection_silent_both_ways_for_the_idle_timeout_is_closed(self) -> None:
        _, agent = self.agent()
        _, face = self.face_accepts()
        self.reactor.advance(RELAY_IDLE_TIMEOUT - 1)
        self.assertFalse(agent.aborted)
        self.reactor.advance(1)
        self.assertTrue(agent.aborted)
        self.assertTrue(face.disconnecting)

    def test_bytes_either_way_restart_the_idle_timeout(self) -> None:
        server, agent = self.agent()
        client, _ = self.face_accepts()
        self.reactor.advance(RELAY_IDLE_TIMEOUT - 1)
        client.dataReceived(b"event: ping\n\n")
        self.reactor.advance(RELAY_IDLE_TIMEOUT - 1)
        server.dataReceived(b"more")
        self.reactor.advance(RELAY_IDLE_TIMEOUT - 1)
        self.assertFalse(agent.aborted)
        self.reactor.advance(1)
        self.assertTrue(agent.aborted)

    def test_the_idle_timeout_also_bounds_a_connect_that_never_ends(self) -> None:
        _, agent = self.agent()
        self.reactor.advance(RELAY_IDLE_TIMEOUT)
        self.assertTrue(agent.aborted)

    def test_no_timer_outlives_a_closed_connection(self) -> None:
        server, _ = self.agent()
        self.face_accepts()
        server.connectionLost(Failure(ConnectionRefusedError()))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_timeouts_must_be_positive_and_finite(self) -> None:
        for bad in (0.0, -1.0, float("inf"), float("nan")):
            with self.assertRaises(ValueError):
                RelayFactory(self.reactor, SOCKET, ConnectionLimits(), connect_timeout=bad)
            with self.assertRaises(ValueError):
                RelayFactory(self.reactor, SOCKET, ConnectionLimits(), idle_timeout=bad)
