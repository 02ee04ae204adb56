"""
The response-head screen on every rule, as a pure function of bytes (with
hypothesis for the properties: a head built of valid parts passes unchanged
but for its Connection-named lines, in any pieces; any single forbidden
byte put in is refused), and the screened Twisted client protocol and pool
on a StringTransport, pinning the private Twisted API they rest on.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import (
    HTTPClientParser,
    ParseError,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import _MalformedChunkedDataError

from credproxy.http._upstream import (
    BAD_CHUNKED_FRAMING,
    PARSER_REFUSED_HEAD,
    UpstreamMalformed,
    malformed_kind,
)
from credproxy.http._upstream_head import (
    FRAMING_HEADERS,
    MAX_HEAD_BYTES,
    MAX_HEADER_LINES,
    MAX_INTERIM_RESPONSES,
    MAX_LINE_BYTES,
    HeadDefect,
    MalformedResponseHead,
    ResponseHeadScreen,
    connection_options,
    screen_head,
)

OK_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Request-Id: req_1\r\n"
    b"Transfer-Encoding: chunked"
)


def feed_all(data: bytes, pieces: list[int] | None = None) -> tuple[bytes, bytes] | None:
    """
    Feed C{data} to a fresh screen, cut at C{pieces} (offsets), returning
    the first complete result (and everything fed after it appended).
    """
    screen = ResponseHeadScreen()
    cuts = [*sorted(set(pieces or [])), len(data)]
    start = 0
    result: tuple[bytes, bytes] | None = None
    for cut in cuts:
        piece = data[start:cut]
        start = cut
        if result is not None:
            result = (result[0], result[1] + piece)
            continue
        result = screen.feed(piece)
    return result


def defect(data: bytes) -> HeadDefect | None:
    try:
        feed_all(data)
    except MalformedResponseHead as refusal:
        return refusal.defect
    return None


class ScreenRuleTests(SynchronousTestCase):
    def assert_passes(self, head: bytes, expected: bytes | None = None) -> None:
        result = feed_all(head + b"\r\n\r\nbody")
        assert result is not None
        self.assertEqual(result, ((expected or head) + b"\r\n\r\n", b"body"))

    def assert_refused(self, data: bytes, kind: HeadDefect) -> None:
        self.assertEqual(defect(data), kind, data[:80])

    def test_a_normal_head_passes_unchanged_with_what_follows(self) -> None:
        self.assert_passes(OK_HEAD)
        self.assert_passes(b"HTTP/1.0 204 No Content")
        self.assert_passes(b"HTTP/1.1 599 Whatever \t phrase\x80\xff")
        self.assert_passes(b"HTTP/1.1 200")  # no phrase, no SP: some CDNs
        self.assert_passes(b"HTTP/1.1 200 ")
        self.assert_passes(b"HTTP/1.1 200 OK\r\nX-Tab:\tv\t\r\nX-Empty:\r\nX-Obs: \x80\xfe")

    def test_an_incomplete_head_is_held(self) -> None:
        screen = ResponseHeadScreen()
        self.assertIsNone(screen.feed(OK_HEAD[:30]))
        self.assertIsNone(screen.feed(OK_HEAD[30:] + b"\r\n\r"))
        self.assertEqual(screen.feed(b"\n5\r\n"), (OK_HEAD + b"\r\n\r\n", b"5\r\n"))
        self.assertTrue(screen.done)
        self.assertEqual(screen.feed(b"hello"), (b"", b"hello"))  # the body passes

    def test_reset_expects_the_next_answer(self) -> None:
        screen = ResponseHeadScreen()
        screen.feed(OK_HEAD + b"\r\n\r\n")
        screen.reset()
        self.assertFalse(screen.done)
        with self.assertRaises(MalformedResponseHead):
            screen.feed(b"HTTP/1.1 200 OK\r\nX: \x00\r\n\r\n")

    def test_header_line_count_limit(self) -> None:
        lines = b"".join(b"\r\nX-H%d: v" % (i,) for i in range(MAX_HEADER_LINES))
        self.assert_passes(b"HTTP/1.1 200 OK" + lines)
        self.assert_refused(
            b"HTTP/1.1 200 OK" + lines + b"\r\nX-One-Too-Many: v\r\n\r\n",
            HeadDefect.TOO_MANY_LINES,
        )

    def test_head_size_limit(self) -> None:
        status = b"HTTP/1.1 200 OK"
        filler = b"\r\nX-Pad: "
        room = MAX_HEAD_BYTES - len(status) - len(filler) - 4
        line = 8000
        head = status + b"".join(
            filler + b"a" * min(line, room - i) for i in range(0, room, line + len(filler))
        )
        head += b"b" * (MAX_HEAD_BYTES - 4 - len(head))
        self.assertEqual(len(head) + 4, MAX_HEAD_BYTES)
        self.assertIsNotNone(feed_all(head + b"\r\n\r\n"))
        self.assert_refused(head + b"c\r\n\r\n", HeadDefect.TOO_LARGE)

    def test_a_head_that_never_ends_is_refused_at_the_limit_not_held(self) -> None:
        screen = ResponseHeadScreen()
        screen.feed(b"HTTP/1.1 200 OK\r\n")
        fed = 0
        with self.assertRaises(MalformedResponseHead) as caught:
            while fed < 10 * MAX_HEAD_BYTES:
                screen.feed(b"X-Pad: " + b"a" * 1017 + b"\r\n")
                fed += 1026
        self.assertEqual(caught.exception.defect, HeadDefect.TOO_LARGE)
        self.assertLessEqual(fed, MAX_HEAD_BYTES)

    def test_one_big_read_over_the_limit_is_refused(self) -> None:
        self.assert_refused(b"HTTP/1.1 200 OK\r\nX: " + b"a" * MAX_HEAD_BYTES, HeadDefect.TOO_LARGE)

    def test_line_length_limit_is_below_twisteds_line_parser(self) -> None:
        # Twisted's LineReceiver closes the connection on a longer line
        # (counting the CR) without an error the exchange could name.
        self.assertGreaterEqual(HTTPClientParser.MAX_LENGTH, MAX_LINE_BYTES + 1)
        value = b"v" * (MAX_LINE_BYTES - len(b"X-Long: "))
        self.assert_passes(b"HTTP/1.1 200 OK\r\nX-Long: " + value)
        self.assert_refused(
            b"HTTP/1.1 200 OK\r\nX-Long: " + value + b"v\r\n\r\n", HeadDefect.LINE_TOO_LONG
        )
        self.assert_refused(b"HTTP/1.1 200 " + b"O" * MAX_LINE_BYTES, HeadDefect.LINE_TOO_LONG)

    def test_malformed_status_lines(self) -> None:
        for line in (
            b"HTTP/2 200 OK",
            b"HTTP/2.0 200 OK",
            b"HTTP/1.2 200 OK",
            b"http/1.1 200 OK",
            b"HTTP/1.1 20 OK",
            b"HTTP/1.1 2000 OK",
            b"HTTP/1.1 099 Low",
            b"HTTP/1.1 600 High",
            b"HTTP/1.1  200 OK",
            b"HTTP/1.1 200OK",
            b"HTTP/1.1 +20 OK",
            b" HTTP/1.1 200 OK",
            b"ICY 200 OK",
            b"",
        ):
            self.assert_refused(line + b"\r\nA: b\r\n\r\n", HeadDefect.BAD_STATUS_LINE)

    def test_a_bad_status_line_is_refused_before_the_head_is_complete(self) -> None:
        screen = ResponseHeadScreen()
        with self.assertRaises(MalformedResponseHead) as caught:
            screen.feed(b"SSH-2.0-OpenSSH_9.2\r\n")
        self.assertEqual(caught.exception.defect, HeadDefect.BAD_STATUS_LINE)

    def test_bare_cr_and_bare_lf(self) -> None:
        for data in (
            b"HTTP/1.1 200 O\rK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nA: b\rc\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nA: b\r\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nA: b\nC: d\r\n\r\n",
            b"HTTP/1.1 200 OK\nA: b\n\n",
        ):
            self.assert_refused(data, HeadDefect.BARE_CR_OR_LF)

    def test_bare_lf_is_refused_before_the_head_is_complete(self) -> None:
        screen = ResponseHeadScreen()
        screen.feed(b"HTTP/1.1 200 OK\r\nA: b\r")
        with self.assertRaises(MalformedResponseHead):
            screen.feed(b"\nC: d\n")  # the CR LF pair straddles the pieces; the next LF is bare

    def test_control_characters(self) -> None:
        for byte in [*range(0x09), *range(0x0B, 0x0D), *range(0x0E, 0x20), 0x7F]:
            char = bytes([byte])
            self.assert_refused(
                b"HTTP/1.1 200 OK\r\nA: b" + char + b"c\r\n\r\n", HeadDefect.CONTROL_CHARACTER
            )
            self.assert_refused(
                b"HTTP/1.1 200 O" + char + b"K\r\n\r\n", HeadDefect.CONTROL_CHARACTER
            )

    def test_obs_fold(self) -> None:
        for fold in (b" ", b"\t"):
            self.assert_refused(
                b"HTTP/1.1 200 OK\r\nA: b\r\n" + fold + b"continued\r\n\r\n", HeadDefect.OBS_FOLD
            )
        self.assert_refused(b"HTTP/1.1 200 OK\r\n folded: first\r\n\r\n", HeadDefect.OBS_FOLD)

    def test_names_must_be_tokens_followed_by_a_colon(self) -> None:
        for line in (
            b"X Y: v",
            b"X-Y : v",
            b"X(Y): v",
            b"X/Y: v",
            b": v",
            b"no colon here",
            b"\xc3\xa9t\xc3\xa9: v",
            b'"q": v',
        ):
            self.assert_refused(
                b"HTTP/1.1 200 OK\r\nA: b\r\n" + line + b"\r\n\r\n", HeadDefect.BAD_FIELD_LINE
            )
        self.assert_passes(b"HTTP/1.1 200 OK\r\n!#$%&'*+-.^_`|~09azAZ: v\r\nA:b:c")

    def test_the_refusal_names_the_defect_never_the_bytes(self) -> None:
        try:
            feed_all(b"HTTP/1.1 200 OK\r\nX: sk-ant-api03-\x00secret\r\n\r\n")
        except MalformedResponseHead as refusal:
            self.assertEqual(str(refusal), HeadDefect.CONTROL_CHARACTER.value)
            self.assertNotIn("secret", repr(refusal))
        else:
            self.fail("not refused")


class ConnectionHeaderTests(SynchronousTestCase):
    def test_named_lines_are_removed_and_connection_kept(self) -> None:
        head = (
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nx-hop: 1\r\n"
            b"Keep-Alive: timeout=5\r\nRequest-Id: r\r\nX-HOP: 2\r\nX-Hopper: stays"
        )
        result = feed_all(head + b"\r\n\r\n")
        assert result is not None
        self.assertEqual(
            result[0],
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nRequest-Id: r\r\n"
            b"X-Hopper: stays\r\n\r\n",
        )

    def test_every_connection_header_counts(self) -> None:
        head = b"HTTP/1.1 200 OK\r\nConnection: a\r\nA: 1\r\nB: 2\r\nconnection: ,, b ,\r\nC: 3"
        result = feed_all(head + b"\r\n\r\n")
        assert result is not None
        self.assertEqual(
            result[0], b"HTTP/1.1 200 OK\r\nConnection: a\r\nconnection: ,, b ,\r\nC: 3\r\n\r\n"
        )

    def test_framing_headers_are_never_removed(self) -> None:
        head = (
            b"HTTP/1.1 200 OK\r\nConnection: close, Content-Length, Transfer-Encoding, "
            b"Connection\r\nContent-Length: 2"
        )
        result = feed_all(head + b"\r\n\r\nok")
        assert result is not None
        self.assertEqual(result[0], head + b"\r\n\r\n")
        self.assertEqual(FRAMING_HEADERS, {b"connection", b"content-length", b"transfer-encoding"})

    def test_connection_options(self) -> None:
        self.assertEqual(
            connection_options([b"Keep-Alive, X-A", b" ,x-b\t, ,"]), {b"keep-alive", b"x-a", b"x-b"}
        )
        self.assertEqual(connection_options([]), frozenset())


class FramingTests(SynchronousTestCase):
    def test_framing_rules(self) -> None:
        good = (
            b"Transfer-Encoding: chunked",
            b"transfer-encoding:  Chunked ",
            b"Content-Length: 12",
            b"Content-Length: 12, 12\r\ncontent-length: 012",
        )
        for lines in good:
            self.assertIsNone(defect(b"HTTP/1.1 200 OK\r\n" + lines + b"\r\n\r\n"), lines)
        bad = (
            (b"Transfer-Encoding: gzip, chunked", HeadDefect.BAD_TRANSFER_ENCODING),
            (b"Transfer-Encoding: identity", HeadDefect.BAD_TRANSFER_ENCODING),
            (
                b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
                HeadDefect.BAD_TRANSFER_ENCODING,
            ),
            (b"Transfer-Encoding: chunked\r\nContent-Length: 3", HeadDefect.AMBIGUOUS_FRAMING),
            (b"Content-Length: 12, 13", HeadDefect.BAD_CONTENT_LENGTH),
            (b"Content-Length: 1\r\nContent-Length: 2", HeadDefect.BAD_CONTENT_LENGTH),
            (b"Content-Length: -1", HeadDefect.BAD_CONTENT_LENGTH),
            (b"Content-Length: 0x10", HeadDefect.BAD_CONTENT_LENGTH),
            (b"Content-Length:", HeadDefect.BAD_CONTENT_LENGTH),
            (b"Content-Length: 1" + b"0" * 30, HeadDefect.BAD_CONTENT_LENGTH),
        )
        for lines, kind in bad:
            self.assertEqual(defect(b"HTTP/1.1 200 OK\r\n" + lines + b"\r\n\r\n"), kind, lines)


class InterimResponseTests(SynchronousTestCase):
    def test_interim_heads_are_screened_and_dropped(self) -> None:
        data = (
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n"
            + OK_HEAD
            + b"\r\n\r\nrest"
        )
        screen = ResponseHeadScreen()
        self.assertEqual(screen.feed(data), (OK_HEAD + b"\r\n\r\n", b"rest"))
        self.assertEqual(screen.interim, 2)
        for cut in range(1, len(data)):  # in two pieces, cut anywhere
            self.assertEqual(feed_all(data, [cut]), (OK_HEAD + b"\r\n\r\n", b"rest"), cut)

    def test_a_bad_interim_head_is_refused(self) -> None:
        self.assertEqual(
            defect(b"HTTP/1.1 100 Continue\r\nX: \x00\r\n\r\n" + OK_HEAD + b"\r\n\r\n"),
            HeadDefect.CONTROL_CHARACTER,
        )

    def test_switching_protocols_is_refused(self) -> None:
        self.assertEqual(
            defect(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n"),
            HeadDefect.SWITCHING_PROTOCOLS,
        )

    def test_a_run_of_interim_heads_is_bounded(self) -> None:
        interim = b"HTTP/1.1 100 Continue\r\n\r\n"
        self.assertIsNotNone(feed_all(interim * MAX_INTERIM_RESPONSES + OK_HEAD + b"\r\n\r\n"))
        self.assertEqual(
            defect(interim * (MAX_INTERIM_RESPONSES + 1) + OK_HEAD + b"\r\n\r\n"),
            HeadDefect.TOO_MANY_INTERIM,
        )

    def test_the_size_limit_covers_every_head_of_the_answer(self) -> None:
        hint = b"HTTP/1.1 103 Early Hints\r\nLink: " + b"a" * 9500 + b"\r\n\r\n"
        self.assertIsNotNone(feed_all(hint * 6 + OK_HEAD + b"\r\n\r\n"))
        self.assertEqual(defect(hint * 7 + OK_HEAD + b"\r\n\r\n"), HeadDefect.TOO_LARGE)


# -- properties --------------------------------------------------------------------------

TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
VALUE_BYTES = [0x09, *range(0x20, 0x7F), *range(0x80, 0x100)]
FORBIDDEN = [*range(0x09), *range(0x0A, 0x20), 0x7F]  # CR and LF included
RESERVED = FRAMING_HEADERS | {b"keep-alive"}

names = st.text(alphabet=TCHARS, min_size=1, max_size=20).map(str.encode)
values = st.lists(st.sampled_from(VALUE_BYTES), max_size=40).map(bytes)
fields = st.lists(
    st.tuples(names, values).filter(lambda f: f[0].lower() not in RESERVED), max_size=30
)
statuses = st.tuples(
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]),
    st.integers(200, 599),
    st.one_of(
        st.none(),
        st.lists(st.sampled_from(VALUE_BYTES), max_size=30).map(bytes),
    ),
)


def build_head(status: tuple[bytes, int, bytes | None], lines: list[tuple[bytes, bytes]]) -> bytes:
    version, code, phrase = status
    head = version + b" %d" % (code,) + (b"" if phrase is None else b" " + phrase)
    return head + b"".join(b"\r\n" + name + b":" + value for name, value in lines)


class ScreenPropertyTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(status=statuses, lines=fields, cuts=st.lists(st.integers(0, 2000), max_size=6))
    def test_a_head_of_valid_parts_passes_unchanged_in_any_pieces(
        self,
        status: tuple[bytes, int, bytes | None],
        lines: list[tuple[bytes, bytes]],
        cuts: list[int],
    ) -> None:
        head = build_head(status, lines)
        data = head + b"\r\n\r\nbody"
        self.assertEqual(
            feed_all(data, [c for c in cuts if c < len(data)]), (head + b"\r\n\r\n", b"body")
        )

    @settings(max_examples=300, deadline=None)
    @given(status=statuses, lines=fields, data=st.data())
    def test_only_the_connection_named_lines_are_removed(
        self, status: tuple[bytes, int, bytes | None], lines: list[tuple[bytes, bytes]], data: Any
    ) -> None:
        named = data.draw(st.lists(st.sampled_from([n for n, _ in lines] or [b"x-absent"])))
        connection = (b"Connection", b" " + b", ".join(named))
        position = data.draw(st.integers(0, len(lines)))
        with_connection = [*lines[:position], connection, *lines[position:]]
        drop = {name.lower() for name in named}
        expected = build_head(
            status, [line for line in with_connection if line[0].lower() not in drop]
        )
        result = feed_all(build_head(status, with_connection) + b"\r\n\r\n")
        self.assertEqual(result, (expected + b"\r\n\r\n", b""))

    @settings(max_examples=500, deadline=None)
    @given(status=statuses, lines=fields, byte=st.sampled_from(FORBIDDEN), data=st.data())
    def test_any_single_forbidden_byte_put_in_is_refused(
        self,
        status: tuple[bytes, int, bytes | None],
        lines: list[tuple[bytes, bytes]],
        byte: int,
        data: Any,
    ) -> None:
        head = build_head(status, lines)
        at = data.draw(st.integers(0, len(head)))
        spoiled = head[:at] + bytes([byte]) + head[at:] + b"\r\n\r\n"
        with self.assertRaises(MalformedResponseHead):
            feed_all(spoiled)

    @settings(max_examples=500, deadline=None)
    @given(
        junk=st.binary(max_size=300),
        prefix=st.sampled_from([b"", b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 100 Continue\r\n\r\n"]),
    )
    def test_any_bytes_are_refused_or_give_a_head_that_screens_the_same(
        self, junk: bytes, prefix: bytes
    ) -> None:
        try:
            result = feed_all(prefix + junk + b"\r\n\r\n")
        except MalformedResponseHead:
            return
        if result is None:
            return  # still waiting for an end (an interim head came out whole)
        head = result[0][:-4]
        self.assertEqual(screen_head(head)[1], head)  # screening is idempotent
        self.assertNotIn(b"\x00", head)


# -- the screened protocol and the pool (private Twisted API pinned here) ------------------


class MalformedKindTests(SynchronousTestCase):
    def test_malformed_kind_sees_through_twisteds_wrappers(self) -> None:
        inner = Failure(UpstreamMalformed("X"))
        self.assertEqual(
            malformed_kind(Failure(ResponseFailed([Failure(ValueError()), inner]))), "X"
        )
        self.assertEqual(
            malformed_kind(Failure(ResponseNeverReceived([Failure(ParseError("r", b"d"))]))),
            PARSER_REFUSED_HEAD,
        )
        self.assertEqual(
            malformed_kind(Failure(ResponseFailed([Failure(_MalformedChunkedDataError())]))),
            BAD_CHUNKED_FRAMING,
        )
        self.assertIsNone(
            malformed_kind(Failure(ResponseNeverReceived([Failure(ConnectionDone())])))
        )
