"""
The credential-socket server on a StringTransport with a Clock: send frames
or raw bytes as a client would, read back every frame it wrote.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHalfCloseableDescriptor
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from credproxy._secret import Secret
from credproxy.broker import Broker
from credproxy.stores import MemoryProviderKeyStore, MemoryTokenStore, Token
from credproxy.wire import CredentialServerFactory, CredentialServerProtocol
from tests.logcapture import captured_log, log_text

__all__ = ["captured_log", "log_text"]  # the wire tests import them from here

CAPABILITY = "ab" * 32
ACCESS = "access-0123456789abcdef"
REFRESH = "refresh-fedcba9876543210"
KEY = "sk-ant-key-0123456789"


def frame(message: Any) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode("utf-8")
    return struct.pack(">I", len(body)) + body


def handshake(version: int = 2, token: str | None = None) -> dict[str, Any]:
    payload: dict[str, Any] = {"minVersion": 1, "maxVersion": version}
    if token is not None:
        payload["capabilityToken"] = token
    return {"v": version, "op": "handshake", "payload": payload}


def request(request_id: str, op: str, **payload: Any) -> dict[str, Any]:
    return {"v": 2, "id": request_id, "op": op, "payload": payload}


@implementer(IHalfCloseableDescriptor)
class HalfCloseableTransport(StringTransport):
    """
    A StringTransport that records a half-close, as Unix sockets offer one.
    """

    write_closed = False

    def readConnectionLost(self, reason: Failure) -> None:
        pass

    def writeConnectionLost(self, reason: Failure) -> None:
        pass

    def getHandle(self) -> object:
        return None

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class _PeerCredHandle:
    """
    A Unix socket handle as far as SO_PEERCRED goes: the kernel says C{uid}.
    """

    family = socket.AF_UNIX

    def __init__(self, uid: int) -> None:
        self.uid = uid

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        assert (level, option) == (socket.SOL_SOCKET, socket.SO_PEERCRED)
        return struct.pack("3i", 4242, self.uid, self.uid)


class UnixPeerTransport(HalfCloseableTransport):
    """
    A half-closeable transport whose peer is a Unix process of C{uid}.
    """

    def __init__(self, uid: int) -> None:
        super().__init__()
        self._handle = _PeerCredHandle(uid)

    def getHandle(self) -> object:
        return self._handle


class Connection:
    """
    One server connection and the client's view of it. C{peer} is the TCP
    address it comes from; C{uid} makes it a Unix peer of that uid instead.
    """

    def __init__(
        self,
        capability_token: str | None = None,
        *,
        tokens: Any = None,
        keys: Any = None,
        clock: Clock | None = None,
        half_closeable: bool = False,
        factory: CredentialServerFactory | None = None,
        peer: str | None = None,
        uid: int | None = None,
    ) -> None:
        self.clock = clock or Clock()
        self.tokens: Any = tokens if tokens is not None else MemoryTokenStore()
        self.keys: Any = keys if keys is not None else MemoryProviderKeyStore()
        self.factory = factory or CredentialServerFactory(
            self.clock,
            Broker(self.clock, self.tokens, self.keys),
            Secret(capability_token) if capability_token is not None else None,
        )
        protocol = self.factory.buildProtocol(None)
        assert protocol is not None
        self.protocol: CredentialServerProtocol = protocol
        if uid is not None:
            self.transport: Any = UnixPeerTransport(uid)
        elif half_closeable:
            self.transport = HalfCloseableTransport()
        else:
            self.transport = StringTransport()
        if peer is not None:
            self.transport.peerAddr = IPv4Address("TCP", peer, 54321)
        self.protocol.makeConnection(self.transport)
        self._read = 0

    def send(self, *messages: Any) -> None:
        """
        Deliver C{messages} (dicts become frames, bytes go as they are) in one read.
        """
        self.protocol.dataReceived(
            b"".join(m if isinstance(m, bytes) else frame(m) for m in messages)
        )

    def replies(self) -> list[dict[str, Any]]:
        """
        Every frame written since the last call, decoded (each must be whole).
        """
        data = self.transport.value()[self._read :]
        self._read = len(self.transport.value())
        found = []
        while data:
            assert len(data) >= 4, "a partial frame header was written"
            (length,) = struct.unpack(">I", data[:4])
            assert len(data) >= 4 + length, "a partial frame was written"
            found.append(json.loads(data[4 : 4 + length]))
            data = data[4 + length :]
        return found

    def raw_replies(self) -> bytes:
        data: bytes = self.transport.value()[self._read :]
        self._read = len(self.transport.value())
        return data

    def reply(self) -> dict[str, Any]:
        (only,) = self.replies()
        return only

    def open(self, version: int = 2, token: str | None = None) -> Connection:
        self.send(handshake(version, token))
        answer = self.reply()
        assert answer["ok"] is True, answer
        return self

    def ask(self, request_id: str, op: str, **payload: Any) -> dict[str, Any]:
        self.send(request(request_id, op, **payload))
        return self.reply()

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    @property
    def aborted(self) -> bool:
        return bool(self.transport.disconnected)

    def lose(self) -> None:
        self.protocol.connectionLost(None)


def seed(tokens: MemoryTokenStore, keys: MemoryProviderKeyStore) -> None:
    token = Token(
        {
            "access_token": ACCESS,
            "refresh_token": REFRESH,
            "expiry": 1900000000,
            "token_type": "Bearer",
            "scope": None,
            "resource_url": "https://example.test",
        }
    )
    tokens.save_token("anthropic", token)
    tokens.save_token("anthropic", token, "work")
    keys.save_key("anthropic", Secret(KEY))
