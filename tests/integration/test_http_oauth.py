"""
The HTTP face with a stored OAuth login, end to end on real sockets: agents
on a Unix socket, the fake API on loopback, and the broker refreshing
through the real Anthropic provider against the fake OAuth server on
loopback. A token about to expire is refreshed before forwarding; a token
the API refuses is refreshed and the request replayed once; a second
refusal reaches the agent as the API sent it; a login that can no longer be
refreshed gets credproxy's own 401.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import LogEvent
from twisted.web.server import Request

from credproxy._secret import Secret
from credproxy.broker import Broker
from credproxy.broker.credentials import BrokerCredentialSource
from credproxy.oauth._anthropic import AnthropicPKCEProvider
from credproxy.oauth._http import default_oauth_agent
from credproxy.stores._memory import MemoryProviderKeyStore, MemoryTokenStore
from credproxy.stores._token import Token
from credproxy.testing._oauth_server import FakeOAuthServer
from tests.integration.agents import Parsed, exchange, messages_request
from tests.integration.conftest import MakeProxy, RunningProxy
from tests.integration.upstream import Handler, Received, Upstream, answer_json, stream_events
from tests.leakcheck import LEAK_CHECK
from tests.logcapture import captured_log, log_text

UPSTREAM_REFUSAL = (
    b'{"type":"error","error":{"type":"authentication_error",'
    b'"message":"upstream-says: OAuth token has expired"}}'
)


def refusing(refused: set[str] | None = None) -> Handler:
    """
    The fake API, answering 401 to a Bearer token in C{refused} (to every
    Bearer token when C{refused} is None) and as usual otherwise.
    """

    def handle(request: Request, received: Received) -> bytes | int:
        presented = (received.header("authorization") or "").removeprefix("Bearer ")
        if refused is None or presented in refused:
            request.setResponseCode(401)
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"request-id", b"req_refused")
            return UPSTREAM_REFUSAL
        return answer_json(request, received)

    return handle


@dataclass
class Host:
    """
    The host side: a broker on memory stores whose C{anthropic} provider
    talks to the fake OAuth server.
    """

    server: FakeOAuthServer
    broker: Broker
    tokens: MemoryTokenStore

    async def store(self, token: Token) -> str:
        await self.broker.store_login("anthropic", token)
        access = token.access_token
        assert access is not None
        return access

    async def stored_access_token(self) -> str | None:
        token = await self.tokens.get_token("anthropic")
        return token.access_token if token is not None else None

    async def requests_counted(self) -> int:
        stats = await self.broker.get_bucket_stats("anthropic")
        return stats.request_count if stats is not None else 0

    @property
    def refreshes(self) -> int:
        return self.server.grants["refresh_token"]


@pytest_twisted.async_yield_fixture
async def host() -> AsyncIterator[Host]:
    server = FakeOAuthServer(reactor)
    server.listen(reactor)
    LEAK_CHECK.add_source(lambda: set(server.minted))
    provider = AnthropicPKCEProvider(server.pkce_config(), reactor, default_oauth_agent(reactor))
    tokens = MemoryTokenStore()
    broker = Broker(
        reactor, tokens, MemoryProviderKeyStore(), providers={"anthropic": provider}, renew=False
    )
    broker.startService()
    try:
        yield Host(server, broker, tokens)
    finally:
        broker.stopService()
        await server.stop()


@pytest.fixture
def log_events() -> Iterator[list[LogEvent]]:
    with captured_log() as events:
        yield events


async def proxy_for(host: Host, make_proxy: MakeProxy) -> RunningProxy:
    return await make_proxy(credentials=BrokerCredentialSource(host.broker, environ={}))


def assert_log_in_again(response: Parsed) -> None:
    assert response.status == 401
    error = response.json()["error"]
    assert error["type"] == "authentication_error"
    assert "run `credproxy login anthropic` on the host" in error["message"]
    assert "upstream-says" not in error["message"]
    assert FakeOAuthServer.PROVIDER_TEXT not in error["message"]


def audit_outcomes(events: list[LogEvent]) -> list[tuple[object, object]]:
    return [
        (e["status"], e["outcome"])
        for e in events
        if e.get("log_namespace") == "credproxy.http.audit"
    ]


@pytest_twisted.ensureDeferred
async def test_a_token_about_to_expire_is_refreshed_before_forwarding(
    upstream: Upstream, make_proxy: MakeProxy, host: Host
) -> None:
    stored = await host.store(host.server.issue_token(expires_in=30))
    proxy = await proxy_for(host, make_proxy)
    response = await exchange(reactor, proxy.path, messages_request())
    assert response.status == 200
    (seen,) = upstream.received
    refreshed = await host.stored_access_token()
    assert refreshed is not None and refreshed != stored
    assert seen.header("authorization") == f"Bearer {refreshed}"
    assert seen.headers["anthropic-beta"] == ["oauth-2025-04-20"]
    assert seen.header("x-api-key") is None
    assert host.refreshes == 1
    assert await host.requests_counted() == 1


@pytest_twisted.ensureDeferred
async def test_a_refused_token_is_refreshed_and_the_request_replayed_once(
    upstream: Upstream, make_proxy: MakeProxy, host: Host, log_events: list[LogEvent]
) -> None:
    stored = await host.store(host.server.issue_token(expires_in=3600))
    upstream.handler = refusing({stored})
    proxy = await proxy_for(host, make_proxy)
    request = messages_request(stream=True)
    response = await exchange(reactor, proxy.path, request)
    assert response.status == 200
    assert response.complete
    assert response.body == b"".join(stream_events(["Hello", ", world"]))
    refused, replayed = upstream.received
    refreshed = await host.stored_access_token()
    assert refreshed is not None and refreshed != stored
    assert refused.header("authorization") == f"Bearer {stored}"
    assert replayed.header("authorization") == f"Bearer {refreshed}"
    assert (replayed.uri, replayed.body) == (refused.uri, refused.body)
    assert replayed.body == request.partition(b"\r\n\r\n")[2]
    assert host.refreshes == 1
    assert await host.requests_counted() == 2
    assert audit_outcomes(log_events) == [(200, "replayed")]
    text = log_text(log_events)
    for secret in (stored, refreshed, *host.server.minted):
        assert secret not in text


@pytest_twisted.ensureDeferred
async def test_a_second_refusal_reaches_the_agent_as_the_api_sent_it(
    upstream: Upstream, make_proxy: MakeProxy, host: Host, log_events: list[LogEvent]
) -> None:
    await host.store(host.server.issue_token(expires_in=3600))
    upstream.handler = refusing()
    proxy = await proxy_for(host, make_proxy)
    response = await exchange(reactor, proxy.path, messages_request())
    assert (response.status, response.body) == (401, UPSTREAM_REFUSAL)
    assert response.headers["request-id"] == "req_refused"
    first, second = upstream.received  # exactly two: one replay, never more
    assert first.header("authorization") != second.header("authorization")
    assert host.refreshes == 1
    assert audit_outcomes(log_events) == [(401, "replayed")]


@pytest_twisted.ensureDeferred
async def test_a_refused_token_whose_refresh_fails_gets_the_clear_401(
    upstream: Upstream, make_proxy: MakeProxy, host: Host, log_events: list[LogEvent]
) -> None:
    live = host.server.issue_token(expires_in=3600)
    revoked = Token({**live.to_json(), "refresh_token": "sk-ant-ort01-revoked-long-ago-0123"})
    stored = await host.store(revoked)
    upstream.handler = refusing({stored})
    proxy = await proxy_for(host, make_proxy)
    response = await exchange(reactor, proxy.path, messages_request())
    assert_log_in_again(response)
    assert len(upstream.received) == 1
    assert host.refreshes == 1
    assert await host.stored_access_token() == stored  # a failed refresh deletes nothing
    assert audit_outcomes(log_events) == [(401, "credential_unavailable")]


@pytest_twisted.ensureDeferred
async def test_an_expired_login_that_cannot_be_refreshed_never_reaches_the_api(
    upstream: Upstream, make_proxy: MakeProxy, host: Host
) -> None:
    expired = Token(
        {
            "access_token": "sk-ant-oat01-expired-and-no-refresh-0123",
            "expiry": reactor.seconds() - 60,
        }
    )
    await host.store(expired)
    proxy = await proxy_for(host, make_proxy)
    response = await exchange(reactor, proxy.path, messages_request())
    assert_log_in_again(response)
    assert upstream.received == []
    assert host.refreshes == 0


@pytest_twisted.ensureDeferred
async def test_api_keys_from_the_store_are_never_replayed(
    upstream: Upstream, make_proxy: MakeProxy, host: Host
) -> None:
    await host.store(host.server.issue_token(expires_in=3600))
    await host.broker.save_key("anthropic", Secret("sk-ant-api03-stored-key-for-tests-0123"))
    upstream.handler = refusing()
    proxy = await proxy_for(host, make_proxy)
    response = await exchange(reactor, proxy.path, messages_request())
    assert (response.status, response.body) == (401, UPSTREAM_REFUSAL)
    (seen,) = upstream.received
    assert seen.header("x-api-key") == "sk-ant-api03-stored-key-for-tests-0123"
    assert seen.header("authorization") is None
    assert host.refreshes == 0
    assert json.loads(response.body)["error"]["type"] == "authentication_error"
