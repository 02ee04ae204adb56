"""
What each operation does (the protocol reference (docs/wire.md)), separate from
the framing and the connection that carry it.

Every handler is an C{async} function of the connection's L{OpContext}, the
request payload, and an L{AuditRecord} it fills in. It answers with the
C{data} object or raises L{OpFailure}; anything else it raises becomes a
safe C{INTERNAL_ERROR}. Sandbox connections are checked before any field
is validated, so a sandbox cannot probe the API's shape. The refresh and
login ops (C{_login_ops}) have the same shape; C{_op_table} registers them all.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Final

from credproxy.broker import Broker, RefreshError
from credproxy.stores._interfaces import DEFAULT_BUCKET
from credproxy.stores._token import sanitized_fields
from credproxy.wire._codec import js_number
from credproxy.wire._spec import ErrorCode, Message


class Status:
    """
    The C{status} of an audit line.
    """

    OK: Final = "ok"
    NOT_FOUND: Final = "not_found"
    BLOCKED_SANDBOX: Final = "blocked_sandbox"
    INVALID: Final = "invalid"
    ERROR: Final = "error"
    CANCELLED: Final = "cancelled"
    TIMED_OUT: Final = "timed_out"


class OpFailure(Exception):
    """
    A refusal to answer in the protocol's shape. C{message} goes to the
    client, so it is built only from fixed texts and the names the client
    itself sent, never from a stored value or a backend's error.
    """

    def __init__(self, code: ErrorCode, message: str, status: str = Status.ERROR) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.status = status
        self.retry_after: float | None = None  # seconds, on a refresh RATE_LIMITED


def _access_denied() -> OpFailure:
    return OpFailure(ErrorCode.FORBIDDEN, Message.ACCESS_DENIED, Status.BLOCKED_SANDBOX)


def _sandbox_refused(message: str) -> OpFailure:
    """
    An op a sandbox connection may never use, refused with its own text.
    """
    return OpFailure(ErrorCode.FORBIDDEN, message, Status.BLOCKED_SANDBOX)


def _invalid(message: str) -> OpFailure:
    return OpFailure(ErrorCode.INVALID_REQUEST, message, Status.INVALID)


@dataclass
class AuditRecord:
    """
    What the audit line of one op says; a handler fills in what it may name.
    """

    op: str
    provider: str | None = None
    bucket: str | None = None
    key: str | None = None
    count: int | None = None
    status: str = Status.OK


@dataclass(frozen=True)
class OpContext:
    """
    What an op may use: the broker, whether the connection is a sandbox's,
    and the connection's identity (login sessions are bound to it).
    """

    broker: Broker
    sandbox: bool
    connection: object = None


Payload = Mapping[str, Any]
Handler = Callable[[OpContext, Payload, AuditRecord], Coroutine[Any, Any, dict[str, Any]]]


def text(payload: Payload, name: str) -> str | None:
    """
    A string field, or None when it is absent, empty or not a string.
    """
    value = payload.get(name)
    return value if isinstance(value, str) and value else None


def _provider_and_bucket(payload: Payload, record: AuditRecord) -> tuple[str, str | None]:
    provider = text(payload, "provider")
    if provider is None:
        raise _invalid(Message.MISSING_PROVIDER)
    bucket = text(payload, "bucket")
    record.provider, record.bucket = provider, bucket or DEFAULT_BUCKET
    return provider, bucket


async def get_token(ctx: OpContext, payload: Payload, record: AuditRecord) -> dict[str, Any]:
    broker = ctx.broker
    if ctx.sandbox:
        provider, bucket = text(payload, "provider"), text(payload, "bucket")
        token = (
            await broker.get_token(provider, bucket)
            if provider is not None and broker.sandbox_may_read(provider)
            else None
        )
        if token is None:
            raise _access_denied()  # a miss names nothing, and looks like a refusal
        record.provider, record.bucket = provider, bucket or DEFAULT_BUCKET
    else:
        provider, bucket = _provider_and_bucket(payload, record)
        token = await broker.get_token(provider, bucket)
        if token is None:
            raise _no_token(provider)
    return sanitized_fields(token)


def _no_token(provider: str) -> OpFailure:
    return OpFailure(
        ErrorCode.NOT_FOUND, f"No token found for provider: {provider}", Status.NOT_FOUND
    )


async def save_token(ctx: OpContext, payload: Payload, record: AuditRecord) -> dict[str, Any]:
    if ctx.sandbox:
        raise _sandbox_refused(Message.SANDBOX_CANNOT_MODIFY_TOKENS)
    provider, incoming = text(payload, "provider"), payload.get("token")
    if provider is None or not isinstance(incoming, dict):
        raise _invalid(Message.MISSING_PROVIDER_OR_TOKEN)
    bucket = text(payload, "bucket")
    record.provider, record.bucket = provider, bucket or DEFAULT_BUCKET
    await ctx.broker.save_token(provider, incoming, bucket)
    return {}


async def remove_token(ctx: OpContext, payload: Payload, record: AuditRecord) -> dict[str, Any]:
    if ctx.sandbox:
        raise _sandbox_refused(Message.SANDBOX_CANNOT_REMOVE_TOKENS)
    provider, bucket = _provider_and_bucket(payload, record)
    await ctx.broker.remove_token(provider, bucket)
    return {}


async def list_providers(ctx: OpContext, payload: Payload, record: AuditRecord) -> dict[str, Any]:
    providers = [] if ctx.sandbox else list(await ctx.broker.list_providers())
    record.count = len(providers)
    return {"providers": providers}


async def list_buckets(ctx: OpContext, payload: Payload, record: AuditRecord) -> dict[str, Any]:
    if ctx.sandbox:
        buckets: list[str] = []
    else:
        provider = text(payload, "provider")
        if provider is None:
            raise _invalid(Message.MISSING_PROVIDER)
        record.provider = provider
        buckets = list(await ctx.broker.list_buckets(provider))
    record.count = len(buckets)
    return {"buckets": buckets}


async def get_bucket_stats(ctx: OpContext, payload: Payload, record: AuditRecord) -> dict[str, Any]:
    bucket = text(payload, "bucket") or DEFAULT_BUCKET
    if ctx.sandbox:
        return {"bucket": bucket, "requestCount": 0, "percentage": 0}
    provider, _ = _provider_and_bucket(payload, record)
    stats = await ctx.broker.get_bucket_stats(provider, bucket)
    if stats is None:
        raise OpFailure(
            ErrorCode.NOT_FOUND, f"No stats found for {provider}/{bucket}", Status.NOT_FOUND
        )
    data: dict[str, Any] = {
        "bucket": stats.bucket,
        "requestCount": stats.request_count,
        "percentage": js_number(stats.percentage),
    }
    if stats.last_used is not None:
        data["lastUsed"] = round(stats.last_used * 1000)  # JavaScript time: milliseconds
    return data


async def get_api_key(ctx: OpContext, payload: Payload, record: AuditRecord) -> dict[str, Any]:
    broker = ctx.broker
    name = text(payload, "name")
    if ctx.sandbox:
        key = (
            await broker.get_key(name)
            if name is not None and broker.sandbox_may_read(name)
            else None
        )
        if key is None:
            raise _access_denied()
    else:
        if name is None:
            raise _invalid(Message.MISSING_NAME)
        record.key = name
        key = await broker.get_key(name)
        if key is None:
            raise OpFailure(ErrorCode.NOT_FOUND, f"No API key found for: {name}", Status.NOT_FOUND)
    record.key = name
    return {"key": key.reveal()}


async def list_api_keys(ctx: OpContext, payload: Payload, record: AuditRecord) -> dict[str, Any]:
    keys = [] if ctx.sandbox else list(await ctx.broker.list_keys())
    record.count = len(keys)
    return {"keys": keys}


async def has_api_key(ctx: OpContext, payload: Payload, record: AuditRecord) -> dict[str, Any]:
    if ctx.sandbox:
        raise _sandbox_refused(Message.SANDBOX_CANNOT_CHECK_KEYS)
    name = text(payload, "name")
    if name is None:
        raise _invalid(Message.MISSING_NAME)
    record.key = name
    return {"exists": bool(await ctx.broker.has_key(name))}


async def refresh_token(ctx: OpContext, payload: Payload, record: AuditRecord) -> dict[str, Any]:
    if ctx.sandbox and not ctx.broker.sandbox.allow_login:
        raise _sandbox_refused(Message.SANDBOX_CANNOT_REFRESH)
    provider, bucket = _provider_and_bucket(payload, record)
    if ctx.sandbox and not ctx.broker.sandbox_may_read(provider):
        raise _access_denied()
    try:
        token = await ctx.broker.refresh_token(provider, bucket)
    except RefreshError as e:
        failure = OpFailure(ErrorCode(e.reason.value), e.message, Status.ERROR)
        failure.retry_after = e.retry_after
        raise failure from None
    return sanitized_fields(token)
