"""
credproxy's own HTTP errors, in the Anthropic API's JSON shape so SDKs surface
them like the API's own.
"""

from __future__ import annotations

import enum
import json


class ErrorKind(enum.Enum):
    """
    The API's error types, each with its status code.
    """

    INVALID_REQUEST = ("invalid_request_error", 400)
    AUTHENTICATION = ("authentication_error", 401)
    PERMISSION = ("permission_error", 403)
    NOT_FOUND = ("not_found_error", 404)
    METHOD_NOT_ALLOWED = ("invalid_request_error", 405)
    REQUEST_TOO_LARGE = ("request_too_large", 413)
    API = ("api_error", 502)
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


def raw_error_response(kind: ErrorKind, message: str) -> bytes:
    """
    A whole HTTP/1.1 error response, for answering before twisted.web has a
    request to answer through (body too large, peer refused).
    """
    body = error_body(kind, message)
    head = (
        f"HTTP/1.1 {kind.status} {_REASONS[kind.status]}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Request Entity Too Large",
    502: "Bad Gateway",
    504: "Gateway Timeout",
}
