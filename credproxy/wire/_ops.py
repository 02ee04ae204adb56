"""
What each operation does (wire-protocol.md sections 4 and 5), separate from
the framing and the connection that carry it.

Every handler is an C{async} function of the connection's L{OpContext}, the
request payload, and an L{AuditRecord} it fills in. It answers with the
C{data} object or raises L{OpFailure}; anything else it raises becomes a
safe C{INTERNAL_ERROR}. Sandbox connections are checked before any field
is validated, so a sandbox cannot probe the API's shape. The refresh and
login ops of the next issue register in L{OPERATIONS} the same way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from twisted.internet.defer import DeferredLock

from credproxy.broker.tokens import merge_saved, sanitized_fields
from credproxy.stores._interfaces import DEFAULT_BUCKET, IProviderKeyStore, ITokenStore
from credproxy.wire._codec import js_number
from credproxy.wire._spec import ErrorCode, Message, Op


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


def _access_denied() -> OpFailure:
    return OpFailure(ErrorCode.FORBIDDEN, Message.ACCESS_DENIED, Status.BLOCKED_SANDBOX)


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


class EntryLocks:
    """
    One lock per (provider, bucket) while someone holds or awaits it, so a
    C{save_token}'s read-merge-write cannot interleave with another's and
    lose a field. Unused locks are dropped, so the map stays as small as
    the number of ops in flight.
    """

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], DeferredLock] = {}

    def __len__(self) -> int:
        return len(self._locks)

    async def run(self, entry: tuple[str, str], work: Callable[[], Awaitable[None]]) -> None:
        lock = self._locks.setdefault(entry, DeferredLock())
        await lock.acquire()
        try:
            await work()
        finally:
            lock.release()
            if not lock.locked and not lock.waiting and self._locks.get(entry) is lock:
                del self._locks[entry]


@dataclass(frozen=True)
class OpContext:
    """
    What an op may use: the stores, whether the connection is a sandbox's,
    and the locks shared by every connection of one server.
    """

    tokens: ITokenStore
    keys: IProviderKeyStore
    sandbox: bool
    locks: EntryLocks = field(default_factory=EntryLocks)


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
    if ctx.sandbox:
        provider, bucket = text(payload, "provider"), text(payload, "bucket")
        token = await ctx.tokens.get_token(provider, bucket) if provider else None
        if token is None:
            raise _access_denied()  # a miss names nothing, and looks like a refusal
        record.provider, record.bucket = provider, bucket or DEFAULT_BUCKET
    else:
        provider, bucket = _provider_and_bucket(payload, record)
        token = await ctx.tokens.get_token(provider, bucket)
        if token is None:
            raise OpFailure(
                ErrorCode.NOT_FOUND, f"No token found for provider: {provider}", Status.NOT_FOUND
            )
    return sanitized_fields(token)


async def save_token(ctx: OpContext, payload: Payload, record: AuditRecord) -> dict[str, Any]:
    if ctx.sandbox:
        raise _access_denied()
    provider, incoming = text(payload, "provider"), payload.get("token")
    if provider is None or not isinstance(incoming, dict):
        raise _invalid(Message.MISSING_PROVIDER_OR_TOKEN)
    bucket = text(payload, "bucket")
    record.provider, record.bucket = provider, bucket or DEFAULT_BUCKET

    async def merge_and_store() -> None:
        stored = await ctx.tokens.get_token(provider, bucket)
        await ctx.tokens.save_token(provider, merge_saved(stored, incoming), bucket)

    await ctx.locks.run((provider, bucket or DEFAULT_BUCKET), merge_and_store)
    return {}


async def remove_token(ctx: OpContext, payload: Payload, record: AuditRecord) -> dict[str, Any]:
    if ctx.sandbox:
        raise _access_denied()
    provider, bucket = _provider_and_bucket(payload, record)
    await ctx.locks.run(
        (provider, bucket or DEFAULT_BUCKET), lambda: ctx.tokens.remove_token(provider, bucket)
    )
    return {}


async def list_providers(ctx: OpContext, payload: Payload, record: AuditRecord) -> dict[str, Any]:
    providers = [] if ctx.sandbox else list(await ctx.tokens.list_providers())
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
        buckets = list(await ctx.tokens.list_buckets(provider))
    record.count = len(buckets)
    return {"buckets": buckets}


async def get_bucket_stats(ctx: OpContext, payload: Payload, record: AuditRecord) -> dict[str, Any]:
    bucket = text(payload, "bucket") or DEFAULT_BUCKET
    if ctx.sandbox:
        return {"bucket": bucket, "requestCount": 0, "percentage": 0}
    provider, _ = _provider_and_bucket(payload, record)
    stats = await ctx.tokens.get_bucket_stats(provider, bucket)
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
    name = text(payload, "name")
    if ctx.sandbox:
        key = await ctx.keys.get_key(name) if name else None
        if key is None:
            raise _access_denied()
    else:
        if name is None:
            raise _invalid(Message.MISSING_NAME)
        record.key = name
        key = await ctx.keys.get_key(name)
        if key is None:
            raise OpFailure(ErrorCode.NOT_FOUND, f"No API key found for: {name}", Status.NOT_FOUND)
    record.key = name
    return {"key": key.reveal()}


async def list_api_keys(ctx: OpContext, payload: Payload, record: AuditRecord) -> dict[str, Any]:
    keys = [] if ctx.sandbox else list(await ctx.keys.list_keys())
    record.count = len(keys)
    return {"keys": keys}


async def has_api_key(ctx: OpContext, payload: Payload, record: AuditRecord) -> dict[str, Any]:
    if ctx.sandbox:
        raise _access_denied()
    name = text(payload, "name")
    if name is None:
        raise _invalid(Message.MISSING_NAME)
    record.key = name
    return {"exists": bool(await ctx.keys.has_key(name))}


# -- refresh and login ------------------------------------------------------
# The host's OAuth broker comes in the next issue. Until then this server has
# no OAuth provider configured, and answers exactly as such a server must: a
# sandbox is refused first (the reference's default), a host is told that no
# provider or session exists.


async def refresh_token(ctx: OpContext, payload: Payload, record: AuditRecord) -> dict[str, Any]:
    if ctx.sandbox:
        raise _access_denied()
    provider, _ = _provider_and_bucket(payload, record)
    raise OpFailure(
        ErrorCode.PROVIDER_NOT_FOUND,
        f"No OAuth provider configured for: {provider}",
        Status.NOT_FOUND,
    )


async def oauth_initiate(ctx: OpContext, payload: Payload, record: AuditRecord) -> dict[str, Any]:
    if ctx.sandbox:
        raise _access_denied()
    provider, _ = _provider_and_bucket(payload, record)
    raise OpFailure(
        ErrorCode.PROVIDER_NOT_CONFIGURED,
        f"No OAuth flow configured for provider: {provider}",
        Status.NOT_FOUND,
    )


def _session(ctx: OpContext, payload: Payload) -> None:
    if ctx.sandbox:
        raise _access_denied()
    if text(payload, "session_id") is None:
        raise _invalid(Message.MISSING_SESSION_ID)


async def oauth_exchange(ctx: OpContext, payload: Payload, record: AuditRecord) -> dict[str, Any]:
    _session(ctx, payload)
    if text(payload, "code") is None:
        raise _invalid(Message.MISSING_CODE)
    raise OpFailure(ErrorCode.SESSION_NOT_FOUND, Message.SESSION_NOT_FOUND, Status.NOT_FOUND)


async def oauth_poll(ctx: OpContext, payload: Payload, record: AuditRecord) -> dict[str, Any]:
    _session(ctx, payload)
    raise OpFailure(ErrorCode.SESSION_NOT_FOUND, Message.SESSION_NOT_FOUND, Status.NOT_FOUND)


async def oauth_cancel(ctx: OpContext, payload: Payload, record: AuditRecord) -> dict[str, Any]:
    _session(ctx, payload)
    return {}  # no such session: nothing to cancel, as for an ended one


# The registered operations besides cancel, which the connection itself
# answers. A plain dict keyed by name: nothing else (no attribute, no
# prototype) can be reached by naming it.
OPERATIONS: Final[Mapping[str, Handler]] = {
    Op.GET_TOKEN: get_token,
    Op.SAVE_TOKEN: save_token,
    Op.REMOVE_TOKEN: remove_token,
    Op.LIST_PROVIDERS: list_providers,
    Op.LIST_BUCKETS: list_buckets,
    Op.GET_BUCKET_STATS: get_bucket_stats,
    Op.GET_API_KEY: get_api_key,
    Op.LIST_API_KEYS: list_api_keys,
    Op.HAS_API_KEY: has_api_key,
    Op.REFRESH_TOKEN: refresh_token,
    Op.OAUTH_INITIATE: oauth_initiate,
    Op.OAUTH_EXCHANGE: oauth_exchange,
    Op.OAUTH_POLL: oauth_poll,
    Op.OAUTH_CANCEL: oauth_cancel,
}
