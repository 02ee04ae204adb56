"""
An in-memory server side for the credential-socket client tests: an endpoint
whose connections are StringTransports, and a fake server per connection that
reads the client's frames and writes answers, byte-exact.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer


def frame(message: Any) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode("utf-8")
    return struct.pack(">I", len(body)) + body


def split_frames(data: bytes) -> list[bytes]:
    bodies = []
    while data:
        (length,) = struct.unpack(">I", data[:4])
        bodies.append(data[4 : 4 + length])
        data = data[4 + length :]
    return bodies


class FakeServerConnection:
    """
    The server end of one client connection.
    """

    def __init__(self, protocol: IProtocol, transport: StringTransport) -> None:
        self.protocol = protocol
        self.transport = transport
        self.closed = False

    def raw(self) -> bytes:
        """
        Every byte the client wrote since the last read.
        """
        data: bytes = self.transport.value()
        self.transport.clear()
        return data

    def read(self) -> list[dict[str, Any]]:
        """
        The frames the client wrote since the last read, decoded.
        """
        return [json.loads(body) for body in split_frames(self.raw())]

    def send(self, message: Any) -> None:
        self.protocol.dataReceived(frame(message))

    def send_bytes(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def accept(self, version: int = 2) -> dict[str, Any]:
        """
        Read the handshake and accept it at C{version}; the handshake frame.
        """
        (handshake,) = self.read()
        self.send({"v": version, "op": "handshake", "ok": True, "data": {"version": version}})
        return handshake

    def answer(self, request: dict[str, Any], data: dict[str, Any] | None = None) -> None:
        self.send({"id": request["id"], "ok": True, "data": data or {}})

    def refuse(self, request: dict[str, Any], code: str, error: str) -> None:
        self.send({"id": request["id"], "ok": False, "code": code, "error": error})

    @property
    def client_closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def deliver_close(self) -> None:
        """
        What the reactor does after the client asked to close: tell it the
        connection is gone.
        """
        assert self.client_closed
        self.drop()

    def drop(self) -> None:
        """
        The server end goes away (server stopped, socket closed).
        """
        if not self.closed:
            self.closed = True
            self.protocol.connectionLost(Failure(ConnectionDone()))


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """
    Connects at once to a fresh StringTransport (or refuses, when told to).
    """

    def __init__(self) -> None:
        self.connections: list[FakeServerConnection] = []
        self.refuse = False

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        if self.refuse:
            return fail(ConnectionRefusedError())
        protocol = protocolFactory.buildProtocol(None)  # type: ignore[arg-type]
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.connections.append(FakeServerConnection(protocol, transport))
        return succeed(protocol)

    @property
    def last(self) -> FakeServerConnection:
        return self.connections[-1]
