"""
A tiny credential-socket server on a real Unix socket, in threads, for the
blocking client's tests (and as a stand-in until the real server is used
end to end). It speaks just enough of the protocol and is scriptable by op:

  echo        answers {"echo": payload}
  delay       answers {"echo": payload} after payload["seconds"]
  hang        never answers
  fail        answers ok:false with payload["code"] / payload["error"]
  bad_data    answers with a non-object data (a violation)
  cancel      answers {"cancelled": bool}, then CANCELLED for the target

and any op in C{scripted}, whose function maps the payload to the answer
(without its id).
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any


def _frame(message: Any) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode("utf-8")
    return struct.pack(">I", len(body)) + body


class _Peer:
    def __init__(self, server: ThreadedFakeServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.lock = threading.Lock()
        self.open: set[str] = set()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def send(self, message: Any) -> None:
        try:
            with self.lock:
                self.sock.sendall(_frame(message))
        except OSError:
            pass

    def recv_exact(self, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            try:
                chunk = self.sock.recv(n - len(data))
            except OSError:
                return None
            if not chunk:
                return None
            data += chunk
        return data

    def run(self) -> None:
        first = True
        while True:
            header = self.recv_exact(4)
            if header is None:
                break
            body = self.recv_exact(struct.unpack(">I", header)[0])
            if body is None:
                break
            message = json.loads(body)
            if first:
                first = False
                self.server.record_handshake(body)
                reply = self.server.handshake_reply
                self.send(reply)
                if not reply.get("ok"):
                    break
                continue
            self.server.record(message)
            self.handle(message)
        self.server.closed_peers += 1
        self.close()

    def answer(self, request_id: str, data: Any) -> None:
        with self.server.lock:
            self.open.discard(request_id)
        self.send({"id": request_id, "ok": True, "data": data})

    def handle(self, message: dict[str, Any]) -> None:
        op, rid, payload = message["op"], message["id"], message.get("payload", {})
        if op == "cancel":
            target = payload["targetId"]
            with self.server.lock:
                found = target in self.open
                self.open.discard(target)
            self.send({"id": rid, "ok": True, "data": {"cancelled": found}})
            if found:
                self.send(
                    {"id": target, "ok": False, "code": "CANCELLED", "error": "Operation cancelled"}
                )
            return
        with self.server.lock:
            self.open.add(rid)
            self.server.max_open = max(self.server.max_open, len(self.open))
        if op in self.server.scripted:
            with self.server.lock:
                self.open.discard(rid)
            self.send({"id": rid, **self.server.scripted[op](payload)})
        elif op == "echo":
            self.answer(rid, {"echo": payload})
        elif op == "delay":
            timer = threading.Timer(payload["seconds"], self.answer, (rid, {"echo": payload}))
            timer.daemon = True
            timer.start()
        elif op == "fail":
            self.send({"id": rid, "ok": False, "code": payload["code"], "error": payload["error"]})
        elif op == "bad_data":
            self.send({"id": rid, "ok": True, "data": [1, 2]})

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class ThreadedFakeServer:
    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.handshakes: list[bytes] = []
        self.requests: list[dict[str, Any]] = []
        self.peers: list[_Peer] = []
        self.max_open = 0
        self.scripted: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {}
        self.closed_peers = 0
        self.handshake_reply: dict[str, Any] = {
            "v": 2,
            "op": "handshake",
            "ok": True,
            "data": {"version": 2},
        }
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(64)
        self.thread = threading.Thread(target=self.accept_loop, daemon=True)
        self.thread.start()

    def accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.peers.append(_Peer(self, sock))

    def record_handshake(self, body: bytes) -> None:
        with self.lock:
            self.handshakes.append(body)

    def record(self, message: dict[str, Any]) -> None:
        with self.lock:
            self.requests.append(message)

    def ops(self) -> list[str]:
        with self.lock:
            return [m["op"] for m in self.requests]

    def drop_connections(self) -> None:
        with self.lock:
            peers = list(self.peers)
        for peer in peers:
            peer.close()

    def stop(self) -> None:
        self.listener.close()
        self.drop_connections()
