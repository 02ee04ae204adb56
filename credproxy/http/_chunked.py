"""
The upstream answer's chunked body, decoded a read at a time.

An SSE answer comes one event per chunk, so a 64 KiB read holds dozens of
chunks. Twisted's decoder (C{twisted.web.http._ChunkedTransferDecoder})
walks them with a state machine that copies its buffer and calls back once
per chunk, which was more than half of the proxy's work on a large stream.
This decoder finds each chunk's size line with one regular expression (in
C), and hands all the data of one read to its consumer in one call.

It is as strict as Twisted's or stricter (RFC 9112 section 7.1): a size is
hexadecimal digits, an extension holds no control byte, each chunk's data
ends in CRLF, and trailer lines are field lines; anything else raises
C{_MalformedChunkedDataError}, which the screened client protocol turns
into a malformed answer. No wait grows a buffer past L{MAX_CHUNK_LINE} (a
size line) or L{MAX_TRAILERS} (the trailer section).

It has the interface of Twisted's decoder, which it replaces in the upstream
client's parser (L{credproxy.http._upstream.ScreenedHTTP11ClientProtocol}).
No C parser was used: httptools (llhttp) parses whole messages, not a body
on its own, and the framing is a dozen lines.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

from twisted.web.http import _DataLoss, _MalformedChunkedDataError

from credproxy.http._grammar import TCHAR

# A size line (size, extensions, CRLF) longer than this is refused: a size
# is at most 16 hex digits, and upstreams send no extensions.
MAX_CHUNK_LINE: Final = 1024
# The trailer section after the last chunk, all lines together.
MAX_TRAILERS: Final = 16 * 1024

_SIZE_LINE: Final = re.compile(rb"([0-9A-Fa-f]{1,16})((?:;[\t\x20-\x7e]*)?)\r\n")
_SIZE_LINE_START: Final = re.compile(rb"[0-9A-Fa-f]{1,16}(?:;[\t\x20-\x7e]*)?\r?")
_TRAILER_LINE: Final = re.compile(rb"[" + TCHAR + rb"]+:[\t\x20-\x7e\x80-\xff]*\r\n")

_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class ChunkedDecoder:
    """
    Decodes one chunked body: C{data_received} gets the data, C{finished}
    the bytes after the body's end (which belong to no answer).
    """

    def __init__(
        self, data_received: Callable[[bytes], object], finished: Callable[[bytes], object]
    ) -> None:
        self._data_received = data_received
        self._finished = finished
        self._state = _SIZE
        self._remaining = 0  # of the current chunk's data
        self._pending = b""  # an incomplete size line, chunk end or trailer line
        self._trailer_bytes = 0

    def dataReceived(self, data: bytes) -> None:
        if self._state == _DONE:
            return
        if self._pending:
            data = self._pending + data
            self._pending = b""
        pieces: list[bytes] = []
        try:
            self._decode(data, pieces)
        finally:
            # What was decoded goes out even when what follows is refused,
            # as a decoder calling back per chunk would have sent it.
            if pieces:
                self._data_received(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        if self._state == _DONE:
            rest, self._pending = self._pending, b""
            self._finished(rest)

    def _decode(self, data: bytes, pieces: list[bytes]) -> None:
        position = 0
        end = len(data)
        while position < end:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, end - position)
                pieces.append(data[position : position + take])
                position += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _DATA_END
            elif state == _SIZE:
                match = _SIZE_LINE.match(data, position)
                if match is None:
                    self._hold_line(data, position, MAX_CHUNK_LINE)
                    return
                start = match.end()
                size = int(match[1], 16)
                if not size:
                    self._state = _TRAILER
                    position = start
                    continue
                stop = start + size
                if stop + 2 <= end:
                    # The whole chunk and its CRLF are here (the usual case
                    # for events): taken in one step.
                    if not data.startswith(b"\r\n", stop):
                        raise _MalformedChunkedDataError("chunk data not followed by CRLF")
                    pieces.append(data[start:stop])
                    position = stop + 2
                    continue
                self._remaining = size
                self._state = _DATA
                position = start
            elif state == _DATA_END:
                if end - position < 2:
                    if data[position:] != b"\r"[: end - position]:
                        raise _MalformedChunkedDataError("chunk data not followed by CRLF")
                    self._pending = data[position:]
                    return
                if data[position : position + 2] != b"\r\n":
                    raise _MalformedChunkedDataError("chunk data not followed by CRLF")
                position += 2
                self._state = _SIZE
            else:  # _TRAILER
                if data.startswith(b"\r\n", position):
                    self._state = _DONE
                    self._pending = data[position + 2 :]
                    return
                match = _TRAILER_LINE.match(data, position)
                if match is None:
                    self._hold_line(data, position, MAX_TRAILERS - self._trailer_bytes)
                    return
                self._trailer_bytes += match.end() - position
                if self._trailer_bytes > MAX_TRAILERS:
                    raise _MalformedChunkedDataError("trailer section too large")
                position = match.end()

    def _hold_line(self, data: bytes, position: int, limit: int) -> None:
        """
        Keep an incomplete line for the next read, or refuse one that is
        already complete (it did not match) or can no longer fit.
        """
        rest = data[position:]
        if (
            b"\n" in rest
            or len(rest) > limit
            or (self._state == _SIZE and _SIZE_LINE_START.fullmatch(rest) is None)
        ):
            raise _MalformedChunkedDataError("malformed chunk size or trailer line")
        self._pending = rest

    def noMoreData(self) -> None:
        """
        The connection ended: an error unless the body had.
        """
        if self._state != _DONE:
            raise _DataLoss("chunked body ended before its last chunk")
