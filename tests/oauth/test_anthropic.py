"""
The code-paste PKCE provider against the fake server in memory: the
authorization URL, the S256 challenge, the exchange (and the state check
before it), refresh with rotation.
"""

from __future__ import annotations

import base64
import dataclasses
import re
from urllib.parse import parse_qsl, urlsplit

from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from credproxy._secret import Secret
from credproxy.oauth import (
    ANTHROPIC,
    AnthropicPKCEProvider,
    Detail,
    OAuthError,
    OAuthErrorKind,
    s256_challenge,
)
from credproxy.stores._token import Token
from credproxy.testing._oauth_server import FakeOAuthServer

_UNRESERVED = re.compile(r"[A-Za-z0-9._~-]+\Z")  # RFC 7636 section 4.1


class ChallengeTests(SynchronousTestCase):
    def test_rfc7636_appendix_b(self) -> None:
        self.assertEqual(
            s256_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
        )


class BeginTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.provider = AnthropicPKCEProvider(ANTHROPIC, Clock(), RequestTraversalAgent(None))

    def test_the_authorization_url(self) -> None:
        login = self.provider.begin()
        url = urlsplit(login.auth_url)
        self.assertEqual(
            (url.scheme, url.netloc, url.path), ("https", "claude.ai", "/oauth/authorize")
        )
        params = parse_qsl(url.query, strict_parsing=True)
        self.assertEqual(
            params,
            [
                ("code", "true"),
                ("client_id", "9d1c250a-e61b-44d9-88ed-5944d1962f5e"),
                ("response_type", "code"),
                ("redirect_uri", "https://console.anthropic.com/oauth/code/callback"),
                ("scope", "org:create_api_key user:profile user:inference"),
                ("code_challenge", s256_challenge(login.verifier.reveal())),
                ("code_challenge_method", "S256"),
                ("state", login.state.reveal()),
            ],
        )
        self.assertIn("scope=org%3Acreate_api_key%20user%3Aprofile%20user%3Ainference", url.query)
        self.assertEqual(login.redirect_uri, ANTHROPIC.redirect_uri)
        self.assertNotIn(login.verifier.reveal(), login.auth_url)

    def test_verifier_and_state(self) -> None:
        login = self.provider.begin()
        verifier, state = login.verifier.reveal(), login.state.reveal()
        self.assertTrue(43 <= len(verifier) <= 128)
        self.assertRegex(verifier, _UNRESERVED)
        self.assertEqual(len(base64.urlsafe_b64decode(state + "=" * (-len(state) % 4))), 32)
        again = self.provider.begin()
        self.assertNotEqual(again.verifier, login.verifier)
        self.assertNotEqual(again.state, login.state)

    def test_a_redirect_uri_override(self) -> None:
        login = self.provider.begin("http://localhost:9/cb")
        self.assertEqual(login.redirect_uri, "http://localhost:9/cb")
        self.assertIn(
            ("redirect_uri", "http://localhost:9/cb"), parse_qsl(urlsplit(login.auth_url).query)
        )
        with self.assertRaises(ValueError):
            self.provider.begin("")

    def test_a_redirect_uri_elsewhere_is_refused(self) -> None:
        for elsewhere in (
            "https://attacker.example/cb",
            "http://console.anthropic.com/oauth/code/callback",
            "javascript:alert(1)",
        ):
            with self.assertRaises(ValueError, msg=elsewhere):
                self.provider.begin(elsewhere)
        self.assertEqual(
            self.provider.begin(ANTHROPIC.redirect_uri).redirect_uri, ANTHROPIC.redirect_uri
        )
        self.assertEqual(
            self.provider.begin("https://127.0.0.1:8/cb").redirect_uri, "https://127.0.0.1:8/cb"
        )

    def test_an_authorize_url_with_a_query(self) -> None:
        config = dataclasses.replace(ANTHROPIC, authorize_url="https://a.example/auth?tenant=x")
        provider = AnthropicPKCEProvider(config, Clock(), RequestTraversalAgent(None))
        params = parse_qsl(urlsplit(provider.begin().auth_url).query)
        self.assertEqual(params[:2], [("tenant", "x"), ("code", "true")])

    def test_the_login_shows_no_secret(self) -> None:
        login = self.provider.begin()
        for text in (repr(login), str(login), f"{login}"):
            self.assertNotIn(login.state.reveal(), text)
            self.assertNotIn(login.verifier.reveal(), text)
            self.assertNotIn("auth_url", text)


class ExchangeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.server = FakeOAuthServer(self.clock)
        self.provider = AnthropicPKCEProvider(
            self.server.pkce_config(), self.clock, RequestTraversalAgent(self.server.resource())
        )

    def refused(self, d: Deferred[Token]) -> OAuthError:
        error = self.failureResultOf(d, OAuthError).value
        assert isinstance(error, OAuthError)
        return error

    def test_exchange(self) -> None:
        login = self.provider.begin()
        pasted = self.server.authorize(login.auth_url)
        token = self.successResultOf(self.provider.exchange(login, Secret(f"  {pasted}\n")))
        self.assertEqual(
            sorted(token), ["access_token", "expiry", "refresh_token", "scope", "token_type"]
        )
        self.assertEqual(token.access_token, self.server.access_tokens[-1])
        self.assertEqual(token.expiry, self.clock.seconds() + 3600)
        self.assertEqual(token["token_type"], "Bearer")
        self.assertEqual(token["scope"], "org:create_api_key user:profile user:inference")
        assert token.refresh_token is not None
        self.assertTrue(self.server.is_live(token.refresh_token))
        (received,) = self.server.received
        self.assertEqual(received.path, FakeOAuthServer.TOKEN_PATH)
        self.assertEqual(received.content_type, "application/json; charset=UTF-8")
        code, _ = pasted.split("#")
        self.assertEqual(
            received.fields,
            {
                "grant_type": "authorization_code",
                "code": code,
                "state": login.state.reveal(),
                "client_id": self.server.client_id,
                "redirect_uri": self.server.redirect_uri,
                "code_verifier": login.verifier.reveal(),
            },
        )

    def test_a_state_mismatch_sends_nothing(self) -> None:
        login = self.provider.begin()
        code, state = self.server.authorize(login.auth_url).split("#")
        for pasted in (f"{code}#{state}x", f"{code}#", code, f"{code}#{state[:-1]}", f"#{state}"):
            error = self.refused(self.provider.exchange(login, Secret(pasted)))
            self.assertEqual(
                (error.kind, error.detail), (OAuthErrorKind.REJECTED, Detail.STATE_MISMATCH)
            )
        self.assertEqual(sum(self.server.calls.values()), 0)
        # The code was never spent: the right paste still works.
        self.successResultOf(self.provider.exchange(login, Secret(f"{code}#{state}")))

    def test_another_logins_code(self) -> None:
        mine, theirs = self.provider.begin(), self.provider.begin()
        pasted = self.server.authorize(theirs.auth_url)
        error = self.refused(self.provider.exchange(mine, Secret(pasted)))
        self.assertEqual(error.detail, Detail.STATE_MISMATCH)

    def test_the_server_checks_the_verifier(self) -> None:
        login = self.provider.begin()
        pasted = self.server.authorize(login.auth_url)
        forged = dataclasses.replace(
            login, verifier=Secret(self.provider.begin().verifier.reveal())
        )
        error = self.refused(self.provider.exchange(forged, Secret(pasted)))
        self.assertEqual(error.kind, OAuthErrorKind.INVALID_GRANT)
        self.assertEqual(self.server.grants["authorization_code"], 1)
        self.assertEqual(self.server.access_tokens, [])

    def test_a_code_is_used_once(self) -> None:
        login = self.provider.begin()
        pasted = Secret(self.server.authorize(login.auth_url))
        self.successResultOf(self.provider.exchange(login, pasted))
        self.assertEqual(
            self.refused(self.provider.exchange(login, pasted)).kind, OAuthErrorKind.INVALID_GRANT
        )

    def test_an_expired_code(self) -> None:
        login = self.provider.begin()
        pasted = Secret(self.server.authorize(login.auth_url))
        self.clock.advance(self.server.code_lifetime)
        self.assertEqual(
            self.refused(self.provider.exchange(login, pasted)).kind, OAuthErrorKind.INVALID_GRANT
        )

    def test_the_redirect_uri_must_match(self) -> None:
        login = self.provider.begin()
        pasted = Secret(self.server.authorize(login.auth_url))
        moved = dataclasses.replace(login, redirect_uri="https://elsewhere.example/cb")
        self.assertEqual(
            self.refused(self.provider.exchange(moved, pasted)).kind, OAuthErrorKind.INVALID_GRANT
        )


class RefreshTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.server = FakeOAuthServer(self.clock)
        self.provider = AnthropicPKCEProvider(
            self.server.pkce_config(), self.clock, RequestTraversalAgent(self.server.resource())
        )

    def test_rotation(self) -> None:
        first = self.server.issue_token()
        assert first.refresh_token is not None
        old = Secret(first.refresh_token)
        self.clock.advance(100)
        second = self.successResultOf(self.provider.refresh(old))
        assert second.refresh_token is not None
        self.assertNotEqual(second.refresh_token, first.refresh_token)
        self.assertNotEqual(second.access_token, first.access_token)
        self.assertEqual(second.expiry, 3700)
        self.assertFalse(self.server.is_live(first.refresh_token))
        self.assertTrue(self.server.is_live(second.refresh_token))
        (received,) = self.server.received
        self.assertEqual(received.content_type, "application/json; charset=UTF-8")
        self.assertEqual(
            received.fields,
            {
                "grant_type": "refresh_token",
                "refresh_token": first.refresh_token,
                "client_id": self.server.client_id,
            },
        )
        error = self.failureResultOf(self.provider.refresh(old), OAuthError).value
        self.assertEqual(error.kind, OAuthErrorKind.INVALID_GRANT)  # reused
        self.successResultOf(self.provider.refresh(Secret(second.refresh_token)))

    def test_an_unknown_refresh_token(self) -> None:
        error = self.failureResultOf(
            self.provider.refresh(Secret("sk-ant-ort01-nope")), OAuthError
        ).value
        self.assertEqual(error.kind, OAuthErrorKind.INVALID_GRANT)

    def test_an_answer_without_a_new_refresh_token(self) -> None:
        self.server.rotate_refresh_tokens = False
        self.server.extra_fields = {"account": {"uuid": "u-1"}}
        first = self.server.issue_token()
        assert first.refresh_token is not None
        token = self.successResultOf(self.provider.refresh(Secret(first.refresh_token)))
        self.assertIsNone(token.refresh_token)
        self.assertEqual(token["account"], {"uuid": "u-1"})
        self.assertTrue(self.server.is_live(first.refresh_token))

    def test_a_transient_failure_spends_nothing(self) -> None:
        first = self.server.issue_token()
        assert first.refresh_token is not None
        self.server.fail_next(1, status=503)
        error = self.failureResultOf(
            self.provider.refresh(Secret(first.refresh_token)), OAuthError
        ).value
        self.assertEqual((error.kind, error.detail), (OAuthErrorKind.TRANSIENT, "503"))
        self.successResultOf(self.provider.refresh(Secret(first.refresh_token)))
        self.assertEqual(self.server.grants["refresh_token"], 2)
