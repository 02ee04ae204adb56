"""
The sandbox's relay on real sockets: a side that stops reading stops the
relay reading the other side, so what a client can push into it is what
the kernel's socket buffers hold, not what the relay's memory would.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.threads import deferToThread

from credproxy._limits import ConnectionLimits
from credproxy._relay import RelayFactory

# Far more than the kernel buffers on both sockets together (a few MiB on
# loopback TCP with autotuning, a few hundred KiB on a Unix socket).
OFFERED = 64 * 1024 * 1024
BOUND = 24 * 1024 * 1024
CHUNK = 256 * 1024
# How long a writer keeps finding no room before it calls the pipe full.
STALLED = 1.0


@dataclass
class Relay:
    port: int
    face: socket.socket  # the stand-in for the HTTP face's Unix socket, listening


@pytest_twisted.async_yield_fixture
async def relay(socket_dir: str) -> AsyncIterator[Relay]:
    path = os.path.join(socket_dir, "face.sock")
    face = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    face.bind(path)
    face.listen(4)
    factory = RelayFactory(reactor, path, ConnectionLimits(4, 4))
    port: IListeningPort = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[arg-type]
    try:
        yield Relay(port.getHost().port, face)  # type: ignore[attr-defined]
    finally:
        await maybeDeferred(port.stopListening)
        face.close()


def push_until_full(sock: socket.socket) -> int:
    """
    Write to C{sock} until it has had no room for L{STALLED} seconds, or
    L{OFFERED} bytes went: how many went.
    """
    sock.setblocking(False)
    chunk = b"\x5a" * CHUNK
    sent = 0
    stalled_since: float | None = None
    while sent < OFFERED:
        try:
            sent += sock.send(chunk)
            stalled_since = None
        except BlockingIOError:
            now = time.monotonic()
            if stalled_since is None:
                stalled_since = now
            elif now - stalled_since > STALLED:
                break
            time.sleep(0.01)
    return sent


def agent_pushes_to_a_face_that_never_reads(relay: Relay) -> int:
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as agent:
        relay.face.settimeout(10)
        face_side, _ = relay.face.accept()
        with face_side:
            return push_until_full(agent)


def face_pushes_to_an_agent_that_never_reads(relay: Relay) -> int:
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10):
        relay.face.settimeout(10)
        face_side, _ = relay.face.accept()
        with face_side:
            return push_until_full(face_side)


@pytest_twisted.ensureDeferred
async def test_an_agent_cannot_push_more_than_the_buffers_into_a_face_that_does_not_read(
    relay: Relay,
) -> None:
    sent = await deferToThread(agent_pushes_to_a_face_that_never_reads, relay)
    assert 0 < sent < BOUND


@pytest_twisted.ensureDeferred
async def test_a_face_cannot_push_more_than_the_buffers_to_an_agent_that_does_not_read(
    relay: Relay,
) -> None:
    sent = await deferToThread(face_pushes_to_an_agent_that_never_reads, relay)
    assert 0 < sent < BOUND
