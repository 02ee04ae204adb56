"""
systemd integration: telling the service manager that credproxy is ready
(the sd_notify protocol, for C{Type=notify} units), and listening on a Unix
socket that socket activation handed over.

Twisted adopts inherited sockets itself (the C{systemd:} endpoint), but for
a Unix socket its port behaves like one it bound: it chmods the socket file
to 0666, unlinks it at stop, and shuts the socket down, which would make
systemd's own copy refuse every later connection. A socket unit owns its
socket file, its mode and its lifetime, so L{InheritedUNIXServerEndpoint}
listens on it without touching any of them.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import tcp, unix
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from credproxy._transports import LeanUNIXServer

log = Logger()

READY = b"READY=1"

# Makes the datagram socket a notification goes out on; tests pass their own.
SocketFactory = Callable[[int, int], socket.socket]


def notify_address(environ: Mapping[str, str] = os.environ) -> str | None:
    """
    The AF_UNIX address C{$NOTIFY_SOCKET} names, with a leading C{@} turned
    into the NUL byte of the abstract namespace; L{None} when it is unset or
    empty (not started by a service manager that wants to hear from us).

    @raise ValueError: for an address that is neither a path nor abstract
        (systemd also knows C{vsock:}, which credproxy does not speak).
    """
    address = environ.get("NOTIFY_SOCKET", "")
    if not address:
        return None
    if address.startswith("@"):
        return "\0" + address[1:]
    if address.startswith("/"):
        return address
    raise ValueError(f"unsupported NOTIFY_SOCKET {address!r}: not a path or an abstract name")


def notify(
    state: bytes,
    environ: Mapping[str, str] = os.environ,
    socket_factory: SocketFactory = socket.socket,
) -> bool:
    """
    Send one sd_notify datagram (C{state}, e.g. C{READY=1}) to C{$NOTIFY_SOCKET}.

    Telling systemd is a courtesy, not part of serving: a failure is one
    warning line and never an exception, so a broken notification socket
    cannot stop credproxy from running.

    @return: whether the datagram was sent.
    """
    try:
        address = notify_address(environ)
    except ValueError as e:
        log.warn("Cannot notify the service manager: {reason}", reason=str(e))
        return False
    if address is None:
        return False
    try:
        with socket_factory(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state, address)
    except (OSError, ValueError) as e:
        log.warn(
            "Cannot notify the service manager at {address} ({state}): {reason}",
            address=environ.get("NOTIFY_SOCKET"),
            state=state.decode("ascii", "replace"),
            reason=e.strerror if isinstance(e, OSError) and e.strerror else str(e),
        )
        return False
    return True


def notify_ready(
    environ: Mapping[str, str] = os.environ,
    socket_factory: SocketFactory = socket.socket,
) -> bool:
    """
    Tell a C{Type=notify} unit's manager that every face listens, so that
    units ordered after credproxy start only once connecting can work. A
    no-op without C{$NOTIFY_SOCKET}.

    @return: whether C{READY=1} was sent.
    """
    return notify(READY, environ, socket_factory)


def inherited_unix_socket(fileno: int) -> socket.socket:
    """
    Take over the inherited descriptor C{fileno}: check that it is a
    listening Unix stream socket, and return it as a non-blocking socket
    object, the original descriptor closed.

    The check matters for security, not only for clear errors: the endpoint
    string only I{claims} C{domain=UNIX}, and without a capability token the
    kernel's peer credentials are the only guard, which a TCP socket lacks.

    @raise CannotListenError: the descriptor is not one.
    """
    where = f"inherited descriptor {fileno}"
    try:
        skt = socket.socket(fileno=os.dup(fileno))  # family and type read from the socket
    except OSError as e:
        raise CannotListenError(None, where, e) from None
    try:
        listening = skt.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        listening = 0
    if skt.family != socket.AF_UNIX or skt.type != socket.SOCK_STREAM or not listening:
        skt.close()
        raise CannotListenError(None, where, "not a listening Unix stream socket")
    skt.setblocking(False)
    os.close(fileno)
    return skt


class _InheritedUNIXPort(unix.Port):
    """
    A Unix listening port on a socket systemd made: unlike L{unix.Port} it
    neither chmods the socket file when it starts, nor unlinks it or shuts the
    socket down when it stops. Its connections are lean, as every
    listener's of credproxy's does.
    """

    transport = LeanUNIXServer

    def __init__(self, skt: socket.socket, factory: IProtocolFactory, reactor: Any) -> None:
        self._path: str | bytes = skt.getsockname()
        super().__init__(self._path, factory, reactor=reactor)
        self._inherited: socket.socket | None = skt

    def startListening(self) -> None:
        # What unix.Port.startListening does for a pre-existing socket, less
        # its chmod: the socket already listens, with the unit's backlog.
        skt, self._inherited = self._inherited, None
        if skt is None:
            raise CannotListenError(None, self._bindPath, "the inherited socket was closed")
        tcp._reservedFD.reserve()  # the spare descriptor Twisted's accept uses at EMFILE
        log.info(
            "{factory} listening on {path}, a socket the service manager passed",
            factory=self._getLogPrefix(self.factory),
            path=self._path,
        )
        self.factory.doStart()  # type: ignore[union-attr]
        self._shouldShutdown = False  # systemd keeps listening on its copy
        self.connected = True
        self.socket = skt
        self.fileno = skt.fileno  # type: ignore[method-assign]
        self.numberAccepts = 100
        self.startReading()

    def connectionLost(self, reason: Failure) -> None:
        # Not unix.Port.connectionLost, which unlinks the socket file: the
        # socket unit owns it, and connections made while we are stopped
        # wait in its backlog for the next activation.
        tcp.Port.connectionLost(self, reason)


@implementer(IStreamServerEndpoint)
class InheritedUNIXServerEndpoint:
    """
    Listens on an inherited listening Unix socket (descriptor C{fileno}),
    leaving its file, mode and lifetime to whoever made it. Like Twisted's
    L{AdoptedStreamServerEndpoint}, it can listen once.
    """

    def __init__(self, reactor: Any, fileno: int) -> None:
        self._reactor = reactor
        self.fileno = fileno
        self._used = False

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        if self._used:
            return fail(CannotListenError(None, self.fileno, "already listened on"))
        self._used = True
        try:
            skt = inherited_unix_socket(self.fileno)
            port = _InheritedUNIXPort(skt, protocolFactory, self._reactor)
            port.startListening()
        except Exception:
            return fail()
        return succeed(port)
