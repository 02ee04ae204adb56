"""
The factory's side of a connection's life: refusing while stopping, and
ending every connection at shutdown (EOF, then a hard close after 3 s), with
a Clock. The connection limits are tested in test_limits.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from credproxy.broker import Broker
from credproxy.stores import MemoryProviderKeyStore, MemoryTokenStore
from credproxy.wire import CredentialServerFactory
from credproxy.wire._spec import SHUTDOWN_HARD_CLOSE_DELAY
from tests.wire.server_harness import Connection, captured_log, request
from tests.wire.test_server_dispatch import ControlledTokenStore


def _factory(clock: Clock) -> CredentialServerFactory:
    return CredentialServerFactory(
        clock, Broker(clock, MemoryTokenStore(), MemoryProviderKeyStore())
    )


class StoppingTests(SynchronousTestCase):
    def test_a_stopping_server_refuses_new_connections(self) -> None:
        factory = _factory(Clock())
        factory.end_connections()
        with captured_log() as events:
            self.assertIsNone(factory.buildProtocol(None))
        self.assertTrue(any(e.get("reason") == "stopping" for e in events))


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
