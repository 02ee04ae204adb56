"""
The sandbox's TCP relay: inside a C{credproxy run --sandbox}, whose network
namespace has only its own loopback, C{127.0.0.1:PORT} carries each
connection to the HTTP face's Unix socket bind-mounted into the sandbox, so
that C{ANTHROPIC_BASE_URL=http://127.0.0.1:PORT} works for clients that only
speak TCP.

The relay judges nothing: it holds no token and reads no request. Every
rule of the HTTP face (the peer uid, this run's placeholder key, paths,
sizes, deadlines) is applied by the face itself, outside the sandbox, to
the bytes the relay passes on. What the relay bounds is its own share: the
connections it keeps (the faces' L{ConnectionSlots}, in total and per
peer), the bytes in flight (each side is the other's streaming producer, as
in L{twisted.protocols.portforward}, so a slow reader pauses the other
side's reads instead of growing a buffer), the time a connect may take,
and how long a connection may go without a byte either way. A connection
it cannot carry gets an answer in the API's error shape, as the face's own
refusals, and is closed.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Final

from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.interfaces import IConnector, IDelayedCall, IHalfCloseableDescriptor
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from credproxy._limits import ConnectionLimits, ConnectionSlots, FloodLog, SlotRefusal, peer_key
from credproxy.http import ErrorKind
from credproxy.http._channel import (
    MAX_LINGERING_REFUSALS,
    NO_SLOT_LINGER_SECONDS,
    OVERLOADED_RETRY_AFTER,
)
from credproxy.http._errors import raw_error_response

log = Logger(namespace="credproxy.relay")

# A connect to a Unix socket on the same machine is answered at once or not
# at all; one that takes this long finds a face too busy to accept.
RELAY_CONNECT_TIMEOUT: Final = 10.0
# Longer than any deadline of the face's own (600 s to an answer's first
# byte, for long extended thinking), so the face, which answers with a
# status, always gives up first; this catches only a side gone silent.
RELAY_IDLE_TIMEOUT: Final = 900.0

_NO_SLOT: Final = {
    SlotRefusal.FACE_FULL: (
        "The sandbox's relay to credproxy is carrying as many connections as it may; retry shortly."
    ),
    SlotRefusal.PEER_FULL: (
        "This client holds as many connections to the sandbox's relay as one client may; "
        "close some or retry shortly."
    ),
}
UNREACHABLE: Final = "credproxy's HTTP socket does not answer in the sandbox."
CONNECT_TIMED_OUT: Final = "credproxy's HTTP socket did not accept the connection in time."


class RelayFactory(Factory):
    """
    The relay's listening side: the slots, the refusal log and the
    settings all its connections share.
    """

    def __init__(
        self,
        reactor: Any,
        socket_path: str,
        limits: ConnectionLimits,
        *,
        connect_timeout: float = RELAY_CONNECT_TIMEOUT,
        idle_timeout: float = RELAY_IDLE_TIMEOUT,
    ) -> None:
        if not (0 < connect_timeout < float("inf") and 0 < idle_timeout < float("inf")):
            raise ValueError("the relay's timeouts must be positive and finite")
        self.reactor = reactor
        self.socket_path = socket_path
        self.slots = ConnectionSlots(limits)
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.lingering = 0
        self.refusals = FloodLog(reactor, self._summarize)

    def buildProtocol(self, addr: Any) -> RelayServer | None:
        return RelayServer(self)

    def stopFactory(self) -> None:
        self.refusals.stop()

    def refused(self, outcome: str) -> None:
        """
        One log line per kind of refusal per second, however many there are.
        """
        suppressed = self.refusals.admit(outcome)
        if suppressed is None:
            return
        log.warn(
            "Relay refused a connection: {outcome}{more}",
            outcome=outcome,
            more=f" ({suppressed} more like it not logged)" if suppressed else "",
        )

    @staticmethod
    def _summarize(outcome: str, count: int) -> None:
        log.warn("Relay refused {count} more connections: {outcome}", count=count, outcome=outcome)


class RelayClient(Protocol):
    """
    The relay's connection to the face's Unix socket. Once it is made, each
    transport becomes the other's streaming producer (the wiring of
    L{twisted.protocols.portforward}), so a side whose writes back up
    pauses the other side's reads, and the agent's side starts reading.
    """

    def __init__(self, server: RelayServer) -> None:
        self.server = server

    def connectionMade(self) -> None:
        server = self.server
        if server.closed:
            # The agent went away while this connect was under way.
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        server.connected_to_face(self)
        mine: Any = self.transport
        theirs: Any = server.transport
        mine.registerProducer(theirs, True)
        theirs.registerProducer(mine, True)
        theirs.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        server = self.server
        server.touched()
        server.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.server.closed:
            self.server.transport.loseConnection()  # type: ignore[union-attr]


class _FaceConnector(ClientFactory):
    """
    Connects one agent connection to the face, and turns a failed connect
    into a refusal the agent can read.
    """

    def __init__(self, server: RelayServer) -> None:
        self.server = server

    def buildProtocol(self, addr: Any) -> RelayClient:
        return RelayClient(self.server)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.server.face_unreachable(reason)


class RelayServer(Protocol):
    """
    One agent connection on the relay's loopback port. Nothing it sends is
    read until the face has accepted its twin; then bytes pass both ways as
    they are, until either side closes or neither sends for
    L{RelayFactory.idle_timeout}.
    """

    peer: RelayClient | None = None
    closed = False
    _slot: Hashable | None = None
    _connector: IConnector | None = None
    _idle: IDelayedCall | None = None
    _linger: IDelayedCall | None = None
    _lingering = False
    _refused = False

    def __init__(self, relay: RelayFactory) -> None:
        self.relay = relay

    def connectionMade(self) -> None:
        relay = self.relay
        key = peer_key(self.transport)
        refusal = relay.slots.take(key)
        if refusal is not None:
            self.refuse(
                ErrorKind.OVERLOADED, _NO_SLOT[refusal], refusal, retry_after=OVERLOADED_RETRY_AFTER
            )
            return
        self._slot = key
        # Nothing is read from the agent until there is somewhere to send it.
        self.transport.pauseProducing()  # type: ignore[union-attr]
        self._idle = relay.reactor.callLater(relay.idle_timeout, self._went_idle)
        self._connector = relay.reactor.connectUNIX(
            relay.socket_path, _FaceConnector(self), timeout=relay.connect_timeout
        )

    def connected_to_face(self, client: RelayClient) -> None:
        self._connector = None
        self.peer = client
        self.touched()

    def face_unreachable(self, reason: Failure) -> None:
        self._connector = None
        if reason.check(ConnectTimeout):
            self.refuse(ErrorKind.TIMEOUT, CONNECT_TIMED_OUT, "connect_timeout")
        else:
            self.refuse(ErrorKind.API, UNREACHABLE, "face_unreachable")

    def touched(self) -> None:
        """
        A byte passed, one way or the other: the idle deadline starts again.
        """
        if self._idle is not None and self._idle.active():
            self._idle.reset(self.relay.idle_timeout)

    def dataReceived(self, data: bytes) -> None:
        if self.peer is None:
            return  # refused: what the agent still sends is dropped
        self.touched()
        self.peer.transport.write(data)  # type: ignore[union-attr]

    def _went_idle(self) -> None:
        self._idle = None
        self.relay.refused("idle_timeout")
        if self.peer is not None:
            self.peer.transport.abortConnection()  # type: ignore[union-attr]
        self.transport.abortConnection()  # type: ignore[union-attr]

    def refuse(
        self, kind: ErrorKind, message: str, outcome: str, *, retry_after: int | None = None
    ) -> None:
        """
        Answer in the API's error shape before any of the agent's bytes went
        anywhere, then stop sending and drop what it still sends, so that it
        reads the answer instead of a reset; closed when it closes, after a
        short linger, or at once when too many refusals linger already.
        """
        if self.closed or self._refused:
            return
        self._refused = True
        self._give_back()
        relay = self.relay
        relay.refused(outcome)
        transport: Any = self.transport
        transport.write(raw_error_response(kind, message, retry_after=retry_after))
        if relay.lingering >= MAX_LINGERING_REFUSALS or not IHalfCloseableDescriptor.providedBy(
            transport
        ):
            transport.loseConnection()
            return
        self._lingering = True
        relay.lingering += 1
        closing: Any = transport
        closing.resumeProducing()  # read, to notice the agent's close
        closing.loseWriteConnection()
        self._linger = relay.reactor.callLater(NO_SLOT_LINGER_SECONDS, closing.abortConnection)

    def _give_back(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        if self._slot is not None:
            self.relay.slots.give_back(self._slot)
            self._slot = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        self._give_back()
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
        if self._lingering:
            self._lingering = False
            self.relay.lingering -= 1
        if self._connector is not None:
            connector, self._connector = self._connector, None
            connector.stopConnecting()  # the face never sees this agent
        if self.peer is not None:
            peer, self.peer = self.peer, None
            peer.transport.loseConnection()  # type: ignore[union-attr]
