"""
The HTTP face as a service: one site on every endpoint, the upstream client,
and the graceful stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IReactorPluggableNameResolver, IStreamClientEndpoint
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from credproxy._audit_trail import IAuditTrail
from credproxy._listen import ListeningService, is_unix_description
from credproxy._transports import lean_reactor
from credproxy.broker.credentials import ICredentialSource
from credproxy.http._config import HTTPProxyConfig
from credproxy.http._resolver import ResolvingReactor, SharedLookups
from credproxy.http._resource import ProxyResource
from credproxy.http._site import ProxySite
from credproxy.http._upstream_agent import UpstreamAgent
from credproxy.http._upstream_client import UpstreamPool

# Agents keep several streams open at once; Twisted's default of 2 persistent
# connections per host would close every connection beyond two after each answer.
MAX_PERSISTENT_PER_HOST = 64
# An idle kept-alive upstream connection is closed after this long.
CACHED_CONNECTION_TIMEOUT = 120


class HTTPFaceConfigError(ValueError):
    """
    The HTTP face was asked for something unsafe.
    """


# Endpoints kept for reuse: the face talks to one upstream, so one is used;
# the bound only keeps a caller-supplied URL from growing the cache.
MAX_CACHED_ENDPOINTS = 8


@implementer(IAgentEndpointFactory)
class UpstreamEndpoints:
    """
    The endpoints of the upstream hop (TCP for http, verified TLS over TCP
    for https), built once per scheme, host and port rather than once per
    request as Twisted's default factory does: building one parses and
    IDNA-encodes the host and makes a TLS connection creator each time,
    which costs about as much as the gate and the screen together.
    """

    def __init__(self, reactor: Any, tls_policy: IPolicyForHTTPS, connect_timeout: float) -> None:
        # Its connections are lean (credproxy._transports).
        self._reactor = lean_reactor(reactor)
        # A hostname's lookups are shared (credproxy.http._resolver).
        self._resolving_reactor = self._reactor
        if IReactorPluggableNameResolver.providedBy(reactor):
            lookups = SharedLookups(reactor.nameResolver, self._reactor)
            self._resolving_reactor = ResolvingReactor(self._reactor, lookups)
        self._tls_policy = tls_policy
        self._connect_timeout = connect_timeout
        self._endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            if len(self._endpoints) >= MAX_CACHED_ENDPOINTS:
                self._endpoints.clear()
            endpoint = self._endpoints[key] = self._build(uri)
        return endpoint

    def _build(self, uri: URI) -> IStreamClientEndpoint:
        try:
            host = uri.host.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError("the upstream's host must be ASCII") from None
        tcp: IStreamClientEndpoint
        if isIPAddress(host):
            # An address needs no name resolution: HostnameEndpoint would
            # still hand each connection's lookup to the thread pool, which
            # a burst of new streams then waits on in turn.
            tcp = TCP4ClientEndpoint(self._reactor, host, uri.port, timeout=self._connect_timeout)
        elif isIPv6Address(host):
            tcp = TCP6ClientEndpoint(self._reactor, host, uri.port, timeout=self._connect_timeout)
        else:
            tcp = HostnameEndpoint(
                self._resolving_reactor, host, uri.port, timeout=self._connect_timeout
            )
        if uri.scheme == b"http":
            return tcp
        if uri.scheme == b"https":
            return wrapClientTLS(self._tls_policy.creatorForNetloc(uri.host, uri.port), tcp)
        raise SchemeNotSupported(f"Unsupported scheme: {uri.scheme!r}")


def _default_agent(reactor: Any, config: HTTPProxyConfig) -> tuple[IAgent, UpstreamPool]:
    """
    The upstream client: an L{UpstreamAgent} over credproxy's own client
    (L{UpstreamPool}, whose connections screen every response head),
    verifying TLS, following no redirect, adding no header of its own but
    I{Host}.
    """
    pool = UpstreamPool(reactor, persistent=True)
    pool.maxPersistentPerHost = MAX_PERSISTENT_PER_HOST
    pool.cachedConnectionTimeout = CACHED_CONNECTION_TIMEOUT
    endpoints = UpstreamEndpoints(
        reactor,
        BrowserLikePolicyForHTTPS(),  # verifies against the platform's trust
        config.connect_timeout,
    )
    agent = UpstreamAgent(endpoints, pool)
    return agent, pool


def build_proxy_site(
    reactor: Any,
    config: HTTPProxyConfig,
    credentials: ICredentialSource,
    agent: IAgent | None = None,
    audit_trail: IAuditTrail | None = None,
) -> ProxySite:
    """
    The HTTP face's site, for listening on endpoints of your own. Without an
    C{agent}, one with its own connection pool and verified TLS is made; call
    C{site.close()} when done with it. Without an C{audit_trail}, audit
    records go to twisted.logger.
    """
    pool: UpstreamPool | None = None
    if agent is None:
        agent, pool = _default_agent(reactor, config)
    site = ProxySite(ProxyResource(reactor, config, credentials, agent, audit_trail), reactor)
    site.pool = pool
    return site


class HTTPFace(MultiService):
    """
    Listens on each endpoint with one shared site. Stopping stops listening
    (removing Unix socket files), lets in-flight requests finish for up to
    C{grace} seconds, then closes what is left and the upstream connections.
    """

    def __init__(
        self,
        reactor: Any,
        endpoints: Sequence[str],
        config: HTTPProxyConfig,
        credentials: ICredentialSource,
        grace: float = 10.0,
        agent: IAgent | None = None,
        audit_trail: IAuditTrail | None = None,
    ) -> None:
        super().__init__()
        for endpoint in endpoints:
            if config.capability_token is None and not is_unix_description(endpoint):
                raise HTTPFaceConfigError(
                    f"refusing to serve {endpoint!r} without a capability token: only Unix "
                    "sockets identify their peers"
                )
        self.grace = grace
        self.site = build_proxy_site(reactor, config, credentials, agent, audit_trail)
        for endpoint in endpoints:
            ListeningService(reactor, endpoint, self.site).setServiceParent(self)

    async def _stop(self) -> None:
        await super().stopService()
        await self.site.drain(self.grace)
        await self.site.close()

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())
