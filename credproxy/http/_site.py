"""
The twisted.web site of the HTTP face: bounded requests, no access log of its
own (the audit line replaces it), and a drain for graceful stops.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.web.server import Site

from credproxy.http._channel import FaceGuard, ProxyChannel
from credproxy.http._request import BoundedRequest
from credproxy.http._resource import ProxyResource


class ClosablePool(Protocol):
    """
    What a site needs of the upstream pool it owns: a way to close it.
    """

    def closeCachedConnections(self) -> Deferred[None]: ...


# Idle keep-alive connections are closed after this long; twisted.web pauses
# the timer while a request is being answered, so streams are not affected.
CONNECTION_IDLE_TIMEOUT = 300.0


class ProxySite(Site):
    """
    Serves L{ProxyResource}; one site may listen on several endpoints, and
    they share one L{FaceGuard} (connection slots, body budget). Its
    channels are L{ProxyChannel}s, without twisted.web's HTTP/2-negotiating
    wrapper: the agent side speaks plain HTTP/1.1.
    """

    protocol = ProxyChannel  # type: ignore[assignment]
    requestFactory = BoundedRequest
    displayTracebacks = False

    def __init__(self, resource: ProxyResource, reactor: Any) -> None:
        super().__init__(resource, reactor=reactor, timeout=CONNECTION_IDLE_TIMEOUT)
        self.proxy = resource
        self.guard = FaceGuard.for_config(resource.config, reactor, resource.refusals)
        self.pool: ClosablePool | None = None  # the upstream pool this site owns, if any

    def log(self, request: Any) -> None:
        """
        No combined-log line: the resource writes one audit line per request.
        """

    def drain(self, grace: float) -> Deferred[None]:
        """
        Fire once every in-flight exchange is done, closing those still running
        after C{grace} seconds.
        """
        return self.proxy.drain(grace)

    def close(self) -> Deferred[None]:
        """
        Close the upstream connections this site owns, and write the
        refusal counts still owed.
        """
        self.guard.refusals.stop()
        if self.pool is None:
            return succeed(None)
        closed: Deferred[None] = self.pool.closeCachedConnections()
        return closed
