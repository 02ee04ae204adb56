"""
LoginAdapter over a real credential socket: a CredproxyService (file store,
OAuth providers pointing at the test OAuth server on loopback) and a
ProxySocketClient. The "person" at the terminal reads the printed URL or
user code and plays the browser. Both flows store the token on the host,
where the factories' proxy stores (both flavours) then find it; a refused
paste, a denied device login and Ctrl-C all call the session off, which the
host then no longer knows (a spent session that was not called off would
answer SESSION_ALREADY_USED instead).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.threads import deferToThread
from zope.interface import implementer

from credproxy import BrokerConfig, CredproxyConfig, CredproxyService
from credproxy._listen import unix_description
from credproxy._secret import Secret
from credproxy.inner import (
    LOGIN_SESSION_LIFETIME,
    ILoginBackend,
    ILoginTerminal,
    LoginAdapter,
    SocketLoginBackend,
    create_blocking_token_store,
    create_token_store,
    reset_store_factories,
)
from credproxy.oauth._device import DEVICE_CODE_GRANT
from credproxy.testing import FakeOAuthServer
from credproxy.wire import ProxyRequestError, ProxySocketClient
from tests.inner.environment import isolate

DEVICE = "example"
POLL_INTERVAL = 0.2  # the test server's device interval: polls a fraction of a second apart


@dataclass
class Host:
    server: FakeOAuthServer
    rpc_path: str
    client: ProxySocketClient

    def adapter(self, terminal: ILoginTerminal) -> tuple[LoginAdapter, RecordingBackend]:
        backend = RecordingBackend(SocketLoginBackend(self.client))
        return LoginAdapter(backend, terminal, reactor), backend


@implementer(ILoginBackend)
class RecordingBackend:
    """
    The real socket backend, remembering the session id it was given so the
    test can ask the host about that session afterwards.
    """

    def __init__(self, real: SocketLoginBackend) -> None:
        self.real = real
        self.session_id: str | None = None
        self.cancelled = 0

    def initiate(self, provider: str, bucket: str | None) -> Deferred[dict[str, Any]]:
        def remember(data: dict[str, Any]) -> dict[str, Any]:
            self.session_id = data["session_id"]
            return data

        return self.real.initiate(provider, bucket).addCallback(remember)

    def exchange(self, session_id: Secret, code: Secret) -> Deferred[dict[str, Any]]:
        return self.real.exchange(session_id, code)

    def poll(self, session_id: Secret) -> Deferred[dict[str, Any]]:
        return self.real.poll(session_id)

    def cancel(self, session_id: Secret) -> Deferred[None]:
        self.cancelled += 1
        return self.real.cancel(session_id)


@implementer(ILoginTerminal)
@dataclass
class Person:
    """
    Reads what the adapter prints; C{on_line} reacts to a line (approve a
    device login), C{paste} answers a read from the URL printed so far.
    """

    paste: Callable[[str], Deferred[str]] | None = None
    on_line: Callable[[str], None] | None = None
    out: list[str] = field(default_factory=list)

    def write_line(self, text: str) -> None:
        self.out.append(text)
        if self.on_line is not None:
            self.on_line(text)

    def read_line(self) -> Deferred[str]:
        assert self.paste is not None
        (url,) = [line for line in self.out if line.startswith("http")]
        return self.paste(url)


@pytest_twisted.async_yield_fixture
async def host(socket_dir: str, tmp_path: Any) -> AsyncIterator[Host]:
    cleanups: list[Any] = []
    isolate(str(tmp_path / "sandbox-state"), cleanups.append)
    server = FakeOAuthServer(reactor)
    server.device_interval = POLL_INTERVAL
    server.listen(reactor)
    config_path = os.path.join(str(tmp_path), "oauth.toml")
    with open(config_path, "w") as f:
        f.write(server.oauth_toml(DEVICE))
    rpc_path = os.path.join(socket_dir, "cred.sock")
    service = CredproxyService(
        reactor,
        CredproxyConfig(
            rpc_endpoints=(unix_description(rpc_path),),
            broker=BrokerConfig(
                store="file",
                state_dir=os.path.join(str(tmp_path), "host-state"),
                oauth_config=config_path,
            ),
        ),
        environ={},
    )
    service.startService()
    # A login must outlive the default idle close (docs: SocketLoginBackend).
    client = ProxySocketClient(reactor, rpc_path, idle_timeout=LOGIN_SESSION_LIFETIME + 60)
    try:
        yield Host(server, rpc_path, client)
    finally:
        await client.close()
        await reset_store_factories()
        await maybeDeferred(service.stopService)
        await server.stop()
        for cleanup in reversed(cleanups):
            cleanup()


async def session_answer(host: Host, op: str, payload: dict[str, Any]) -> str:
    """
    The error code the host answers C{op} with (on the login's own connection).
    """
    with pytest.raises(ProxyRequestError) as refused:
        await host.client.request(op, payload)
    return refused.value.code


@pytest_twisted.ensureDeferred
async def test_code_paste_login_stores_the_token_on_the_host(host: Host) -> None:
    person = Person(paste=lambda url: succeed(host.server.authorize(url)))
    adapter, backend = host.adapter(person)
    token = await adapter.login("anthropic", "work")
    assert token["access_token"] == host.server.access_tokens[-1]
    assert "refresh_token" not in token
    assert person.out[-1] == "Logged in to anthropic (bucket work)."
    assert backend.cancelled == 0
    assert backend.session_id is not None
    assert not any(backend.session_id in line for line in person.out)

    # The factories' proxy stores, in either flavour, find it on the host.
    os.environ["CREDPROXY_SOCKET"] = host.rpc_path
    stored = await create_token_store(reactor).get_token("anthropic", "work")
    assert stored is not None and stored["access_token"] == token["access_token"]
    blocking = await deferToThread(create_blocking_token_store().get_token, "anthropic", "work")
    assert blocking is not None and blocking["access_token"] == token["access_token"]


@pytest_twisted.ensureDeferred
async def test_device_code_login_stores_the_token_on_the_host(host: Host) -> None:
    def approve_later(line: str) -> None:
        if "enter the code" in line:
            user_code = line.rsplit(" ", 1)[1]
            reactor.callLater(POLL_INTERVAL * 2, host.server.approve, user_code)

    person = Person(on_line=approve_later)
    adapter, backend = host.adapter(person)
    token = await adapter.login(DEVICE, "work")
    assert host.server.grants[DEVICE_CODE_GRANT] >= 2
    assert person.out[-1] == f"Logged in to {DEVICE} (bucket work)."
    assert backend.cancelled == 0
    stored = await host.client.request("get_token", {"provider": DEVICE, "bucket": "work"})
    assert stored["access_token"] == token["access_token"]


@pytest_twisted.ensureDeferred
async def test_a_wrong_paste_calls_the_session_off(host: Host) -> None:
    def wrong(url: str) -> Deferred[str]:
        code = host.server.authorize(url)
        return succeed(code.split("#")[0] + "#not-this-logins-state")

    person = Person(paste=wrong)
    adapter, backend = host.adapter(person)
    with pytest.raises(ProxyRequestError) as refused:
        await adapter.login("anthropic")
    assert refused.value.code == "EXCHANGE_FAILED"
    assert backend.cancelled == 1
    assert person.out[-1].startswith("Login failed: OAuth code exchange failed")
    assert backend.session_id is not None
    code = await session_answer(
        host, "oauth_exchange", {"session_id": backend.session_id, "code": "x#y"}
    )
    assert code == "SESSION_NOT_FOUND"


@pytest_twisted.ensureDeferred
async def test_a_denied_device_login_calls_the_session_off(host: Host) -> None:
    def deny(line: str) -> None:
        if "enter the code" in line:
            host.server.deny(line.rsplit(" ", 1)[1])

    person = Person(on_line=deny)
    adapter, backend = host.adapter(person)
    with pytest.raises(ProxyRequestError) as refused:
        await adapter.login(DEVICE)
    assert refused.value.code == "ACCESS_DENIED"
    assert backend.cancelled == 1
    assert person.out[-1] == "Login failed: User denied authorization"
    assert backend.session_id is not None
    code = await session_answer(host, "oauth_poll", {"session_id": backend.session_id})
    assert code == "SESSION_NOT_FOUND"


@pytest_twisted.ensureDeferred
async def test_ctrl_c_while_waiting_for_the_paste_calls_the_session_off(host: Host) -> None:
    urls: list[str] = []
    asked: Deferred[None] = Deferred()

    def never(url: str) -> Deferred[str]:
        urls.append(url)
        reactor.callLater(0, asked.callback, None)  # not from inside the login's own call
        return Deferred()  # the person never pastes

    person = Person(paste=never)
    adapter, backend = host.adapter(person)
    login = adapter.login("anthropic")
    await asked.addTimeout(10, reactor)  # the initiate round trip
    login.cancel()  # what a Ctrl-C handler does
    with pytest.raises(CancelledError):
        await login
    assert backend.cancelled == 1
    assert person.out[-1] == "Login cancelled."
    # The code the person would have pasted no longer finds the session.
    assert backend.session_id is not None
    code = await session_answer(
        host,
        "oauth_exchange",
        {"session_id": backend.session_id, "code": host.server.authorize(urls[0])},
    )
    assert code == "SESSION_NOT_FOUND"
    assert host.server.grants["authorization_code"] == 0


@pytest_twisted.ensureDeferred
async def test_keyboard_interrupt_during_the_paste_calls_the_session_off(host: Host) -> None:
    def interrupted(url: str) -> Deferred[str]:
        raise KeyboardInterrupt

    person = Person(paste=interrupted)
    adapter, backend = host.adapter(person)
    with pytest.raises(KeyboardInterrupt):
        await adapter.login("anthropic")
    assert backend.cancelled == 1
    assert backend.session_id is not None
    code = await session_answer(
        host, "oauth_exchange", {"session_id": backend.session_id, "code": "x#y"}
    )
    assert code == "SESSION_NOT_FOUND"
