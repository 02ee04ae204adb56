"""
The upstream answer's chunked body, decoded in C a read at a time.

An SSE answer comes one event per chunk, so a 64 KiB read holds dozens of
chunks. Twisted's decoder (C{twisted.web.http._ChunkedTransferDecoder})
walks them in Python, copying its buffer and calling back once per chunk,
which was more than half of the proxy's work on a large stream. This one
hands the framing to llhttp (through C{httptools}, the parser uvicorn uses),
fed a fixed response head once so that what follows is parsed as a chunked
body, and passes all the data of one read to its consumer in one call.

llhttp's framing is as strict as Twisted's or stricter (RFC 9112 section
7.1): a size is hexadecimal digits with no space around them, an extension
holds no control byte, each chunk's data ends in CRLF, trailer lines are
field lines. Anything else raises C{_MalformedChunkedDataError}, which the
screened client protocol turns into a malformed answer. llhttp holds no
buffer but a trailer line it is reading; that, like any run of bytes that
carries no data, is bounded by L{MAX_BYTES_WITHOUT_DATA}.

It has the interface of Twisted's decoder; the upstream client
(L{credproxy.http._upstream_client}) reads chunked answers with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from httptools import HttpParserError, HttpResponseParser
from twisted.web.http import _DataLoss, _MalformedChunkedDataError

# Framing without data between two chunks' data (a size line with its
# extensions, the trailer section) longer than this is refused: upstreams
# send a few bytes of it.
MAX_BYTES_WITHOUT_DATA: Final = 16 * 1024
# What llhttp is told the answer's head was, so that it reads a chunked body.
_CHUNKED_HEAD: Final = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


class _Events:
    """
    llhttp's callbacks for one body: its data, its end, and whether another
    message began after it (bytes that belong to no answer).
    """

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.messages = 0
        self.complete = False

    def on_message_begin(self) -> None:
        self.messages += 1

    def on_body(self, body: bytes) -> None:
        self.pieces.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class ChunkedDecoder:
    """
    Decodes one chunked body: C{data_received} gets the data, C{finished}
    the bytes after the body's end (which belong to no answer; when some
    followed, the read they came in, since llhttp does not say where the
    body ended within it).
    """

    def __init__(
        self, data_received: Callable[[bytes], object], finished: Callable[[bytes], object]
    ) -> None:
        self._data_received = data_received
        self._finished = finished
        self._events = _Events()
        self._parser = HttpResponseParser(self._events)
        self._parser.feed_data(_CHUNKED_HEAD)
        self._without_data = 0
        self._done = False

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        events = self._events
        refused = trailing = False
        try:
            self._parser.feed_data(data)
        except HttpParserError:
            # After the end, what llhttp refused was bytes of no answer.
            trailing = events.complete
            refused = not trailing
        pieces = events.pieces
        events.pieces = []
        if refused:
            # Nothing of a read whose framing breaks is passed on: its data
            # may be the broken chunk's own (a size that lies), and the
            # agent's connection sends what it is given at once.
            raise _MalformedChunkedDataError("malformed chunked framing")
        if pieces:
            self._without_data = 0
            self._data_received(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        if events.complete:
            self._done = True
            followed = trailing or events.messages > 1
            self._finished(data if followed else b"")
            return
        if not pieces:
            self._without_data += len(data)
            if self._without_data > MAX_BYTES_WITHOUT_DATA:
                raise _MalformedChunkedDataError("chunked framing without data past its bound")

    def noMoreData(self) -> None:
        """
        The connection ended: an error unless the body had.
        """
        if not self._done:
            raise _DataLoss("chunked body ended before its last chunk")
