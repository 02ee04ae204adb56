"""
credproxy's own HTTP errors, in the Anthropic API's JSON shape so SDKs surface
them like the API's own.
"""

from __future__ import annotations

import enum
import json
from http import HTTPStatus


class ErrorKind(enum.Enum):
    """
    The API's error types, each with its status code.
    """

    INVALID_REQUEST = ("invalid_request_error", 400)
    AUTHENTICATION = ("authentication_error", 401)
    PERMISSION = ("permission_error", 403)
    NOT_FOUND = ("not_found_error", 404)
    METHOD_NOT_ALLOWED = ("invalid_request_error", 405)
    REQUEST_TIMEOUT = ("invalid_request_error", 408)
    REQUEST_TOO_LARGE = ("request_too_large", 413)
    URI_TOO_LONG = ("invalid_request_error", 414)
    HEADERS_TOO_LARGE = ("invalid_request_error", 431)
    NOT_IMPLEMENTED = ("invalid_request_error", 501)
    API = ("api_error", 502)
    OVERLOADED = ("overloaded_error", 503)
    TIMEOUT = ("api_error", 504)

    @property
    def type(self) -> str:
        return self.value[0]

    @property
    def status(self) -> int:
        return self.value[1]


def error_body(kind: ErrorKind, message: str) -> bytes:
    """
    C{{"type":"error","error":{"type":…,"message":…}}} as bytes.
    """
    return json.dumps(
        {"type": "error", "error": {"type": kind.type, "message": message}},
        separators=(",", ":"),
    ).encode("utf-8")


def reason_phrase(status: int) -> bytes:
    """
    The standard reason phrase of C{status}: what the agent is sent whatever
    phrase the upstream wrote.
    """
    return _PHRASES.get(status, b"Unknown Status")


def raw_error_response(
    kind: ErrorKind,
    message: str,
    *,
    retry_after: int | None = None,
    extra_headers: tuple[tuple[bytes, bytes], ...] = (),
) -> bytes:
    """
    A whole HTTP/1.1 error response that closes the connection, for answering
    before or instead of twisted.web's request (a refused head, a body too
    large, a deadline missed).
    """
    body = error_body(kind, message)
    lines = [
        b"HTTP/1.1 %d %s" % (kind.status, reason_phrase(kind.status)),
        b"content-type: application/json",
        b"content-length: %d" % (len(body),),
        b"connection: close",
    ]
    if retry_after is not None:
        lines.append(b"retry-after: %d" % (retry_after,))
    lines.extend(name + b": " + value for name, value in extra_headers)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


_PHRASES = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}
