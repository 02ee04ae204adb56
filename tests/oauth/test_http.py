"""
Token-endpoint calls in memory: every answer mapped to its kind, the answer
size limit, the deadline on a Clock, and what the client does not do
(follow redirects, accept compression, keep cookies, repeat provider text).
"""

from __future__ import annotations

import gzip
from typing import Any

import orjson
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from credproxy._secret import Secret
from credproxy.oauth import (
    DEFAULT_EXPIRES_IN,
    MAX_ANSWER_BYTES,
    TOKEN_CALL_DEADLINE,
    AnthropicPKCEProvider,
    DeviceCodeProvider,
    OAuthError,
    OAuthErrorKind,
)
from credproxy.oauth._http import KNOWN_ERRORS, BodyEncoding, Detail, TokenEndpointClient
from credproxy.stores._token import Token
from credproxy.testing._oauth_server import FakeOAuthServer

TRANSIENT = OAuthErrorKind.TRANSIENT
REJECTED = OAuthErrorKind.REJECTED
INVALID_GRANT = OAuthErrorKind.INVALID_GRANT
URL = "http://127.0.0.1/token"


def _detail_is_safe(detail: str) -> bool:
    return detail == "" or detail.isdigit() or detail in set(Detail) | KNOWN_ERRORS


class _Fixture(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.server = FakeOAuthServer(self.clock)
        self.agent = RequestTraversalAgent(self.server.resource())
        self.anthropic = AnthropicPKCEProvider(self.server.pkce_config(), self.clock, self.agent)
        self.device = DeviceCodeProvider(self.server.device_config(), self.clock, self.agent)
        self.live = self.server.issue_token()

    def refresh(self) -> Deferred[Token]:
        assert self.live.refresh_token is not None
        return self.anthropic.refresh(Secret(self.live.refresh_token))

    def refused(self, d: Deferred[Any]) -> OAuthError:
        error = self.failureResultOf(d, OAuthError).value
        assert isinstance(error, OAuthError)
        self.assertTrue(_detail_is_safe(error.detail), error.detail)
        for text in (str(error), repr(error)):
            self.assertNotIn(FakeOAuthServer.PROVIDER_TEXT, text)
            self.assertNotIn("fake-provider-says", text)
        return error


class ErrorMappingTests(_Fixture):
    def check(
        self, status: int, body: bytes | dict[str, Any], kind: OAuthErrorKind, detail: str
    ) -> None:
        self.server.answer_next(status, body)
        error = self.refused(self.refresh())
        self.assertEqual((error.kind, error.detail), (kind, detail), (status, body))

    def test_server_errors_and_429_are_transient(self) -> None:
        for status in (500, 502, 503, 504, 599, 429):
            self.check(status, {"error": "invalid_grant"}, TRANSIENT, str(status))

    def test_invalid_grant_on_400_and_401(self) -> None:
        self.check(400, {"error": "invalid_grant"}, INVALID_GRANT, "")
        self.check(401, {"error": "invalid_grant"}, INVALID_GRANT, "")

    def test_other_statuses_do_not_read_error_names(self) -> None:
        self.check(403, {"error": "invalid_grant"}, REJECTED, "403")
        self.check(404, b"not found", REJECTED, "404")
        self.check(302, b"", REJECTED, "302")
        self.check(204, b"", REJECTED, Detail.NOT_JSON)

    def test_other_known_errors_are_rejected_by_name(self) -> None:
        self.check(401, {"error": "invalid_client"}, REJECTED, "invalid_client")
        self.check(400, {"error": "invalid_scope"}, REJECTED, "invalid_scope")
        self.check(400, {"error": "unsupported_grant_type"}, REJECTED, "unsupported_grant_type")

    def test_unknown_error_names_are_not_repeated(self) -> None:
        self.check(400, {"error": "secret-looking-thing-xyz"}, REJECTED, "400")
        self.check(400, {"error": 5}, REJECTED, "400")
        self.check(400, b"<html>no</html>", REJECTED, "400")
        self.check(400, b"[1]", REJECTED, "400")

    def test_device_errors_outside_a_poll_are_rejected(self) -> None:
        for name in ("authorization_pending", "slow_down", "access_denied", "expired_token"):
            self.check(400, {"error": name}, REJECTED, name)

    def test_device_errors_in_a_poll(self) -> None:
        kinds = {
            "authorization_pending": OAuthErrorKind.PENDING,
            "slow_down": OAuthErrorKind.SLOW_DOWN,
            "access_denied": OAuthErrorKind.ACCESS_DENIED,
            "expired_token": OAuthErrorKind.EXPIRED,
            "invalid_grant": INVALID_GRANT,
        }
        for name, kind in kinds.items():
            self.server.answer_next(400, {"error": name})
            error = self.refused(self.device.poll(Secret("fake-device-code-x")))
            self.assertEqual((error.kind, error.detail, str(error)), (kind, "", kind.value))

    def test_answers_that_are_not_json_objects(self) -> None:
        for body in (b"access_token=x", b"[]", b'"x"', b"", b'{"a":', b"\xff", b"NaN"):
            self.check(200, body, REJECTED, Detail.NOT_JSON)

    def test_answers_that_are_not_tokens(self) -> None:
        for answer in (
            {},
            {"access_token": 5},
            {"access_token": ""},
            {"access_token": None},
            {"access_token": "a", "expires_in": "soon"},
            {"access_token": "a", "expires_in": -1},
            {"access_token": "a", "expires_in": 0},
            {"access_token": "a", "expires_in": True},
            {"access_token": "a", "expires_in": "9" * 5000},
            {"access_token": "a", "expires_in": "1e3"},
            {"access_token": "a", "refresh_token": 7},
            {"access_token": "a", "token_type": 7},
            {"access_token": "a", "token_type": ""},
        ):
            self.check(200, orjson.dumps(answer), REJECTED, Detail.NOT_A_TOKEN)

    def test_a_redirect_is_not_followed(self) -> None:
        target = self.server.url(FakeOAuthServer.TOKEN_PATH)
        self.server.answer_next(307, b"", {b"location": target.encode()})
        self.assertEqual(self.refused(self.refresh()).detail, "307")
        self.assertEqual(sum(self.server.calls.values()), 1)
        assert self.live.refresh_token is not None
        self.assertTrue(self.server.is_live(self.live.refresh_token))


class TokenShapeTests(_Fixture):
    def answer(self, answer: dict[str, Any]) -> Token:
        self.server.answer_next(200, orjson.dumps(answer))
        return self.successResultOf(self.refresh())

    def test_expires_in_becomes_an_absolute_expiry(self) -> None:
        token = self.answer({"access_token": "a", "expires_in": 60, "extra": {"k": [1]}})
        self.assertEqual(
            token.to_json(),
            {"access_token": "a", "expiry": self.clock.seconds() + 60, "token_type": "Bearer",
             "extra": {"k": [1]}},
        )  # fmt: skip

    def test_a_decimal_string_expires_in(self) -> None:
        self.assertEqual(self.answer({"access_token": "a", "expires_in": "90"}).expiry, 1_000_090)

    def test_no_expires_in(self) -> None:
        for answer in ({"access_token": "a"}, {"access_token": "a", "expires_in": None}):
            self.assertEqual(self.answer(answer).expiry, self.clock.seconds() + DEFAULT_EXPIRES_IN)

    def test_token_type_and_refresh_token_are_kept(self) -> None:
        token = self.answer({"access_token": "a", "token_type": "bearer", "refresh_token": "r"})
        self.assertEqual((token["token_type"], token.refresh_token), ("bearer", "r"))

    def test_a_null_refresh_token_is_dropped(self) -> None:
        self.assertNotIn("refresh_token", self.answer({"access_token": "a", "refresh_token": None}))


class _Recorder(Resource):
    """
    Answers with a fixed response and remembers each request's headers.
    """

    isLeaf = True

    def __init__(self, body: bytes, headers: dict[bytes, bytes] | None = None) -> None:
        super().__init__()
        self.body = body
        self.headers = headers or {}
        self.seen: list[Headers] = []

    def render_POST(self, request: Request) -> bytes:
        self.seen.append(request.requestHeaders)
        for name, value in self.headers.items():
            request.setHeader(name, value)
        return self.body


class _Chunked(Resource):
    """
    Answers in pieces without a Content-Length (chunked).
    """

    isLeaf = True

    def __init__(self, pieces: list[bytes]) -> None:
        super().__init__()
        self.pieces = pieces

    def render_POST(self, request: Request) -> int:
        for piece in self.pieces:
            request.write(piece)
        request.finish()
        return NOT_DONE_YET


def _token_body(size: int) -> bytes:
    head, tail = b'{"access_token":"', b'"}'
    return head + b"a" * (size - len(head) - len(tail)) + tail


class TransferTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def post(
        self, resource: Resource, encoding: BodyEncoding = BodyEncoding.JSON
    ) -> Deferred[dict[str, Any]]:
        client = TokenEndpointClient(self.clock, RequestTraversalAgent(resource))
        return client.post(URL, {"grant_type": "x", "secret": Secret("s3cr3t")}, encoding)

    def test_the_answer_limit_with_a_length(self) -> None:
        body = _token_body(MAX_ANSWER_BYTES)
        self.assertEqual(len(self.successResultOf(self.post(_Recorder(body)))["access_token"]),
                         MAX_ANSWER_BYTES - 19)  # fmt: skip
        error = self.failureResultOf(self.post(_Recorder(body + b" ")), OAuthError).value
        self.assertEqual((error.kind, error.detail), (REJECTED, Detail.ANSWER_TOO_LARGE))

    def test_the_answer_limit_when_chunked(self) -> None:
        body = _token_body(MAX_ANSWER_BYTES)
        pieces = [body[:1000], body[1000:]]
        self.assertIn("access_token", self.successResultOf(self.post(_Chunked(pieces))))
        error = self.failureResultOf(self.post(_Chunked([*pieces, b" "])), OAuthError).value
        self.assertEqual((error.kind, error.detail), (REJECTED, Detail.ANSWER_TOO_LARGE))

    def test_a_declared_length_over_the_limit_is_refused_before_the_body(self) -> None:
        stall = _Stall(b'{"access_token": "')
        original = stall.render_POST

        def render(request: Request) -> int:
            request.setHeader(b"content-length", str(MAX_ANSWER_BYTES + 1).encode())
            return original(request)

        stall.render_POST = render  # type: ignore[method-assign]
        error = self.failureResultOf(self.post(stall), OAuthError).value
        self.assertEqual((error.kind, error.detail), (REJECTED, Detail.ANSWER_TOO_LARGE))

    def test_a_smaller_limit(self) -> None:
        agent = RequestTraversalAgent(_Chunked([_token_body(101)]))
        client = TokenEndpointClient(self.clock, agent, max_answer=100)
        error = self.failureResultOf(client.post(URL, {}, BodyEncoding.FORM), OAuthError).value
        self.assertEqual(error.detail, Detail.ANSWER_TOO_LARGE)

    def test_the_limit_does_not_apply_to_transient_answers(self) -> None:
        server_error = _Recorder(b"x" * (MAX_ANSWER_BYTES * 2))
        original = server_error.render_POST

        def render(request: Request) -> bytes:
            request.setResponseCode(503)
            return original(request)

        server_error.render_POST = render  # type: ignore[method-assign]
        error = self.failureResultOf(self.post(server_error), OAuthError).value
        self.assertEqual((error.kind, error.detail), (TRANSIENT, "503"))

    def test_bodies_and_headers(self) -> None:
        recorder = _Recorder(b'{"access_token":"a"}')
        self.successResultOf(self.post(recorder, BodyEncoding.JSON))
        self.successResultOf(self.post(recorder, BodyEncoding.FORM))
        json_headers, form_headers = recorder.seen
        self.assertEqual(
            json_headers.getRawHeaders(b"content-type"), [b"application/json; charset=UTF-8"]
        )
        self.assertEqual(
            form_headers.getRawHeaders(b"content-type"), [b"application/x-www-form-urlencoded"]
        )
        for headers in recorder.seen:
            self.assertEqual(headers.getRawHeaders(b"accept"), [b"application/json"])
            self.assertIsNone(headers.getRawHeaders(b"accept-encoding"))

    def test_compressed_answers_are_refused(self) -> None:
        body = gzip.compress(b'{"access_token":"' + b"a" * 10_000_000 + b'"}')
        recorder = _Recorder(body, {b"content-encoding": b"gzip"})
        error = self.failureResultOf(self.post(recorder), OAuthError).value
        self.assertEqual((error.kind, error.detail), (REJECTED, Detail.CONTENT_ENCODING))
        identity = _Recorder(b'{"access_token":"a"}', {b"content-encoding": b"identity"})
        self.assertEqual(self.successResultOf(self.post(identity)), {"access_token": "a"})

    def test_cookies_are_not_kept(self) -> None:
        recorder = _Recorder(b'{"access_token":"a"}', {b"set-cookie": b"session=abc; Path=/"})
        agent = RequestTraversalAgent(recorder)
        client = TokenEndpointClient(self.clock, agent)
        for _ in range(2):
            self.successResultOf(client.post(URL, {}, BodyEncoding.FORM))
        self.assertEqual([h.getRawHeaders(b"cookie") for h in recorder.seen], [None, None])

    def test_connection_failures_are_transient(self) -> None:
        @implementer(IAgent)
        class Unreachable:
            def request(
                self,
                method: bytes,
                uri: bytes,
                headers: Headers | None = None,
                bodyProducer: IBodyProducer | None = None,
            ) -> Deferred[IResponse]:
                return fail(ConnectionRefusedError("127.0.0.1 said no to s3cr3t"))

        client = TokenEndpointClient(self.clock, Unreachable())
        d = client.post(URL, {"secret": Secret("s3cr3t")}, BodyEncoding.FORM)
        error = self.failureResultOf(d, OAuthError).value
        self.assertEqual((error.kind, error.detail), (TRANSIENT, Detail.CONNECTION_FAILED))
        self.assertNotIn("s3cr3t", str(error))
        self.assertEqual(self.clock.getDelayedCalls(), [])  # the deadline timer is gone


class _Stall(Resource):
    """
    Never finishes: writes C{head} (nothing, or the start of an answer) and
    waits, noting when the client goes away.
    """

    isLeaf = True

    def __init__(self, head: bytes | None) -> None:
        super().__init__()
        self.head = head
        self.gone: list[object] = []

    def render_POST(self, request: Request) -> int:
        request.notifyFinish().addErrback(self.gone.append)
        if self.head is not None:
            request.write(self.head)
        return NOT_DONE_YET


class DeadlineTests(SynchronousTestCase):
    def check_deadline(self, head: bytes | None) -> None:
        clock = Clock()
        stall = _Stall(head)
        agent = RequestTraversalAgent(stall)
        d = TokenEndpointClient(clock, agent).post(URL, {}, BodyEncoding.JSON)
        agent.flush()
        clock.advance(TOKEN_CALL_DEADLINE - 0.01)
        self.assertNoResult(d)
        clock.advance(0.01)
        error = self.failureResultOf(d, OAuthError).value
        self.assertEqual((error.kind, error.detail), (TRANSIENT, Detail.TIMEOUT))
        agent.flush()
        self.assertEqual(len(stall.gone), 1)  # the connection was closed, not left hanging
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_before_the_headers(self) -> None:
        self.check_deadline(None)

    def test_in_the_body(self) -> None:
        self.check_deadline(b'{"access_token": "sk-ant-oat01-')

    def test_a_shorter_deadline(self) -> None:
        clock = Clock()
        d = TokenEndpointClient(clock, RequestTraversalAgent(_Stall(None)), deadline=2).post(
            URL, {}, BodyEncoding.FORM
        )
        clock.advance(1.99)
        self.assertNoResult(d)
        clock.advance(0.01)
        self.assertEqual(self.failureResultOf(d, OAuthError).value.detail, Detail.TIMEOUT)

    def test_a_slow_server_within_the_deadline(self) -> None:
        clock = Clock()
        server = FakeOAuthServer(clock)
        server.delay = TOKEN_CALL_DEADLINE - 1
        agent = RequestTraversalAgent(server.resource())
        provider = AnthropicPKCEProvider(server.pkce_config(), clock, agent)
        live = server.issue_token()
        assert live.refresh_token is not None
        d = provider.refresh(Secret(live.refresh_token))
        clock.advance(TOKEN_CALL_DEADLINE - 1)
        agent.flush()
        token = self.successResultOf(d)
        self.assertEqual(token.expiry, clock.seconds() + 3600)  # the clock when it arrived
        self.assertEqual(server.waiting, 0)

    def test_a_cancelled_call_is_not_a_timeout(self) -> None:
        clock = Clock()
        d = TokenEndpointClient(clock, RequestTraversalAgent(_Stall(None))).post(
            URL, {}, BodyEncoding.FORM
        )
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(clock.getDelayedCalls(), [])
