"""
Token usage for the audit line, read from the answer as it passes: the SSE
C{message_start}/C{message_delta} events of a stream, or the C{usage} of a JSON
message. Each byte is looked at once and only the two small events are parsed,
so a long stream costs a scan, not a parse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

# An SSE line longer than this (a huge text delta) is skipped, not buffered.
MAX_SSE_LINE = 1024 * 1024
# A JSON answer larger than this is forwarded but not parsed for usage.
MAX_JSON_BODY = 4 * 1024 * 1024

_INTERESTING = (b'"message_start"', b'"message_delta"')


@dataclass
class Usage:
    model: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class SSEUsageParser:
    """
    Fed the bytes of a text/event-stream answer in arbitrary pieces.
    """

    def __init__(self) -> None:
        self.usage = Usage()
        self._tail = b""
        self._skipping = False  # inside an over-long line, until its newline

    def feed(self, data: bytes) -> None:
        start = 0
        if self._skipping or self._tail:
            newline = data.find(b"\n")
            if newline < 0:
                if not self._skipping:
                    self._hold(self._tail + data)
                return
            if not self._skipping:
                self._line(self._tail + data[:newline])
            self._tail, self._skipping = b"", False
            start = newline + 1
        cut = data.rfind(b"\n", start)
        if cut >= 0:
            # Only the lines holding the marker are looked at; the rest of
            # the read is searched (in C), never copied.
            marker = data.find(b'"message_', start, cut)
            while marker >= 0:
                line_start = data.rfind(b"\n", start, marker) + 1 or start
                line_end = data.find(b"\n", marker, cut + 1)
                self._line(data[line_start:line_end])
                marker = data.find(b'"message_', line_end, cut)
            start = cut + 1
        if start < len(data):
            self._hold(data[start:])

    def _hold(self, partial: bytes) -> None:
        """
        Keep the start of a line for the next read, unless it is over-long.
        """
        if len(partial) > MAX_SSE_LINE:
            self._tail, self._skipping = b"", True
        else:
            self._tail = partial

    def _line(self, line: bytes) -> None:
        if line.startswith(b"data:") and any(marker in line for marker in _INTERESTING):
            self._event(line[5:])

    def _event(self, payload: bytes) -> None:
        try:
            event = orjson.loads(payload)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        if event.get("type") == "message_start" and isinstance(event.get("message"), dict):
            message = event["message"]
            if isinstance(message.get("model"), str):
                self.usage.model = message["model"]
            usage = message.get("usage")
            if isinstance(usage, dict):
                self.usage.input_tokens = _int(usage.get("input_tokens"))
                self.usage.output_tokens = _int(usage.get("output_tokens"))
        elif event.get("type") == "message_delta" and isinstance(event.get("usage"), dict):
            usage = event["usage"]
            output = _int(usage.get("output_tokens"))  # cumulative
            if output is not None:
                self.usage.output_tokens = output
            input_tokens = _int(usage.get("input_tokens"))
            if input_tokens is not None:
                self.usage.input_tokens = input_tokens

    def finish(self) -> Usage:
        return self.usage


class JSONUsageParser:
    """
    Collects a JSON answer (up to L{MAX_JSON_BODY}) and reads its usage at the end.
    """

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, data: bytes) -> None:
        self._size += len(data)
        if self._size <= MAX_JSON_BODY:
            self._parts.append(data)
        else:
            self._parts = []

    def finish(self) -> Usage:
        usage = Usage()
        if not self._parts or self._size > MAX_JSON_BODY:
            return usage
        try:
            body = orjson.loads(b"".join(self._parts))
        except ValueError:
            return usage
        if isinstance(body, dict):
            if isinstance(body.get("model"), str):
                usage.model = body["model"]
            counts = body.get("usage")
            if isinstance(counts, dict):
                usage.input_tokens = _int(counts.get("input_tokens"))
                usage.output_tokens = _int(counts.get("output_tokens"))
        return usage


UsageParser = SSEUsageParser | JSONUsageParser


def parser_for(content_type: bytes | None) -> UsageParser | None:
    """
    The parser for an answer of this content type, or None when it has no usage.
    """
    kind = (content_type or b"").split(b";")[0].strip().lower()
    if kind == b"text/event-stream":
        return SSEUsageParser()
    if kind == b"application/json":
        return JSONUsageParser()
    return None
