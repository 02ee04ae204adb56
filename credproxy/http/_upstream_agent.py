"""
The upstream hop's C{IAgent}, over credproxy's own HTTP/1.1 client
(L{credproxy.http._upstream_client}).

Twisted's C{Agent} parses and validates the whole URL, looks up an
endpoint, computes the I{Host} value and copies the headers for every
request. The face sends every request to one origin (the configured
upstream), so that work is done once per origin here, and each request
only splits its URL at the path and checks the path's bytes. The request
is written as the bytes Twisted's own request writes (tests pin that),
head and in-memory body in one write with I{Host} last: no redirect is
followed, nothing retried, no header added but I{Host}.

It relies on no private Twisted name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import URI
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from credproxy.http._body import BodyProducer
from credproxy.http._grammar import REQUEST_TARGET, TOKEN
from credproxy.http._upstream_client import UpstreamConnection, UpstreamPool

# Origins kept parsed: the face uses one; the bound keeps a caller that
# names many from growing the map.
MAX_CACHED_ORIGINS: Final = 8
_VISIBLE: Final = re.compile(rb"[\x21-\x7e]+")
_DEFAULT_PORTS: Final = ((b"http", 80), (b"https", 443))


@dataclass(frozen=True)
class _Origin:
    """
    One origin, parsed once: the pool's key, its endpoint and I{Host} value.
    """

    uri: URI
    key: tuple[bytes, bytes, int]
    endpoint: IStreamClientEndpoint
    host: bytes


def _host_value(uri: URI) -> bytes:
    host: bytes = uri.host
    if b":" in host:  # an IPv6 literal
        host = b"[" + host + b"]"
    if (uri.scheme, uri.port) in _DEFAULT_PORTS:
        return host
    return b"%b:%d" % (host, uri.port)


def request_bytes(
    method: bytes,
    path: bytes,
    headers: Headers,
    host: bytes | None,
    body: BodyProducer | None,
    persistent: bool,
) -> bytes:
    """
    One request as Twisted's client writes it (the request line,
    C{Connection: close} when not persistent, the body's Content-Length,
    the headers), with C{host}, the I{Host} value the caller's headers
    lack, last, where Twisted's C{Agent} would have added it to a copy of
    them; then the body, in the same bytes.
    """
    lines = [b"%b %b HTTP/1.1\r\n" % (method, path)]
    if not persistent:
        lines.append(b"Connection: close\r\n")
    if body is not None:
        lines.append(b"Content-Length: %d\r\n" % (body.length,))
    elif method in (b"PUT", b"POST"):
        lines.append(b"Content-Length: 0\r\n")
    for name, values in headers.getAllRawHeaders():
        for value in values:
            lines.append(b"%b: %b\r\n" % (name, value))
    if host is not None:
        lines.append(b"Host: %b\r\n" % (host,))
    lines.append(b"\r\n")
    if body is not None:
        lines += body.chunks
    return b"".join(lines)


@implementer(IAgent)
class UpstreamAgent:
    """
    Sends requests through an L{UpstreamPool} to endpoints from an
    endpoint factory (the face's L{credproxy.http._face.UpstreamEndpoints}).

    Nothing is followed or retried: a redirect is an answer like any other,
    and a request is sent once, on a pooled connection if one is idle (a
    dead one fails it with C{ResponseNeverReceived}), else on a new one.
    Bodies are in memory (L{BodyProducer}) or absent: a body still being
    produced is refused, since nothing in credproxy sends one.
    """

    def __init__(self, endpoints: IAgentEndpointFactory, pool: UpstreamPool) -> None:
        self._endpoints = endpoints
        self._pool = pool
        self._origins: dict[bytes, _Origin] = {}

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        try:
            origin, path = self._split(uri)
            if TOKEN.fullmatch(method) is None:
                raise ValueError("the method is not an HTTP token")
            if bodyProducer is not None and not isinstance(bodyProducer, BodyProducer):
                raise ValueError("the upstream agent sends bodies held in memory only")
        except Exception as error:  # a bad URL, method or body: the request's failure
            return fail(error)
        if headers is None:
            headers = Headers()
        pool = self._pool
        persistent = pool.persistent
        data = request_bytes(
            method,
            path,
            headers,
            None if headers.hasHeader(b"host") else origin.host,
            bodyProducer,
            persistent,
        )
        no_body = method == b"HEAD"
        connection = pool.take(origin.key)
        if connection is not None:
            return connection.send(data, no_body=no_body, persistent=persistent)

        def connected(connection: UpstreamConnection) -> Deferred[IResponse]:
            return connection.send(data, no_body=no_body, persistent=persistent)

        connecting: Deferred[UpstreamConnection] = pool.connect(origin.key, origin.endpoint)
        return connecting.addCallback(connected)

    def _split(self, uri: bytes) -> tuple[_Origin, bytes]:
        """
        The URL's origin (parsed on first sight) and its path with the query.
        """
        scheme_end = uri.find(b"://")
        if scheme_end < 0:
            raise ValueError("the URL must be absolute")
        path_start = uri.find(b"/", scheme_end + 3)
        if path_start < 0:
            prefix, path = uri, b"/"
        else:
            prefix, path = uri[:path_start], uri[path_start:]
        if REQUEST_TARGET.fullmatch(path) is None:
            raise ValueError("the URL's path holds a byte a request target may not")
        origin = self._origins.get(prefix)
        if origin is None:
            origin = self._parse_origin(prefix)
        return origin, path

    def _parse_origin(self, prefix: bytes) -> _Origin:
        uri = URI.fromBytes(prefix + b"/")
        if (
            uri.scheme not in (b"http", b"https")
            or not uri.host
            or _VISIBLE.fullmatch(prefix) is None
        ):
            raise ValueError("the URL's origin is not an http or https origin")
        endpoint = self._endpoints.endpointForURI(uri)
        origin = _Origin(uri, (uri.scheme, uri.host, uri.port), endpoint, _host_value(uri))
        if len(self._origins) >= MAX_CACHED_ORIGINS:
            self._origins.clear()
        self._origins[prefix] = origin
        return origin
