"""
The bytes of a frame, shared by the server and both clients so neither can
drift from the other: the length prefix, and JSON the way JavaScript's
C{JSON.stringify} and C{JSON.parse} treat it (compact, UTF-8, no NaN or
Infinity, an object at the top).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any, Final, NoReturn

from credproxy.wire._spec import HEADER_SIZE

LENGTH_PREFIX: Final = struct.Struct(">I")
assert LENGTH_PREFIX.size == HEADER_SIZE

_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class NotAJSONObject(ValueError):
    """
    A frame body that is not UTF-8 JSON with an object at the top.
    """


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(name)


# JavaScript has one number type: 2.0 and 2 are the same value, and
# JSON.stringify writes both as "2". Integral floats become ints on the way
# in and out, so what we echo is byte-identical to what llxprt would send.
_SAFE_INTEGER: Final = 2**53


def js_number(value: float) -> int | float:
    """
    C{value} as JavaScript would write it: integral values without a fraction.
    """
    if value.is_integer() and abs(value) < _SAFE_INTEGER:
        return int(value)
    return value


def _parse_float(literal: str) -> int | float:
    return js_number(float(literal))


_DECODER: Final = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_parse_float)


def encode_json(message: Mapping[str, Any]) -> bytes:
    """
    A frame body: compact UTF-8 JSON, byte-identical to C{JSON.stringify}
    for the values credproxy sends.

    @raise ValueError: for values JSON cannot carry (NaN, Infinity).
    @raise TypeError: for values that are not JSON types.
    """
    return _ENCODER.encode(message).encode("utf-8")


def decode_json_object(body: bytes) -> dict[str, Any]:
    """
    A frame body as a JSON object.

    @raise NotAJSONObject: not UTF-8, not JSON (including NaN, Infinity and
        nesting too deep to parse), or not an object.
    """
    try:
        message = _DECODER.decode(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise NotAJSONObject("not JSON") from None
    if not isinstance(message, dict):
        raise NotAJSONObject("not a JSON object")
    return message


def frame(body: bytes) -> bytes:
    """
    C{body} with its length prefix.
    """
    return LENGTH_PREFIX.pack(len(body)) + body
