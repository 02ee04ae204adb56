"""
The header policy of the HTTP face, as pure functions: what is forwarded
upstream, what is never forwarded, how the real credential goes in, how the
OAuth beta flag is merged, and what comes back to the agent.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from credproxy._secret import Secret
from credproxy.broker.credentials import CredentialKind, UpstreamCredential
from credproxy.http._headers import (
    OAUTH_BETA_FLAG,
    copy_response_headers,
    merge_beta_flags,
    presented_placeholder,
    upstream_request_headers,
)
from credproxy.http._upstream_head import connection_options

REAL_KEY = "sk-ant-api03-real-key"
REAL_OAUTH = "sk-ant-oat01-real-oauth"
API_KEY = UpstreamCredential(CredentialKind.API_KEY, Secret(REAL_KEY), "test")
OAUTH = UpstreamCredential(CredentialKind.OAUTH, Secret(REAL_OAUTH), "test")


def _incoming(**extra: list[bytes]) -> Headers:
    headers = Headers(
        {
            b"content-type": [b"application/json"],
            b"anthropic-version": [b"2023-06-01"],
            b"x-api-key": [b"placeholder"],
            b"authorization": [b"Bearer placeholder"],
            b"connection": [b"keep-alive, x-private-hop"],
            b"x-private-hop": [b"drop me"],
            b"keep-alive": [b"timeout=5"],
            b"transfer-encoding": [b"chunked"],
            b"te": [b"trailers"],
            b"upgrade": [b"h2c"],
            b"proxy-authorization": [b"Basic eA=="],
            b"content-length": [b"12"],
            b"accept-encoding": [b"gzip, br"],
            b"x-stainless-lang": [b"python"],
        }
    )
    for name, values in extra.items():
        headers.setRawHeaders(name.replace("_", "-").encode(), values)
    return headers


class UpstreamRequestHeaderTests(SynchronousTestCase):
    def test_api_key_replaces_every_presented_credential(self) -> None:
        out = upstream_request_headers(_incoming(), API_KEY)
        self.assertEqual(out.getRawHeaders(b"x-api-key"), [REAL_KEY.encode()])
        self.assertFalse(out.hasHeader(b"authorization"))

    def test_oauth_goes_as_bearer_with_the_beta_flag(self) -> None:
        out = upstream_request_headers(_incoming(), OAUTH)
        self.assertEqual(out.getRawHeaders(b"authorization"), [b"Bearer " + REAL_OAUTH.encode()])
        self.assertFalse(out.hasHeader(b"x-api-key"))
        self.assertEqual(out.getRawHeaders(b"anthropic-beta"), [OAUTH_BETA_FLAG])

    def test_hop_by_hop_and_connection_named_headers_are_dropped(self) -> None:
        out = upstream_request_headers(_incoming(), API_KEY)
        for name in (
            b"connection",
            b"x-private-hop",
            b"keep-alive",
            b"transfer-encoding",
            b"te",
            b"upgrade",
            b"proxy-authorization",
            b"content-length",
        ):
            self.assertFalse(out.hasHeader(name), name)

    def test_end_to_end_headers_pass_and_encoding_is_identity(self) -> None:
        out = upstream_request_headers(_incoming(), API_KEY)
        self.assertEqual(out.getRawHeaders(b"anthropic-version"), [b"2023-06-01"])
        self.assertEqual(out.getRawHeaders(b"x-stainless-lang"), [b"python"])
        self.assertEqual(out.getRawHeaders(b"accept-encoding"), [b"identity"])

    def test_agent_beta_flags_are_kept_in_order_without_duplicates(self) -> None:
        incoming = _incoming(anthropic_beta=[b"a-1, oauth-2025-04-20", b"b-2,a-1"])
        out = upstream_request_headers(incoming, OAUTH)
        self.assertEqual(out.getRawHeaders(b"anthropic-beta"), [b"a-1,oauth-2025-04-20,b-2"])
        api = upstream_request_headers(incoming, API_KEY)  # untouched for API keys
        self.assertEqual(
            api.getRawHeaders(b"anthropic-beta"), [b"a-1, oauth-2025-04-20", b"b-2,a-1"]
        )

    def test_names_with_an_underscore_are_never_forwarded(self) -> None:
        incoming = Headers(
            {
                b"x_api_key": [b"sk-ant-api03-smuggled"],
                b"anthropic_version": [b"2023-06-01"],
                b"X_Stainless_Lang": [b"python"],
                b"authorization_": [b"Bearer x"],
                b"x-api_key": [b"k"],
                b"anthropic-version": [b"2023-06-01"],
            }
        )
        for credential in (API_KEY, OAUTH):
            out = upstream_request_headers(incoming, credential)
            names = [name for name, _ in out.getAllRawHeaders()]
            self.assertEqual([name for name in names if b"_" in name], [])
            self.assertEqual(out.getRawHeaders(b"anthropic-version"), [b"2023-06-01"])
            self.assertNotIn("sk-ant-api03-smuggled", repr(list(out.getAllRawHeaders())))

    def test_merge_beta_flags(self) -> None:
        self.assertEqual(merge_beta_flags([], b"f"), b"f")
        self.assertEqual(merge_beta_flags([b" ,x,, y ,x"], b"f"), b"x,y,f")


class PlaceholderTests(SynchronousTestCase):
    def test_x_api_key_first_then_bearer(self) -> None:
        self.assertEqual(presented_placeholder(_incoming()), b"placeholder")
        self.assertEqual(
            presented_placeholder(Headers({b"authorization": [b"bearer  tok "]})), b"tok"
        )
        self.assertIsNone(presented_placeholder(Headers({b"authorization": [b"Basic eA=="]})))
        self.assertIsNone(presented_placeholder(Headers()))


class ResponseHeaderTests(SynchronousTestCase):
    def test_upstream_hop_by_hop_and_cookies_do_not_reach_the_agent(self) -> None:
        upstream = Headers(
            {
                b"content-type": [b"text/event-stream"],
                b"request-id": [b"req_1"],
                b"anthropic-ratelimit-requests-remaining": [b"9"],
                b"connection": [b"close, x-hop"],
                b"x-hop": [b"1"],
                b"transfer-encoding": [b"chunked"],
                b"content-length": [b"99"],
                b"set-cookie": [b"session=1"],
            }
        )
        into = Headers()
        copied = copy_response_headers(upstream, into)
        self.assertEqual(
            sorted(name for name, _ in into.getAllRawHeaders()),
            sorted([b"Content-Type", b"Request-Id", b"Anthropic-Ratelimit-Requests-Remaining"]),
        )
        self.assertEqual(
            sorted(name.lower() for name in copied),
            [b"anthropic-ratelimit-requests-remaining", b"content-type", b"request-id"],
        )

    def test_connection_named_headers_read_as_the_screen_reads_them(self) -> None:
        # One rule for parsed headers and raw heads (credproxy.http._upstream_head).
        upstream = Headers(
            {
                b"connection": [b" X-A ,, ", b"x-b"],
                b"x-a": [b"1"],
                b"x-b": [b"2"],
                b"x-c": [b"3"],
            }
        )
        into = Headers()
        copy_response_headers(upstream, into)
        self.assertEqual([name for name, _ in into.getAllRawHeaders()], [b"X-C"])
        self.assertEqual(
            connection_options(upstream.getRawHeaders(b"connection", [])), {b"x-a", b"x-b"}
        )
