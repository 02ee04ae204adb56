"""
A minimal asyncio HTTP/1.1 client for the benchmarks: just enough to send a
POST and read a chunked or sized answer, timing its first byte, without an
HTTP library's own overhead hiding the proxy's.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

Target = tuple[str, str] | tuple[str, str, int]  # ("unix", path) | ("tcp", host, port)


def messages_request(path: str, *, stream: bool, key: str) -> bytes:
    body = json.dumps(
        {
            "model": "claude-bench",
            "max_tokens": 16,
            "stream": stream,
            "messages": [{"role": "user", "content": "hello"}],
        }
    ).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\ncontent-type: application/json\r\n"
        f"x-api-key: {key}\r\nanthropic-version: 2023-06-01\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def connect(target: Target) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    limit = 1 << 20
    if target[0] == "unix":
        return await asyncio.open_unix_connection(target[1], limit=limit)
    return await asyncio.open_connection(target[1], target[2], limit=limit)  # type: ignore[misc]


@dataclass
class Answer:
    status: int
    first_byte: float  # seconds from send to the status line
    body_bytes: int
    body: bytes


async def read_answer(
    reader: asyncio.StreamReader,
    sent_at: float,
    *,
    keep: bool = True,
    stop_after: int | None = None,
) -> Answer:
    """
    Read one response. With C{stop_after}, return once that many body bytes arrived.
    """
    status_line = await reader.readline()
    first = time.perf_counter() - sent_at
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    parts: list[bytes] = []
    total = 0
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                break
            data = await reader.readexactly(size + 2)
            total += size
            if keep:
                parts.append(data[:-2])
            if stop_after is not None and total >= stop_after:
                break
    else:
        data = await reader.readexactly(int(headers.get("content-length", "0")))
        total = len(data)
        if keep:
            parts.append(data)
    return Answer(status, first, total, b"".join(parts))
