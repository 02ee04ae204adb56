"""
Connections that send at once, on real sockets: a write to an idle
connection is in the peer's socket before the reactor turns; what the
socket does not take is queued and sent in order; producers, closing and a
reset peer behave as with Twisted's own transports.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import pytest_twisted
from twisted.internet import reactor, tcp, unix
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    UNIXClientEndpoint,
    UNIXServerEndpoint,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer, IReactorTCP, IReactorTime, IReactorUNIX
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from zope.interface import implementer

from credproxy._transports import (
    LeanReactor,
    LeanTCPClient,
    LeanTCPServer,
    LeanUNIXClient,
    LeanUNIXServer,
    lean_reactor,
)

WAIT = 10.0
CONNECTION_DONE = Failure(ConnectionDone())


class Recorder(Protocol):
    def __init__(self) -> None:
        self.received = bytearray()
        self.made: Deferred[Recorder] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def connectionMade(self) -> None:
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = CONNECTION_DONE) -> None:
        self.reason = reason
        self.lost.callback(None)


@dataclass
class Served:
    """A listener on the wrapped reactor and what its connections made."""

    path: str
    protocols: list[Recorder] = field(default_factory=list)
    made: list[Deferred[Recorder]] = field(default_factory=list)

    def factory(self) -> Factory:
        served = self

        class _Factory(Factory):
            def buildProtocol(self, addr: object) -> Recorder:
                protocol = Recorder()
                served.protocols.append(protocol)
                if served.made:
                    protocol.made.chainDeferred(served.made.pop(0))
                return protocol

        return _Factory()

    def next_connection(self) -> Deferred[Recorder]:
        d: Deferred[Recorder] = Deferred()
        self.made.append(d)
        return d


@pytest_twisted.async_yield_fixture
async def served(socket_dir: str) -> AsyncIterator[Served]:
    path = os.path.join(socket_dir, "s.sock")
    result = Served(path)
    port = await UNIXServerEndpoint(lean_reactor(reactor), path).listen(result.factory())
    try:
        yield result
    finally:
        await maybeDeferred(port.stopListening)


async def _accepted(served: Served) -> tuple[socket.socket, Recorder]:
    made = served.next_connection()
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        peer.connect(served.path)
    protocol = await made.addTimeout(WAIT, reactor)
    return peer, protocol


def _drain(peer: socket.socket) -> bytes:
    got = bytearray()
    while True:
        try:
            piece = peer.recv(1 << 20)
        except BlockingIOError:
            return bytes(got)
        if not piece:
            return bytes(got)
        got += piece


async def _read_until(peer: socket.socket, size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        got += _drain(peer)
        if len(got) < size:
            await _sleep(0.005)
    return bytes(got)


def _sleep(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


@pytest_twisted.ensureDeferred
async def test_a_write_to_an_idle_connection_is_in_the_peers_socket_when_write_returns(
    served: Served,
) -> None:
    peer, protocol = await _accepted(served)
    try:
        assert isinstance(protocol.transport, LeanUNIXServer)
        protocol.transport.write(b"first")
        protocol.transport.writeSequence([b"-", b"second"])
        # No reactor turn since: Twisted's own transport would still hold both.
        assert _drain(peer) == b"first-second"
        assert not protocol.transport.dataBuffer and not protocol.transport._tempDataLen
    finally:
        peer.close()


@pytest_twisted.ensureDeferred
async def test_what_the_socket_does_not_take_is_queued_and_sent_in_order(
    served: Served,
) -> None:
    peer, protocol = await _accepted(served)
    try:
        transport = protocol.transport
        assert isinstance(transport, LeanUNIXServer)
        rng = random.Random(7)
        pieces = [bytes([i % 251]) * rng.randrange(1, 300_000) for i in range(40)]
        for i, piece in enumerate(pieces):
            if i % 3:
                transport.write(piece)
            else:
                transport.writeSequence([piece[:10], piece[10:]])
        assert transport._tempDataLen or transport.dataBuffer  # the socket filled: queued
        expected = b"".join(pieces)
        assert await _read_until(peer, len(expected)) == expected
    finally:
        peer.close()


@implementer(IPushProducer)
class CountingProducer:
    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        pass


@pytest_twisted.ensureDeferred
async def test_a_streaming_producer_is_paused_when_the_queue_passes_its_bound(
    served: Served,
) -> None:
    peer, protocol = await _accepted(served)
    try:
        transport = protocol.transport
        assert isinstance(transport, FileDescriptor)
        producer = CountingProducer()
        transport.registerProducer(producer, True)
        written = 0
        while not producer.paused:
            transport.write(b"p" * 65536)
            written += 65536
            assert written < 64 * 1024 * 1024, "never paused"
        assert producer.resumed == 0
        await _read_until(peer, written)
        for _ in range(200):
            if producer.resumed:
                break
            await _sleep(0.01)
        assert producer.resumed == 1
        transport.unregisterProducer()
    finally:
        peer.close()


@pytest_twisted.ensureDeferred
async def test_lose_connection_after_a_sent_write_closes_after_it(served: Served) -> None:
    peer, protocol = await _accepted(served)
    try:
        assert protocol.transport is not None
        protocol.transport.write(b"last words")
        protocol.transport.loseConnection()
        await protocol.lost.addTimeout(WAIT, reactor)
        assert _drain(peer) == b"last words"
        assert peer.recv(10) == b""  # the end, after the words
    finally:
        peer.close()


@pytest_twisted.ensureDeferred
async def test_a_write_to_a_reset_connection_loses_it_without_raising(served: Served) -> None:
    peer, protocol = await _accepted(served)
    peer.close()  # the peer is gone; the write finds out
    assert protocol.transport is not None
    for _ in range(3):
        protocol.transport.write(b"x" * 100_000)
    await protocol.lost.addTimeout(WAIT, reactor)
    assert protocol.reason is not None


@pytest_twisted.ensureDeferred
async def test_nothing_is_sent_after_the_write_side_is_closed(served: Served) -> None:
    peer, protocol = await _accepted(served)
    try:
        transport = protocol.transport
        assert transport is not None
        transport.write(b"before")
        transport.loseWriteConnection()  # type: ignore[attr-defined]
        await _sleep(0.05)
        transport.write(b"after")
        await _sleep(0.05)
        assert _drain(peer) == b"before"
    finally:
        peer.close()


@pytest_twisted.ensureDeferred
async def test_outgoing_connections_lean_reactor_through_twisteds_endpoints(
    served: Served,
) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    wrapped = lean_reactor(reactor)
    try:
        for endpoint in (
            TCP4ClientEndpoint(wrapped, "127.0.0.1", port),
            HostnameEndpoint(wrapped, b"localhost", port),
        ):
            protocol: Recorder = await endpoint.connect(Factory.forProtocol(Recorder))  # type: ignore[assignment]
            accepted, _ = listener.accept()
            try:
                assert isinstance(protocol.transport, LeanTCPClient)
                protocol.transport.write(b"hello")
                accepted.settimeout(WAIT)
                assert accepted.recv(10) == b"hello"
            finally:
                protocol.transport.abortConnection()  # type: ignore[union-attr]
                accepted.close()
        unix_client = await UNIXClientEndpoint(wrapped, served.path).connect(
            Factory.forProtocol(Recorder)
        )
        assert isinstance(unix_client.transport, LeanUNIXClient)
        unix_client.transport.loseConnection()
    finally:
        listener.close()


@pytest_twisted.ensureDeferred
async def test_tcp_listeners_accept_connections_that_lean_reactor() -> None:
    made: Deferred[Recorder] = Deferred()

    class _Factory(Factory):
        def buildProtocol(self, addr: object) -> Recorder:
            protocol = Recorder()
            protocol.made.chainDeferred(made)
            return protocol

    port = lean_reactor(reactor).listenTCP(0, _Factory(), interface="127.0.0.1")
    peer = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=WAIT)
    try:
        protocol = await made.addTimeout(WAIT, reactor)
        assert isinstance(protocol.transport, LeanTCPServer)
        protocol.transport.write(b"tcp")
        assert peer.recv(10) == b"tcp"
    finally:
        peer.close()
        await maybeDeferred(port.stopListening)


def test_the_wrapper_provides_what_the_reactor_provides() -> None:
    wrapped = lean_reactor(reactor)
    assert isinstance(wrapped, LeanReactor)
    for interface in (IReactorTCP, IReactorUNIX, IReactorTime):
        assert interface.providedBy(wrapped)
    assert wrapped.seconds() == pytest.approx(reactor.seconds(), abs=1.0)
    assert lean_reactor(wrapped) is wrapped  # not wrapped twice


def test_a_reactor_that_is_not_twisteds_posix_one_is_left_as_it_is() -> None:
    memory = MemoryReactorClock()
    assert lean_reactor(memory) is memory


def test_the_private_twisted_names_it_leans_on_exist() -> None:
    transport = FileDescriptor()
    for name in ("dataBuffer", "_tempDataLen", "_writeDisconnected"):
        assert hasattr(transport, name), name
    assert tcp.Port.transport is tcp.Server and unix.Port.transport is unix.Server
    assert callable(tcp.Connector._makeTransport) and callable(unix.Connector._makeTransport)
    assert "_sendmsgQueue" in unix._SendmsgMixin.__init__.__code__.co_names


@pytest_twisted.ensureDeferred
async def test_a_pause_undone_before_a_read_never_leaves_the_read_set(served: Served) -> None:
    peer, protocol = await _accepted(served)
    try:
        transport = protocol.transport
        assert isinstance(transport, LeanUNIXServer)
        reads = reactor._reads
        assert transport.fileno() in reads
        transport.pauseProducing()
        assert transport.fileno() in reads  # only noted
        transport.resumeProducing()
        assert transport.fileno() in reads
        peer.send(b"after")
        for _ in range(200):
            if protocol.received:
                break
            await _sleep(0.005)
        assert protocol.received == b"after"
    finally:
        peer.close()


@pytest_twisted.ensureDeferred
async def test_nothing_is_delivered_while_paused_and_all_of_it_after(served: Served) -> None:
    peer, protocol = await _accepted(served)
    try:
        transport = protocol.transport
        assert isinstance(transport, LeanUNIXServer)
        transport.pauseProducing()
        peer.send(b"while paused")
        await _sleep(0.1)  # the read came: the pause took effect instead
        assert protocol.received == b""
        assert transport.fileno() not in reactor._reads
        transport.resumeProducing()
        for _ in range(200):
            if protocol.received:
                break
            await _sleep(0.005)
        assert protocol.received == b"while paused"
    finally:
        peer.close()
