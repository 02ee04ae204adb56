"""
Composition: which faces run, where they listen, and the one broker they
share (stores, refresh, renewal, login). This is the embedding API: a Twisted
application builds a L{CredproxyService} with its own reactor, and may hand it
a broker or a credential source of its own.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from keyring.backend import KeyringBackend
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent

from credproxy import _process
from credproxy._audit_trail import AuditLogError, FileAuditTrail, IAuditTrail, LogAuditTrail
from credproxy._limits import ConnectionLimits
from credproxy._listen import (
    ListenError,
    ListeningService,
    default_runtime_dir,
    ensure_private_dir,
    parse_unix_description,
    unix_description,
)
from credproxy._secret import Secret
from credproxy.broker import Broker, RedisRefreshLock, SandboxPolicy
from credproxy.broker._lock_file import (
    FileRefreshLock,
    InProcessRefreshLock,
    IRefreshLock,
    RefreshLockError,
)
from credproxy.broker.credentials import BrokerCredentialSource, ICredentialSource
from credproxy.http import HTTPFace, HTTPProxyConfig
from credproxy.http._channel import MAX_LINGERING_REFUSALS as HTTP_LINGERING_REFUSALS
from credproxy.oauth import (
    OAuthConfigError,
    build_providers,
    default_oauth_agent,
    load_oauth_config,
)
from credproxy.stores import (
    DEFAULT_BUCKET,
    BlockingCalls,
    IBlockingCalls,
    RedisStoreConfig,
    StoreUnavailable,
    default_state_dir,
    is_redis_url,
    open_host_stores,
)
from credproxy.wire import RPCFace
from credproxy.wire._spec import MAX_LINGERING_REFUSALS as RPC_LINGERING_REFUSALS
from credproxy.wire._spec import MAX_PENDING_HANDSHAKES

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
class BrokerConfig:
    """
    Where the broker keeps credentials and what it lets sandboxes do.

    C{store} is C{auto} (a Secret Service keyring when one answers, else
    files in C{state_dir}), C{keyring}, C{file}, C{memory}, or the URL of a
    Redis that a fleet of hosts shares (with C{redis} saying how to reach
    and read it). C{oauth_config}
    is a TOML file of OAuth providers; without it the built-in C{anthropic}
    provider is configured. C{bucket} is the bucket of the stored anthropic
    token the HTTP face uses.
    """

    store: str = "memory"
    state_dir: str | None = None
    oauth_config: str | None = None
    bucket: str = DEFAULT_BUCKET
    sandbox_readable: frozenset[str] | None = None
    allow_sandbox_login: bool = False
    # How to reach and read a Redis store (C{store} a redis://, rediss:// or unix:// URL).
    redis: RedisStoreConfig = field(default_factory=RedisStoreConfig)


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
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    # The credential socket's own slots (the HTTP face's are in http.limits).
    rpc_limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    max_pending_handshakes: int = MAX_PENDING_HANDSHAKES
    # A file for the faces' audit records (JSON lines); None: twisted.logger.
    audit_log: str | None = None


class CredproxyConfigError(ValueError):
    """
    The configuration cannot be served: an unusable store or a bad OAuth
    provider file. The message is one line naming what is wrong.
    """


def _private_state_dir(path: str) -> None:
    """
    Create the state directory with mode 0700, or check that an existing one
    is a directory of ours, and make it private: it holds the file stores and
    the refresh locks, and every store, keyring included, shares it.

    @raise CredproxyConfigError: it cannot be used; the message names it.
    """
    try:
        if not os.path.isdir(path):
            os.makedirs(path, mode=0o700)
        info = os.stat(path)
    except FileExistsError:
        raise CredproxyConfigError(f"cannot use state directory {path}: not a directory") from None
    except OSError as e:
        raise CredproxyConfigError(f"cannot use state directory {path}: {e.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise CredproxyConfigError(f"cannot use state directory {path}: not a directory")
    if info.st_uid != os.geteuid():
        raise CredproxyConfigError(
            f"cannot use state directory {path}: it belongs to uid {info.st_uid}, not to us"
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(path, 0o700)


# The subdirectory of the state directory holding the refresh lock files.
LOCKS_DIR_NAME = "refresh-locks"


def build_broker(
    reactor: Any,
    config: BrokerConfig,
    calls: IBlockingCalls,
    *,
    oauth_agent: IAgent | None = None,
    keyring_backend: KeyringBackend | None = None,
    renew: bool = True,
) -> Broker:
    """
    The broker the configuration describes: its stores, its OAuth providers
    and, for stores other processes can share, the lock that makes a
    refresh happen once: a file lock per host, or the fleet's lock in Redis.

    A command that lives for seconds passes C{renew=False}: it must not
    refresh tokens behind the user's back.

    @raise CredproxyConfigError: the store is unusable or the provider file bad.
    """
    state_dir = config.state_dir or default_state_dir()
    if config.store != "memory" and not is_redis_url(config.store):
        _private_state_dir(state_dir)
    try:
        stores = open_host_stores(
            config.store,
            state_dir,
            calls,
            backend=keyring_backend,
            reactor=reactor,
            redis=config.redis,
        )
    except StoreUnavailable as e:
        raise CredproxyConfigError(str(e)) from None
    try:
        oauth = load_oauth_config(config.oauth_config)
    except OAuthConfigError as e:
        raise CredproxyConfigError(str(e)) from None
    providers = build_providers(
        oauth, reactor, oauth_agent if oauth_agent is not None else default_oauth_agent(reactor)
    )
    lock: IRefreshLock
    if stores.redis is not None:
        lock = RedisRefreshLock(reactor, stores.redis)  # the fleet's: every host takes it
    elif config.store == "memory":
        lock = InProcessRefreshLock()  # nothing outside this process can see the tokens
    else:
        locks = os.path.join(state_dir, LOCKS_DIR_NAME)
        try:
            lock = FileRefreshLock(reactor, locks)
        except (OSError, RefreshLockError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise CredproxyConfigError(f"cannot use {locks}: {reason}") from None
    return Broker(
        reactor,
        stores.tokens,
        stores.keys,
        providers=providers,
        refresh_lock=lock,
        sandbox=SandboxPolicy(config.sandbox_readable, config.allow_sandbox_login),
        store_description=stores.description,
        store_service=stores.redis,
        renew=renew,
    )


class CredproxyService(MultiService):
    """
    The running faces (the HTTP face and the credential socket) and the one
    broker they share, with their shared settings: the capability token and
    the Unix peers allowed in.

    Without a C{broker}, one is built from C{config.broker}, with a thread
    pool for its blocking store calls; without C{credentials}, the HTTP face
    asks the broker (environment first, then the stores). Children start in
    the order thread pool, broker, faces, and stop in the reverse order.

    Starting creates any missing socket directory with mode 0700 (the default
    runtime directory is also made private if it exists) before a face binds.
    If a face cannot listen, the faces already started are stopped again and
    L{ListenError} is raised.
    """

    def __init__(
        self,
        reactor: Any,
        config: CredproxyConfig,
        credentials: ICredentialSource | None = None,
        *,
        broker: Broker | None = None,
        agent: IAgent | None = None,
        oauth_agent: IAgent | None = None,
        calls: IBlockingCalls | None = None,
        keyring_backend: KeyringBackend | None = None,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        super().__init__()
        self.config = config
        self.audit_trail: IAuditTrail = LogAuditTrail()
        if config.audit_log is not None:
            try:
                trail = FileAuditTrail(reactor, config.audit_log)
            except AuditLogError as e:
                raise CredproxyConfigError(str(e)) from None
            # The first child, so it stops last: after the faces' last records.
            trail.setServiceParent(self)
            self.audit_trail = trail
        self._runtime_dir = default_runtime_dir(environ)
        if broker is None:
            if calls is None:
                calls = BlockingCalls(reactor)
            if IService.providedBy(calls):
                calls.setServiceParent(self)
            broker = build_broker(
                reactor,
                config.broker,
                calls,
                oauth_agent=oauth_agent,
                keyring_backend=keyring_backend,
            )
        self.broker = broker
        broker.setServiceParent(self)
        if credentials is None:
            credentials = BrokerCredentialSource(
                broker, environ=environ, bucket=config.broker.bucket
            )
        self.credentials = credentials
        self.http_face: HTTPFace | None = None
        if config.http_endpoints:
            self.http_face = HTTPFace(
                reactor,
                config.http_endpoints,
                config.http,
                credentials,
                grace=config.grace,
                agent=agent,
                audit_trail=self.audit_trail,
            )
            self.http_face.setServiceParent(self)
        self.rpc_face: RPCFace | None = None
        if config.rpc_endpoints:
            self.rpc_face = RPCFace(
                reactor,
                config.rpc_endpoints,
                broker,
                config.capability_token,
                allowed_uids=config.http.allowed_uids,
                limits=config.rpc_limits,
                max_pending_handshakes=config.max_pending_handshakes,
                audit_trail=self.audit_trail,
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

    def descriptors_needed(self) -> int:
        """
        The descriptors the running faces may hold at their caps, with room
        for credproxy's own files.
        """
        config = self.config
        needed = _process.DESCRIPTOR_RESERVE
        if config.http_endpoints:
            needed += (
                config.http.limits.max_connections
                + config.http.max_upstream_connections
                + HTTP_LINGERING_REFUSALS
            )
        if config.rpc_endpoints:
            needed += (
                config.rpc_limits.max_connections
                + config.max_pending_handshakes
                + RPC_LINGERING_REFUSALS
            )
        return needed

    def startService(self) -> None:
        self._prepare_socket_directories()
        problem = _process.raise_open_file_limit(self.descriptors_needed())
        if problem is not None:
            log.warn("Connection caps not fully usable: {problem}", problem=problem)
        try:
            super().startService()
        except ListenError:
            for child in reversed(list(self)):
                if child.running:
                    child.stopService()
            self.running = False
            raise
        log.info(
            "credproxy serving: http={http} rpc={rpc}",
            http=list(self.config.http_endpoints),
            rpc=list(self.config.rpc_endpoints),
        )
        # Every face listens now (listening is synchronous): a Type=notify
        # unit may start what depends on us. Only after, never on a failed start.
        from credproxy._systemd import notify_ready

        notify_ready()
        log.info("Credential store: {store}", store=self.broker.store_description)
        if self.http_face is not None:
            self.credentials.describe().addCallbacks(self._log_credential, self._log_unknown)

    def _log_credential(self, description: str | None) -> None:
        if description:
            log.info("HTTP face credential: {source}", source=description)
        else:
            log.warn(
                "NO CREDENTIAL: every request to the HTTP face will get a 401 until you {how}",
                how=self.credentials.how_to_configure(),
            )

    def _log_unknown(self, failure: Failure) -> None:
        # The stores could not be read: say so in one line (the store logged
        # its own safe reason); the faces keep serving and say it per request.
        log.error(
            "Could not tell which credential the HTTP face will use: {kind}",
            kind=failure.type.__qualname__ if failure.type else "unknown",
        )

    def stopService(self) -> Deferred[None]:
        log.info("credproxy stopping")
        return super().stopService()  # type: ignore[no-any-return]
