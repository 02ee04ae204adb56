"""
The factory's side of a connection's life: the connection limit, refusing
while stopping, and ending every connection at shutdown (EOF, then a hard
close after 3 s), with a Clock.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from credproxy.broker import Broker
from credproxy.stores import MemoryProviderKeyStore, MemoryTokenStore
from credproxy.wire import CredentialServerFactory
from credproxy.wire._spec import MAX_CONNECTIONS, SHUTDOWN_HARD_CLOSE_DELAY
from tests.wire.server_harness import Connection, captured_log, request
from tests.wire.test_server_dispatch import ControlledTokenStore


def _factory(clock: Clock, max_connections: int = MAX_CONNECTIONS) -> CredentialServerFactory:
    return CredentialServerFactory(
        clock,
        Broker(clock, MemoryTokenStore(), MemoryProviderKeyStore()),
        max_connections=max_connections,
    )


class LimitTests(SynchronousTestCase):
    def test_default_limit(self) -> None:
        self.assertEqual(_factory(Clock()).max_connections, MAX_CONNECTIONS)

    def test_connections_beyond_the_limit_are_refused(self) -> None:
        clock = Clock()
        factory = _factory(clock, max_connections=2)
        first = Connection(factory=factory, clock=clock)
        Connection(factory=factory, clock=clock)
        with captured_log() as events:
            self.assertIsNone(factory.buildProtocol(None))
        self.assertTrue(any(e.get("reason") == "too_many_connections" for e in events))
        first.lose()
        self.assertIsNotNone(factory.buildProtocol(None))


class ShutdownTests(SynchronousTestCase):
    def test_end_sends_eof_abandons_ops_and_hard_closes(self) -> None:
        clock = Clock()
        store = ControlledTokenStore()
        factory = CredentialServerFactory(clock, Broker(clock, store, MemoryProviderKeyStore()))
        busy = Connection(factory=factory, clock=clock).open()
        idle = Connection(factory=factory, clock=clock).open()
        busy.send(request("w", "get_token", provider="wait-1"))
        gone = factory.end_connections()
        self.assertNoResult(gone)
        self.assertTrue(busy.closed and idle.closed)
        self.assertFalse(busy.aborted)
        self.assertEqual(store.cancelled, ["wait-1"])
        self.assertEqual(busy.replies(), [])  # abandoned ops answer nothing
        self.assertIsNone(factory.buildProtocol(None))  # no new connections while stopping
        idle.lose()  # this peer read its EOF and closed
        self.assertNoResult(gone)
        clock.advance(SHUTDOWN_HARD_CLOSE_DELAY)
        self.assertTrue(busy.aborted)  # that one never did
        busy.lose()
        self.successResultOf(gone)

    def test_end_with_no_connections(self) -> None:
        self.successResultOf(_factory(Clock()).end_connections())

    def test_input_after_end_is_dropped(self) -> None:
        clock = Clock()
        factory = _factory(clock)
        connection = Connection(factory=factory, clock=clock).open()
        factory.end_connections()
        connection.send(request("late", "list_providers"))
        self.assertEqual(connection.replies(), [])
