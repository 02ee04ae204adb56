"""
The Twisted client on a real reactor and a real Unix socket (against the
threaded test server): what in-memory transports cannot show, such as the
asynchronous connection loss and reconnect of real sockets.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater

from credproxy.wire._client import ProxySocketClient
from credproxy.wire._client_errors import ProxyConnectionLost, ProxyTimeoutError
from credproxy.wire._spec import MAX_IN_FLIGHT, Message
from tests.wire.threaded_fake_server import ThreadedFakeServer


@pytest.fixture
def server(socket_dir: str) -> Iterator[ThreadedFakeServer]:
    fake = ThreadedFakeServer(os.path.join(socket_dir, "cred.sock"))
    yield fake
    fake.stop()


MakeClient = Callable[..., ProxySocketClient]


@pytest_twisted.async_yield_fixture
async def make_client(server: ThreadedFakeServer) -> AsyncIterator[MakeClient]:
    clients: list[ProxySocketClient] = []

    def make(**kwargs: Any) -> ProxySocketClient:
        client = ProxySocketClient(reactor, server.path, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await deferLater(reactor, 0.01)


@pytest_twisted.ensureDeferred
async def test_round_trip(server: ThreadedFakeServer, make_client: MakeClient) -> None:
    client = make_client()
    assert await client.request("echo", {"a": 1}) == {"echo": {"a": 1}}
    assert client.version == 2
    assert len(server.handshakes) == 1


@pytest_twisted.ensureDeferred
async def test_server_drop_fails_waiting_at_once_then_reconnects(
    server: ThreadedFakeServer, make_client: MakeClient
) -> None:
    client = make_client()
    waiting = [client.request("hang") for _ in range(3)]
    await until(lambda: len(server.requests) == 3)
    dropped = time.monotonic()
    server.drop_connections()
    for d in waiting:
        with pytest.raises(ProxyConnectionLost) as caught:
            await d
        assert str(caught.value) == Message.CONNECTION_LOST
    assert time.monotonic() - dropped < 1.0
    assert await client.request("echo", {"b": 2}) == {"echo": {"b": 2}}
    assert len(server.handshakes) == 2


@pytest_twisted.ensureDeferred
async def test_idle_close_and_reconnect(
    server: ThreadedFakeServer, make_client: MakeClient
) -> None:
    client = make_client(idle_timeout=0.2)
    await client.request("echo")
    await until(lambda: server.closed_peers == 1, 3)
    assert await client.request("echo", {"c": 3}) == {"echo": {"c": 3}}
    assert len(server.handshakes) == 2


@pytest_twisted.ensureDeferred
async def test_timeout_cancels_on_the_wire(
    server: ThreadedFakeServer, make_client: MakeClient
) -> None:
    client = make_client()
    with pytest.raises(ProxyTimeoutError):
        await client.request("hang", timeout=0.1)
    await until(lambda: "cancel" in server.ops())
    assert server.requests[1]["payload"] == {"targetId": server.requests[0]["id"]}
    assert await client.request("echo") == {"echo": {}}
    assert len(server.handshakes) == 1


@pytest_twisted.ensureDeferred
async def test_many_concurrent_requests(
    server: ThreadedFakeServer, make_client: MakeClient
) -> None:
    client = make_client()
    payloads = [{"n": n, "seconds": 0.01 * (n % 5)} for n in range(40)]
    results = await gatherResults([client.request("delay", p) for p in payloads])
    assert results == [{"echo": p} for p in payloads]
    assert len(server.handshakes) == 1
    assert server.max_open <= MAX_IN_FLIGHT
