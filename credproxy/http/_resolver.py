"""
Name resolution for the upstream hop: one lookup shared by every
connection that wants the same name at once, and its answer kept for a
few seconds.

Twisted's L{HostnameEndpoint} asks the reactor's resolver for every new
connection, and the default resolver runs each C{getaddrinfo} on the
reactor's thread pool (ten threads). A burst of new streams to a hostname
upstream (C{api.anthropic.com}) would queue one lookup per stream behind
those threads, each a DNS round trip when the system does not cache, and
the last stream's first byte would wait for all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IReactorTime,
    IResolutionReceiver,
)
from zope.interface import directlyProvides, implementer, providedBy

# How long a name's addresses are used again before it is looked up anew.
# getaddrinfo does not tell the record's TTL; a few seconds is short enough
# that a provider's address change is followed at once, long enough that a
# burst shares one lookup. Kept-alive connections outlive it anyway.
KEEP_ADDRESSES_SECONDS: Final = 10.0
# Names kept at once: the face talks to one upstream, so one is used; the
# bound only keeps a caller-supplied URL from growing the map.
MAX_KEPT_NAMES: Final = 8

_Key = tuple[str, int, Any, str]


@implementer(IHostnameResolver)
class SharedLookups:
    """
    An L{IHostnameResolver} over another one (the reactor's) that shares
    lookups in flight and keeps an answer with addresses for
    L{KEEP_ADDRESSES_SECONDS}. An answer without addresses (the name does
    not resolve) is given to everyone who waited for it and not kept.

    Those waiting on one lookup are bounded by the connections the upstream
    hop may open at once (C{--max-upstream-connections}).
    """

    def __init__(
        self,
        resolver: IHostnameResolver,
        clock: IReactorTime,
        keep_for: float = KEEP_ADDRESSES_SECONDS,
    ) -> None:
        self._resolver = resolver
        self._clock = clock
        self._keep_for = keep_for
        self._kept: dict[_Key, tuple[float, tuple[IAddress, ...]]] = {}
        self._waiting: dict[_Key, list[IResolutionReceiver]] = {}

    def __repr__(self) -> str:
        return f"<SharedLookups kept={len(self._kept)} in_flight={len(self._waiting)}>"

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        types = frozenset(addressTypes) if addressTypes is not None else None
        key: _Key = (hostName, portNumber, types, transportSemantics)
        resolution = _Resolution(hostName, self, key, resolutionReceiver)
        resolutionReceiver.resolutionBegan(resolution)
        kept = self._kept.get(key)
        if kept is not None:
            until, addresses = kept
            if self._clock.seconds() < until:
                _deliver(resolutionReceiver, addresses)
                return resolution
            del self._kept[key]
        waiting = self._waiting.get(key)
        if waiting is not None:
            waiting.append(resolutionReceiver)
            return resolution
        self._waiting[key] = [resolutionReceiver]
        self._resolver.resolveHostName(
            _Collector(self, key), hostName, portNumber, addressTypes, transportSemantics
        )
        return resolution

    def forget(self, key: _Key, receiver: IResolutionReceiver) -> None:
        """
        C{receiver} no longer wants the answer of the lookup of C{key}.
        """
        waiting = self._waiting.get(key, [])
        if receiver in waiting:
            waiting.remove(receiver)

    def complete(self, key: _Key, addresses: tuple[IAddress, ...]) -> None:
        """
        The lookup of C{key} ended with C{addresses}: give them to everyone
        waiting, and keep them if there are any.
        """
        waiting = self._waiting.pop(key, [])
        if addresses:
            if len(self._kept) >= MAX_KEPT_NAMES:
                self._kept.clear()
            self._kept[key] = (self._clock.seconds() + self._keep_for, addresses)
        for receiver in waiting:
            _deliver(receiver, addresses)


@implementer(IHostResolution)
class _Resolution:
    """
    One caller's resolution: cancelling it stops only its own delivery,
    the shared lookup goes on for the others.
    """

    def __init__(
        self, name: str, lookups: SharedLookups, key: _Key, receiver: IResolutionReceiver
    ) -> None:
        self.name = name
        self._lookups = lookups
        self._key = key
        self._receiver = receiver

    def cancel(self) -> None:
        self._lookups.forget(self._key, self._receiver)


@implementer(IResolutionReceiver)
class _Collector:
    """
    Gathers the addresses of the one lookup a L{SharedLookups} makes.
    """

    def __init__(self, lookups: SharedLookups, key: _Key) -> None:
        self._lookups = lookups
        self._key = key
        self._found: list[IAddress] = []

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        pass

    def addressResolved(self, address: IAddress) -> None:
        self._found.append(address)

    def resolutionComplete(self) -> None:
        self._lookups.complete(self._key, tuple(self._found))


def _deliver(receiver: IResolutionReceiver, addresses: Sequence[IAddress]) -> None:
    for address in addresses:
        receiver.addressResolved(address)
    receiver.resolutionComplete()


class ResolvingReactor:
    """
    A reactor whose C{nameResolver} is C{resolver}; everything else is the
    wrapped reactor's (it provides what that reactor provides, so
    L{HostnameEndpoint} takes the resolver from it as from any reactor).
    """

    def __init__(self, reactor: Any, resolver: IHostnameResolver) -> None:
        self._reactor = reactor
        self.nameResolver = resolver
        directlyProvides(self, providedBy(reactor))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)
