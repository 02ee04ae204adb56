"""
The credential socket under exhaustion on a real Unix socket, with small
limits so the tests are fast (4 pending handshakes, 8 connections, 8 per
peer): silent connections filling the pending pool do not keep a real client
from handshaking and being answered; a newcomer to a full face reads the
refusal frame and an EOF at once, and the real clients raise its code; and
closed connections give their slots back.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from credproxy._limits import ConnectionLimits
from credproxy._listen import unix_description
from credproxy._secret import Secret
from credproxy.broker import Broker
from credproxy.stores import MemoryProviderKeyStore, MemoryTokenStore, Token
from credproxy.wire import (
    BlockingProxySocketClient,
    ProxyRequestError,
    ProxySocketClient,
    RPCFace,
)
from tests.integration.raw_wire import connect, frames

API_KEY = "sk-ant-exhaustion-key-0123456789"
ACCESS = "access-exhaustion-0123456789abcdef"
HELLO = {"v": 2, "op": "handshake", "payload": {"minVersion": 1, "maxVersion": 2}}
FACE_FULL = {
    "v": 2,
    "op": "handshake",
    "ok": False,
    "code": "RESOURCE_EXHAUSTED",
    "error": "Too many connections",
}
PENDING_FULL = {**FACE_FULL, "error": "Too many connections waiting for a handshake"}


def _frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return struct.pack(">I", len(body)) + body


def _read_to_eof(sock: socket.socket) -> tuple[list[dict[str, Any]], float]:
    """
    Every frame until EOF, and how long the EOF took.
    """
    started = time.monotonic()
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return frames(data), time.monotonic() - started


def _handshaken(path: str) -> socket.socket:
    sock = connect(path)
    sock.sendall(_frame(HELLO))
    data = b""
    while not frames(data):
        chunk = sock.recv(65536)
        assert chunk, "closed before the handshake reply"
        data += chunk
    assert frames(data)[0]["ok"] is True, data
    return sock


async def _until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await deferLater(reactor, 0.01)


StartFace = Callable[..., Awaitable[tuple[RPCFace, str]]]


@pytest_twisted.async_yield_fixture
async def start_face(socket_dir: str) -> AsyncIterator[StartFace]:
    """
    C{await start_face(**limits)}: a face with a key and a token stored,
    small limits, and its socket path; stopped after the test.
    """
    faces: list[RPCFace] = []

    async def start(
        max_pending_handshakes: int = 4, max_connections: int = 8, max_per_peer: int = 8
    ) -> tuple[RPCFace, str]:
        tokens, keys = MemoryTokenStore(), MemoryProviderKeyStore()
        await keys.save_key("anthropic", Secret(API_KEY))
        await tokens.save_token("anthropic", Token({"access_token": ACCESS, "expiry": 1900000000}))
        path = os.path.join(socket_dir, f"cred{len(faces)}.sock")
        face = RPCFace(
            reactor,
            [unix_description(path)],
            Broker(reactor, tokens, keys),
            limits=ConnectionLimits(max_connections=max_connections, max_per_peer=max_per_peer),
            max_pending_handshakes=max_pending_handshakes,
        )
        face.startService()
        faces.append(face)
        return face, path

    try:
        yield start
    finally:
        for face in faces:
            if face.running:
                await face.stopService()


@pytest_twisted.ensureDeferred
async def test_silent_connections_do_not_keep_a_real_client_out(start_face: StartFace) -> None:
    face, path = await start_face()
    factory = face.factory
    silent = [await deferToThread(connect, path) for _ in range(6)]
    client = ProxySocketClient(reactor, path)
    try:
        await _until(lambda: len(factory.connections) == 6)
        assert factory.pending_handshakes == 4
        assert factory.slots.total == 0  # silent connections hold no slot
        started = time.monotonic()
        assert await client.request("get_api_key", {"name": "anthropic"}) == {"key": API_KEY}
        token = await client.request("get_token", {"provider": "anthropic"})
        assert token["access_token"] == ACCESS
        assert time.monotonic() - started < 2
        assert factory.slots.total == 1
        # The client made room by evicting a silent one, then left the pool.
        assert factory.pending_handshakes == 3
        # The oldest silent connections made room: each read why, then EOF.
        evicted = [await deferToThread(_read_to_eof, sock) for sock in silent[:3]]
        assert [frames for frames, _ in evicted] == [[PENDING_FULL]] * 3
    finally:
        await client.close()
        for sock in silent:
            sock.close()
    await _until(lambda: not factory.connections)
    assert (factory.pending_handshakes, factory.slots.total, factory.lingering_refusals) == (
        0,
        0,
        0,
    )


@pytest_twisted.ensureDeferred
async def test_a_full_face_answers_a_newcomer_at_once_and_slots_come_back(
    start_face: StartFace,
) -> None:
    face, path = await start_face()
    factory = face.factory
    held = [await deferToThread(_handshaken, path) for _ in range(8)]
    client = ProxySocketClient(reactor, path)
    blocking = BlockingProxySocketClient(path, request_timeout=5)
    try:
        await _until(lambda: factory.slots.total == 8)

        def newcomer() -> tuple[list[dict[str, Any]], float]:
            with connect(path) as sock:
                sock.sendall(_frame(HELLO))
                return _read_to_eof(sock)

        frames, waited = await deferToThread(newcomer)
        assert frames == [FACE_FULL]
        assert waited < 2  # the half-close is an EOF at once, not the 3 s hard close

        started = time.monotonic()
        with pytest.raises(ProxyRequestError) as refused:
            await client.request("get_api_key", {"name": "anthropic"})
        assert refused.value.code == "RESOURCE_EXHAUSTED"
        assert refused.value.message == "Too many connections"
        with pytest.raises(ProxyRequestError) as blocked:
            await deferToThread(blocking.request, "get_api_key", {"name": "anthropic"})
        assert blocked.value.code == "RESOURCE_EXHAUSTED"
        assert time.monotonic() - started < 2  # answered, not left to time out
        assert factory.slots.total == 8

        for sock in held[:2]:
            sock.close()
        await _until(lambda: factory.slots.total == 6)
        assert await client.request("get_api_key", {"name": "anthropic"}) == {"key": API_KEY}
        answer = await deferToThread(blocking.request, "get_api_key", {"name": "anthropic"})
        assert answer == {"key": API_KEY}
        assert factory.slots.total == 8
    finally:
        await client.close()
        blocking.close()
        for sock in held:
            sock.close()
    await _until(lambda: not factory.connections)
    assert (factory.pending_handshakes, factory.slots.total, factory.lingering_refusals) == (
        0,
        0,
        0,
    )


@pytest_twisted.ensureDeferred
async def test_one_peer_is_held_to_its_own_limit(start_face: StartFace) -> None:
    face, path = await start_face(max_per_peer=2)
    factory = face.factory
    held = [await deferToThread(_handshaken, path) for _ in range(2)]
    try:

        def newcomer() -> list[dict[str, Any]]:
            with connect(path) as sock:
                return _read_to_eof(sock)[0]

        assert await deferToThread(newcomer) == [
            {**FACE_FULL, "error": "Too many connections from this peer"}
        ]
        assert factory.slots.held_by(("uid", os.getuid())) == 2
    finally:
        for sock in held:
            sock.close()
    await _until(lambda: not factory.connections)
    assert factory.slots.total == 0
