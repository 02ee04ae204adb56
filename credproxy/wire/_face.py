"""
The credential socket as a service: one server factory listening on every
endpoint, and the shutdown order clients depend on (docs/wire.md): end
every connection first, remove the socket file last.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from credproxy._audit_trail import IAuditTrail
from credproxy._limits import ConnectionLimits
from credproxy._listen import ListeningService, is_unix_description
from credproxy._secret import Secret
from credproxy.broker import Broker
from credproxy.wire._server import DEFAULT_LIMITS, CredentialServerFactory
from credproxy.wire._spec import MAX_PENDING_HANDSHAKES


class RPCFaceConfigError(ValueError):
    """
    The credential socket was asked for something unsafe.
    """


class RPCFace(MultiService):
    """
    Serves the credential socket on each endpoint.

    With a C{capability_token}, every connection must present it and is a
    sandbox connection (read-only, no enumeration); without one, every
    connection is a host connection, so only Unix sockets (which the kernel
    restricts to our uid and C{allowed_uids}) are allowed.

    C{limits} bounds the handshaken connections of the face (all endpoints
    together) and of each peer; C{max_pending_handshakes} those still
    handshaking, which never take a handshaken one's slot. Past a limit a
    connection is answered C{RESOURCE_EXHAUSTED} and closed at once.

    Stopping refuses new connections, sends EOF to every open one (hard
    close after 3 s if a peer does not read), and only then stops listening,
    which removes the socket file.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        endpoints: Sequence[str],
        broker: Broker,
        capability_token: Secret | None = None,
        *,
        allowed_uids: frozenset[int] = frozenset(),
        limits: ConnectionLimits = DEFAULT_LIMITS,
        max_pending_handshakes: int = MAX_PENDING_HANDSHAKES,
        audit_trail: IAuditTrail | None = None,
    ) -> None:
        super().__init__()
        for endpoint in endpoints:
            if capability_token is None and not is_unix_description(endpoint):
                raise RPCFaceConfigError(
                    f"refusing to serve the credential socket on {endpoint!r} without a "
                    "capability token: only Unix sockets identify their peers"
                )
        self.factory = CredentialServerFactory(
            reactor,
            broker,
            capability_token,
            allowed_uids=allowed_uids or frozenset({os.getuid()}),
            limits=limits,
            max_pending_handshakes=max_pending_handshakes,
            audit_trail=audit_trail,
        )
        for endpoint in endpoints:
            ListeningService(reactor, endpoint, self.factory).setServiceParent(self)

    def startService(self) -> None:
        self.factory.accepting = True
        super().startService()

    async def _stop(self) -> None:
        await self.factory.end_connections()
        await super().stopService()
        # Connections refused while the listeners were closing may owe a
        # count of suppressed refusal lines: write it, leave no timer behind.
        self.factory.refusals.stop()

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())
