"""
Routing and admission: which paths are forwarded, who may use the proxy, and
the graceful drain of what is in flight.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from credproxy._listen import peer_credentials
from credproxy.broker.credentials import ICredentialSource
from credproxy.http._audit import audit
from credproxy.http._config import HTTPProxyConfig
from credproxy.http._errors import ErrorKind, error_body
from credproxy.http._exchange import Exchange, ExchangeContext
from credproxy.http._headers import presented_placeholder

log = Logger(namespace="credproxy.http")

FORWARDED_PATHS = frozenset({b"/v1/messages", b"/v1/messages/count_tokens"})
FORWARDED_METHOD = b"POST"


class ProxyResource(Resource):
    """
    Forwards the Messages API paths; answers everything else itself.
    """

    isLeaf = True

    def __init__(
        self,
        reactor: Any,
        config: HTTPProxyConfig,
        credentials: ICredentialSource,
        agent: IAgent,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.credentials = credentials
        self.agent = agent
        self.upstream_base = config.upstream.rstrip("/").encode("ascii")
        self._context = ExchangeContext(reactor, config, credentials, agent, self.upstream_base)
        self._active: set[Exchange] = set()
        self._draining = False
        self._drained: list[Deferred[None]] = []

    def render(self, request: Request) -> bytes | int:
        started = self.reactor.seconds()
        if request.path not in FORWARDED_PATHS:
            return self._refuse(
                request,
                started,
                ErrorKind.NOT_FOUND,
                "Not found: credproxy "
                "forwards only POST /v1/messages and /v1/messages/count_tokens.",
            )
        if request.method != FORWARDED_METHOD:
            request.setHeader(b"allow", FORWARDED_METHOD)
            return self._refuse(
                request, started, ErrorKind.METHOD_NOT_ALLOWED, "Method not allowed: use POST."
            )
        peer = peer_credentials(request.channel.transport)
        if peer is not None and not self.config.serves_uid(peer.uid):
            log.warn("Refused Unix peer uid={uid} pid={pid}", uid=peer.uid, pid=peer.pid)
            request.setHeader(b"connection", b"close")
            return self._refuse(
                request, started, ErrorKind.PERMISSION, "This user may not use credproxy."
            )
        token = self.config.capability_token
        if token is not None and not token.matches(presented_placeholder(request.requestHeaders)):
            return self._refuse(
                request, started, ErrorKind.AUTHENTICATION, "Invalid or missing capability token."
            )
        if self._draining:
            return self._refuse(request, started, ErrorKind.API, "credproxy is shutting down.")
        exchange = Exchange(self._context, request, started)
        self._active.add(exchange)
        exchange.when_done(self._exchange_done)
        exchange.start()
        return NOT_DONE_YET

    def _refuse(self, request: Request, started: float, kind: ErrorKind, message: str) -> bytes:
        body = error_body(kind, message)
        request.setResponseCode(kind.status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % (len(body),))
        audit(
            method=request.method,
            path=request.path,
            status=kind.status,
            usage=None,
            request_body=b"",
            response_bytes=len(body),
            duration=self.reactor.seconds() - started,
            outcome="refused",
        )
        return body

    def _exchange_done(self, exchange: Exchange) -> None:
        self._active.discard(exchange)
        if self._draining:
            # Shutting down: a kept-alive connection gets no further request.
            exchange.agent_transport.loseConnection()
        if not self._active and self._drained:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    @property
    def in_flight(self) -> int:
        return len(self._active)

    def drain(self, grace: float) -> Deferred[None]:
        """
        Refuse new requests; fire when the in-flight ones are done, closing
        those still running after C{grace} seconds.
        """
        self._draining = True
        if not self._active:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        timer = self.reactor.callLater(grace, self._abort_all)
        d.addBoth(lambda result: (timer.cancel() if timer.active() else None, result)[1])
        return d

    def _abort_all(self) -> None:
        if self._active:
            log.info("Grace expired; closing {count} streams", count=len(self._active))
        for exchange in list(self._active):
            exchange.abort()
