"""
The whole host on real sockets: a L{CredproxyService} with a file store and
OAuth providers from a TOML file pointing at the test OAuth server on
loopback. A host logs in over the credential socket (both flows), the HTTP
face then forwards with the token it obtained, and the request counts
against its bucket; login sessions belong to the connection that opened
them; a sandbox may log in only when the host allows it.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import deferLater

from credproxy import BrokerConfig, CredproxyConfig, CredproxyService, HTTPProxyConfig
from credproxy._listen import unix_description
from credproxy._secret import Secret
from credproxy.testing import FakeOAuthServer
from credproxy.wire import ProxyRequestError, ProxySocketClient
from tests.integration.agents import exchange, messages_request
from tests.integration.upstream import Upstream
from tests.logcapture import captured_log, log_text

DEVICE = "example"
CAPABILITY = "cd" * 32
# The device flow's poll interval the test server names: short, so the test
# waits a fraction of a second between polls rather than the RFC's 5 s.
POLL_INTERVAL = 0.2


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds)


@dataclass
class Host:
    service: CredproxyService
    http_path: str
    rpc_path: str
    state_dir: str
    server: FakeOAuthServer
    clients: list[ProxySocketClient]

    def client(self, capability_token: str | None = None) -> ProxySocketClient:
        client = ProxySocketClient(
            reactor,
            self.rpc_path,
            capability_token=Secret(capability_token) if capability_token else None,
        )
        self.clients.append(client)
        return client


MakeHost = Callable[..., Awaitable[Host]]


@pytest_twisted.async_yield_fixture
async def make_host(upstream: Upstream, socket_dir: str, tmp_path: Any) -> AsyncIterator[MakeHost]:
    server = FakeOAuthServer(reactor)
    server.device_interval = POLL_INTERVAL
    server.listen(reactor)
    hosts: list[Host] = []

    async def make(capability_token: str | None = None, allow_sandbox_login: bool = False) -> Host:
        config_path = os.path.join(str(tmp_path), "oauth.toml")
        with open(config_path, "w") as f:
            f.write(server.oauth_toml(DEVICE))
        state_dir = os.path.join(str(tmp_path), "state")
        http_path = os.path.join(socket_dir, "http.sock")
        rpc_path = os.path.join(socket_dir, "cred.sock")
        token = Secret(capability_token) if capability_token else None
        config = CredproxyConfig(
            http_endpoints=(unix_description(http_path),),
            rpc_endpoints=(unix_description(rpc_path),),
            http=HTTPProxyConfig(upstream=upstream.url),
            capability_token=token,
            broker=BrokerConfig(
                store="file",
                state_dir=state_dir,
                oauth_config=config_path,
                allow_sandbox_login=allow_sandbox_login,
            ),
        )
        service = CredproxyService(reactor, config, environ={})
        service.startService()
        host = Host(service, http_path, rpc_path, state_dir, server, [])
        hosts.append(host)
        return host

    try:
        yield make
    finally:
        for host in hosts:
            for client in host.clients:
                await client.close()
            await maybeDeferred(host.service.stopService)
        await server.stop()


def _stored(host: Host) -> dict[str, Any]:
    with open(os.path.join(host.state_dir, "tokens.json")) as f:
        stored: dict[str, Any] = json.load(f)
    return stored


@pytest_twisted.ensureDeferred
async def test_pkce_login_over_the_socket_then_the_http_face_uses_it(
    make_host: MakeHost, upstream: Upstream
) -> None:
    host = await make_host()
    client = host.client()
    before = await exchange(reactor, host.http_path, messages_request())
    assert before.status == 401  # nothing configured yet

    started = await client.request("oauth_initiate", {"provider": "anthropic"})
    assert started["flow_type"] == "pkce_redirect"
    assert len(started["session_id"]) == 32
    pasted = host.server.authorize(started["auth_url"])
    token = await client.request(
        "oauth_exchange", {"session_id": started["session_id"], "code": pasted}
    )
    assert "refresh_token" not in token
    assert token["access_token"] in host.server.access_tokens
    assert host.server.grants["authorization_code"] == 1

    # The refresh token stayed on the host, in the file store.
    assert "refresh_token" in json.dumps(_stored(host))
    # The session was single use.
    with pytest.raises(ProxyRequestError) as reused:
        await client.request(
            "oauth_exchange", {"session_id": started["session_id"], "code": pasted}
        )
    assert reused.value.code == "SESSION_ALREADY_USED"

    answer = await exchange(reactor, host.http_path, messages_request())
    assert answer.status == 200
    assert upstream.received[-1].header("authorization") == f"Bearer {token['access_token']}"
    stats = await client.request("get_bucket_stats", {"provider": "anthropic"})
    assert stats["requestCount"] == 1


@pytest_twisted.ensureDeferred
async def test_device_code_login_over_the_socket(make_host: MakeHost) -> None:
    host = await make_host()
    client = host.client()
    started = await client.request("oauth_initiate", {"provider": DEVICE, "bucket": "work"})
    assert started["flow_type"] == "device_code"
    assert "device_code" not in started
    polled = await client.request("oauth_poll", {"session_id": started["session_id"]})
    assert polled == {"status": "pending"}
    host.server.approve(started["user_code"])
    await sleep(POLL_INTERVAL * 1.5)  # the host keeps to the provider's interval
    done = await client.request("oauth_poll", {"session_id": started["session_id"]})
    assert done["status"] == "complete"
    assert "refresh_token" not in done["token"]
    stored = await client.request("get_token", {"provider": DEVICE, "bucket": "work"})
    assert stored["access_token"] == done["token"]["access_token"]


@pytest_twisted.ensureDeferred
async def test_a_session_belongs_to_the_connection_that_opened_it(make_host: MakeHost) -> None:
    host = await make_host()
    opener, other = host.client(), host.client()
    started = await opener.request("oauth_initiate", {"provider": "anthropic"})
    pasted = host.server.authorize(started["auth_url"])
    with pytest.raises(ProxyRequestError) as stolen:
        await other.request("oauth_exchange", {"session_id": started["session_id"], "code": pasted})
    assert stolen.value.code == "SESSION_NOT_FOUND"
    await opener.close()  # the session dies with its connection
    reopened = host.client()
    with pytest.raises(ProxyRequestError) as gone:
        await reopened.request(
            "oauth_exchange", {"session_id": started["session_id"], "code": pasted}
        )
    assert gone.value.code == "SESSION_NOT_FOUND"
    assert host.server.grants["authorization_code"] == 0


@pytest_twisted.ensureDeferred
async def test_a_sandbox_logs_in_only_when_the_host_allows_it(make_host: MakeHost) -> None:
    refused = await make_host(capability_token=CAPABILITY)
    with pytest.raises(ProxyRequestError) as forbidden:
        await refused.client(CAPABILITY).request("oauth_initiate", {"provider": "anthropic"})
    assert (forbidden.value.code, str(forbidden.value)) == (
        "FORBIDDEN",
        "Sandbox connections cannot initiate OAuth",
    )
    for client in refused.clients:
        await client.close()
    refused.clients.clear()
    await maybeDeferred(refused.service.stopService)

    allowed = await make_host(capability_token=CAPABILITY, allow_sandbox_login=True)
    sandbox = allowed.client(CAPABILITY)
    started = await sandbox.request("oauth_initiate", {"provider": "anthropic"})
    token = await sandbox.request(
        "oauth_exchange",
        {
            "session_id": started["session_id"],
            "code": allowed.server.authorize(started["auth_url"]),
        },
    )
    assert "refresh_token" not in token


@pytest_twisted.ensureDeferred
async def test_an_unreadable_store_gives_a_clear_answer_and_no_traceback(
    make_host: MakeHost, upstream: Upstream, tmp_path: Any
) -> None:
    state_dir = os.path.join(str(tmp_path), "state")
    os.mkdir(state_dir, 0o700)
    with open(os.path.join(state_dir, "tokens.json"), "w") as f:
        f.write("{not json")
    os.chmod(os.path.join(state_dir, "tokens.json"), 0o600)
    with captured_log() as events:
        host = await make_host()
        answer = await exchange(reactor, host.http_path, messages_request())
    assert answer.status == 502
    assert answer.json()["error"]["message"] == (
        "credproxy could not read its credential store; see its log on the host."
    )
    assert upstream.received == []
    assert not [e for e in events if e.get("log_failure") is not None]
    assert not [e for e in events if e["log_level"].name == "critical"]
    assert "The credential store cannot be read" in log_text(events)
