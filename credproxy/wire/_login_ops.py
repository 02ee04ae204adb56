"""
The login ops (the protocol reference (docs/wire.md)): C{oauth_initiate},
C{oauth_exchange}, C{oauth_poll} and C{oauth_cancel}, each a thin
translation between the wire and the broker's L{LoginSessions}.

Sessions are bound to the connection that opened them (C{ctx.connection}),
so another connection naming a session id is told it does not exist. A
sandbox connection is refused first, with llxprt's text for each op,
unless the host lets sandboxes log in (C{SandboxPolicy.allow_login}); then
it may log in only to providers it may read. Fields are validated after
that. Answers hold the token sanitized (never the refresh token); apart
from C{oauth_initiate}'s C{session_id}, no answer, audit line or error
holds a session id, code, verifier, state or device code.
"""

from __future__ import annotations

from typing import Any

from credproxy._secret import Secret
from credproxy.broker import LoginError, LoginFailure
from credproxy.broker._sessions import InitiatedLogin
from credproxy.oauth._interfaces import FlowType
from credproxy.stores._interfaces import DEFAULT_BUCKET
from credproxy.stores._token import sanitized_fields
from credproxy.wire._codec import js_number
from credproxy.wire._ops import AuditRecord, OpContext, OpFailure, Payload, Status, text
from credproxy.wire._spec import ErrorCode, Message

# Failures that say something does not exist, audited as not_found.
_NOT_FOUND_REASONS = frozenset(
    {LoginFailure.PROVIDER_NOT_CONFIGURED, LoginFailure.SESSION_NOT_FOUND}
)


def _refused(ctx: OpContext, message: str) -> None:
    """
    Refuse a sandbox connection unless the host lets sandboxes log in.
    """
    if ctx.sandbox and not ctx.broker.sandbox.allow_login:
        raise OpFailure(ErrorCode.FORBIDDEN, message, Status.BLOCKED_SANDBOX)


def _invalid(message: str) -> OpFailure:
    return OpFailure(ErrorCode.INVALID_REQUEST, message, Status.INVALID)


def _failure(error: LoginError) -> OpFailure:
    """
    The answer to a failed login step: the reason's own code and the
    broker's fixed text.
    """
    status = Status.NOT_FOUND if error.reason in _NOT_FOUND_REASONS else Status.ERROR
    return OpFailure(ErrorCode(error.reason.value), error.message, status)


def _session_id(ctx: OpContext, payload: Payload, record: AuditRecord) -> Secret:
    """
    The request's session id, as a secret; the audit record gets the
    session's provider and bucket when this connection holds it.
    """
    raw = text(payload, "session_id")
    if raw is None:
        raise _invalid(Message.MISSING_SESSION_ID)
    session_id = Secret(raw)
    entry = ctx.broker.sessions.entry_of(ctx.connection, session_id)
    if entry is not None:
        record.provider, record.bucket = entry
    return session_id


def _initiated(login: InitiatedLogin) -> dict[str, Any]:
    data: dict[str, Any] = {
        "flow_type": login.flow_type.value,
        "session_id": login.session_id.reveal(),  # the one place a session id is sent
        "pollIntervalMs": login.poll_interval_ms,
        "auth_url": login.auth_url,
    }
    if login.flow_type is FlowType.DEVICE_CODE:
        data["verification_uri"] = login.verification_uri
        data["user_code"] = login.user_code
        if login.verification_uri_complete is not None:
            data["verification_uri_complete"] = login.verification_uri_complete
    return data


async def oauth_initiate(ctx: OpContext, payload: Payload, record: AuditRecord) -> dict[str, Any]:
    _refused(ctx, Message.SANDBOX_CANNOT_INITIATE_OAUTH)
    provider = text(payload, "provider")
    if provider is None:
        raise _invalid(Message.MISSING_PROVIDER)
    if ctx.sandbox and not ctx.broker.sandbox_may_read(provider):
        # A login would hand the sandbox a token it may not read; the
        # refusal names nothing, like a sandbox's read miss.
        raise OpFailure(ErrorCode.FORBIDDEN, Message.ACCESS_DENIED, Status.BLOCKED_SANDBOX)
    bucket = text(payload, "bucket")
    record.provider, record.bucket = provider, bucket or DEFAULT_BUCKET
    try:
        login = await ctx.broker.sessions.initiate(
            ctx.connection, provider, bucket, text(payload, "redirect_uri")
        )
    except LoginError as e:
        raise _failure(e) from None
    return _initiated(login)


async def oauth_exchange(ctx: OpContext, payload: Payload, record: AuditRecord) -> dict[str, Any]:
    _refused(ctx, Message.SANDBOX_CANNOT_EXCHANGE_OAUTH)
    session_id = _session_id(ctx, payload, record)
    code = text(payload, "code")
    if code is None:
        raise _invalid(Message.MISSING_CODE)
    try:
        token = await ctx.broker.sessions.exchange(ctx.connection, session_id, Secret(code))
    except LoginError as e:
        raise _failure(e) from None
    return sanitized_fields(token)


async def oauth_poll(ctx: OpContext, payload: Payload, record: AuditRecord) -> dict[str, Any]:
    _refused(ctx, Message.SANDBOX_CANNOT_POLL_OAUTH)
    session_id = _session_id(ctx, payload, record)
    try:
        result = await ctx.broker.sessions.poll(ctx.connection, session_id)
    except LoginError as e:
        raise _failure(e) from None
    if result.token is not None:
        return {"status": "complete", "token": sanitized_fields(result.token)}
    if result.interval is not None:
        return {"status": "pending", "interval": js_number(result.interval)}
    return {"status": "pending"}


async def oauth_cancel(ctx: OpContext, payload: Payload, record: AuditRecord) -> dict[str, Any]:
    _refused(ctx, Message.SANDBOX_CANNOT_CANCEL_OAUTH)
    session_id = _session_id(ctx, payload, record)
    ctx.broker.sessions.cancel(ctx.connection, session_id)
    return {}  # an unknown session is answered the same: nothing to cancel
