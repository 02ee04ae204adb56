"""
The client half of the protocol without any I/O: building the handshake,
request and cancel frames, reading the handshake reply and answers, and
splitting a byte stream into frames. The Twisted client and the blocking
client both use these, so they cannot drift apart on the wire.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, NoReturn

from credproxy._secret import Secret
from credproxy.wire._client_errors import (
    FrameTooLargeError,
    ProtocolViolation,
    ProxyRequestError,
)
from credproxy.wire._codec import (
    LENGTH_PREFIX,
    NotAJSONObject,
    decode_json_object,
    encode_json,
    is_number,
)
from credproxy.wire._spec import (
    CANCEL_OP,
    CLIENT_MAX_REQUEST_TIMEOUT,
    HANDSHAKE_OP,
    HEADER_SIZE,
    MAX_FRAME_V1,
    PROTOCOL_VERSION_MAX,
    PROTOCOL_VERSION_MIN,
    ErrorCode,
    Message,
)

_HEADER: Final = LENGTH_PREFIX


def checked_timeout(timeout: float | None, default: float) -> float:
    """
    The timeout a request runs with: C{default} when None, capped at an hour
    (llxprt's longest override), and refused when not a positive number.
    """
    seconds = default if timeout is None else timeout
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0:
        raise ValueError("a request timeout must be a positive number of seconds")
    return float(min(seconds, CLIENT_MAX_REQUEST_TIMEOUT))


def encode_frame(message: Mapping[str, Any], limit: int) -> bytes:
    """
    A frame: the length prefix and the compact UTF-8 JSON body (the same bytes
    as JavaScript's C{JSON.stringify}).

    @raise FrameTooLargeError: when the body exceeds C{limit}.
    """
    body = encode_json(message)
    if len(body) > limit:
        raise FrameTooLargeError()
    return _HEADER.pack(len(body)) + body


def handshake_message(capability_token: Secret | None) -> dict[str, Any]:
    """
    The first frame of every connection: offer versions 1 to 2, and the
    capability token only when there is one.
    """
    payload: dict[str, Any] = {
        "minVersion": PROTOCOL_VERSION_MIN,
        "maxVersion": PROTOCOL_VERSION_MAX,
    }
    if capability_token is not None:
        payload["capabilityToken"] = capability_token.reveal()
    return {"v": PROTOCOL_VERSION_MAX, "op": HANDSHAKE_OP, "payload": payload}


def request_message(
    version: int, request_id: str, op: str, payload: Mapping[str, Any]
) -> dict[str, Any]:
    return {"v": version, "id": request_id, "op": op, "payload": dict(payload)}


def cancel_message(version: int, request_id: str, target_id: str) -> dict[str, Any]:
    return request_message(version, request_id, CANCEL_OP, {"targetId": target_id})


def _violation(what: str) -> NoReturn:
    raise ProtocolViolation(f"credential proxy sent {what}")


def parse_body(body: bytes) -> dict[str, Any]:
    """
    A frame body as a JSON object.

    @raise ProtocolViolation: not UTF-8, not JSON, or not an object.
    """
    try:
        return decode_json_object(body)
    except NotAJSONObject as e:
        _violation(f"a frame that is {e}")


def negotiated_version(reply: Mapping[str, Any]) -> int:
    """
    The version a handshake reply settles on: C{data.version}, or 1 when the
    reply has no numeric one (older servers).

    @raise ProxyRequestError: the server refused (its code and text), or
        settled on a version this client does not speak.
    @raise ProtocolViolation: C{data} is present but not an object.
    """
    if reply.get("ok") is not True:
        code, error = reply.get("code"), reply.get("error")
        raise ProxyRequestError(
            code if isinstance(code, str) else ErrorCode.UNKNOWN_VERSION,
            error if isinstance(error, str) else Message.UNSUPPORTED_VERSION,
        )
    data = reply.get("data", {})
    if not isinstance(data, dict):
        _violation("a handshake reply whose data is not an object")
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int | float):
        return PROTOCOL_VERSION_MIN
    if version not in range(PROTOCOL_VERSION_MIN, PROTOCOL_VERSION_MAX + 1):
        raise ProxyRequestError(ErrorCode.UNKNOWN_VERSION, Message.UNSUPPORTED_VERSION)
    return int(version)


@dataclass(frozen=True)
class Answer:
    """
    One answer to a request: C{data} on success, else C{error}.
    """

    request_id: str
    data: dict[str, Any] | None = None
    error: ProxyRequestError | None = None


def parse_answer(message: Mapping[str, Any]) -> Answer | None:
    """
    The answer a frame carries, or None for a frame with no string C{id}
    (nothing to correlate it with, so it is ignored as llxprt ignores it).

    @raise ProtocolViolation: C{ok} is not a boolean, C{data} is not an
        object, or C{code}/C{error} are not strings.
    """
    request_id = message.get("id")
    if not isinstance(request_id, str):
        return None
    ok = message.get("ok")
    if ok is True:
        data = message.get("data")
        if not isinstance(data, dict):
            _violation("an answer whose data is not an object")
        return Answer(request_id, data=data)
    if ok is not False:
        _violation("an answer without a boolean ok")
    code, error = message.get("code"), message.get("error")
    if not isinstance(code, str) or not isinstance(error, str):
        _violation("a failed answer without a string code and error")
    retry = message.get("retryAfter")
    retry_after = float(retry) if is_number(retry) and math.isfinite(retry) else None
    return Answer(request_id, error=ProxyRequestError(code, error, retry_after))


class FrameDecoder:
    """
    Frames out of a byte stream, for the blocking client (the Twisted client
    uses C{Int32StringReceiver}). The length prefix is checked before any body
    is buffered, so an oversized prefix allocates nothing.
    """

    def __init__(self, limit: int = MAX_FRAME_V1) -> None:
        self.limit = limit
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """
        The bodies completed by C{data}, in order.

        @raise ProtocolViolation: a length prefix over the limit.
        """
        self._buffer += data
        bodies: list[bytes] = []
        while len(self._buffer) >= HEADER_SIZE:
            (length,) = _HEADER.unpack_from(self._buffer)
            if length > self.limit:
                _violation("a frame over the size limit")
            end = HEADER_SIZE + length
            if len(self._buffer) < end:
                break
            bodies.append(bytes(self._buffer[HEADER_SIZE:end]))
            del self._buffer[:end]
        return bodies
