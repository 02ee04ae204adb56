"""
Which headers cross the proxy in each direction, and how the real credential
is put on a request. Every header set is defined here once.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.web.http_headers import Headers

from credproxy.broker.credentials import CredentialKind, UpstreamCredential

# RFC 9110 7.6.1 hop-by-hop headers, plus the obsolete Proxy-Connection.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Where an agent puts its placeholder; always removed before forwarding.
CREDENTIAL_HEADERS = frozenset({b"x-api-key", b"authorization"})
# Set by the client library for the upstream hop itself, never copied from the agent.
REQUEST_HEADERS_SET_BY_US = frozenset(
    {b"host", b"content-length", b"expect", b"accept-encoding", b"cookie"}
)
# Dropped from answers: twisted.web frames the body itself; no cookies reach agents.
RESPONSE_HEADERS_SET_BY_US = frozenset({b"content-length", b"set-cookie", b"set-cookie2"})

API_KEY_HEADER = b"x-api-key"
AUTHORIZATION_HEADER = b"authorization"
BETA_HEADER = b"anthropic-beta"
OAUTH_BETA_FLAG = b"oauth-2025-04-20"


def _connection_named(headers: Headers) -> frozenset[bytes]:
    named: set[bytes] = set()
    for value in headers.getRawHeaders(b"connection", []):
        named.update(token.strip().lower() for token in value.split(b",") if token.strip())
    return frozenset(named)


def _forwardable(
    headers: Headers, excluded: frozenset[bytes]
) -> Iterable[tuple[bytes, list[bytes]]]:
    skip = HOP_BY_HOP | excluded | _connection_named(headers)
    for name, values in headers.getAllRawHeaders():
        if name.lower() not in skip:
            yield name, list(values)


def merge_beta_flags(values: Iterable[bytes], flag: bytes) -> bytes:
    """
    One comma-separated C{anthropic-beta} value holding every flag the agent
    asked for, in order, without duplicates, plus C{flag}.
    """
    flags: list[bytes] = []
    for value in values:
        for item in value.split(b","):
            item = item.strip()
            if item and item not in flags:
                flags.append(item)
    if flag not in flags:
        flags.append(flag)
    return b",".join(flags)


def upstream_request_headers(incoming: Headers, credential: UpstreamCredential) -> Headers:
    """
    The headers to send upstream: the agent's, less hop-by-hop and credential
    headers, with exactly one real credential and an identity encoding.
    """
    outgoing = Headers()
    for name, values in _forwardable(incoming, CREDENTIAL_HEADERS | REQUEST_HEADERS_SET_BY_US):
        outgoing.setRawHeaders(name, values)
    secret = credential.secret.reveal().encode("utf-8")
    if credential.kind is CredentialKind.API_KEY:
        outgoing.setRawHeaders(API_KEY_HEADER, [secret])
    else:
        outgoing.setRawHeaders(AUTHORIZATION_HEADER, [b"Bearer " + secret])
        outgoing.setRawHeaders(
            BETA_HEADER,
            [merge_beta_flags(incoming.getRawHeaders(BETA_HEADER, []), OAUTH_BETA_FLAG)],
        )
    outgoing.setRawHeaders(b"accept-encoding", [b"identity"])
    return outgoing


def copy_response_headers(upstream: Headers, into: Headers) -> None:
    """
    Copy the upstream answer's end-to-end headers onto the agent's response.
    """
    for name, values in _forwardable(upstream, RESPONSE_HEADERS_SET_BY_US):
        into.setRawHeaders(name, values)


def presented_placeholder(headers: Headers) -> bytes | None:
    """
    What the agent sent as its key: C{x-api-key}, else a Bearer value.
    """
    api_key = headers.getRawHeaders(API_KEY_HEADER)
    if api_key:
        return api_key[0].strip()
    authorization = headers.getRawHeaders(AUTHORIZATION_HEADER)
    if authorization:
        scheme, _, value = authorization[0].strip().partition(b" ")
        if scheme.lower() == b"bearer":
            return value.strip()
    return None
