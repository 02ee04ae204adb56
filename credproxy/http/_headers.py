"""
Which headers cross the proxy in each direction, and how the real credential
is put on a request. Every header set is defined here once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from twisted.web.http_headers import Headers

from credproxy.broker.credentials import CredentialKind, UpstreamCredential
from credproxy.http._upstream_head import connection_options

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
    """
    The headers named by C{headers}' own Connection header (RFC 9110 7.6.1),
    read by the same rule the upstream response screen applies to raw heads.
    """
    return connection_options(headers.getRawHeaders(b"connection", []))


# What never crosses, per direction (the Connection-named ones are added per message).
_NOT_FORWARDED_UP = HOP_BY_HOP | CREDENTIAL_HEADERS | REQUEST_HEADERS_SET_BY_US
_NOT_FORWARDED_DOWN = HOP_BY_HOP | RESPONSE_HEADERS_SET_BY_US


def _forwardable(
    headers: Headers, skip: frozenset[bytes], *, underscores: bool = True
) -> Iterable[tuple[bytes, list[bytes]]]:
    named = _connection_named(headers) if headers.hasHeader(b"connection") else None
    if named:
        skip = skip | named
    for name, values in headers.getAllRawHeaders():
        if name.lower() not in skip and (underscores or b"_" not in name):
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

    A name with an underscore is never forwarded, whatever its value: some
    servers and gateways read C{x_api_key} as C{x-api-key} (CGI-style
    mapping), so a look-alike could carry a second credential past the
    rules above that name the real headers.
    """
    outgoing = Headers()
    for name, values in _forwardable(incoming, _NOT_FORWARDED_UP, underscores=False):
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


def copy_response_headers(upstream: Headers, into: Headers) -> list[bytes]:
    """
    Copy the upstream answer's end-to-end headers onto the agent's response;
    the names copied, so they can be taken off again.

    (The lines an upstream's Connection header names are already gone from
    an answer parsed behind the response screen, which removes them from the
    raw head; Twisted's parser keeps Connection to itself. The rule is
    applied here too, so any C{Headers} given is treated alike.)
    """
    copied: list[bytes] = []
    for name, values in _forwardable(upstream, _NOT_FORWARDED_DOWN):
        into.setRawHeaders(name, values)
        copied.append(name)
    return copied


class RawHeaders(Protocol):
    """
    Headers as twisted.web's L{Headers} or a judged request head gives them.
    """

    def getRawHeaders(self, name: bytes) -> Sequence[bytes] | None: ...


def presented_placeholder(headers: RawHeaders) -> bytes | None:
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
