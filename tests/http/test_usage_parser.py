"""
The usage parsers behind the audit line: the same usage whatever the split
of the stream, bounded buffering, and nothing from a malformed answer.
"""

from __future__ import annotations

import itertools
import json

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from credproxy.http._usage import (
    MAX_JSON_BODY,
    MAX_SSE_LINE,
    JSONUsageParser,
    SSEUsageParser,
    Usage,
    parser_for,
)


def _event(kind: str, data: dict[str, object]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


STREAM = b"".join(
    [
        _event(
            "message_start",
            {
                "type": "message_start",
                "message": {"model": "claude-x", "usage": {"input_tokens": 25, "output_tokens": 1}},
            },
        ),
        _event(
            "content_block_delta",
            {"type": "content_block_delta", "delta": {"text": "message_start in text"}},
        ),
        b": a comment line\r\n\r\n",
        _event("message_delta", {"type": "message_delta", "usage": {"output_tokens": 15}}),
        _event("message_stop", {"type": "message_stop"}),
    ]
)
EXPECTED = Usage("claude-x", 25, 15)


def _sse(chunks: list[bytes]) -> Usage:
    parser = SSEUsageParser()
    for chunk in chunks:
        parser.feed(chunk)
    return parser.finish()


class SSEUsageTests(SynchronousTestCase):
    def test_one_chunk(self) -> None:
        self.assertEqual(_sse([STREAM]), EXPECTED)

    def test_one_byte_at_a_time(self) -> None:
        self.assertEqual(_sse([STREAM[i : i + 1] for i in range(len(STREAM))]), EXPECTED)

    def test_over_long_line_is_skipped_not_buffered(self) -> None:
        parser = SSEUsageParser()
        parser.feed(b"data: " + b"x" * (MAX_SSE_LINE + 10))
        self.assertEqual(parser._tail, b"")
        parser.feed(b"x" * 1000 + b"\n" + STREAM)
        self.assertEqual(parser.finish(), EXPECTED)

    def test_malformed_events_give_no_usage(self) -> None:
        parser = SSEUsageParser()
        parser.feed(b'data: {"type":"message_start","message":[1]}\n')
        parser.feed(b'data: {"type":"message_delta","usage":{"output_tokens":"many"}}\n')
        parser.feed(b'data: {"type":"message_start", broken\n')
        self.assertEqual(parser.finish(), Usage())


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=20))
def test_any_split_gives_the_same_usage(cuts: list[int]) -> None:
    points = sorted(set([0, *cuts, len(STREAM)]))
    chunks = [STREAM[a:b] for a, b in itertools.pairwise(points)]
    assert _sse(chunks) == EXPECTED


class JSONUsageTests(SynchronousTestCase):
    BODY = json.dumps(
        {"model": "claude-y", "usage": {"input_tokens": 3, "output_tokens": 4}}
    ).encode()

    def test_split_body(self) -> None:
        parser = JSONUsageParser()
        for i in range(0, len(self.BODY), 7):
            parser.feed(self.BODY[i : i + 7])
        self.assertEqual(parser.finish(), Usage("claude-y", 3, 4))

    def test_body_over_the_limit_is_dropped(self) -> None:
        parser = JSONUsageParser()
        parser.feed(b" " * MAX_JSON_BODY)
        parser.feed(self.BODY)
        self.assertEqual(parser._parts, [])
        self.assertEqual(parser.finish(), Usage())

    def test_not_json(self) -> None:
        parser = JSONUsageParser()
        parser.feed(b"<html>")
        self.assertEqual(parser.finish(), Usage())


class ParserChoiceTests(SynchronousTestCase):
    def test_by_content_type(self) -> None:
        self.assertIsInstance(parser_for(b"text/event-stream; charset=utf-8"), SSEUsageParser)
        self.assertIsInstance(parser_for(b"Application/JSON"), JSONUsageParser)
        self.assertIsNone(parser_for(b"text/html"))
        self.assertIsNone(parser_for(None))
