"""
The credential socket on a real Unix socket: a refused handshake the client
can still read, a shutdown that ends every connection before the socket file
goes, a peer of another uid, and the connection limit.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from credproxy._listen import unix_description
from credproxy._secret import Secret
from credproxy.broker import Broker
from credproxy.stores import MemoryProviderKeyStore, MemoryTokenStore
from credproxy.wire import RPCFace, RPCFaceConfigError
from tests.integration.raw_wire import connect, frames

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"
CAPABILITY = "9c" * 32


def _frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return struct.pack(">I", len(body)) + body


def _read_all(sock: socket.socket) -> tuple[bytes, float]:
    """
    Everything until EOF, and how long the EOF took.
    """
    started = time.monotonic()
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic() - started


def _broker() -> Broker:
    return Broker(reactor, MemoryTokenStore(), MemoryProviderKeyStore())


def _start(path: str, token: Secret | None = None) -> RPCFace:
    face = RPCFace(reactor, [unix_description(path)], _broker(), token)
    face.startService()
    return face


@pytest_twisted.ensureDeferred
async def test_refused_handshake_is_readable_then_eof(socket_dir: str) -> None:
    path = os.path.join(socket_dir, "cred.sock")
    face = _start(path, Secret(CAPABILITY))
    try:

        def exchange() -> tuple[bytes, float]:
            with connect(path) as sock:
                sock.sendall(
                    _frame({"v": 2, "op": "handshake", "payload": {"capabilityToken": "x"}})
                )
                sock.sendall(_frame({"v": 2, "id": "a", "op": "get_token", "payload": {}}))
                return _read_all(sock)

        data, waited = await deferToThread(exchange)
        assert frames(data) == [
            {
                "v": 2,
                "op": "handshake",
                "ok": False,
                "code": "UNAUTHORIZED",
                "error": "Invalid or missing capability token",
            }
        ]
        assert waited < 2  # the half-close is an EOF at once, not the 3 s hard close
    finally:
        await face.stopService()


@pytest_twisted.ensureDeferred
async def test_stop_ends_connections_before_removing_the_socket(socket_dir: str) -> None:
    path = os.path.join(socket_dir, "cred.sock")
    face = _start(path)
    seen_at_close: list[bool] = []
    original = face.factory.connection_lost

    def noting(connection: Any) -> None:
        seen_at_close.append(os.path.exists(path))
        original(connection)

    face.factory.connection_lost = noting  # type: ignore[method-assign]
    socks = []
    for _ in range(3):
        sock = await deferToThread(connect, path)
        sock.sendall(
            _frame({"v": 2, "op": "handshake", "payload": {"minVersion": 1, "maxVersion": 2}})
        )
        socks.append(sock)
    while len(face.factory.connections) < 3 or any(
        c.version is None for c in face.factory.connections
    ):
        await _sleep(0.01)
    readers = [deferToThread(_read_all, s) for s in socks]
    started = time.monotonic()
    await face.stopService()
    stopped_in = time.monotonic() - started
    results = [await r for r in readers]
    for sock in socks:
        sock.close()
    assert [len(frames(data)) for data, _ in results] == [1, 1, 1]  # the handshake reply, then EOF
    assert seen_at_close == [True, True, True]
    assert not os.path.exists(path)
    assert stopped_in < 1.0


@pytest_twisted.ensureDeferred
async def test_stop_hard_closes_a_peer_that_never_reads(socket_dir: str) -> None:
    path = os.path.join(socket_dir, "cred.sock")
    keys = MemoryProviderKeyStore()
    await keys.save_key("big", Secret("k" * (3 * 1024 * 1024)))
    face = RPCFace(reactor, [unix_description(path)], Broker(reactor, MemoryTokenStore(), keys))
    face.startService()
    sock = await deferToThread(connect, path)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(
            _frame({"v": 2, "op": "handshake", "payload": {"minVersion": 1, "maxVersion": 2}})
        )
        for i in range(4):  # answers far larger than the socket buffers, never read
            sock.sendall(
                _frame({"v": 2, "id": f"k{i}", "op": "get_api_key", "payload": {"name": "big"}})
            )
        while not face.factory.connections or next(iter(face.factory.connections)).version is None:
            await _sleep(0.01)
        await _sleep(0.2)
        started = time.monotonic()
        await face.stopService()
        took = time.monotonic() - started
        assert 2.5 < took < 5
        assert not os.path.exists(path)
    finally:
        sock.close()


@pytest_twisted.ensureDeferred
async def test_restarted_face_serves_the_same_path(socket_dir: str) -> None:
    path = os.path.join(socket_dir, "cred.sock")
    face = _start(path)
    await face.stopService()
    face.startService()
    try:

        def ask() -> list[dict[str, Any]]:
            with connect(path) as sock:
                sock.sendall(_frame({"v": 1, "op": "handshake"}))
                sock.sendall(_frame({"v": 1, "id": "1", "op": "list_providers"}))
                data = b""
                while len(frames(data)) < 2:
                    data += sock.recv(65536)
                return frames(data)

        replies = await deferToThread(ask)
        assert replies[1] == {"id": "1", "ok": True, "data": {"providers": []}}
    finally:
        await face.stopService()


def test_tcp_without_a_capability_token_is_refused() -> None:
    with pytest.raises(RPCFaceConfigError, match="without a capability token"):
        RPCFace(
            reactor,
            ["tcp:port=0:interface=127.0.0.1"],
            _broker(),
        )


PEER_CLIENT = """
import json, socket, struct, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
hello = {"v": 2, "op": "handshake", "payload": {"minVersion": 1, "maxVersion": 2}}
body = json.dumps(hello).encode()
data = b""
try:
    s.sendall(struct.pack(">I", len(body)) + body)
    while chunk := s.recv(65536):
        data += chunk
        if len(data) >= 4 and len(data) >= 4 + struct.unpack(">I", data[:4])[0]:
            break
except OSError:
    pass  # reset by the server
print("answered" if data else "closed")
"""


def _as_nobody(path: str) -> str:
    result = subprocess.run(
        [SYSTEM_PYTHON, "-c", PEER_CLIENT, path],
        user=NOBODY,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return result.stdout.strip()


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON),
    reason="needs root and a system python3 to act as another uid",
)
@pytest_twisted.ensureDeferred
async def test_peer_of_another_uid_is_closed_unless_allowed(socket_dir: str) -> None:
    path = os.path.join(socket_dir, "cred.sock")
    for allowed, expected in ((frozenset(), "closed"), (frozenset({NOBODY}), "answered")):
        face = RPCFace(
            reactor,
            [unix_description(path)],
            _broker(),
            allowed_uids=allowed,
        )
        face.startService()
        try:
            os.chmod(socket_dir, 0o755)  # noqa: S103 - the test's own throwaway directory
            os.chmod(path, 0o666)  # noqa: S103 - so the kernel check, not the mode, decides
            assert await deferToThread(_as_nobody, path) == expected
        finally:
            await face.stopService()


def _sleep(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d
