"""
Token-endpoint calls: one POST, one bounded JSON answer, one deadline, and
every way it can go wrong reduced to an L{OAuthErrorKind}.

The provider's own error text is read only to find its RFC 6749 C{error}
name; it never goes into an exception, so nothing a provider says can reach
a log line.
"""

from __future__ import annotations

import enum
import ipaddress
import math
from collections.abc import Mapping
from http.cookiejar import DefaultCookiePolicy
from typing import Any, cast
from urllib.parse import urlsplit

import orjson
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseDone,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from credproxy._secret import Secret
from credproxy.oauth._interfaces import OAuthError, OAuthErrorKind
from credproxy.stores._token import ACCESS_TOKEN_FIELD, EXPIRY_FIELD, REFRESH_TOKEN_FIELD, Token

# A token answer is a few hundred bytes; anything near this is not a token.
MAX_ANSWER_BYTES = 64 * 1024
# One token call, from connect to the last byte of the answer. The broker
# holds a refresh lock meanwhile, so a hung endpoint must not hold it long.
TOKEN_CALL_DEADLINE = 30.0
# The default agent's TCP (and TLS) connect limit, inside the call deadline.
CONNECT_TIMEOUT = 10.0
# What a token without C{expires_in} is taken to live: RFC 6749 leaves it to
# the provider's documentation; an hour makes the broker refresh early rather
# than hold a dead token until the API refuses it.
DEFAULT_EXPIRES_IN = 3600.0

TOKEN_TYPE_FIELD = "token_type"
EXPIRES_IN_FIELD = "expires_in"

_USER_AGENT = b"credproxy"


class Detail(enum.StrEnum):
    """
    The names, besides an HTTP status, that an L{OAuthError} raised here may
    carry as its C{detail}: each is safe to log.
    """

    TIMEOUT = "timeout"
    CONNECTION_FAILED = "connection_failed"
    ANSWER_TOO_LARGE = "answer_too_large"
    CONTENT_ENCODING = "content_encoding"
    NOT_JSON = "not_json"
    NOT_A_TOKEN = "not_a_token"
    BAD_DEVICE_ANSWER = "bad_device_answer"
    STATE_MISMATCH = "state_mismatch"


# RFC 6749 section 5.2 and RFC 8628 section 3.5 error names: a provider's
# C{error} is repeated in C{detail} only when it is one of these.
KNOWN_ERRORS = frozenset(
    {
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "server_error",
        "temporarily_unavailable",
        "authorization_pending",
        "slow_down",
        "access_denied",
        "expired_token",
    }
)

_DEVICE_ERRORS = {
    "authorization_pending": OAuthErrorKind.PENDING,
    "slow_down": OAuthErrorKind.SLOW_DOWN,
    "access_denied": OAuthErrorKind.ACCESS_DENIED,
    "expired_token": OAuthErrorKind.EXPIRED,
}


class BodyEncoding(enum.Enum):
    """
    How a token request's fields are sent.
    """

    JSON = "json"  # Anthropic's token endpoint
    FORM = "form"  # RFC 6749/8628: application/x-www-form-urlencoded


def is_loopback_host(host: str) -> bool:
    """
    Whether C{host} names this machine only (127.0.0.0/8, ::1, localhost):
    the one place plain HTTP is allowed, since nothing crosses a network.
    """
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def endpoint_url_problem(url: object) -> str | None:
    """
    Why C{url} cannot be an OAuth endpoint, or None when it can: an https URL
    with a host, no credentials and no fragment; plain http only on loopback.
    The reason never repeats the URL.
    """
    if not isinstance(url, str):
        return "must be a string"
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        return "must be an https URL"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - parsing the port validates it
    except ValueError:
        return "must be an https URL"
    if not host or parts.fragment:
        return "must be an https URL"
    if parts.username is not None or parts.password is not None:
        return "must not contain credentials"
    if parts.scheme == "https":
        return None
    if parts.scheme == "http" and is_loopback_host(host):
        return None
    return "must be an https URL"


def default_oauth_agent(
    reactor: Any,
    *,
    trust_root: Any = None,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> IAgent:
    """
    The agent token calls use by default: TLS verified against the platform
    trust (or C{trust_root}, an C{IOpenSSLTrustRoot}, for a private CA), a
    connect timeout, and a pool of its own that keeps no connection, so a
    refresh never fails on a connection the server closed while idle (a POST
    is not retried). A bare L{Agent} follows no redirects.
    """
    return Agent(
        reactor,
        contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust_root),
        connectTimeout=connect_timeout,
        pool=HTTPConnectionPool(reactor, persistent=False),
    )


@implementer(IBodyProducer)
class _BytesProducer:
    """
    A request body written in one go. treq's default producer is
    C{FileBodyProducer}, which writes through the global reactor's
    cooperator; a token request is a few hundred bytes and needs none.
    """

    def __init__(self, body: bytes) -> None:
        if not isinstance(body, bytes):
            raise TypeError("a token request body is bytes")
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def stopProducing(self) -> None:
        pass

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


@implementer(IAgent)
class _IdentityOnlyAgent:
    """
    Beneath treq's content decoder: asks for no compression and refuses a
    compressed answer, so the answer limit counts the bytes that arrive (a
    64 KiB gzip answer can inflate a thousandfold inside one read).
    """

    def __init__(self, agent: IAgent) -> None:
        self._agent = agent

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        headers = Headers() if headers is None else headers.copy()
        headers.removeHeader(b"accept-encoding")
        return self._agent.request(method, uri, headers, bodyProducer).addCallback(self._check)

    @staticmethod
    def _check(response: IResponse) -> IResponse:
        codings = b",".join(response.headers.getRawHeaders(b"content-encoding", []))
        if any(c.strip().lower() not in (b"", b"identity") for c in codings.split(b",")):
            _discard(response)
            raise OAuthError(OAuthErrorKind.REJECTED, Detail.CONTENT_ENCODING)
        return response


class _Discard(Protocol):
    """
    Drops an answer whose body is not needed, closing its connection at once
    instead of letting the agent buffer it.
    """

    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


def _discard(response: IResponse) -> None:
    response.deliverBody(_Discard())


class _BoundedBody(Protocol):
    """
    Collects an answer body of at most C{limit} bytes; one byte more stops
    the transfer and fails the read as C{REJECTED}.
    """

    def __init__(self, limit: int, declared: int | None, finished: Deferred[bytes]) -> None:
        self._limit = limit
        self._declared = declared
        self._finished = finished
        self._chunks: list[bytes] = []
        self._size = 0

    def connectionMade(self) -> None:
        if self._declared is not None and self._declared > self._limit:
            self._too_large()

    def dataReceived(self, data: bytes) -> None:
        if self._finished.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._too_large()
            return
        self._chunks.append(data)

    def _too_large(self) -> None:
        self._chunks.clear()
        self._finished.errback(OAuthError(OAuthErrorKind.REJECTED, Detail.ANSWER_TOO_LARGE))
        self.transport.stopProducing()  # type: ignore[union-attr]

    def stop(self) -> None:
        """
        Abandon the transfer (the call's deadline passed).
        """
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._finished.called:
            return
        # PotentialDataLoss: an answer without a length, ended by the close.
        if reason.check(ResponseDone, PotentialDataLoss):
            self._finished.callback(b"".join(self._chunks))
        else:
            self._finished.errback(OAuthError(OAuthErrorKind.TRANSIENT, Detail.CONNECTION_FAILED))


def _read_bounded(response: IResponse, limit: int) -> Deferred[bytes]:
    protocol: _BoundedBody | None = None

    def cancel(_: Deferred[bytes]) -> None:
        if protocol is not None:
            protocol.stop()

    finished: Deferred[bytes] = Deferred(cancel)
    declared = response.length if response.length is not UNKNOWN_LENGTH else None
    protocol = _BoundedBody(limit, declared, finished)
    response.deliverBody(protocol)
    return finished


def _error_name(body: bytes) -> str | None:
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(answer, dict):
        error = answer.get("error")
        if isinstance(error, str):
            return error
    return None


def _map_refusal(status: int, body: bytes, device: bool) -> OAuthError:
    """
    The error for a non-2xx answer that is not transient: RFC 6749 error
    names are read from 400 and 401 answers only.
    """
    error = _error_name(body) if status in (400, 401) else None
    if error is None or error not in KNOWN_ERRORS:
        return OAuthError(OAuthErrorKind.REJECTED, str(status))
    if error == "invalid_grant":
        return OAuthError(OAuthErrorKind.INVALID_GRANT)
    if device and error in _DEVICE_ERRORS:
        return OAuthError(_DEVICE_ERRORS[error])
    return OAuthError(OAuthErrorKind.REJECTED, error)


class TokenEndpointClient:
    """
    POSTs to OAuth endpoints through treq on an injected agent, and hands
    back the answer's JSON object or fails with L{OAuthError}.

    treq's cookie jar is replaced by one that keeps nothing, redirects are
    never followed, compression is refused, and each call is bounded by
    C{deadline} seconds on C{reactor} and C{max_answer} bytes.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        agent: IAgent,
        *,
        deadline: float = TOKEN_CALL_DEADLINE,
        max_answer: int = MAX_ANSWER_BYTES,
    ) -> None:
        self._reactor = reactor
        self._deadline = deadline
        self._max_answer = max_answer
        jar = IndexableCookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
        self._http = HTTPClient(
            _IdentityOnlyAgent(agent), cookiejar=jar, data_to_body_producer=_BytesProducer
        )

    def post(
        self,
        url: str,
        fields: Mapping[str, str | Secret],
        encoding: BodyEncoding,
        *,
        device_errors: bool = False,
    ) -> Deferred[dict[str, Any]]:
        """
        POST C{fields} (secrets revealed only into the body) to C{url}.

        @param device_errors: map RFC 8628 polling errors to their own kinds
            (only a device-code poll expects them; elsewhere they are
            C{REJECTED}).
        """
        body = {k: v.reveal() if isinstance(v, Secret) else v for k, v in fields.items()}
        stopped: list[str] = []  # why the transfer was abandoned, if it was
        transfer = Deferred.fromCoroutine(self._post(url, body, encoding, device_errors))

        def stop(why: str) -> None:
            if not stopped:
                stopped.append(why)
                transfer.cancel()

        timer = self._reactor.callLater(self._deadline, stop, "deadline")

        def finish(result: object) -> object:
            if timer.active():
                timer.cancel()
            if stopped and isinstance(result, Failure):
                # However the abandoned transfer ended, the cause was the
                # deadline, or the caller's own cancel.
                if stopped[0] == "deadline":
                    raise OAuthError(OAuthErrorKind.TRANSIENT, Detail.TIMEOUT)
                raise CancelledError()
            return result

        transfer.addBoth(finish)
        # What the caller holds: cancelling it abandons the transfer too.
        outcome: Deferred[dict[str, Any]] = Deferred(lambda _: stop("cancelled"))
        transfer.chainDeferred(outcome)
        return outcome

    async def _post(
        self,
        url: str,
        body: dict[str, str],
        encoding: BodyEncoding,
        device: bool,
    ) -> dict[str, Any]:
        headers = Headers({b"accept": [b"application/json"], b"user-agent": [_USER_AGENT]})
        content: dict[str, Any] = (
            {"json": body} if encoding is BodyEncoding.JSON else {"data": body}
        )
        try:
            response = await self._http.post(
                url,
                headers=headers,
                allow_redirects=False,
                unbuffered=True,
                # Only for treq's own timeout, which is not used (it ends at the
                # headers); passing it keeps treq from importing the global reactor.
                reactor=cast(Any, self._reactor),
                **content,
            )
        except (OAuthError, CancelledError):
            raise
        except Exception:
            raise OAuthError(OAuthErrorKind.TRANSIENT, Detail.CONNECTION_FAILED) from None

        status = response.code
        if status >= 500 or status == 429:
            _discard(response)
            raise OAuthError(OAuthErrorKind.TRANSIENT, str(status))
        raw = await _read_bounded(response, self._max_answer)
        if not 200 <= status < 300:
            raise _map_refusal(status, raw, device)
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise OAuthError(OAuthErrorKind.REJECTED, Detail.NOT_JSON) from None
        if not isinstance(answer, dict):
            raise OAuthError(OAuthErrorKind.REJECTED, Detail.NOT_JSON)
        return answer


def positive_number(value: object) -> float | None:
    """
    C{value} as a finite positive float, or None: JSON numbers only (not
    booleans), and decimal strings, which some providers send.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        # A lifetime has a few digits; a long string would only cost time.
        if not (value.isascii() and value.isdigit()) or len(value) > 12:
            return None
        value = int(value)
    if not isinstance(value, int | float):
        return None
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        return None
    return number


def token_from_answer(answer: Mapping[str, Any], now: float) -> Token:
    """
    The stored form of a token answer: every field kept, C{expires_in}
    replaced by an absolute C{expiry} (C{now} plus it, or plus
    L{DEFAULT_EXPIRES_IN} when absent), C{token_type} defaulting to Bearer.

    @raise OAuthError: C{REJECTED} when the answer is not a usable token.
    """
    fields = dict(answer)
    access = fields.get(ACCESS_TOKEN_FIELD)
    if not isinstance(access, str) or not access:
        raise OAuthError(OAuthErrorKind.REJECTED, Detail.NOT_A_TOKEN)
    if fields.get(REFRESH_TOKEN_FIELD, "") is None:
        del fields[REFRESH_TOKEN_FIELD]
    elif not isinstance(fields.get(REFRESH_TOKEN_FIELD, ""), str):
        raise OAuthError(OAuthErrorKind.REJECTED, Detail.NOT_A_TOKEN)
    token_type = fields.get(TOKEN_TYPE_FIELD)
    if token_type is None:
        fields[TOKEN_TYPE_FIELD] = "Bearer"
    elif not isinstance(token_type, str) or not token_type:
        raise OAuthError(OAuthErrorKind.REJECTED, Detail.NOT_A_TOKEN)
    expires_in = fields.pop(EXPIRES_IN_FIELD, None)
    if expires_in is not None:
        lifetime = positive_number(expires_in)
        if lifetime is None:
            raise OAuthError(OAuthErrorKind.REJECTED, Detail.NOT_A_TOKEN)
    else:
        lifetime = DEFAULT_EXPIRES_IN
    fields[EXPIRY_FIELD] = now + lifetime
    return Token(fields)
