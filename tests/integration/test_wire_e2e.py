"""
Both credential-socket clients end to end against the real server (RPCFace)
on a real Unix socket: the proxy-backed stores as a host and as a sandbox
connection, refresh tokens never crossing, cancel on timeout, and the server
stopping under a waiting client (which fails at once, then reconnects after
the restart).

The server is written in parallel with the clients; until
C{credproxy.wire.RPCFace} and the memory stores exist, this module skips.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThread
from zope.interface import implementer

from credproxy._listen import unix_description
from credproxy._secret import Secret
from credproxy.broker import Broker
from credproxy.inner import (
    BlockingProxyProviderKeyStorage,
    BlockingProxyTokenStore,
    ProxyProviderKeyStorage,
    ProxyTokenStore,
    SandboxKeyManagementError,
)
from credproxy.stores import BucketStats, ITokenStore, Token
from credproxy.wire._blocking_client import BlockingProxySocketClient
from credproxy.wire._client import ProxySocketClient
from credproxy.wire._client_errors import (
    ProxyConnectionLost,
    ProxyRequestError,
    ProxyTimeoutError,
)
from credproxy.wire._spec import Message, Op


def _server_api() -> tuple[Any, Any, Any]:
    """
    RPCFace and the memory stores, looked up at run time so this module
    imports (and skips) while the server is not in the tree yet.
    """
    try:
        wire = importlib.import_module("credproxy.wire")
        stores = importlib.import_module("credproxy.stores")
        return wire.RPCFace, stores.MemoryTokenStore, stores.MemoryProviderKeyStore
    except (ImportError, AttributeError):
        pytest.skip(
            "the credential socket server (RPCFace, memory stores) is not in the tree yet",
            allow_module_level=True,
        )
        raise


RPCFace, MemoryTokenStore, MemoryProviderKeyStore = _server_api()

CAPABILITY = "0f" * 32
ACCESS = "access-e2e-0123456789"
REFRESH = "refresh-e2e-9876543210"
KEY = "sk-e2e-key-abcdef"
SLOW = "slow-provider"  # get_token for it never finishes on the host


@implementer(ITokenStore)
class HangingTokenStore:
    """
    The memory token store, except that reading C{SLOW} never finishes: a
    request the host is still working on when the server stops.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.hanging: list[Deferred[Token | None]] = []

    def get_token(self, provider: str, bucket: str | None = None) -> Deferred[Token | None]:
        if provider == SLOW:
            d: Deferred[Token | None] = Deferred()
            self.hanging.append(d)
            return d
        result: Deferred[Token | None] = self.inner.get_token(provider, bucket)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Host:
    """
    The real server on a Unix socket, restartable on the same path.
    """

    def __init__(self, path: str, capability_token: Secret | None) -> None:
        self.path = path
        self.capability_token = capability_token
        self.tokens = HangingTokenStore(MemoryTokenStore())
        self.keys = MemoryProviderKeyStore()
        self.face: Any = None

    async def seed(self) -> None:
        token = Token(
            {
                "access_token": ACCESS,
                "refresh_token": REFRESH,
                "expiry": 1900000000,
                "token_type": "Bearer",
            }
        )
        await self.tokens.save_token("anthropic", token)
        await self.tokens.save_token("anthropic", token, "work")
        await self.keys.save_key("anthropic", Secret(KEY))

    def start(self) -> None:
        broker = Broker(reactor, self.tokens, self.keys)  # type: ignore[arg-type]
        self.face = RPCFace(reactor, [unix_description(self.path)], broker, self.capability_token)
        self.face.startService()

    async def stop(self) -> None:
        face, self.face = self.face, None
        if face is not None:
            await face.stopService()

    def release(self) -> None:
        """
        Let the never-ending reads finish, once no client waits for them.
        """
        for d in self.tokens.hanging:
            if not d.called:
                d.callback(None)
        self.tokens.hanging.clear()


MakeHost = Callable[..., Awaitable[Host]]


@pytest_twisted.async_yield_fixture
async def make_host(socket_dir: str) -> AsyncIterator[MakeHost]:
    hosts: list[Host] = []

    async def make(capability_token: Secret | None = None) -> Host:
        host = Host(os.path.join(socket_dir, f"cred{len(hosts)}.sock"), capability_token)
        hosts.append(host)
        await host.seed()
        host.start()
        return host

    yield make
    for host in hosts:
        await host.stop()
        host.release()


@pytest_twisted.async_yield_fixture
async def clients() -> AsyncIterator[list[ProxySocketClient | BlockingProxySocketClient]]:
    made: list[ProxySocketClient | BlockingProxySocketClient] = []
    yield made
    for client in made:
        if isinstance(client, ProxySocketClient):
            await client.close()
        else:
            client.close()


def twisted_client(
    made: list[Any], host: Host, token: Secret | None = None, **kwargs: Any
) -> ProxySocketClient:
    client = ProxySocketClient(reactor, host.path, capability_token=token, **kwargs)
    made.append(client)
    return client


def blocking_client(
    made: list[Any], host: Host, token: Secret | None = None, **kwargs: Any
) -> BlockingProxySocketClient:
    client = BlockingProxySocketClient(host.path, capability_token=token, **kwargs)
    made.append(client)
    return client


# -- host connections ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_twisted_stores_as_host(make_host: MakeHost, clients: list[Any]) -> None:
    host = await make_host()
    client = twisted_client(clients, host)
    tokens, keys = ProxyTokenStore(client), ProxyProviderKeyStorage(client)
    token = await tokens.get_token("anthropic")
    assert token is not None and token["access_token"] == ACCESS
    assert "refresh_token" not in token
    raw = await client.request(Op.GET_TOKEN, {"provider": "anthropic", "bucket": "work"})
    assert "refresh_token" not in raw and REFRESH not in repr(raw)
    assert await tokens.get_token("nobody") is None
    assert await tokens.list_providers() == ["anthropic"]
    assert await tokens.list_buckets("anthropic") == ["default", "work"]
    await tokens.save_token("other", Token({"access_token": "x", "refresh_token": "r"}))
    assert await tokens.list_providers() == ["anthropic", "other"]
    await tokens.remove_token("other")
    assert await tokens.list_providers() == ["anthropic"]
    key = await keys.get_key("anthropic")
    assert key is not None and key.reveal() == KEY
    assert await keys.get_key("nobody") is None
    assert await keys.list_keys() == ["anthropic"]
    assert await keys.has_key("anthropic") is True
    with pytest.raises(SandboxKeyManagementError):
        await keys.save_key("k", Secret("v"))
    assert client.version == 2


@pytest_twisted.ensureDeferred
async def test_blocking_stores_as_host(make_host: MakeHost, clients: list[Any]) -> None:
    host = await make_host()
    client = blocking_client(clients, host)

    def work() -> None:
        tokens = BlockingProxyTokenStore(client)
        keys = BlockingProxyProviderKeyStorage(client)
        token = tokens.get_token("anthropic", "work")
        assert token is not None and dict(token).get("refresh_token") is None
        assert tokens.get_token("nobody") is None
        assert tokens.list_providers() == ["anthropic"]
        key = keys.get_key("anthropic")
        assert key is not None and key.reveal() == KEY
        assert keys.has_key("nope") is False

    await deferToThread(work)


# -- sandbox connections -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sandbox_restrictions_through_the_stores(
    make_host: MakeHost, clients: list[Any]
) -> None:
    host = await make_host(Secret(CAPABILITY))
    client = twisted_client(clients, host, Secret(CAPABILITY))
    tokens, keys = ProxyTokenStore(client), ProxyProviderKeyStorage(client)
    token = await tokens.get_token("anthropic")
    assert token is not None and token["access_token"] == ACCESS and "refresh_token" not in token
    with pytest.raises(ProxyRequestError) as denied:
        await tokens.get_token("nobody")
    assert (denied.value.code, str(denied.value)) == ("FORBIDDEN", Message.ACCESS_DENIED)
    assert await tokens.list_providers() == []
    assert await tokens.list_buckets("anthropic") == []
    assert await tokens.get_bucket_stats("anthropic") == BucketStats("default", 0, 0.0)
    for change in (
        tokens.save_token("anthropic", Token({"access_token": "x"})),
        tokens.remove_token("anthropic"),
    ):
        with pytest.raises(ProxyRequestError) as caught:
            await change
        assert caught.value.code == "FORBIDDEN"
    key = await keys.get_key("anthropic")
    assert key is not None and key.reveal() == KEY
    assert await keys.list_keys() == []
    with pytest.raises(ProxyRequestError) as caught:
        await keys.has_key("anthropic")
    assert caught.value.code == "FORBIDDEN"
    with pytest.raises(SandboxKeyManagementError):
        await keys.delete_key("anthropic")
    with pytest.raises(ProxyRequestError) as caught:
        await client.request(Op.REFRESH_TOKEN, {"provider": "anthropic"})
    assert caught.value.code == "FORBIDDEN"
    still = await tokens.get_token("anthropic")
    assert still is not None and still["access_token"] == ACCESS


@pytest_twisted.ensureDeferred
async def test_wrong_capability_token(make_host: MakeHost, clients: list[Any]) -> None:
    host = await make_host(Secret(CAPABILITY))
    for token in (None, Secret("1" * 64)):
        client = twisted_client(clients, host, token)
        with pytest.raises(ProxyRequestError) as caught:
            await ProxyTokenStore(client).get_token("anthropic")
        assert (caught.value.code, str(caught.value)) == (
            "UNAUTHORIZED",
            Message.BAD_CAPABILITY_TOKEN,
        )
        assert CAPABILITY not in repr(caught.value)

    def blocking() -> None:
        with pytest.raises(ProxyRequestError) as caught:
            blocking_client(clients, host).request(Op.LIST_PROVIDERS)
        assert caught.value.code == "UNAUTHORIZED"

    await deferToThread(blocking)


# -- timeouts, concurrency, server stop ---------------------------------------------


@pytest_twisted.ensureDeferred
async def test_timeout_cancels_then_the_connection_serves_on(
    make_host: MakeHost, clients: list[Any]
) -> None:
    host = await make_host()
    client = twisted_client(clients, host)
    with pytest.raises(ProxyTimeoutError):
        await client.request(Op.GET_TOKEN, {"provider": SLOW}, timeout=0.2)
    assert (await client.request(Op.LIST_PROVIDERS)) == {"providers": ["anthropic"]}

    def blocking() -> None:
        other = blocking_client(clients, host)
        with pytest.raises(ProxyTimeoutError):
            other.request(Op.GET_TOKEN, {"provider": SLOW}, timeout=0.2)
        assert other.request(Op.LIST_PROVIDERS) == {"providers": ["anthropic"]}

    await deferToThread(blocking)


@pytest_twisted.ensureDeferred
async def test_many_concurrent_requests(make_host: MakeHost, clients: list[Any]) -> None:
    host = await make_host()
    tokens = ProxyTokenStore(twisted_client(clients, host))
    results = await gatherResults([tokens.get_token("anthropic", "work") for _ in range(50)])
    assert all(t is not None and t["access_token"] == ACCESS for t in results)


@pytest_twisted.ensureDeferred
async def test_server_stop_under_a_waiting_twisted_client(
    make_host: MakeHost, clients: list[Any]
) -> None:
    host = await make_host()
    tokens = ProxyTokenStore(twisted_client(clients, host))
    assert await tokens.get_token("anthropic") is not None
    waiting = tokens.get_token(SLOW)
    started = time.monotonic()
    await host.stop()
    with pytest.raises(ProxyConnectionLost) as caught:
        await waiting
    assert str(caught.value) == "Credential proxy connection lost. Restart the session."
    assert time.monotonic() - started < 5  # the server's hard close, not the 30 s timeout
    host.start()
    token = await tokens.get_token("anthropic")
    assert token is not None and token["access_token"] == ACCESS


@pytest_twisted.ensureDeferred
async def test_server_stop_under_a_waiting_blocking_client(
    make_host: MakeHost, clients: list[Any]
) -> None:
    host = await make_host()
    client = blocking_client(clients, host)
    tokens = BlockingProxyTokenStore(client)
    assert await deferToThread(tokens.get_token, "anthropic") is not None

    def wait_slow() -> BaseException | None:
        try:
            tokens.get_token(SLOW)
        except BaseException as error:
            return error
        return None

    waiting = deferToThread(wait_slow)
    while client.pending == 0:
        await deferToThread(time.sleep, 0.01)
    await host.stop()
    error = await waiting
    assert isinstance(error, ProxyConnectionLost)
    assert str(error) == Message.CONNECTION_LOST
    host.start()
    token = await deferToThread(tokens.get_token, "anthropic")
    assert token is not None and token["access_token"] == ACCESS


@pytest_twisted.ensureDeferred
async def test_bucket_stats_round_trip_in_host_units(
    make_host: MakeHost, clients: list[Any]
) -> None:
    host = await make_host()
    host.tokens.inner.record_request("anthropic", "work", 1700000000.25)
    tokens = ProxyTokenStore(twisted_client(clients, host))
    stats = await tokens.get_bucket_stats("anthropic", "work")
    assert stats == BucketStats("work", 1, 100.0, 1700000000.25)
