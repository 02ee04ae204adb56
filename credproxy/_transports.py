"""
Connections that spare the reactor system calls: they send at once, and
they pause reading lazily.

Twisted's transports queue every write and ask the reactor to watch the
socket for writability (an C{epoll_ctl} to start, a turn of the loop to be
told, another C{epoll_ctl} to stop). A proxy writes once per request on each
of its two connections, almost always to a socket with room, so that is
four system calls and two loop turns per request for nothing. Here a write
to a connection with nothing queued is tried at once; whatever the socket
does not take (it is full, or the connection failed) is queued as Twisted
would have queued it, and Twisted's own machinery (the writability watch,
producers, C{loseConnection}, connection loss) takes over from there.

Twisted's client pauses the upstream connection when an answer's head
arrives and resumes it when the body gets its consumer, which the face
gives it in the same call: two more C{epoll_ctl}s per request that change
nothing. Here a pause is only noted; the connection leaves the reactor's
read set when a read actually comes while paused, so a pause undone before
then costs no system call, and no data is delivered while paused either way.

The connections are made by L{LeanReactor}, a reactor that builds them for
C{listenTCP}, C{listenUNIX}, C{connectTCP} and C{connectUNIX} and passes
everything else to the reactor it wraps, so that Twisted's endpoints (and
C{HostnameEndpoint}'s attempts) use them unchanged.

This leans on private state of C{twisted.internet.abstract.FileDescriptor}
(C{dataBuffer}, C{_tempDataLen}, C{_writeDisconnected}) and of Twisted's
connectors and ports (C{Connector._makeTransport}, C{Port.transport});
tests/integration/test_transports.py pins each.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp, unix
from twisted.internet.abstract import _dataMustBeBytes
from twisted.internet.interfaces import IConnector, IListeningPort
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import ClientFactory, Factory
from zope.interface import directlyProvides, providedBy


class SendAtOnceMixin:
    """
    Tries the socket before queueing: mixed in ahead of a Twisted stream
    connection class.
    """

    def write(self, data: bytes) -> None:
        if self._may_send_now(data):
            sent = self.writeSomeData(data)  # type: ignore[attr-defined]
            if isinstance(sent, int) and sent > 0:
                if sent == len(data):
                    return
                data = data[sent:]
            # Not taken whole (full, or failed): queued, and Twisted's next
            # write attempt sends the rest or finds the failure.
        super().write(data)  # type: ignore[misc]

    def writeSequence(self, iovec: Any) -> None:
        pieces = list(iovec)
        for piece in pieces:
            _dataMustBeBytes(piece)
        self.write(b"".join(pieces))

    def _may_send_now(self, data: bytes) -> bool:
        """
        Whether this write may go out before the reactor's next turn: it is
        bytes, nothing is queued ahead of it, and the connection is open for
        writing without a TLS layer of Twisted's own on it.
        """
        return (
            type(data) is bytes
            and bool(data)
            and not self.dataBuffer  # type: ignore[attr-defined]
            and not self._tempDataLen  # type: ignore[attr-defined]
            and self.connected  # type: ignore[attr-defined]
            and not self.disconnecting  # type: ignore[attr-defined]
            and not self._writeDisconnected  # type: ignore[attr-defined]
            and not getattr(self, "TLS", False)
        )


class LazyPauseMixin:
    """
    Notes a pause of reading and applies it when a read comes: mixed in
    ahead of a Twisted stream connection class.
    """

    _pause_pending = False

    def pauseProducing(self) -> None:
        self._pause_pending = True

    def resumeProducing(self) -> None:
        if self._pause_pending:
            self._pause_pending = False  # it never left the read set
            return
        super().resumeProducing()  # type: ignore[misc]

    def startReading(self) -> None:
        self._pause_pending = False
        super().startReading()  # type: ignore[misc]

    def stopReading(self) -> None:
        self._pause_pending = False
        super().stopReading()  # type: ignore[misc]

    def doRead(self) -> Any:
        if self._pause_pending:
            self.stopReading()  # paused: the read waits for resumeProducing
            return None
        return super().doRead()  # type: ignore[misc]


class LeanTCPServer(LazyPauseMixin, SendAtOnceMixin, tcp.Server):
    """An accepted TCP connection that sends at once and pauses lazily."""


class LeanTCPClient(LazyPauseMixin, SendAtOnceMixin, tcp.Client):
    """An outgoing TCP connection that sends at once and pauses lazily."""


class _UNIXSendAtOnceMixin(SendAtOnceMixin):
    """
    Sends at once unless file descriptors are queued to go with the bytes:
    then it queues, as Twisted does.
    """

    def _may_send_now(self, data: bytes) -> bool:
        return not self._sendmsgQueue and super()._may_send_now(data)  # type: ignore[attr-defined]


class LeanUNIXServer(LazyPauseMixin, _UNIXSendAtOnceMixin, unix.Server):
    """An accepted Unix connection that sends at once and pauses lazily."""


class LeanUNIXClient(LazyPauseMixin, _UNIXSendAtOnceMixin, unix.Client):
    """An outgoing Unix connection that sends at once and pauses lazily."""


class LeanTCPPort(tcp.Port):
    transport = LeanTCPServer


class LeanUNIXPort(unix.Port):
    transport = LeanUNIXServer


class _LeanTCPConnector(tcp.Connector):
    def _makeTransport(self) -> LeanTCPClient:
        return LeanTCPClient(self.host, self.port, self.bindAddress, self, self.reactor)


class _LeanUNIXConnector(unix.Connector):
    def _makeTransport(self) -> Any:  # a unix.Client, which is no tcp.Client
        return LeanUNIXClient(self.address, self, self.reactor, self.checkPID)


class LeanReactor:
    """
    A reactor whose stream connections are lean; everything but making
    them is the wrapped reactor's (it provides what that reactor provides,
    so endpoints and C{IReactor*.providedBy} checks see no difference).

    Only a POSIX reactor's own connections are replaced: the wrapped
    reactor must be one whose C{listenTCP} and C{connectTCP} build
    C{twisted.internet.tcp} connections (epoll, poll, select).
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        directlyProvides(self, providedBy(reactor))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def listenTCP(
        self, port: int, factory: Factory, backlog: int = 50, interface: str = ""
    ) -> IListeningPort:
        listening = LeanTCPPort(port, factory, backlog, interface, self._reactor)
        listening.startListening()
        return listening

    def listenUNIX(
        self,
        address: Any,  # str or bytes, as Twisted takes it
        factory: Factory,
        backlog: int = 50,
        mode: int = 0o666,
        wantPID: int = 0,
    ) -> IListeningPort:
        listening = LeanUNIXPort(address, factory, backlog, mode, self._reactor, wantPID)
        listening.startListening()
        return listening

    def connectTCP(
        self,
        host: str,
        port: int,
        factory: ClientFactory,
        timeout: float = 30.0,
        bindAddress: Any = None,
    ) -> IConnector:
        connector = _LeanTCPConnector(host, port, factory, timeout, bindAddress, self._reactor)
        connector.connect()
        return connector

    def connectUNIX(
        self, address: str, factory: ClientFactory, timeout: float = 30, checkPID: int = 0
    ) -> IConnector:
        connector = _LeanUNIXConnector(address, factory, timeout, self._reactor, checkPID)
        connector.connect()
        return connector


def lean_reactor(reactor: Any) -> Any:
    """
    C{reactor} wrapped in a L{LeanReactor} when it is a POSIX reactor
    that builds Twisted's own TCP connections, else C{reactor} itself (a
    test's C{MemoryReactor}, another event loop): connections then behave
    exactly as that reactor's do.
    """
    if isinstance(reactor, LeanReactor) or not isinstance(reactor, PosixReactorBase):
        return reactor
    return LeanReactor(reactor)
