"""
In-process decode rates for the wire benchmark: a long stream of small
C{get_token} request frames fed to a L{CredentialServerProtocol} over a
L{StringTransport} (each answered at once from a memory store), and, for
comparison, the same bytes through bare framing and JSON decoding.

The server cuts off a peer that sends more than 100 frames in one read, so
the stream is cut into chunks of exactly 100 frames' worth of bytes, at
arbitrary offsets (as socket reads fall): every chunk completes exactly 100
frames, and most end inside a frame.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.basic import Int32StringReceiver

from credproxy.broker import Broker
from credproxy.stores import IHostTokenStore, MemoryProviderKeyStore, MemoryTokenStore, Token
from credproxy.wire import CredentialServerFactory
from credproxy.wire._codec import decode_json_object
from credproxy.wire._spec import MAX_FRAMES_PER_READ

HANDSHAKE = {"v": 2, "op": "handshake", "payload": {"minVersion": 1, "maxVersion": 2}}
PROVIDER = "anthropic"


def frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return len(body).to_bytes(4, "big") + body


def request_id(n: int) -> str:
    # uuid4-shaped and fixed-width, so every frame (and answer) has one length
    return f"{n:08x}-0000-4000-8000-{n:012x}"


def request_stream(count: int) -> tuple[bytes, int]:
    """
    C{count} concatenated get_token frames with unique ids, and the length of one.
    """
    frames = [
        frame({"v": 2, "id": request_id(n), "op": "get_token", "payload": {"provider": PROVIDER}})
        for n in range(count)
    ]
    assert len({len(f) for f in frames}) == 1
    return b"".join(frames), len(frames[0])


def chunks(stream: bytes, size: int) -> list[bytes]:
    return [stream[i : i + size] for i in range(0, len(stream), size)]


@dataclass
class DecodeRate:
    bytes_fed: int
    frames: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.bytes_fed / self.seconds / 1e6

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds


def server_rate(
    pieces: list[bytes],
    frame_len: int,
    budget: float,
    token: Token,
    *,
    tokens: IHostTokenStore | None = None,
) -> DecodeRate:
    """
    Feed C{pieces} to one handshaken server connection until they run out or
    C{budget} seconds pass; check every request got its C{ok} answer.

    The broker's token store is a memory store holding C{token}, or
    C{tokens}, which must already hold it and answer at once (a file store
    over inline calls, for instance).
    """
    if tokens is None:
        tokens = MemoryTokenStore()
        tokens.save_token(PROVIDER, token)
    clock = Clock()
    factory = CredentialServerFactory(clock, Broker(clock, tokens, MemoryProviderKeyStore()))
    protocol = factory.buildProtocol(None)
    assert protocol is not None
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(frame(HANDSHAKE))
    reply = json.loads(transport.value()[4:])
    assert reply["ok"] is True and reply["data"]["version"] == 2, reply
    transport.clear()

    # The first piece, checked in full, also gives the length of one answer.
    protocol.dataReceived(pieces[0])
    out = transport.value()
    transport.clear()
    answers = []
    while out:
        length = int.from_bytes(out[:4], "big")
        answers.append(json.loads(out[4 : 4 + length]))
        out = out[4 + length :]
    assert len(answers) == MAX_FRAMES_PER_READ, len(answers)
    for n, answer in enumerate(answers):
        assert answer["id"] == request_id(n) and answer["ok"] is True, answer
        assert "refresh_token" not in answer["data"], "refresh token leaked"
    answer_len = len(frame(answers[0]))

    fed = written = 0
    started = time.perf_counter()
    deadline = started + budget
    for piece in pieces[1:]:
        protocol.dataReceived(piece)
        written += len(transport.value())
        transport.clear()
        fed += len(piece)
        if time.perf_counter() > deadline:
            break
    elapsed = time.perf_counter() - started
    assert not transport.disconnecting, "the server closed the connection"
    frames = (len(pieces[0]) + fed) // frame_len - MAX_FRAMES_PER_READ
    assert written == frames * answer_len, (written, frames, answer_len)
    return DecodeRate(fed, frames, elapsed)


class _JustDecode(Int32StringReceiver):
    MAX_LENGTH = 4 * 1024 * 1024

    def __init__(self) -> None:
        self.count = 0

    def stringReceived(self, string: bytes) -> None:
        decode_json_object(string)
        self.count += 1


def framing_rate(pieces: list[bytes], frame_len: int, budget: float) -> DecodeRate:
    """
    The same bytes through Int32StringReceiver and credproxy's JSON decoding only.
    """
    protocol = _JustDecode()
    protocol.makeConnection(StringTransport())
    fed = 0
    started = time.perf_counter()
    deadline = started + budget
    for piece in pieces:
        protocol.dataReceived(piece)
        fed += len(piece)
        if time.perf_counter() > deadline:
            break
    elapsed = time.perf_counter() - started
    assert protocol.count == fed // frame_len, (protocol.count, fed // frame_len)
    return DecodeRate(fed, protocol.count, elapsed)
