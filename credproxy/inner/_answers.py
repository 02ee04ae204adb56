"""
How each store method maps onto an op and back (llxprt-code's
ProxyTokenStore and ProxyProviderKeyStorage), shared by the Twisted and the
blocking stores: the payload to send, and the value to make of the answer.
"""

from __future__ import annotations

from typing import Any

from credproxy._secret import Secret
from credproxy.stores._interfaces import DEFAULT_BUCKET, BucketStats
from credproxy.stores._token import Token, sanitize
from credproxy.wire._client_errors import ProtocolViolation, ProxyClientError
from credproxy.wire._codec import is_number
from credproxy.wire._spec import Message


class SandboxKeyManagementError(ProxyClientError):
    """
    Saving or deleting an API key from inside the sandbox: keys are managed
    on the host only.
    """

    def __init__(self) -> None:
        super().__init__(Message.SANDBOX_KEY_MANAGEMENT)


def provider_payload(provider: str, bucket: str | None = None) -> dict[str, Any]:
    """
    C{provider}, and C{bucket} only when given (absent means the default bucket).
    """
    payload: dict[str, Any] = {"provider": provider}
    if bucket is not None:
        payload["bucket"] = bucket
    return payload


def save_payload(provider: str, token: Token, bucket: str | None) -> dict[str, Any]:
    payload = provider_payload(provider, bucket)
    payload["token"] = token.to_json()
    return payload


def _malformed(op: str) -> ProtocolViolation:
    return ProtocolViolation(f"credential proxy answered {op} with an unexpected shape")


def to_token(data: dict[str, Any]) -> Token:
    """
    The token of a C{get_token} answer. Sanitized again on arrival: the
    sandbox side never keeps a refresh token, whatever a server sends.
    """
    return sanitize(Token(data))


def to_names(data: dict[str, Any], field: str) -> list[str]:
    """
    The list of strings under C{field} (providers, buckets, keys).
    """
    names = data.get(field)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise _malformed(field)
    return list(names)


def to_bucket_stats(data: dict[str, Any], bucket: str | None) -> BucketStats:
    def number(name: str) -> float:
        value = data.get(name, 0)
        if not is_number(value):
            raise _malformed("get_bucket_stats")
        return value

    answered = data.get("bucket")
    last_used = data.get("lastUsed")
    return BucketStats(
        bucket=answered if isinstance(answered, str) else (bucket or DEFAULT_BUCKET),
        request_count=int(number("requestCount")),
        percentage=float(number("percentage")),
        last_used=float(last_used) / 1000  # JavaScript time, in milliseconds
        if is_number(last_used)
        else None,
    )


def to_key(data: dict[str, Any]) -> Secret:
    key = data.get("key")
    if not isinstance(key, str):
        raise _malformed("get_api_key")
    return Secret(key)


def to_exists(data: dict[str, Any]) -> bool:
    exists = data.get("exists")
    if not isinstance(exists, bool):
        raise _malformed("has_api_key")
    return exists
