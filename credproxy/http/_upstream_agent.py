"""
The upstream hop's C{IAgent}: Twisted's HTTP/1.1 client protocol and
connection pool, without C{Agent}'s work per request.

Twisted's C{Agent} parses and validates the whole URL, looks up an
endpoint, computes the I{Host} value and copies the headers for every
request. The face sends every request to one origin (the configured
upstream), so that work is done once per origin here, and each request
only splits its URL at the path and checks the path's bytes. What reaches
the wire is the same: the same protocol (L{ScreenedHTTP11ClientProtocol}
through the pool), the same request object, no redirect followed, no header
added but I{Host}.

This leans on one private Twisted name, C{twisted.web._newclient.Request._construct}
(what C{Agent} itself uses); tests/http/test_upstream_agent.py pins it, and
checks that a L{HeldBodyRequest} writes the bytes Twisted's own request does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web._newclient import Request as ClientRequest
from twisted.web.client import URI, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from credproxy.http._body import BodyProducer
from credproxy.http._grammar import REQUEST_TARGET, TOKEN

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


class HeldBodyRequest(ClientRequest):
    """
    A request whose body is already in memory (a L{BodyProducer}): written
    with its head in one write, the bytes Twisted writes for any request
    with a Content-Length, without the producer and consumer machinery (a
    length enforcer, a producer registered on the connection, three
    Deferreds) that a body still being produced needs.

    C{host}, when given, is the I{Host} value the caller's headers lack: it
    is written last, where Twisted's C{Agent} would have added it to a copy
    of them, so the headers are neither copied nor changed.
    """

    host: bytes | None = None

    def writeTo(self, transport: Any) -> Deferred[None]:
        producer: BodyProducer = self.bodyProducer
        lines = [b"%b %b HTTP/1.1\r\n" % (self.method, self.uri)]
        if not self.persistent:
            lines.append(b"Connection: close\r\n")
        lines.append(b"Content-Length: %d\r\n" % (producer.length,))
        for name, values in self.headers.getAllRawHeaders():
            for value in values:
                lines.append(b"%b: %b\r\n" % (name, value))
        if self.host is not None:
            lines.append(b"Host: %b\r\n" % (self.host,))
        lines.append(b"\r\n")
        lines += producer.chunks
        transport.writeSequence(lines)
        return succeed(None)


@implementer(IAgent)
class UpstreamAgent:
    """
    Sends requests through a connection pool to endpoints from an endpoint
    factory (the face's L{credproxy.http._face.UpstreamEndpoints}).

    Nothing is followed or retried: a redirect is an answer like any other,
    and a request is sent once (the pool's connections do not retry a
    C{POST}).
    """

    def __init__(self, endpoints: IAgentEndpointFactory, pool: HTTPConnectionPool) -> None:
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
        except Exception as error:  # a bad URL or method: the request's failure
            return fail(error)
        if headers is None:
            headers = Headers()
        held = isinstance(bodyProducer, BodyProducer)
        host = None if headers.hasHeader(b"host") else origin.host
        if host is not None and not held:
            headers = headers.copy()
            headers.addRawHeader(b"host", host)
        d = self._pool.getConnection(origin.key, origin.endpoint)
        persistent = self._pool.persistent

        def connected(protocol: HTTP11ClientProtocol) -> Deferred[IResponse]:
            if not held:
                return protocol.request(
                    ClientRequest._construct(
                        method,
                        path,
                        headers,
                        bodyProducer,
                        persistent=persistent,
                        parsedURI=origin.uri,
                    )
                )
            request: HeldBodyRequest = HeldBodyRequest._construct(
                method, path, headers, bodyProducer, persistent=persistent, parsedURI=origin.uri
            )
            request.host = host
            return protocol.request(request)

        return d.addCallback(connected)

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
