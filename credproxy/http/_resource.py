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

from credproxy._audit_trail import IAuditTrail, LogAuditTrail
from credproxy._listen import peer_credentials
from credproxy.broker.credentials import ICredentialSource
from credproxy.http._admission import SHUTTING_DOWN, admission_refusal
from credproxy.http._audit import RefusalAudit
from credproxy.http._config import HTTPProxyConfig
from credproxy.http._errors import ErrorKind, error_body
from credproxy.http._exchange import Exchange, ExchangeContext
from credproxy.http._head import BAD_TARGET, HeadRefusal, valid_target
from credproxy.http._headers import presented_placeholder
from credproxy.http._upstream import UpstreamSlots

log = Logger(namespace="credproxy.http")


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
        audit_trail: IAuditTrail | None = None,
    ) -> None:
        super().__init__()
        if audit_trail is None:
            audit_trail = LogAuditTrail()
        self.reactor = reactor
        self.config = config
        self.credentials = credentials
        self.agent = agent
        self.upstream_base = config.upstream.rstrip("/").encode("ascii")
        self._context = ExchangeContext(
            reactor,
            config,
            credentials,
            agent,
            self.upstream_base,
            UpstreamSlots.for_config(reactor, config),
            audit_trail,
        )
        self._active: set[Exchange] = set()
        self._draining = False
        self._drained: list[Deferred[None]] = []
        # The face's refusal lines (the site's gate writes through it too).
        self.refusals = RefusalAudit(reactor, audit_trail)

    def render(self, request: Request) -> bytes | int:
        started = self.reactor.seconds()
        if getattr(request, "head", None) is None:
            # Not admitted by a ProxyChannel's gate (this resource is served
            # by a site of the embedder's own): admission happens here, late.
            if not valid_target(request.uri):
                return self._refuse(request, started, BAD_TARGET)
            peer = peer_credentials(request.channel.transport)
            refusal = admission_refusal(
                self.config,
                request.method,
                request.path,
                peer.uid if peer is not None else None,
                presented_placeholder(request.requestHeaders),
            )
            if refusal is not None:
                return self._refuse(request, started, refusal)
        if self._draining:
            return self._refuse(request, started, SHUTTING_DOWN)
        exchange = Exchange(self._context, request, started)
        self._active.add(exchange)
        exchange.when_done(self._exchange_done)
        exchange.start()
        return NOT_DONE_YET

    def _refuse(self, request: Request, started: float, refusal: HeadRefusal) -> bytes:
        kind = refusal.kind
        body = error_body(kind, refusal.message)
        request.setResponseCode(kind.status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % (len(body),))
        for name, value in refusal.headers:
            request.setHeader(name, value)
        if kind is not ErrorKind.API:
            # A refused agent gets no second request on this connection.
            request.setHeader(b"connection", b"close")
        self.refusals.refused(
            method=request.method,
            path=request.path,
            status=kind.status,
            outcome=refusal.outcome,
            response_bytes=len(body),
            started=started,
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
