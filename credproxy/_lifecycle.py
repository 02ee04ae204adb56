"""
A proxy made for one sandboxed command: both faces on fresh Unix sockets
that only this run knows, a fresh capability token for the credential socket,
optionally a loopback TCP port for SDKs that speak plain HTTP guarded by a
second fresh token, and a stop that leaves nothing behind.

Fresh names (the pid and a 128-bit nonce) mean two runs never contend for a
socket and a path cannot be guessed in advance; fresh tokens mean nothing a
previous run handed out opens this one. Two tokens, not one, because they go
to different places: the TCP token becomes the command's C{ANTHROPIC_API_KEY}
(an environment variable every grandchild inherits), while the credential
socket's token is handed over once through a descriptor. Knowing the first
must not open the second.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from keyring.backend import KeyringBackend
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.web.iweb import IAgent

from credproxy._listen import (
    ListenError,
    ListeningService,
    clear_stale_socket,
    default_runtime_dir,
    ensure_private_dir,
    is_unix_description,
    unix_description,
)
from credproxy._secret import Secret
from credproxy.broker import Broker
from credproxy.broker.credentials import ICredentialSource
from credproxy.http import HTTPFace, HTTPProxyConfig
from credproxy.service import (
    DEFAULT_GRACE,
    BrokerConfig,
    CredproxyConfig,
    CredproxyConfigError,
    CredproxyService,
)
from credproxy.stores import IBlockingCalls
from credproxy.wire import RPCFace

log = Logger(namespace="credproxy.lifecycle")

# The loopback HTTP endpoint for SDKs that only speak TCP: port 0 lets the
# kernel pick a free port, so two runs never collide.
LOOPBACK_HTTP_ENDPOINT = "tcp:port=0:interface=127.0.0.1"
# sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
NONCE_BYTES = 16  # 128 bits: a path nobody can guess or collide with
TOKEN_BYTES = 32  # 256 bits per capability token
CREDENTIAL_SOCKET_SUFFIX = ".sock"
HTTP_SOCKET_SUFFIX = "-http.sock"
# What this module names its sockets, so a stale one can be recognised.
_RUN_SOCKET_NAME = re.compile(r"\A([0-9]+)-[0-9a-f]{32}(?:-http)?\.sock\Z")


class ProxyStartError(Exception):
    """
    The proxy could not start; the message is one line saying why, and never
    holds a token or credential. Whatever the start had made is gone again.
    """


@dataclass(frozen=True)
class SocketPaths:
    """
    The two Unix sockets of one proxy: the credential socket and its HTTP
    sibling, side by side in one private directory.
    """

    credential: str
    http: str


def check_socket_path(path: str) -> None:
    """
    Refuse a path a Unix socket cannot bind: the kernel would cut it short or
    refuse it with an error that does not say the path is the problem.

    @raise ProxyStartError: naming the length and the limit.
    """
    length = len(os.fsencode(path))
    if length > MAX_SOCKET_PATH_BYTES:
        raise ProxyStartError(
            f"the socket path in {os.path.dirname(path)} would be {length} bytes long, but a "
            f"Unix socket path may have at most {MAX_SOCKET_PATH_BYTES}; use a shorter runtime "
            "directory (XDG_RUNTIME_DIR)"
        )


def socket_paths(runtime_dir: str, pid: int, nonce: str) -> SocketPaths:
    """
    C{{runtime_dir}}/C{{pid}}-C{{nonce}}.sock and its C{-http.sock} sibling.

    @raise ProxyStartError: when either path is too long for a Unix socket.
    """
    stem = os.path.join(runtime_dir, f"{pid}-{nonce}")
    paths = SocketPaths(stem + CREDENTIAL_SOCKET_SUFFIX, stem + HTTP_SOCKET_SUFFIX)
    check_socket_path(paths.credential)
    check_socket_path(paths.http)
    return paths


def new_socket_paths(runtime_dir: str) -> SocketPaths:
    """
    Socket paths for this process that no other run has used or can guess.
    """
    return socket_paths(runtime_dir, os.getpid(), secrets.token_hex(NONCE_BYTES))


def new_capability_token() -> Secret:
    """
    A fresh 256-bit capability token.
    """
    return Secret(secrets.token_hex(TOKEN_BYTES))


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists; it is someone else's
        return True
    return True


def remove_stale_run_sockets(runtime_dir: str) -> list[str]:
    """
    Remove the sockets earlier runs left in C{runtime_dir} when they were
    killed without a chance to clean up. Their names are unique, so no later
    run would ever replace them; without this they would pile up.

    Only names this module makes are considered, and only when their pid is
    gone and nothing answers on them (a process in another pid namespace
    sharing the directory still answers), so a live run is never touched.
    Returns the paths removed.
    """
    try:
        names = os.listdir(runtime_dir)
    except OSError:
        return []
    removed: list[str] = []
    for name in sorted(names):
        match = _RUN_SOCKET_NAME.match(name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _process_exists(pid):
            continue
        path = os.path.join(runtime_dir, name)
        try:
            clear_stale_socket(path)
        except ListenError:
            continue  # alive after all, or not a socket: not ours to remove
        if not os.path.lexists(path):
            removed.append(path)
    return removed


def _private_unix_description(path: str) -> str:
    # No lock file: the path is unique to this run, so there is nobody to
    # lock out, and a lock file would be one more file a killed run leaves.
    described = unix_description(path)
    assert described.endswith(":lockfile=1")
    return described.removesuffix(":lockfile=1") + ":lockfile=0"


@dataclass(frozen=True)
class ProxyLaunchConfig:
    """
    What a launched proxy is told: the service options except where it
    listens and which capability token it wants, since a launch makes fresh
    sockets and tokens of its own.

    C{http.capability_token} is not used: the HTTP face's Unix socket is
    guarded by the peer uid check, and the TCP endpoint by a fresh token.
    C{tcp_http_endpoint} (a Twisted server endpoint string, normally
    L{LOOPBACK_HTTP_ENDPOINT}) also serves the HTTP face on TCP; None serves
    it on the Unix socket only. With C{placeholder_on_socket}, the Unix
    socket wants the fresh placeholder token too, on top of the uid check:
    for a sandbox whose relay carries any of its local clients' requests to
    that socket, so that the placeholder rules of the TCP endpoint hold
    there as well. C{runtime_dir} defaults to credproxy's private runtime
    directory.
    """

    http: HTTPProxyConfig = field(default_factory=HTTPProxyConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    grace: float = DEFAULT_GRACE
    tcp_http_endpoint: str | None = None
    runtime_dir: str | None = None
    placeholder_on_socket: bool = False

    @classmethod
    def from_service_config(
        cls,
        config: CredproxyConfig,
        *,
        tcp_http_endpoint: str | None = None,
        runtime_dir: str | None = None,
        placeholder_on_socket: bool = False,
    ) -> ProxyLaunchConfig:
        """
        The launch configuration of the settings C{credproxy.tap.Options}
        parsed; the endpoints and capability token it names are not used.
        """
        return cls(
            http=replace(config.http, capability_token=None),
            broker=config.broker,
            grace=config.grace,
            tcp_http_endpoint=tcp_http_endpoint,
            runtime_dir=runtime_dir,
            placeholder_on_socket=placeholder_on_socket,
        )


def _url_of(face: HTTPFace, endpoint: str) -> str:
    listeners = [s for s in face if isinstance(s, ListeningService)]
    port = listeners[0].port
    assert port is not None
    host = port.getHost()
    if isinstance(host, IPv4Address):
        return f"http://{host.host}:{host.port}"
    if isinstance(host, IPv6Address):
        return f"http://[{host.host}]:{host.port}"
    raise ProxyStartError(f"the extra HTTP endpoint {endpoint!r} is not a TCP endpoint")


class ProxyHandle:
    """
    A running launched proxy: where its faces listen, the tokens that open
    them, and its stop.

    @ivar credential_socket: the credential socket; connections must present
        C{capability_token} and are sandbox connections.
    @ivar http_socket: the HTTP face's Unix socket, for peers with an allowed uid.
    @ivar http_url: C{http://127.0.0.1:PORT} of the TCP endpoint, or None.
    @ivar capability_token: the credential socket's token.
    @ivar http_token: the only placeholder the TCP endpoint accepts (and
        the Unix socket, with C{placeholder_on_socket}); None without either.
    @ivar service: the running service (its children include both extra faces).
    """

    def __init__(
        self,
        service: CredproxyService,
        paths: SocketPaths,
        capability_token: Secret,
        http_url: str | None,
        http_token: Secret | None,
    ) -> None:
        self.service = service
        self.credential_socket = paths.credential
        self.http_socket = paths.http
        self.http_url = http_url
        self.capability_token = capability_token
        self.http_token = http_token
        self._stopped = False
        self._waiting: list[Deferred[None]] | None = None

    def __repr__(self) -> str:
        return (
            f"<ProxyHandle credential_socket={self.credential_socket!r}"
            f" http_socket={self.http_socket!r} http_url={self.http_url!r}>"
        )

    def stop(self) -> Deferred[None]:
        """
        Stop listening, end the connections (in-flight HTTP streams get the
        grace period), cancel the broker's timers, forget its login sessions
        and remove the socket files. Fires once all that is done; calling it
        again, during or after the stop, is harmless and fires then too.
        """
        if self._stopped:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        if self._waiting is None:
            self._waiting = [waiter]
            Deferred.fromCoroutine(self._stop())
        else:
            self._waiting.append(waiter)
        return waiter

    async def _stop(self) -> None:
        try:
            if self.service.running:
                await self.service.stopService()
        except Exception:
            log.failure("Stopping credproxy failed")
        self._stopped = True
        waiting, self._waiting = self._waiting or [], None
        for d in waiting:
            d.callback(None)


def create_and_start_proxy(
    reactor: Any,
    config: ProxyLaunchConfig,
    *,
    environ: Mapping[str, str] = os.environ,
    paths: SocketPaths | None = None,
    credentials: ICredentialSource | None = None,
    broker: Broker | None = None,
    agent: IAgent | None = None,
    oauth_agent: IAgent | None = None,
    calls: IBlockingCalls | None = None,
    keyring_backend: KeyringBackend | None = None,
) -> Deferred[ProxyHandle]:
    """
    Start a proxy on fresh sockets (C{paths}, by default new ones in the
    runtime directory) with fresh tokens. Every socket is bound when the
    result fires, so a command started then finds the proxy listening.

    C{environ} names the runtime directory (C{XDG_RUNTIME_DIR}) and holds
    the credential of the HTTP face (C{ANTHROPIC_API_KEY}, ...) unless
    C{credentials} is given; C{broker}, C{agent}, C{oauth_agent}, C{calls}
    and C{keyring_backend} are passed to L{CredproxyService}.

    Fails with L{ProxyStartError} when a path is too long for a Unix socket,
    the directory is not private to us, something is serving at a path, a
    bind fails, or the broker cannot be configured; by then everything the
    start made (sockets, listeners, threads, timers) is gone again.
    """
    return Deferred.fromCoroutine(
        _start(
            reactor,
            config,
            environ=environ,
            paths=paths,
            credentials=credentials,
            broker=broker,
            agent=agent,
            oauth_agent=oauth_agent,
            calls=calls,
            keyring_backend=keyring_backend,
        )
    )


async def _start(
    reactor: Any,
    config: ProxyLaunchConfig,
    *,
    environ: Mapping[str, str],
    paths: SocketPaths | None,
    credentials: ICredentialSource | None,
    broker: Broker | None,
    agent: IAgent | None,
    oauth_agent: IAgent | None,
    calls: IBlockingCalls | None,
    keyring_backend: KeyringBackend | None,
) -> ProxyHandle:
    runtime_dir = config.runtime_dir or default_runtime_dir(environ)
    if paths is None:
        paths = new_socket_paths(runtime_dir)
    else:
        check_socket_path(paths.credential)
        check_socket_path(paths.http)
    tcp_endpoint = config.tcp_http_endpoint
    if tcp_endpoint is not None and is_unix_description(tcp_endpoint):
        raise ProxyStartError(f"the extra HTTP endpoint must be TCP, not {tcp_endpoint!r}")
    try:
        for directory in sorted({os.path.dirname(paths.credential), os.path.dirname(paths.http)}):
            ensure_private_dir(directory)
    except ListenError as e:
        raise ProxyStartError(str(e)) from None
    remove_stale_run_sockets(runtime_dir)

    capability_token = new_capability_token()
    wants_placeholder = tcp_endpoint is not None or config.placeholder_on_socket
    http_token = new_capability_token() if wants_placeholder else None
    # The uid check guards the Unix socket; the placeholder too when asked.
    unix_http = replace(
        config.http, capability_token=http_token if config.placeholder_on_socket else None
    )
    try:
        # The service runs the HTTP face on its Unix socket; the credential
        # socket and the TCP endpoint are added once it runs. A failure of
        # the service's own start leaves nothing bound (its socket is the
        # first), and a failure of either added face is rolled back here,
        # waiting for every listener to close.
        service = CredproxyService(
            reactor,
            CredproxyConfig(
                http_endpoints=(_private_unix_description(paths.http),),
                http=unix_http,
                capability_token=capability_token,
                grace=config.grace,
                broker=config.broker,
            ),
            credentials,
            broker=broker,
            agent=agent,
            oauth_agent=oauth_agent,
            calls=calls,
            keyring_backend=keyring_backend,
            environ=environ,
        )
    except CredproxyConfigError as e:
        raise ProxyStartError(str(e)) from None
    rpc_face = RPCFace(
        reactor,
        [_private_unix_description(paths.credential)],
        service.broker,
        capability_token,
        allowed_uids=config.http.allowed_uids,
    )
    tcp_face: HTTPFace | None = None
    if tcp_endpoint is not None:
        tcp_face = HTTPFace(
            reactor,
            [tcp_endpoint],
            replace(config.http, capability_token=http_token),
            service.credentials,
            grace=config.grace,
            agent=agent,
        )

    try:
        service.startService()
    except ListenError as e:
        raise ProxyStartError(str(e)) from None
    except BaseException:
        if service.running:
            await service.stopService()
        raise
    try:
        rpc_face.setServiceParent(service)
        http_url: str | None = None
        if tcp_face is not None and tcp_endpoint is not None:
            tcp_face.setServiceParent(service)
            http_url = _url_of(tcp_face, tcp_endpoint)
    except BaseException as e:
        await service.stopService()
        if isinstance(e, ListenError | ProxyStartError):
            raise ProxyStartError(str(e)) from None
        raise
    log.info(
        "credproxy run: credential socket {credential}, HTTP socket {http}, HTTP port {url}",
        credential=paths.credential,
        http=paths.http,
        url=http_url or "none",
    )
    return ProxyHandle(service, paths, capability_token, http_url, http_token)
