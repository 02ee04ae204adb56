"""
A lean load generator for the credential socket: plain blocking sockets and
one epoll loop, no framework, so the server is what the benchmark measures.

    python -m bench._wire_load SOCKET_PATH --conns N [--depth 16] [--tag T]

Each connection handshakes, then keeps C{depth} C{get_token} requests in
flight, sending one new request for every answer (the refills of one read go
in one write). Every answer is checked: its id must be one in flight on that
connection, and it must be C{ok:true} (the first of each connection is also
decoded in full and its token checked for a missing refresh token).

Talks to its parent over stdio (see L{bench._wire_rig}): prints C{ready}
once every connection is handshaken, reads a line C{"<measure_from>
<measure_until>"} of C{time.monotonic()} values (one clock for all
processes on Linux), runs until C{measure_until}, and prints a JSON line with
the answers that arrived inside the window.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import sys
import time
from typing import Any

HEADER = 4
HANDSHAKE = b'{"v":2,"op":"handshake","payload":{"minVersion":1,"maxVersion":2}}'
REQUEST_HEAD = b'{"v":2,"id":"'
REQUEST_TAIL = b'","op":"get_token","payload":{"provider":"anthropic"}}'
ANSWER_HEAD = b'{"id":"'
ANSWER_OK = b'","ok":true,"data":{'


class LoadError(Exception):
    pass


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def recv_frame(sock: socket.socket) -> bytes:
    """
    One whole frame, read blockingly (only for the handshake).
    """
    data = b""
    while len(data) < HEADER or len(data) < HEADER + int.from_bytes(data[:HEADER], "big"):
        chunk = sock.recv(65536)
        if not chunk:
            raise LoadError("server closed the connection during the handshake")
        data += chunk
    length = int.from_bytes(data[:HEADER], "big")
    if len(data) != HEADER + length:
        raise LoadError("server sent more than the handshake reply")
    return data[HEADER:]


class Connection:
    __slots__ = ("answers", "buffer", "checked", "in_flight", "next", "prefix", "sock")

    def __init__(self, path: str, prefix: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.sendall(frame(HANDSHAKE))
        reply = json.loads(recv_frame(self.sock))
        if reply.get("ok") is not True or reply.get("data", {}).get("version") != 2:
            raise LoadError(f"handshake refused: {reply!r}")
        self.prefix = prefix.encode()
        self.buffer = bytearray()
        self.in_flight: set[bytes] = set()
        self.next = 0
        self.answers = 0
        self.checked = False

    def requests(self, count: int) -> bytes:
        """
        C{count} new request frames, their ids recorded as in flight.
        """
        frames = []
        for _ in range(count):
            self.next += 1
            request_id = b"%s-%d" % (self.prefix, self.next)
            self.in_flight.add(request_id)
            body = REQUEST_HEAD + request_id + REQUEST_TAIL
            frames.append(len(body).to_bytes(4, "big") + body)
        return b"".join(frames)

    def check_full(self, body: bytes) -> None:
        message: dict[str, Any] = json.loads(body)
        data = message.get("data")
        if (
            message.get("ok") is not True
            or not isinstance(data, dict)
            or not isinstance(data.get("access_token"), str)
            or "refresh_token" in data
        ):
            raise LoadError(f"unexpected answer {body[:200]!r}")
        self.checked = True

    def readable(self) -> int:
        """
        Read what is there, check each whole answer, send as many new
        requests as were answered; the number answered.
        """
        data = self.sock.recv(262144)
        if not data:
            raise LoadError("server closed the connection")
        buffer = self.buffer
        buffer += data
        size = len(buffer)
        position = 0
        answered = 0
        in_flight = self.in_flight
        while size - position >= HEADER:
            end = position + HEADER + int.from_bytes(buffer[position : position + HEADER], "big")
            if end > size:
                break
            body = bytes(buffer[position + HEADER : end])
            position = end
            if not body.startswith(ANSWER_HEAD):
                raise LoadError(f"answer without a leading id: {body[:200]!r}")
            quote = body.index(b'"', 7)
            request_id = body[7:quote]
            if request_id not in in_flight:
                raise LoadError(f"answer to an id not in flight: {body[:200]!r}")
            if not body.startswith(ANSWER_OK, quote):
                raise LoadError(f"not ok: {body[:200]!r}")
            if not self.checked:
                self.check_full(body)
            in_flight.remove(request_id)
            answered += 1
        del buffer[:position]
        if answered:
            self.sock.sendall(self.requests(answered))
        self.answers += answered
        return answered


def run(path: str, conns: int, depth: int, tag: str) -> None:
    connections = [Connection(path, f"{tag}.{i}") for i in range(conns)]
    print("ready", flush=True)
    measure_from, measure_until = (float(x) for x in sys.stdin.readline().split())
    selector = selectors.EpollSelector()
    for connection in connections:
        selector.register(connection.sock, selectors.EVENT_READ, connection)
    for connection in connections:
        connection.sock.sendall(connection.requests(depth))
    in_window = 0
    before = 0
    now = time.monotonic()
    while now < measure_until:
        events = selector.select(0.5)
        now = time.monotonic()
        for key, _ in events:
            answered = key.data.readable()
            if now >= measure_from:
                in_window += answered
            else:
                before += answered
    for connection in connections:
        connection.sock.close()
    print(
        json.dumps(
            {
                "answers": in_window,
                "warmup_answers": before,
                "seconds": measure_until - measure_from,
                "checked": all(c.checked for c in connections if c.answers),
            }
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("socket")
    parser.add_argument("--conns", type=int, default=1)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--tag", default="load")
    args = parser.parse_args()
    try:
        run(args.socket, args.conns, args.depth, args.tag)
    except LoadError as e:
        print(json.dumps({"error": str(e)}), flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
