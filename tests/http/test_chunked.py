"""
The upstream body's chunked decoder: what it delivers (all of a read's data
in one call), what it refuses, its bounds, and agreement with Twisted's own
decoder on every body both accept.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import _ChunkedTransferDecoder, _DataLoss, _MalformedChunkedDataError

from credproxy.http._chunked import MAX_BYTES_WITHOUT_DATA, ChunkedDecoder


class Decoded:
    """
    What a decoder gave: the data calls, and the rest once finished.
    """

    def __init__(self, decoder_class: type = ChunkedDecoder) -> None:
        self.calls: list[bytes] = []
        self.rest: bytes | None = None
        self.decoder = decoder_class(self.calls.append, self._finished)

    def _finished(self, rest: bytes) -> None:
        self.rest = rest

    def feed(self, *pieces: bytes) -> Decoded:
        for piece in pieces:
            if self.rest is not None:
                break  # finished: a parser feeds its decoder no more
            self.decoder.dataReceived(piece)
        return self

    @property
    def data(self) -> bytes:
        return b"".join(self.calls)


def chunked(*chunks: bytes, trailers: bytes = b"") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n" + trailers + b"\r\n"


class DecodingTests(SynchronousTestCase):
    def test_all_the_chunks_of_one_read_are_delivered_in_one_call(self) -> None:
        events = [b"event: ping\ndata: {}\n\n"] * 40
        decoded = Decoded().feed(chunked(*events))
        self.assertEqual(decoded.calls, [b"".join(events)])
        self.assertEqual(decoded.rest, b"")

    def test_a_body_in_one_byte_pieces_decodes_the_same(self) -> None:
        body = chunked(b"hello", b" ", b"world" * 100, trailers=b"x-trailer: 1\r\n")
        decoded = Decoded().feed(*[body[i : i + 1] for i in range(len(body))])
        self.assertEqual(decoded.data, b"hello " + b"world" * 100)
        self.assertEqual(decoded.rest, b"")

    def test_bytes_after_the_body_are_reported(self) -> None:
        # llhttp does not say where the body ended within a read, so the
        # read is given: the protocol only asks whether anything followed.
        for after in [b"HTTP/1.1 200 OK\r\n", b"garbage"]:
            read = chunked(b"ab") + after
            decoded = Decoded().feed(read)
            self.assertEqual(decoded.data, b"ab")
            self.assertEqual(decoded.rest, read)
        decoded = Decoded().feed(chunked(b"ab"))
        self.assertEqual(decoded.rest, b"")
        decoded.decoder.dataReceived(b"more")  # after the end: ignored
        self.assertEqual(decoded.data, b"ab")

    def test_extensions_and_upper_case_sizes_are_read(self) -> None:
        decoded = Decoded().feed(b"A;name=value\r\n0123456789\r\n0;last\r\n\r\n")
        self.assertEqual(decoded.data, b"0123456789")
        self.assertEqual(decoded.rest, b"")

    def test_an_unfinished_body_is_data_loss(self) -> None:
        for body in [b"", b"5\r\nab", b"2\r\nab\r\n", b"0\r\n", b"0\r\nx: 1\r\n"]:
            decoded = Decoded().feed(body)
            with self.assertRaises(_DataLoss):
                decoded.decoder.noMoreData()
        finished = Decoded().feed(chunked(b"ab"))
        finished.decoder.noMoreData()  # no error

    def test_malformed_framing_is_refused(self) -> None:
        for body in [
            b"g\r\n",  # not hex
            b"-1\r\n",
            b" 5\r\nabcde\r\n",
            b"5 \r\nabcde\r\n",
            b"5\nabcde\r\n",  # bare LF
            b"5\r\nabcdeXY",  # data not followed by CRLF
            b"5\r\nabcde\rX",
            b"5;ext\x00\r\nabcde\r\n",  # control byte in an extension
            b"1" * 17 + b"\r\n",  # a size past 16 digits
            b"0\r\nbad trailer\r\n\r\n",
            b"0\r\nx: 1\nfoo\r\n\r\n",
        ]:
            decoded = Decoded()
            with self.assertRaises(_MalformedChunkedDataError, msg=repr(body)):
                decoded.feed(body)

    def test_a_bad_size_line_is_refused_before_its_end_arrives(self) -> None:
        with self.assertRaises(_MalformedChunkedDataError):
            Decoded().feed(b"zz")

    def test_nothing_of_a_read_whose_framing_breaks_is_delivered(self) -> None:
        # The data of earlier reads went out; the refused read's did not,
        # neither a good chunk ahead of the break nor the lying chunk's own.
        decoded = Decoded().feed(b"2\r\nok\r\n")
        with self.assertRaises(_MalformedChunkedDataError):
            decoded.feed(b"2\r\nab\r\n5\r\nhello!!\r\n")
        self.assertEqual(decoded.data, b"ok")

    def test_framing_without_data_is_bounded(self) -> None:
        # A chunk extension that never ends holds no buffer in llhttp, but
        # carries no data either: past the bound it is refused.
        decoded = Decoded().feed(b"5;")
        decoded.feed(b"e" * (MAX_BYTES_WITHOUT_DATA - 10))
        with self.assertRaises(_MalformedChunkedDataError):
            decoded.feed(b"e" * 20)

    def test_the_trailer_section_is_bounded(self) -> None:
        decoded = Decoded().feed(chunked(b"ab")[: -len(b"\r\n")])  # the last chunk, no end
        line = b"x-trailer: " + b"v" * 1000 + b"\r\n"
        with self.assertRaises(_MalformedChunkedDataError):
            for _ in range(MAX_BYTES_WITHOUT_DATA // len(line) + 2):
                decoded.feed(line)
        self.assertIsNone(decoded.rest)

    def test_data_keeps_a_long_stream_going(self) -> None:
        decoded = Decoded()
        event = b"x" * 1000
        for _ in range(100):  # far past the bound in all, with data all along
            decoded.feed(b"%x\r\n%s\r\n" % (len(event), event))
        self.assertEqual(len(decoded.data), 100 * len(event))


_chunk_data = st.binary(min_size=1, max_size=300)
_bodies = st.builds(
    lambda chunks, trailers, rest: chunked(*chunks, trailers=trailers) + rest,
    st.lists(_chunk_data, max_size=12),
    st.sampled_from([b"", b"x-one: 1\r\n", b"x-one: 1\r\nx-two: two\r\n"]),
    st.sampled_from([b"", b"HTTP/1.1 200 OK\r\n"]),
)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return [p for p in pieces if p]


def _outcome(decoder_class: type, pieces: list[bytes]) -> tuple[str, bytes, bool | None]:
    """
    How a decoder ended, its data, and whether bytes followed the end.
    """
    decoded = Decoded(decoder_class)
    try:
        decoded.feed(*pieces)
    except _MalformedChunkedDataError:
        return ("refused", decoded.data, None)
    if decoded.rest is None:
        return ("open", decoded.data, None)
    return ("finished", decoded.data, bool(decoded.rest))


class AgreementTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(_bodies, st.lists(st.integers(min_value=0, max_value=4000), max_size=8))
    def test_a_valid_body_in_any_pieces_decodes_as_twisted_decodes_it(
        self, body: bytes, cuts: list[int]
    ) -> None:
        pieces = _split(body, cuts)
        ours = _outcome(ChunkedDecoder, pieces)
        self.assertEqual(ours[0], "finished")
        self.assertEqual(ours, _outcome(_ChunkedTransferDecoder, pieces))

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.sampled_from(
                [b"0", b"5", b"a", b"Z", b";", b"x", b"\r", b"\n", b"\r\n", b":", b" "]
            ),
            max_size=30,
        )
    )
    def test_ours_is_at_least_as_strict_as_twisteds(self, parts: list[bytes]) -> None:
        body = b"".join(parts)
        ours = _outcome(ChunkedDecoder, [body])
        theirs = _outcome(_ChunkedTransferDecoder, [body])
        if ours[0] == "finished":
            self.assertEqual(ours, theirs)
        if theirs[0] == "refused":
            self.assertEqual(ours[0], "refused")
