"""
The HTTP face as a service: one site on every endpoint, the upstream client,
and the graceful stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.iweb import IAgent

from credproxy._listen import ListeningService, is_unix_description
from credproxy.broker.credentials import ICredentialSource
from credproxy.http._config import HTTPProxyConfig
from credproxy.http._resource import ProxyResource
from credproxy.http._site import ProxySite
from credproxy.http._upstream import ScreenedConnectionPool

# Agents keep several streams open at once; Twisted's default of 2 persistent
# connections per host would close every connection beyond two after each answer.
MAX_PERSISTENT_PER_HOST = 64
# An idle kept-alive upstream connection is closed after this long.
CACHED_CONNECTION_TIMEOUT = 120


class HTTPFaceConfigError(ValueError):
    """
    The HTTP face was asked for something unsafe.
    """


def _default_agent(reactor: Any, config: HTTPProxyConfig) -> tuple[IAgent, HTTPConnectionPool]:
    """
    The upstream client: Twisted's Agent over a pool whose connections
    screen every response head (L{ScreenedConnectionPool}), verifying TLS,
    following no redirect, adding no header of its own.
    """
    pool = ScreenedConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = MAX_PERSISTENT_PER_HOST
    pool.cachedConnectionTimeout = CACHED_CONNECTION_TIMEOUT
    agent = Agent(
        reactor,
        contextFactory=BrowserLikePolicyForHTTPS(),  # verifies against the platform's trust
        connectTimeout=config.connect_timeout,
        pool=pool,
    )
    return agent, pool


def build_proxy_site(
    reactor: Any,
    config: HTTPProxyConfig,
    credentials: ICredentialSource,
    agent: IAgent | None = None,
) -> ProxySite:
    """
    The HTTP face's site, for listening on endpoints of your own. Without an
    C{agent}, one with its own connection pool and verified TLS is made; call
    C{site.close()} when done with it.
    """
    pool: HTTPConnectionPool | None = None
    if agent is None:
        agent, pool = _default_agent(reactor, config)
    site = ProxySite(ProxyResource(reactor, config, credentials, agent), reactor)
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
    ) -> None:
        super().__init__()
        for endpoint in endpoints:
            if config.capability_token is None and not is_unix_description(endpoint):
                raise HTTPFaceConfigError(
                    f"refusing to serve {endpoint!r} without a capability token: only Unix "
                    "sockets identify their peers"
                )
        self.grace = grace
        self.site = build_proxy_site(reactor, config, credentials, agent)
        for endpoint in endpoints:
            ListeningService(reactor, endpoint, self.site).setServiceParent(self)

    async def _stop(self) -> None:
        await super().stopService()
        await self.site.drain(self.grace)
        await self.site.close()

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())
