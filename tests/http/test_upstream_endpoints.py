"""
The upstream hop's endpoint factory: one endpoint per scheme, host and port,
reused for every request (Twisted's default builds one per request), TLS for
https only, and a bounded cache.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI, BrowserLikePolicyForHTTPS
from twisted.web.error import SchemeNotSupported

from credproxy.http._face import MAX_CACHED_ENDPOINTS, UpstreamEndpoints


def _endpoints() -> UpstreamEndpoints:
    return UpstreamEndpoints(reactor, BrowserLikePolicyForHTTPS(), 30.0)


class UpstreamEndpointsTests(SynchronousTestCase):
    def test_one_endpoint_serves_every_request_to_the_upstream(self) -> None:
        factory = _endpoints()
        first = factory.endpointForURI(URI.fromBytes(b"https://api.example/v1/messages"))
        again = factory.endpointForURI(URI.fromBytes(b"https://api.example/v1/messages?beta=1"))
        self.assertIs(first, again)
        other = factory.endpointForURI(URI.fromBytes(b"https://api.example:8443/v1/messages"))
        self.assertIsNot(first, other)

    def test_http_is_plain_tcp_and_https_is_wrapped_in_tls(self) -> None:
        factory = _endpoints()
        plain = factory.endpointForURI(URI.fromBytes(b"http://upstream.example:8080/v1/messages"))
        self.assertIsInstance(plain, HostnameEndpoint)
        secure = factory.endpointForURI(URI.fromBytes(b"https://127.0.0.1:8443/v1/messages"))
        self.assertNotIsInstance(secure, HostnameEndpoint)
        self.assertEqual(type(secure).__name__, "_WrapperEndpoint")

    def test_other_schemes_are_refused(self) -> None:
        with self.assertRaises(SchemeNotSupported):
            _endpoints().endpointForURI(URI.fromBytes(b"ftp://example/x"))

    def test_the_cache_is_bounded(self) -> None:
        factory = _endpoints()
        for port in range(MAX_CACHED_ENDPOINTS * 3):
            factory.endpointForURI(URI.fromBytes(b"http://h:%d/" % (1000 + port,)))
        self.assertLessEqual(len(factory._endpoints), MAX_CACHED_ENDPOINTS)

    def test_an_address_is_connected_to_without_name_resolution(self) -> None:
        factory = _endpoints()
        for url, kind in [
            (b"http://127.0.0.1:8080/v1/messages", TCP4ClientEndpoint),
            (b"http://[::1]:8080/v1/messages", TCP6ClientEndpoint),
            (b"http://localhost:8080/v1/messages", HostnameEndpoint),
        ]:
            endpoint = factory.endpointForURI(URI.fromBytes(url))
            self.assertIsInstance(endpoint, kind, url)
        # Under TLS too: the address is what is connected to.
        secure = factory.endpointForURI(URI.fromBytes(b"https://127.0.0.1:8443/v1/messages"))
        self.assertIsInstance(secure._wrappedEndpoint, TCP4ClientEndpoint)  # type: ignore[attr-defined]

    def test_the_connect_timeout_is_kept_for_an_address(self) -> None:
        endpoint = _endpoints().endpointForURI(URI.fromBytes(b"http://127.0.0.1:8080/"))
        self.assertEqual(endpoint._timeout, 30.0)  # type: ignore[attr-defined]
