"""
The RFC 8628 provider in memory: what it sends (form-encoded), how it reads
a device authorization answer, and refresh. The polling states run end to
end on loopback in test_loopback.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from treq.testing import RequestTraversalAgent
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from credproxy._secret import Secret
from credproxy.oauth import (
    DEFAULT_INTERVAL,
    DEVICE_CODE_GRANT,
    AnthropicPKCEProvider,
    Detail,
    DeviceCodeProvider,
    DeviceLogin,
    OAuthError,
    OAuthErrorKind,
)
from credproxy.testing._oauth_server import FakeOAuthServer

FORM = "application/x-www-form-urlencoded"

GOOD: dict[str, Any] = {
    "device_code": "dc",
    "user_code": "BCDF-GHJK",
    "verification_uri": "https://idp.example/device",
    "expires_in": 600,
}


class DeviceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.server = FakeOAuthServer(self.clock)
        self.agent = RequestTraversalAgent(self.server.resource())
        self.provider = DeviceCodeProvider(self.server.device_config(), self.clock, self.agent)

    def test_begin(self) -> None:
        login = self.successResultOf(self.provider.begin())
        (received,) = self.server.received
        self.assertEqual(
            (received.path, received.content_type),
            (FakeOAuthServer.DEVICE_AUTHORIZATION_PATH, FORM),
        )
        self.assertEqual(
            received.fields,
            {
                "client_id": self.server.client_id,
                "scope": "org:create_api_key user:profile user:inference",
            },
        )
        self.assertIn(login.device_code.reveal(), self.server.minted)
        self.assertRegex(
            login.user_code, r"\A[BCDFGHJKLMNPQRSTVWXZ]{4}-[BCDFGHJKLMNPQRSTVWXZ]{4}\Z"
        )
        self.assertEqual(login.verification_uri, self.server.url("/device"))
        self.assertEqual(
            login.verification_uri_complete, f"{login.verification_uri}?user_code={login.user_code}"
        )
        self.assertEqual((login.interval, login.expires_in), (5.0, 600.0))
        for text in (repr(login), str(login)):
            self.assertNotIn(login.device_code.reveal(), text)
            self.assertNotIn(login.user_code, text)

    def test_begin_without_scopes(self) -> None:
        config = dataclasses.replace(self.server.device_config(), scopes=())
        provider = DeviceCodeProvider(config, self.clock, self.agent)
        self.successResultOf(provider.begin())
        self.assertEqual(self.server.received[0].fields, {"client_id": self.server.client_id})

    def test_the_default_interval(self) -> None:
        self.server.device_interval = None
        self.assertEqual(self.successResultOf(self.provider.begin()).interval, DEFAULT_INTERVAL)

    def answered(self, answer: dict[str, Any]) -> DeviceLogin | OAuthError:
        self.server.answer_next(200, answer)
        result: list[DeviceLogin | OAuthError] = []
        self.provider.begin().addCallbacks(
            result.append, lambda f: result.append(f.trap(OAuthError) and f.value)
        )
        return result[0]

    def test_a_verification_url_is_read_too(self) -> None:
        answer = {k: v for k, v in GOOD.items() if k != "verification_uri"}
        login = self.answered(
            {**answer, "verification_url": "https://idp.example/d", "interval": "7"}
        )
        assert isinstance(login, DeviceLogin)
        self.assertEqual((login.verification_uri, login.interval), ("https://idp.example/d", 7.0))
        self.assertIsNone(login.verification_uri_complete)

    def test_malformed_answers(self) -> None:
        self.assertIsInstance(self.answered(GOOD), DeviceLogin)
        for key, value in [
            ("device_code", None),
            ("device_code", ""),
            ("device_code", 5),
            ("user_code", None),
            ("user_code", "\x1b[2J"),
            ("user_code", ["A"]),
            ("verification_uri", None),
            ("verification_uri", "javascript:alert(1)"),
            ("verification_uri", "https://"),
            ("verification_uri_complete", "data:text/html,x"),
            ("verification_uri_complete", 3),
            ("expires_in", None),
            ("expires_in", 0),
            ("expires_in", "ten"),
            ("interval", 0),
            ("interval", -5),
            ("interval", [5]),
            ("interval", True),
        ]:
            answer = {**GOOD, key: value}
            if value is None:
                del answer[key]
            error = self.answered(answer)
            assert isinstance(error, OAuthError), (key, value)
            self.assertEqual(
                (error.kind, error.detail), (OAuthErrorKind.REJECTED, Detail.BAD_DEVICE_ANSWER)
            )

    def test_begin_errors(self) -> None:
        self.server.fail_next(1, status=429)
        error = self.failureResultOf(self.provider.begin(), OAuthError).value
        self.assertEqual((error.kind, error.detail), (OAuthErrorKind.TRANSIENT, "429"))
        self.server.client_id = "someone-else"
        error = self.failureResultOf(self.provider.begin(), OAuthError).value
        self.assertEqual((error.kind, error.detail), (OAuthErrorKind.REJECTED, "invalid_client"))

    def test_poll_sends_the_device_grant(self) -> None:
        login = self.successResultOf(self.provider.begin())
        self.failureResultOf(self.provider.poll(login.device_code), OAuthError)
        received = self.server.received[-1]
        self.assertEqual(
            (received.path, received.content_type), (FakeOAuthServer.FORM_TOKEN_PATH, FORM)
        )
        self.assertEqual(
            received.fields,
            {
                "grant_type": DEVICE_CODE_GRANT,
                "device_code": login.device_code.reveal(),
                "client_id": self.server.client_id,
            },
        )

    def test_a_client_secret_is_sent_when_configured(self) -> None:
        self.server.client_secret = "the-client-secret"
        self.assertEqual(
            self.failureResultOf(self.provider.begin(), OAuthError).value.detail, "invalid_client"
        )
        config = dataclasses.replace(
            self.server.device_config(), client_secret=Secret("the-client-secret")
        )
        provider = DeviceCodeProvider(config, self.clock, self.agent)
        login = self.successResultOf(provider.begin())
        self.server.approve(login.user_code)
        self.successResultOf(provider.poll(login.device_code))
        self.assertEqual(self.server.received[-1].fields["client_secret"], "the-client-secret")
        self.assertNotIn("the-client-secret", repr(config))

    def test_refresh_is_form_encoded_and_rotates(self) -> None:
        first = self.server.issue_token()
        assert first.refresh_token is not None
        self.clock.advance(10)
        token = self.successResultOf(self.provider.refresh(Secret(first.refresh_token)))
        received = self.server.received[-1]
        self.assertEqual(
            (received.path, received.content_type), (FakeOAuthServer.FORM_TOKEN_PATH, FORM)
        )
        self.assertEqual(
            received.fields,
            {
                "grant_type": "refresh_token",
                "refresh_token": first.refresh_token,
                "client_id": self.server.client_id,
            },
        )
        self.assertEqual(token.expiry, 3610)
        self.assertNotEqual(token.refresh_token, first.refresh_token)
        error = self.failureResultOf(
            self.provider.refresh(Secret(first.refresh_token)), OAuthError
        ).value
        self.assertEqual(error.kind, OAuthErrorKind.INVALID_GRANT)

    def test_json_is_refused_by_the_form_endpoint(self) -> None:
        # The fake server holds each endpoint to its encoding, so a provider
        # sending the wrong one cannot pass the tests above.
        wrong = dataclasses.replace(
            self.server.pkce_config(), token_url=self.server.url(FakeOAuthServer.FORM_TOKEN_PATH)
        )
        first = self.server.issue_token()
        assert first.refresh_token is not None
        provider = AnthropicPKCEProvider(wrong, self.clock, self.agent)
        error = self.failureResultOf(
            provider.refresh(Secret(first.refresh_token)), OAuthError
        ).value
        self.assertEqual((error.kind, error.detail), (OAuthErrorKind.REJECTED, "invalid_request"))
