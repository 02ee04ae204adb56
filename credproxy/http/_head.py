"""
The request head, judged before twisted.web parses it: a request whose head
breaks a rule here is answered and closed without twisted.web, the resource
or the upstream ever seeing it. twisted.web's own parser is more lenient
(bytes 0x7F-0xFF in the target, C{Transfer-Encoding: identity}, duplicate
C{Host}) and, past its line limit, closes without an answer.

The whole head is checked by one regular expression (in C), so a valid head
costs one match and a split; only a refused head pays for finding which
rule it broke, to say so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from credproxy.http._errors import ErrorKind
from credproxy.http._grammar import CONTENT_LENGTH, REQUEST_TARGET, TCHAR, TOKEN

# A request target (the path and query) longer than this gets 414. The
# Messages API's paths are short; 8 KiB is what most servers allow.
MAX_REQUEST_TARGET: Final = 8 * 1024
# Any one header line longer than this, or a whole head longer than
# MAX_HEAD, or more than MAX_HEADERS header lines, gets 431. SDK heads are
# well under 2 KiB with a few dozen headers.
MAX_HEADER_LINE: Final = 8 * 1024
MAX_HEAD: Final = 16 * 1024
MAX_HEADERS: Final = 100
# The request line is the target plus the method, two spaces and the version.
_MAX_METHOD: Final = 32
MAX_REQUEST_LINE: Final = MAX_REQUEST_TARGET + _MAX_METHOD + len(b"  HTTP/1.1")

# Field values: visible ASCII, space, tab and obs-text; no other control byte.
_VALUE: Final = rb"[\t\x20-\x7e\x80-\xff]*"
_HEAD: Final = re.compile(
    rb"([" + TCHAR + rb"]{1,32}) (/[\x21-\x7e]*) HTTP/1\.([01])\r\n"
    rb"((?:[" + TCHAR + rb"]+:" + _VALUE + rb"\r\n)*)"
)
_FIELD_VALUE: Final = re.compile(_VALUE)


@dataclass(frozen=True)
class HeadRefusal:
    """
    Why a head is refused: the answer's kind and text, and the word for the
    audit line. The text never quotes the request.
    """

    kind: ErrorKind
    message: str
    outcome: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


class RequestHead:
    """
    A head that passed: what admission needs before twisted.web takes over.
    Header lookups search the raw header block (found by name, in C) rather
    than a parsed list: a request asks for three or four headers. (A plain
    class with slots: one is built per request.)
    """

    __slots__ = (
        "_block",
        "_lowered",
        "chunked",
        "content_length",
        "method",
        "target",
        "version",
    )

    def __init__(
        self,
        method: bytes,
        target: bytes,
        content_length: int | None,
        chunked: bool,
        block: bytes,
        lowered: bytes,
        version: bytes = b"HTTP/1.1",
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.content_length = content_length
        self.chunked = chunked
        # The header lines, each between CRLFs, as sent and lower-cased.
        self._block = block
        self._lowered = lowered

    def __repr__(self) -> str:
        # Never the headers: they hold the placeholder or capability token.
        return f"<RequestHead {self.method!r} {self.path[:64]!r}>"

    @property
    def path(self) -> bytes:
        return self.target.partition(b"?")[0]

    def getRawHeaders(self, name: bytes) -> list[bytes] | None:
        """
        The values of C{name} (lower-case), without surrounding whitespace,
        as L{twisted.web.http_headers.Headers} gives them, so the same header
        rules read a head and a request.
        """
        values = _values(self._block, self._lowered, name)
        return values or None

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def fields(self) -> list[tuple[bytes, bytes]]:
        """
        Every header as sent (name, value without surrounding whitespace), in order.
        """
        fields = []
        for line in self._block.split(b"\r\n")[1:-1]:
            name, _, value = line.partition(b":")
            fields.append((name, value.strip(b" \t")))
        return fields


def _values(block: bytes, lowered: bytes, name: bytes) -> list[bytes]:
    needle = b"\r\n" + name + b":"
    values: list[bytes] = []
    start = lowered.find(needle)
    while start >= 0:
        value_start = start + len(needle)
        value_end = lowered.find(b"\r\n", value_start)
        values.append(block[value_start:value_end].strip(b" \t"))
        start = lowered.find(needle, value_end)
    return values


def valid_target(target: bytes) -> bool:
    """
    Whether C{target} is a path in printable ASCII, the only form forwarded.
    """
    return len(target) <= MAX_REQUEST_TARGET and REQUEST_TARGET.fullmatch(target) is not None


def _bad(message: str) -> HeadRefusal:
    return HeadRefusal(ErrorKind.INVALID_REQUEST, message, "bad_request")


def _too_large(message: str) -> HeadRefusal:
    return HeadRefusal(ErrorKind.HEADERS_TOO_LARGE, message, "head_too_large")


BAD_TARGET: Final = _bad(
    "The request target must be a path starting with / in printable ASCII "
    "(percent-encode other bytes)."
)
URI_TOO_LONG: Final = HeadRefusal(
    ErrorKind.URI_TOO_LONG,
    f"Request target longer than {MAX_REQUEST_TARGET} bytes.",
    "uri_too_long",
)
HEAD_TOO_LARGE: Final = _too_large(f"Request head larger than {MAX_HEAD} bytes.")
HEADER_LINE_TOO_LONG: Final = _too_large(f"A header line is longer than {MAX_HEADER_LINE} bytes.")
TOO_MANY_HEADERS: Final = _too_large(f"More than {MAX_HEADERS} header lines.")


def check_incomplete(buffered: bytes | bytearray) -> HeadRefusal | None:
    """
    Refuse a head that is not complete yet but can already never pass, so a
    client is answered as soon as it crosses a limit, not when it stops.

    @return: the refusal when it is over a limit, else None.
    """
    line_end = buffered.find(b"\r\n")
    if line_end < 0:
        return URI_TOO_LONG if len(buffered) > MAX_REQUEST_LINE else None
    if len(buffered) > MAX_HEAD:
        return HEAD_TOO_LARGE
    last_line_start = buffered.rfind(b"\r\n") + 2
    if len(buffered) - last_line_start > MAX_HEADER_LINE:
        return HEADER_LINE_TOO_LONG
    return None


def parse_head(head: bytes) -> RequestHead | HeadRefusal:
    """
    Judge a complete head: C{head} is everything before the blank line,
    leading blank lines already removed.

    @return: the head, or the refusal for the first rule it breaks. (Refusals
        are returned, not raised: a raised one would keep the frames of the
        raise, which hold the request's bytes, in its traceback.)
    """
    if len(head) + 4 > MAX_HEAD:
        return HEAD_TOO_LARGE
    match = _HEAD.fullmatch(head + b"\r\n")
    if match is None:
        return _diagnose(head)
    method, target, minor, lines = match.groups()
    if len(target) > MAX_REQUEST_TARGET:
        return URI_TOO_LONG
    if lines.count(b"\r\n") > MAX_HEADERS:
        return TOO_MANY_HEADERS
    if len(lines) > MAX_HEADER_LINE and any(
        len(line) > MAX_HEADER_LINE for line in lines.split(b"\r\n")
    ):
        return HEADER_LINE_TOO_LONG
    # Each line between CRLFs, so a name is found as CRLF name ":" and a
    # value ends at the next CRLF.
    block = b"\r\n" + lines
    lowered = block.lower()
    hosts = lowered.count(b"\r\nhost:")
    http11 = minor == b"1"
    if hosts > 1 or (http11 and hosts == 0):
        return _bad("An HTTP/1.1 request needs exactly one Host header.")
    content_length: int | None = None
    if b"\r\ncontent-length:" in lowered:
        lengths = _values(block, lowered, b"content-length")
        if len(lengths) != 1 or not CONTENT_LENGTH.fullmatch(lengths[0]):
            return _bad("Content-Length must be one decimal number.")
        content_length = int(lengths[0])
    chunked = False
    if b"\r\ntransfer-encoding:" in lowered:
        encodings = _values(block, lowered, b"transfer-encoding")
        if len(encodings) != 1 or encodings[0].lower() != b"chunked":
            return HeadRefusal(
                ErrorKind.NOT_IMPLEMENTED,
                "Transfer-Encoding other than one chunked is not supported.",
                "not_implemented",
            )
        if content_length is not None:
            return _bad("A request may not carry both Content-Length and Transfer-Encoding.")
        if not http11:
            return _bad("Transfer-Encoding needs HTTP/1.1.")
        chunked = True
    version = b"HTTP/1.1" if http11 else b"HTTP/1.0"
    return RequestHead(method, target, content_length, chunked, block, lowered, version)


def _diagnose(head: bytes) -> HeadRefusal:
    """
    Which rule a head that failed the expression broke (the slow path, for
    refused heads only), so the answer says what to fix.
    """
    if head.count(b"\r") != head.count(b"\r\n") or head.count(b"\n") != head.count(b"\r\n"):
        return _bad("Lines of a request head must end in CRLF; a bare CR or LF is not allowed.")
    request_line, *lines = head.split(b"\r\n")
    parts = request_line.split(b" ")
    if len(parts) != 3:
        return _bad("Malformed request line.")
    method, target, version = parts
    if len(target) > MAX_REQUEST_TARGET:
        return URI_TOO_LONG
    if not TOKEN.fullmatch(method) or len(method) > _MAX_METHOD:
        return _bad("Malformed request method.")
    if not REQUEST_TARGET.fullmatch(target):
        return BAD_TARGET
    if version not in (b"HTTP/1.0", b"HTTP/1.1"):
        return _bad("Only HTTP/1.0 and HTTP/1.1 are served.")
    if len(lines) > MAX_HEADERS:
        return TOO_MANY_HEADERS
    for line in lines:
        if len(line) > MAX_HEADER_LINE:
            return HEADER_LINE_TOO_LONG
        if line[:1] in (b" ", b"\t"):
            return _bad("Folded header lines are not allowed.")
        name, colon, value = line.partition(b":")
        if not colon or not TOKEN.fullmatch(name):
            return _bad("Malformed header name.")
        if not _FIELD_VALUE.fullmatch(value):
            return _bad("A header value holds a control character.")
    return _bad("Malformed request head.")


def find_head(buffered: bytes | bytearray, scanned: int = 0) -> tuple[int, int] | None:
    """
    Where the head is in C{buffered}: (its start, after leading blank lines;
    its end, where the blank line that ends it begins), or None while that
    blank line has not arrived. C{scanned} bytes were searched before (by an
    earlier call on a shorter buffer), so a head in many pieces is searched
    once, not once per piece.
    """
    start = 0
    while buffered.startswith(b"\r\n", start):
        start += 2
    end = buffered.find(b"\r\n\r\n", max(start, scanned - 3))
    if end < 0:
        return None
    return start, end
