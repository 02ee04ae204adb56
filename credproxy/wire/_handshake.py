"""
The server side of the handshake (the protocol reference (docs/wire.md)) as pure
functions: which version a first frame asks for, whether it carries the
capability token, and the reply frames.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from credproxy._secret import Secret
from credproxy.wire._codec import is_number
from credproxy.wire._spec import (
    HANDSHAKE_OP,
    PROTOCOL_VERSION_MAX,
    PROTOCOL_VERSION_MIN,
    ErrorCode,
    Message,
)


def _as_integer(value: object) -> int | None:
    """
    C{value} as an integer when JavaScript's C{Number.isInteger} would say it
    is one (so C{2.0} is 2 and C{1e400} is not), else None.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def negotiate_version(message: Mapping[str, Any]) -> int | None:
    """
    The version to speak with a client whose first frame is C{message}, or
    None when none is compatible.

    A numeric C{minVersion}/C{maxVersion} pair decides on its own (and a bad
    pair is incompatible, with no fallback); otherwise the top-level C{v}
    decides if it is 1 or 2.
    """
    payload = message.get("payload")
    if isinstance(payload, dict):
        low, high = payload.get("minVersion"), payload.get("maxVersion")
        if is_number(low) and is_number(high):
            lowest, highest = _as_integer(low), _as_integer(high)
            if lowest is None or highest is None:
                return None
            if lowest > highest or highest < PROTOCOL_VERSION_MIN or lowest > PROTOCOL_VERSION_MAX:
                return None
            return min(PROTOCOL_VERSION_MAX, highest)
    version = _as_integer(message.get("v"))
    if version is not None and PROTOCOL_VERSION_MIN <= version <= PROTOCOL_VERSION_MAX:
        return version
    return None


def presents_token(message: Mapping[str, Any], expected: Secret) -> bool:
    """
    Whether the handshake carries C{expected} as its capability token,
    compared as SHA-256 digests in constant time.
    """
    payload = message.get("payload")
    presented = payload.get("capabilityToken") if isinstance(payload, dict) else None
    return isinstance(presented, str) and expected.matches(presented)


def accepted(version: int) -> dict[str, Any]:
    return {"v": version, "op": HANDSHAKE_OP, "ok": True, "data": {"version": version}}


def _refused(code: ErrorCode, error: str) -> dict[str, Any]:
    return {
        "v": PROTOCOL_VERSION_MAX,
        "op": HANDSHAKE_OP,
        "ok": False,
        "code": code,
        "error": error,
    }


UNSUPPORTED_VERSION = _refused(ErrorCode.UNKNOWN_VERSION, Message.UNSUPPORTED_VERSION)
BAD_CAPABILITY_TOKEN = _refused(ErrorCode.UNAUTHORIZED, Message.BAD_CAPABILITY_TOKEN)
# Refusals for want of a slot, written the moment the connection is accepted
# (or in answer to its handshake): the protocol's own handshake shape, so a
# client reports the code and text instead of a bare EOF.
TOO_MANY_CONNECTIONS = _refused(ErrorCode.RESOURCE_EXHAUSTED, Message.TOO_MANY_CONNECTIONS)
TOO_MANY_PEER_CONNECTIONS = _refused(
    ErrorCode.RESOURCE_EXHAUSTED, Message.TOO_MANY_PEER_CONNECTIONS
)
TOO_MANY_PENDING_HANDSHAKES = _refused(
    ErrorCode.RESOURCE_EXHAUSTED, Message.TOO_MANY_PENDING_HANDSHAKES
)
