"""
The screen in front of the upstream client's response parser: a pure,
incremental validator of the response heads an upstream sends, fed bytes
and giving back bytes, so it can sit in front of any HTTP/1.1 client parser
(Twisted's today, another tomorrow) without knowing it.

Twisted's client parser accepts what it should not relay: heads of any size,
bare CR or LF as line ends, NUL and other control bytes in values and in the
reason phrase, obs-fold lines, header names that are not tokens; and it keeps
the C{Connection} header to itself, so the headers it names cannot be told
apart once parsed. The screen refuses the first group and removes the second
before the parser sees a byte.

Everything is checked with C{bytes.find}/C{count}/C{split} and precompiled
regular expressions over a whole head, never a Python loop over its bytes:
a normal head of about 1 KiB in one read costs a few C-level passes.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from typing import Final

from credproxy.http._grammar import CONTENT_LENGTH, TCHAR

# The bytes of all heads of one response (interim 1xx heads and the final
# head, each with its blank line): the API's heads are about 1 KiB; a
# larger one is an upstream that is broken or hostile, and is refused
# before more of it is held.
MAX_HEAD_BYTES: Final = 64 * 1024
# Header lines of one head (the status line not counted).
MAX_HEADER_LINES: Final = 100
# One line without its CRLF. Twisted's line parser (LineReceiver.MAX_LENGTH,
# 16384, which counts the CR) closes the connection without saying why on a
# longer one; refusing here first makes that a clear refusal.
MAX_LINE_BYTES: Final = 16 * 1024 - 1
# Interim (1xx) responses ahead of the final one: one 100 Continue or 103
# Early Hints is normal; a stream of them is an upstream holding the request.
MAX_INTERIM_RESPONSES: Final = 8

# Never removed on a Connection option's say-so: the client parser needs
# them to frame the answer and to decide on keep-alive (none of them reaches
# the agent: they are hop-by-hop, and the agent's answer is framed anew).
FRAMING_HEADERS: Final = frozenset({b"connection", b"content-length", b"transfer-encoding"})

SWITCHING_PROTOCOLS: Final = 101

_TCHAR: Final = rb"[" + TCHAR + rb"]"  # one token character
# HTTP/1.0 or 1.1, a three-digit status from 100 to 599, and a reason
# phrase of HTAB, SP, VCHAR and obs-text. The SP and phrase may be missing
# altogether: RFC 9112's grammar wants the SP, but some servers and CDNs
# omit it with the phrase, Twisted's parser accepts that, and the phrase is
# never relayed anyway.
_STATUS_LINE: Final = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9])(?: [\t\x20-\x7e\x80-\xff]*)?")
# The start of a well-formed field line: a token and a colon right after an LF.
_FIELD_START: Final = re.compile(rb"\n" + _TCHAR + rb"+:")
# Bytes a head may hold once its CRLF pairs are gone, mapped to themselves;
# the rest (CR, LF, and control characters other than HTAB) to 0.
_FIELD_BYTES: Final = bytes(b if b == 0x09 or 0x20 <= b != 0x7F else 0 for b in range(256))
# Control characters other than HTAB (CR and LF are checked as line ends).
_CONTROL: Final = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# A Content-Length item: digits only, at most 18 (under an exabyte: a longer
# one is nonsense, and converting a huge digit string costs time).
_OWS: Final = b" \t"


class HeadDefect(enum.Enum):
    """
    Why a response head was refused: what a log line may name (never the
    bytes themselves, which are the upstream's and may be anything).
    """

    TOO_LARGE = "head over the size limit"
    TOO_MANY_LINES = "too many header lines"
    LINE_TOO_LONG = "header line over the length limit"
    BAD_STATUS_LINE = "malformed status line"
    BARE_CR_OR_LF = "bare CR or LF"
    CONTROL_CHARACTER = "control character in the head"
    OBS_FOLD = "obs-fold continuation line"
    BAD_FIELD_LINE = "header line that is not token:value"
    SWITCHING_PROTOCOLS = "unrequested protocol switch"
    TOO_MANY_INTERIM = "too many interim responses"
    BAD_TRANSFER_ENCODING = "transfer-encoding other than chunked"
    BAD_CONTENT_LENGTH = "invalid or conflicting content-length"
    AMBIGUOUS_FRAMING = "both transfer-encoding and content-length"


class MalformedResponseHead(Exception):
    """
    The upstream's response head breaks a rule of the screen. The message is
    the defect's fixed description, never the upstream's bytes.
    """

    def __init__(self, defect: HeadDefect) -> None:
        super().__init__(defect.value)
        self.defect = defect


def connection_options(values: Iterable[bytes]) -> frozenset[bytes]:
    """
    The lower-cased options named by C{Connection} header values (RFC 9110
    7.6.1): the headers a proxy must not forward. Used by the screen on raw
    heads and by the header policy on parsed ones, so both read it alike.
    """
    named: set[bytes] = set()
    for value in values:
        for option in value.split(b","):
            option = option.strip(_OWS)
            if option:
                named.add(option.lower())
    return frozenset(named)


def _field_spans(lowered: bytes, name: bytes) -> list[tuple[int, int]]:
    """
    Where each C{name} line is in a lower-cased head: (start of the name,
    end of the value before its CRLF). The status line holds no LF, so a
    match always starts a field line.
    """
    needle = b"\n" + name + b":"
    spans: list[tuple[int, int]] = []
    at = lowered.find(needle)
    while at >= 0:
        start = at + 1
        end = lowered.find(b"\r", start)
        if end < 0:
            end = len(lowered)
        spans.append((start, end))
        at = lowered.find(needle, end)
    return spans


def _values(lowered: bytes, name: bytes, spans: list[tuple[int, int]]) -> list[bytes]:
    skip = len(name) + 1
    return [lowered[start + skip : end].strip(_OWS) for start, end in spans]


def _check_framing(lowered: bytes) -> None:
    """
    Refuse framing the client parser would read differently from another
    hop, or fail on without a clear reason: a transfer coding other than a
    single C{chunked}, a Content-Length beside it (RFC 9112 6.1: "ought to
    be handled as an error"), a Content-Length that is not one number.
    """
    te_spans = _field_spans(lowered, b"transfer-encoding")
    cl_spans = _field_spans(lowered, b"content-length")
    if te_spans:
        if len(te_spans) > 1 or _values(lowered, b"transfer-encoding", te_spans) != [b"chunked"]:
            raise MalformedResponseHead(HeadDefect.BAD_TRANSFER_ENCODING)
        if cl_spans:
            raise MalformedResponseHead(HeadDefect.AMBIGUOUS_FRAMING)
    if cl_spans:
        lengths: set[int] = set()
        for value in _values(lowered, b"content-length", cl_spans):
            for item in value.split(b","):
                item = item.strip(_OWS)
                if not CONTENT_LENGTH.fullmatch(item):
                    raise MalformedResponseHead(HeadDefect.BAD_CONTENT_LENGTH)
                lengths.add(int(item))
        if len(lengths) != 1:
            raise MalformedResponseHead(HeadDefect.BAD_CONTENT_LENGTH)


def _without_connection_named(head: bytes, lowered: bytes) -> bytes:
    """
    C{head} less the lines its C{Connection} header names (RFC 9110 7.6.1),
    framing headers excepted; the same object when nothing is named.
    """
    connection = _field_spans(lowered, b"connection")
    if not connection:
        return head
    named = connection_options(_values(lowered, b"connection", connection)) - FRAMING_HEADERS
    spans: list[tuple[int, int]] = []
    for name in named:
        spans.extend(_field_spans(lowered, name))
    if not spans:
        return head
    spans.sort()
    kept: list[bytes] = []
    at = 0
    for start, end in spans:
        kept.append(head[at : start - 2])  # the line goes with the CRLF before it
        at = end
    kept.append(head[at:])
    return b"".join(kept)


def _status_of(line: bytes | bytearray) -> int:
    """
    The status code of a status line, for the check made before the head is complete.
    """
    match = _STATUS_LINE.fullmatch(line)
    if match is None:
        raise MalformedResponseHead(HeadDefect.BAD_STATUS_LINE)
    return int(match.group(1))


def screen_head(head: bytes) -> tuple[int, bytes]:
    """
    Check one complete head (status line and field lines joined by CRLF,
    without the blank line that ends it): its status code and the head to
    hand on, less the lines named by its Connection header. Raises
    L{MalformedResponseHead}.

    A valid head costs a few passes in C: a count, a replace and a
    translate for the bytes, one regular-expression scan that jumps from
    line start to line start for the names, one match for the status line.
    Only a head that fails them is looked at again, to name its defect.
    """
    lines = head.count(b"\r\n")
    if lines > MAX_HEADER_LINES:
        raise MalformedResponseHead(HeadDefect.TOO_MANY_LINES)
    status_end = head.find(b"\r\n")
    if status_end < 0:
        status_end = len(head)
    match = _STATUS_LINE.fullmatch(head, 0, status_end)
    if (
        match is None
        or status_end > MAX_LINE_BYTES
        # After the CRLF pairs are gone, any CR, LF or control byte left is one.
        or 0 in head.replace(b"\r\n", b" ").translate(_FIELD_BYTES)
        # Every field line starts with a token and a colon (an obs-fold line
        # starts with SP or HTAB, a broken one with anything else).
        or len(_FIELD_START.findall(head)) != lines
        # Only a field block longer than one line's limit can hold a long line.
        or (
            len(head) - status_end - 2 > MAX_LINE_BYTES
            and max(map(len, head[status_end + 2 :].split(b"\r\n"))) > MAX_LINE_BYTES
        )
    ):
        raise MalformedResponseHead(_defect_of(head))
    status = int(match.group(1))
    if lines == 0:
        return status, head
    lowered = head.lower()
    if status >= 200:
        _check_framing(lowered)
    return status, _without_connection_named(head, lowered)


def _defect_of(head: bytes) -> HeadDefect:
    """
    Which rule a head that failed L{screen_head}'s checks breaks (the first,
    in the order a reader of the log would look for them).
    """
    crlf = head.count(b"\r\n")
    if head.count(b"\r") != crlf or head.count(b"\n") != crlf:
        return HeadDefect.BARE_CR_OR_LF
    if _CONTROL.search(head) is not None:
        return HeadDefect.CONTROL_CHARACTER
    lines = head.split(b"\r\n")
    if max(map(len, lines)) > MAX_LINE_BYTES:
        return HeadDefect.LINE_TOO_LONG
    if _STATUS_LINE.fullmatch(lines[0]) is None:
        return HeadDefect.BAD_STATUS_LINE
    if any(line[:1] in (b" ", b"\t") for line in lines[1:]):
        return HeadDefect.OBS_FOLD
    return HeadDefect.BAD_FIELD_LINE


class ResponseHeadScreen:
    """
    Screens the heads of one response at a time, fed the bytes an upstream
    connection delivers in any pieces.

    L{feed} holds bytes until a head is complete (refusing as soon as the
    bytes held could not become a valid head: over the size limit, a bare
    LF, a bad status line), screens it, drops interim (1xx) heads, and gives
    back the final head (ending in its blank line) with whatever followed
    it. From then on L{done} is true and the caller passes bytes on without
    asking; L{reset} starts over for the next response on the connection.
    """

    __slots__ = ("_budget", "_checked", "_pending", "_status_checked", "done", "interim")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """
        Expect a new response (the next request on a persistent connection).
        """
        self._pending = bytearray()
        self._budget = MAX_HEAD_BYTES
        self._checked = 0  # bytes of _pending already checked for bare LF
        self._status_checked = False
        self.done = False
        self.interim = 0  # interim heads dropped so far

    def feed(self, data: bytes) -> tuple[bytes, bytes] | None:
        """
        Take the next bytes: None while the final head is incomplete, then
        (the final head screened, the bytes after it). Raises
        L{MalformedResponseHead}; after that the connection must be closed.
        """
        if self.done:
            return b"", data
        buffer: bytes | bytearray
        if self._pending:
            scan = len(self._pending) - 3
            self._pending += data
            buffer = self._pending
        else:
            scan = 0
            buffer = data
        while True:
            end = buffer.find(b"\r\n\r\n", max(scan, 0))
            if end < 0:
                self._check_partial(buffer)
                if buffer is not self._pending:
                    self._pending = bytearray(buffer)
                return None
            size = end + 4
            if size > self._budget:
                raise MalformedResponseHead(HeadDefect.TOO_LARGE)
            self._budget -= size
            status, head = screen_head(bytes(buffer[:end]))
            rest = bytes(buffer[size:])
            if status >= 200:
                self.done = True
                self._pending = bytearray()
                return head + b"\r\n\r\n", rest
            if status == SWITCHING_PROTOCOLS:
                raise MalformedResponseHead(HeadDefect.SWITCHING_PROTOCOLS)
            self.interim += 1
            if self.interim > MAX_INTERIM_RESPONSES:
                raise MalformedResponseHead(HeadDefect.TOO_MANY_INTERIM)
            # An interim head is dropped: the final head follows it.
            self._pending = bytearray()
            self._checked = 0
            self._status_checked = False
            buffer = rest
            scan = 0
            if not buffer:
                return None

    def _check_partial(self, buffer: bytes | bytearray) -> None:
        """
        Refuse an incomplete head as soon as it cannot become a valid one,
        so an upstream that never sends a CRLF CRLF is not waited for.
        """
        if len(buffer) >= self._budget:
            raise MalformedResponseHead(HeadDefect.TOO_LARGE)
        start = self._checked if buffer is self._pending else 0
        # Every LF since the last check must follow a CR (the pair may
        # straddle the previous piece).
        if buffer.count(b"\n", start) != buffer.count(b"\r\n", max(start - 1, 0)):
            raise MalformedResponseHead(HeadDefect.BARE_CR_OR_LF)
        self._checked = len(buffer)
        if not self._status_checked:
            line_end = buffer.find(b"\r\n")
            if line_end >= 0:
                _status_of(buffer[:line_end])
                self._status_checked = True
            elif len(buffer) > MAX_LINE_BYTES:
                raise MalformedResponseHead(HeadDefect.LINE_TOO_LONG)
