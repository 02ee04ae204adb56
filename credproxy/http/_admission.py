"""
Who may use the HTTP face, and for what: the forwarded paths and method, the
Unix peer's uid, and the capability token. Judged once the request head is
complete, before any body byte is read, so a refused client can make
credproxy hold nothing.
"""

from __future__ import annotations

from typing import Final

from credproxy.http._config import HTTPProxyConfig
from credproxy.http._errors import ErrorKind
from credproxy.http._head import HeadRefusal

FORWARDED_PATHS: Final = frozenset({b"/v1/messages", b"/v1/messages/count_tokens"})
FORWARDED_METHOD: Final = b"POST"

NOT_FORWARDED: Final = HeadRefusal(
    ErrorKind.NOT_FOUND,
    "Not found: credproxy forwards only POST /v1/messages and /v1/messages/count_tokens.",
    "not_found",
)
WRONG_METHOD: Final = HeadRefusal(
    ErrorKind.METHOD_NOT_ALLOWED,
    "Method not allowed: use POST.",
    "method_not_allowed",
    headers=((b"allow", FORWARDED_METHOD),),
)
PEER_REFUSED: Final = HeadRefusal(
    ErrorKind.PERMISSION, "This user may not use credproxy.", "peer_refused"
)
BAD_TOKEN: Final = HeadRefusal(
    ErrorKind.AUTHENTICATION, "Invalid or missing capability token.", "bad_token"
)
SHUTTING_DOWN: Final = HeadRefusal(ErrorKind.API, "credproxy is shutting down.", "shutting_down")


def admission_refusal(
    config: HTTPProxyConfig,
    method: bytes,
    path: bytes,
    peer_uid: int | None,
    placeholder: bytes | None,
) -> HeadRefusal | None:
    """
    Why this request may not be forwarded, or None when it may. C{peer_uid}
    is the kernel's word for a Unix peer (None on TCP); C{placeholder} is
    the key the agent presented.
    """
    if path not in FORWARDED_PATHS:
        return NOT_FORWARDED
    if method != FORWARDED_METHOD:
        return WRONG_METHOD
    if peer_uid is not None and not config.serves_uid(peer_uid):
        return PEER_REFUSED
    token = config.capability_token
    if token is not None and not token.matches(placeholder):
        return BAD_TOKEN
    return None
