"""
The upstream hop's name lookups on the real reactor and its real resolver:
connections opened at once to a hostname upstream share one lookup, and
each is still one of the lean connections.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IProtocol,
    IResolutionReceiver,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from zope.interface import implementer

from credproxy._transports import LeanTCPClient
from credproxy.http._face import UpstreamEndpoints

CONNECTIONS = 5


@implementer(IHostnameResolver)
class CountingResolver:
    def __init__(self, resolver: IHostnameResolver) -> None:
        self.resolver = resolver
        self.names: list[str] = []

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        self.names.append(hostName)
        return self.resolver.resolveHostName(
            resolutionReceiver, hostName, portNumber, addressTypes, transportSemantics
        )


@pytest_twisted.ensureDeferred
async def test_connections_at_once_to_a_hostname_upstream_share_one_lookup() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(CONNECTIONS)
    port = listener.getsockname()[1]
    counting = CountingResolver(reactor.nameResolver)  # type: ignore[attr-defined]
    previous = reactor.installNameResolver(counting)  # type: ignore[attr-defined]
    connected: list[IProtocol] = []
    try:
        endpoints = UpstreamEndpoints(reactor, BrowserLikePolicyForHTTPS(), 10.0)
        endpoint = endpoints.endpointForURI(URI.fromBytes(b"http://localhost:%d/" % port))
        connected = await gatherResults(
            [endpoint.connect(Factory.forProtocol(Protocol)) for _ in range(CONNECTIONS)]
        )
        assert counting.names == ["localhost"]
        assert all(isinstance(p.transport, LeanTCPClient) for p in connected)  # type: ignore[attr-defined]
        # Within the few seconds the addresses are kept, a later one needs none.
        connected.append(await endpoint.connect(Factory.forProtocol(Protocol)))
        assert counting.names == ["localhost"]
    finally:
        reactor.installNameResolver(previous)  # type: ignore[attr-defined]
        for protocol in connected:
            protocol.transport.abortConnection()  # type: ignore[attr-defined]
        listener.close()
