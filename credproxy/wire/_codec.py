"""
The bytes of a frame, shared by the server and both clients so neither can
drift from the other: the length prefix, and JSON the way JavaScript's
C{JSON.stringify} and C{JSON.parse} treat it (compact, UTF-8, no NaN or
Infinity, an object at the top).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any, Final, TypeGuard

import orjson

from credproxy.wire._spec import HEADER_SIZE, MAX_FRAME_V1, MAX_FRAME_V2

LENGTH_PREFIX: Final = struct.Struct(">I")
assert LENGTH_PREFIX.size == HEADER_SIZE

# orjson rather than the standard library: it decodes a small frame about six
# times as fast and encodes an answer about ten times as fast, and its JSON is
# JavaScript's: strict on the way in (no NaN or Infinity literals, valid
# UTF-8 only, nesting bounded at 1024), compact UTF-8 with NaN as null on the
# way out.


class NotAJSONObject(ValueError):
    """
    A frame body that is not UTF-8 JSON with an object at the top.
    """


# JavaScript has one number type: 2.0 and 2 are the same value, and
# JSON.stringify writes both as "2". Numbers credproxy computes go through
# js_number, so what it writes is byte-identical to what llxprt would send.
_SAFE_INTEGER: Final = 2**53


def is_number(value: object) -> TypeGuard[int | float]:
    """
    Whether C{value} is a JSON number (Python's C{bool} is an C{int}, but
    C{true} is not a number).
    """
    return isinstance(value, int | float) and not isinstance(value, bool)


def js_number(value: float) -> int | float:
    """
    C{value} as JavaScript would write it: integral values without a fraction.
    """
    if value.is_integer() and abs(value) < _SAFE_INTEGER:
        return int(value)
    return value


def max_body(version: int) -> int:
    """
    The frame body limit of a negotiated version (and of version 1 before any).
    """
    return MAX_FRAME_V2 if version >= 2 else MAX_FRAME_V1


def encode_json(message: Mapping[str, Any]) -> bytes:
    """
    A frame body: compact UTF-8 JSON, byte-identical to C{JSON.stringify}
    for the values credproxy sends.

    @raise TypeError: for values that are not JSON types.
    """
    return orjson.dumps(message)


def decode_json_object(body: bytes) -> dict[str, Any]:
    """
    A frame body as a JSON object.

    @raise NotAJSONObject: not UTF-8, not JSON (including NaN, Infinity and
        nesting deeper than 1024), or not an object.
    """
    try:
        message = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise NotAJSONObject("not JSON") from None
    if not isinstance(message, dict):
        raise NotAJSONObject("not a JSON object")
    return message


def frame(body: bytes) -> bytes:
    """
    C{body} with its length prefix.
    """
    return LENGTH_PREFIX.pack(len(body)) + body
