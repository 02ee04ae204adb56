"""
End to end on real loopback sockets: the providers the config builds, over
the default agent, against the fake OAuth server. The device flow through
each of its states, the code-paste login with rotation, failures, the
deadline against a slow server, and no minted secret anywhere it could leak.
"""

from __future__ import annotations

from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from credproxy._secret import Secret
from credproxy.oauth import (
    DEFAULT_INTERVAL,
    Detail,
    DeviceLogin,
    OAuthError,
    OAuthErrorKind,
)
from credproxy.oauth._http import BodyEncoding, TokenEndpointClient
from credproxy.stores._token import Token
from credproxy.testing import FakeOAuthServer
from tests.logcapture import captured_log, log_text
from tests.oauth.conftest import Loopback

T = TypeVar("T")


async def outcome(d: Deferred[T]) -> T | Failure:
    try:
        return await d
    except Exception:
        return Failure()


async def refused(d: Deferred[Any]) -> OAuthError:
    result = await outcome(d)
    assert isinstance(result, Failure), result
    error = result.value
    assert isinstance(error, OAuthError), result.getTraceback()
    return error


async def begin(loopback: Loopback) -> DeviceLogin:
    return await loopback.device.begin()


@pytest_twisted.ensureDeferred
async def test_device_flow_pending_then_complete(loopback: Loopback) -> None:
    login = await begin(loopback)
    assert (login.interval, login.expires_in) == (5.0, 600.0)
    for _ in range(2):
        error = await refused(loopback.device.poll(login.device_code))
        assert error.kind is OAuthErrorKind.PENDING
        loopback.clock.advance(login.interval)
    loopback.server.approve(login.user_code)
    token = await loopback.device.poll(login.device_code)
    assert token.access_token == loopback.server.access_tokens[-1]
    assert token.refresh_token is not None and loopback.server.is_live(token.refresh_token)
    assert token.expiry is not None and abs(token.expiry - (reactor.seconds() + 3600)) < 5
    # The device code is spent once the token is issued.
    loopback.clock.advance(login.interval)
    assert (
        await refused(loopback.device.poll(login.device_code))
    ).kind is OAuthErrorKind.INVALID_GRANT
    assert loopback.server.grants["urn:ietf:params:oauth:grant-type:device_code"] == 4


@pytest_twisted.ensureDeferred
async def test_device_flow_slow_down(loopback: Loopback) -> None:
    login = await begin(loopback)
    assert (await refused(loopback.device.poll(login.device_code))).kind is OAuthErrorKind.PENDING
    loopback.clock.advance(login.interval - 0.5)  # too soon
    assert (await refused(loopback.device.poll(login.device_code))).kind is OAuthErrorKind.SLOW_DOWN
    # RFC 8628: the interval is now 5 s longer; the old one is too soon.
    loopback.clock.advance(login.interval)
    assert (await refused(loopback.device.poll(login.device_code))).kind is OAuthErrorKind.SLOW_DOWN
    loopback.clock.advance(login.interval + 2 * DEFAULT_INTERVAL)
    loopback.server.approve(login.user_code)
    assert isinstance(await loopback.device.poll(login.device_code), Token)


@pytest_twisted.ensureDeferred
async def test_device_flow_denied(loopback: Loopback) -> None:
    login = await begin(loopback)
    loopback.server.deny(login.user_code)
    error = await refused(loopback.device.poll(login.device_code))
    assert (error.kind, str(error)) == (OAuthErrorKind.ACCESS_DENIED, "access_denied")
    assert loopback.server.access_tokens == []


@pytest_twisted.ensureDeferred
async def test_device_flow_expired(loopback: Loopback) -> None:
    login = await begin(loopback)
    assert (await refused(loopback.device.poll(login.device_code))).kind is OAuthErrorKind.PENDING
    loopback.clock.advance(login.expires_in)
    loopback.server.approve(login.user_code)  # too late
    assert (await refused(loopback.device.poll(login.device_code))).kind is OAuthErrorKind.EXPIRED
    assert loopback.server.access_tokens == []


@pytest_twisted.ensureDeferred
async def test_device_refresh_rotates(loopback: Loopback) -> None:
    first = loopback.server.issue_token()
    assert first.refresh_token is not None
    second = await loopback.device.refresh(Secret(first.refresh_token))
    assert second.refresh_token is not None and second.refresh_token != first.refresh_token
    error = await refused(loopback.device.refresh(Secret(first.refresh_token)))
    assert error.kind is OAuthErrorKind.INVALID_GRANT


@pytest_twisted.ensureDeferred
async def test_code_paste_login_and_refresh(loopback: Loopback) -> None:
    login = loopback.anthropic.begin()
    pasted = loopback.server.authorize(login.auth_url)
    token = await loopback.anthropic.exchange(login, Secret(pasted))
    assert token.refresh_token is not None
    refreshed = await loopback.anthropic.refresh(Secret(token.refresh_token))
    assert refreshed.refresh_token not in (None, token.refresh_token)
    error = await refused(loopback.anthropic.refresh(Secret(token.refresh_token)))
    assert error.kind is OAuthErrorKind.INVALID_GRANT
    assert loopback.server.calls == {FakeOAuthServer.TOKEN_PATH: 3}
    assert loopback.server.grants == {"authorization_code": 1, "refresh_token": 2}


@pytest_twisted.ensureDeferred
async def test_transient_failures_then_success(loopback: Loopback) -> None:
    live = loopback.server.issue_token()
    assert live.refresh_token is not None
    loopback.server.fail_next(2, status=503)
    for _ in range(2):
        error = await refused(loopback.anthropic.refresh(Secret(live.refresh_token)))
        assert (error.kind, error.detail) == (OAuthErrorKind.TRANSIENT, "503")
    assert isinstance(await loopback.anthropic.refresh(Secret(live.refresh_token)), Token)


@pytest_twisted.ensureDeferred
async def test_a_slow_server_past_the_deadline(loopback: Loopback) -> None:
    loopback.server.delay = 30
    client = TokenEndpointClient(reactor, loopback.agent, deadline=0.3)
    started = reactor.seconds()
    url = loopback.server.url(FakeOAuthServer.FORM_TOKEN_PATH)
    error = await refused(client.post(url, {"grant_type": "refresh_token"}, BodyEncoding.FORM))
    assert (error.kind, error.detail) == (OAuthErrorKind.TRANSIENT, Detail.TIMEOUT)
    assert 0.3 <= reactor.seconds() - started < 5
    # The client hung up, so the server drops the answer it was holding.
    for _ in range(100):
        if loopback.server.waiting == 0:
            break
        await deferLater(reactor, 0.02, lambda: None)
    assert loopback.server.waiting == 0


@pytest_twisted.ensureDeferred
async def test_a_slow_server_within_the_deadline(loopback: Loopback) -> None:
    loopback.server.delay = 0.2
    started = reactor.seconds()
    login = await begin(loopback)
    assert reactor.seconds() - started >= 0.2
    assert login.device_code.reveal() in loopback.server.minted


@pytest_twisted.ensureDeferred
async def test_nothing_listening(loopback: Loopback) -> None:
    closed = FakeOAuthServer(reactor)
    closed.listen(reactor)
    number = urlsplit(closed.base_url).port
    await closed.stop()
    client = TokenEndpointClient(reactor, loopback.agent)
    d = client.post(f"http://127.0.0.1:{number}/token", {}, BodyEncoding.FORM)
    error = await refused(d)
    assert (error.kind, error.detail) == (OAuthErrorKind.TRANSIENT, Detail.CONNECTION_FAILED)


@pytest_twisted.ensureDeferred
async def test_the_default_agent_follows_no_redirect(loopback: Loopback) -> None:
    live = loopback.server.issue_token()
    assert live.refresh_token is not None
    target = loopback.server.url(FakeOAuthServer.TOKEN_PATH).encode()
    loopback.server.answer_next(308, b"", {b"location": target})
    error = await refused(loopback.anthropic.refresh(Secret(live.refresh_token)))
    assert (error.kind, error.detail) == (OAuthErrorKind.REJECTED, "308")
    assert loopback.server.calls == {FakeOAuthServer.TOKEN_PATH: 1}
    assert loopback.server.is_live(live.refresh_token)


@pytest_twisted.ensureDeferred
async def test_no_minted_secret_reaches_logs_errors_or_reprs(loopback: Loopback) -> None:
    server = loopback.server
    seen: list[Any] = []
    secrets: set[str] = set()
    with captured_log() as events:
        # Code paste: a state mismatch, a forged verifier, a good exchange, refreshes.
        login = loopback.anthropic.begin()
        secrets |= {login.state.reveal(), login.verifier.reveal()}
        pasted = server.authorize(login.auth_url)
        code = pasted.split("#")[0]
        seen.append(await outcome(loopback.anthropic.exchange(login, Secret(code + "#wrong"))))
        other = loopback.anthropic.begin()
        secrets |= {other.state.reveal(), other.verifier.reveal()}
        forged = Secret(server.authorize(other.auth_url))
        seen.append(await outcome(loopback.anthropic.exchange(login, forged)))
        token = await loopback.anthropic.exchange(login, Secret(pasted))
        seen.append(token)
        assert token.refresh_token is not None
        seen.append(await outcome(loopback.anthropic.refresh(Secret(token.refresh_token))))
        seen.append(await outcome(loopback.anthropic.refresh(Secret(token.refresh_token))))
        server.fail_next(1, status=500)
        seen.append(await outcome(loopback.anthropic.refresh(Secret(token.refresh_token))))
        # Device flow: pending, slow_down, denied, complete, spent.
        device = await begin(loopback)
        seen += [device, await outcome(loopback.device.poll(device.device_code))]
        seen.append(await outcome(loopback.device.poll(device.device_code)))
        denied = await begin(loopback)
        server.deny(denied.user_code)
        seen += [denied, await outcome(loopback.device.poll(denied.device_code))]
        loopback.clock.advance(60)
        server.approve(device.user_code)
        seen.append(await outcome(loopback.device.poll(device.device_code)))
        loopback.clock.advance(60)
        seen.append(await outcome(loopback.device.poll(device.device_code)))
    seen += [login, other, loopback.anthropic, loopback.device, server, *server.received]
    texts = [log_text(events)]
    for item in seen:
        texts += [repr(item), str(item)]
        if isinstance(item, Failure):
            texts += [item.getTraceback(), repr(item.value), str(item.value)]
    everything = "\n".join(texts)
    secrets |= server.minted
    assert len(server.minted) == 10  # 2 codes, 2 device codes, 3 access + 3 refresh tokens
    assert server.PROVIDER_TEXT not in everything
    leaked = sorted(s for s in secrets if s in everything)
    assert leaked == [], f"{len(leaked)} secrets leaked"
    assert sum(isinstance(i, Failure) for i in seen) == 8  # the failures were really exercised
