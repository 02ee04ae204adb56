"""
The upstream hop's shared lookups: one lookup per name at a time, its
addresses kept for a few seconds, a failed lookup not kept, every map
bounded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IResolutionReceiver,
)
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from credproxy.http._resolver import KEEP_ADDRESSES_SECONDS, MAX_KEPT_NAMES, SharedLookups

ADDRESS = IPv4Address("TCP", "192.0.2.7", 443)
OTHER = IPv4Address("TCP", "192.0.2.8", 443)


@implementer(IHostnameResolver)
class HeldResolver:
    """
    A resolver whose lookups wait until the test answers them.
    """

    def __init__(self) -> None:
        self.lookups: list[tuple[IResolutionReceiver, str, int]] = []

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        self.lookups.append((resolutionReceiver, hostName, portNumber))
        return None  # type: ignore[return-value]  # the receiver is what SharedLookups uses

    def answer(self, index: int, *addresses: IAddress) -> None:
        receiver = self.lookups[index][0]
        receiver.resolutionBegan(None)  # type: ignore[arg-type]
        for address in addresses:
            receiver.addressResolved(address)
        receiver.resolutionComplete()


@implementer(IResolutionReceiver)
class Receiver:
    def __init__(self) -> None:
        self.began: list[IHostResolution] = []
        self.addresses: list[IAddress] = []
        self.completed = 0

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        self.began.append(resolutionInProgress)

    def addressResolved(self, address: IAddress) -> None:
        self.addresses.append(address)

    def resolutionComplete(self) -> None:
        self.completed += 1


class SharedLookupsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.upstream = HeldResolver()
        self.lookups = SharedLookups(self.upstream, self.clock)

    def resolve(self, name: str = "api.example", port: int = 443, **kwargs: Any) -> Receiver:
        receiver = Receiver()
        resolution = self.lookups.resolveHostName(receiver, name, port, **kwargs)
        self.assertEqual(receiver.began, [resolution])
        self.assertEqual(resolution.name, name)
        return receiver

    def test_lookups_of_one_name_at_once_share_one(self) -> None:
        first, second = self.resolve(), self.resolve()
        self.assertEqual(len(self.upstream.lookups), 1)
        self.assertEqual(first.completed + second.completed, 0)
        self.upstream.answer(0, ADDRESS, OTHER)
        for receiver in (first, second):
            self.assertEqual((receiver.addresses, receiver.completed), ([ADDRESS, OTHER], 1))

    def test_the_addresses_are_kept_for_a_few_seconds_then_looked_up_again(self) -> None:
        self.resolve()
        self.upstream.answer(0, ADDRESS)
        self.clock.advance(KEEP_ADDRESSES_SECONDS - 0.5)
        kept = self.resolve()
        self.assertEqual((kept.addresses, kept.completed), ([ADDRESS], 1))  # at once
        self.assertEqual(len(self.upstream.lookups), 1)
        self.clock.advance(0.5)
        fresh = self.resolve()
        self.assertEqual(len(self.upstream.lookups), 2)
        self.assertEqual(fresh.completed, 0)
        self.upstream.answer(1, OTHER)
        self.assertEqual(fresh.addresses, [OTHER])

    def test_a_name_that_does_not_resolve_is_not_kept(self) -> None:
        first, second = self.resolve(), self.resolve()
        self.upstream.answer(0)
        for receiver in (first, second):
            self.assertEqual((receiver.addresses, receiver.completed), ([], 1))
        self.resolve()
        self.assertEqual(len(self.upstream.lookups), 2)

    def test_another_port_or_address_family_is_another_lookup(self) -> None:
        self.resolve()
        self.resolve(port=8443)
        self.resolve(addressTypes=[IPv4Address])
        self.resolve(name="other.example")
        self.assertEqual(len(self.upstream.lookups), 4)

    def test_a_cancelled_resolution_gets_nothing_and_the_others_get_the_answer(self) -> None:
        cancelled = Receiver()
        self.lookups.resolveHostName(cancelled, "api.example", 443)
        waiting = self.resolve()
        cancelled.began[0].cancel()
        self.upstream.answer(0, ADDRESS)
        self.assertEqual((cancelled.addresses, cancelled.completed), ([], 0))
        self.assertEqual((waiting.addresses, waiting.completed), ([ADDRESS], 1))

    def test_the_names_kept_are_bounded(self) -> None:
        for index in range(MAX_KEPT_NAMES * 3):
            self.resolve(name=f"host{index}.example")
            self.upstream.answer(index, ADDRESS)
            self.assertLessEqual(len(self.lookups._kept), MAX_KEPT_NAMES)
        self.assertEqual(self.lookups._waiting, {})
