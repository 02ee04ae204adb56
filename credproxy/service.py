"""
Composition: which faces run, where they listen, what they share. This is the
embedding API: a Twisted application builds a L{CredproxyService} (or the face
itself) with its own reactor and credential source.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.iweb import IAgent

from credproxy._listen import (
    ListenError,
    ListeningService,
    default_runtime_dir,
    ensure_private_dir,
    parse_unix_description,
    unix_description,
)
from credproxy._secret import Secret
from credproxy.broker import Broker
from credproxy.broker.credentials import ICredentialSource
from credproxy.http import HTTPFace, HTTPProxyConfig
from credproxy.stores import (
    IProviderKeyStore,
    ITokenStore,
    MemoryProviderKeyStore,
    MemoryTokenStore,
)
from credproxy.wire import RPCFace

log = Logger()

HTTP_SOCKET_NAME = "http.sock"
RPC_SOCKET_NAME = "cred.sock"
DEFAULT_GRACE = 10.0


def default_http_endpoint(environ: Mapping[str, str] = os.environ) -> str:
    """
    The HTTP face's Unix socket in the private runtime directory.
    """
    return unix_description(os.path.join(default_runtime_dir(environ), HTTP_SOCKET_NAME))


def default_rpc_endpoint(environ: Mapping[str, str] = os.environ) -> str:
    """
    The credential socket in the same private runtime directory.
    """
    return unix_description(os.path.join(default_runtime_dir(environ), RPC_SOCKET_NAME))


@dataclass(frozen=True)
class CredproxyConfig:
    """
    Everything a running credproxy is told; the command line maps onto it
    one to one. An empty endpoint list means that face does not run.
    """

    http_endpoints: tuple[str, ...] = ()
    rpc_endpoints: tuple[str, ...] = ()
    http: HTTPProxyConfig = field(default_factory=HTTPProxyConfig)
    capability_token: Secret | None = None
    grace: float = DEFAULT_GRACE


class CredproxyService(MultiService):
    """
    The running faces (the HTTP face and the credential socket) with their
    shared settings: the capability token and the Unix peers allowed in.
    The credential socket serves C{token_store} and C{key_store} (in memory
    when not given).

    Starting creates any missing socket directory with mode 0700 (the default
    runtime directory is also made private if it exists) before a face binds.
    If a face cannot listen, the faces already started are stopped again and
    L{ListenError} is raised.
    """

    def __init__(
        self,
        reactor: object,
        config: CredproxyConfig,
        credentials: ICredentialSource,
        *,
        agent: IAgent | None = None,
        token_store: ITokenStore | None = None,
        key_store: IProviderKeyStore | None = None,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        super().__init__()
        self.config = config
        self._runtime_dir = default_runtime_dir(environ)
        self.http_face: HTTPFace | None = None
        if config.http_endpoints:
            self.http_face = HTTPFace(
                reactor,
                config.http_endpoints,
                config.http,
                credentials,
                grace=config.grace,
                agent=agent,
            )
            self.http_face.setServiceParent(self)
        self.rpc_face: RPCFace | None = None
        if config.rpc_endpoints:
            self.rpc_face = RPCFace(
                reactor,  # type: ignore[arg-type]
                config.rpc_endpoints,
                Broker(
                    reactor,  # type: ignore[arg-type]
                    token_store if token_store is not None else MemoryTokenStore(),  # type: ignore[arg-type]
                    key_store if key_store is not None else MemoryProviderKeyStore(),
                ),
                config.capability_token,
                allowed_uids=config.http.allowed_uids,
            )
            self.rpc_face.setServiceParent(self)

    def _prepare_socket_directories(self) -> None:
        for description in (*self.config.http_endpoints, *self.config.rpc_endpoints):
            spec = parse_unix_description(description)
            if spec is None:
                continue
            parent = os.path.dirname(os.path.abspath(spec.path))
            if parent == self._runtime_dir or not os.path.exists(parent):
                ensure_private_dir(parent)

    def faces(self) -> list[MultiService]:
        return [face for face in (self.http_face, self.rpc_face) if face is not None]

    def listening_services(self) -> list[ListeningService]:
        """
        Every listener of every face, in start order.
        """
        found: list[ListeningService] = []
        for face in self.faces():
            found.extend(s for s in face if isinstance(s, ListeningService))
        return found

    def startService(self) -> None:
        self._prepare_socket_directories()
        try:
            super().startService()
        except ListenError:
            for face in self.faces():
                if face.running:
                    face.stopService()
            self.running = False
            raise
        log.info(
            "credproxy serving: http={http} rpc={rpc}",
            http=list(self.config.http_endpoints),
            rpc=list(self.config.rpc_endpoints),
        )

    def stopService(self) -> Deferred[None]:
        log.info("credproxy stopping")
        return super().stopService()  # type: ignore[no-any-return]
