"""
The HTTP face under exhaustion on real sockets, with small limits so the
tests are fast: one peer holding all its connections does not keep another
peer out; past the face's cap a newcomer is answered 503 and closed at once;
slow uploads holding the body budget do not stop a request that fits, and
one that does not fit is refused at once without a byte forwarded. And the
faces keep separate slots: a full HTTP face leaves the credential socket
answering, and a credential socket full of silent connections leaves the
HTTP face serving.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from credproxy import CredproxyConfig, CredproxyService, HTTPProxyConfig
from credproxy._limits import ConnectionLimits
from credproxy._listen import unix_description
from credproxy._secret import Secret
from credproxy.wire import ProxySocketClient
from tests.integration.agents import RawAgent, connect_agent, exchange, messages_request
from tests.integration.upstream import Upstream

API_KEY = "sk-ant-api03-REAL-exhaustion-0123456789abcdef"
TOKEN = "ex" * 32


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds)


@dataclass
class Host:
    service: CredproxyService
    http_path: str
    rpc_path: str
    tcp_port: int

    def tcp_agent(self, source: str) -> socket.socket:
        """
        A blocking TCP client from C{source} (any 127/8 address is loopback).
        """
        return socket.create_connection(
            ("127.0.0.1", self.tcp_port), timeout=5, source_address=(source, 0)
        )


MakeHost = Callable[..., Awaitable[Host]]


@pytest_twisted.async_yield_fixture
async def make_host(upstream: Upstream, socket_dir: str) -> AsyncIterator[MakeHost]:
    hosts: list[CredproxyService] = []

    async def make(**http: object) -> Host:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        http_path = os.path.join(socket_dir, "http.sock")
        rpc_path = os.path.join(socket_dir, "cred.sock")
        limits = ConnectionLimits(max_connections=6, max_per_peer=4)
        config = CredproxyConfig(
            http_endpoints=(
                unix_description(http_path),
                f"tcp:port={port}:interface=127.0.0.1",
            ),
            rpc_endpoints=(unix_description(rpc_path),),
            http=HTTPProxyConfig(
                upstream=upstream.url,
                capability_token=Secret(TOKEN),
                limits=limits,
                **http,  # type: ignore[arg-type]
            ),
            capability_token=None,
            rpc_limits=limits,
            max_pending_handshakes=3,
        )
        service = CredproxyService(reactor, config, environ={"ANTHROPIC_API_KEY": API_KEY})
        service.startService()
        hosts.append(service)
        return Host(service, http_path, rpc_path, port)

    try:
        yield make
    finally:
        for service in hosts:
            await maybeDeferred(service.stopService)


def _request(token: str = TOKEN, body: bytes | None = None) -> bytes:
    return messages_request(body=body, headers={"x-api-key": token, "connection": "close"})


async def _hold(path: str, count: int) -> list[RawAgent]:
    """
    C{count} connections that send nothing, each seen by the face.
    """
    held = [await connect_agent(reactor, path) for _ in range(count)]
    await sleep(0.05)
    return held


def _read_all(client: socket.socket) -> bytes:
    data = b""
    while chunk := client.recv(65536):
        data += chunk
    return data


@pytest_twisted.ensureDeferred
async def test_one_peer_at_its_cap_leaves_room_for_another(make_host: MakeHost) -> None:
    host = await make_host()
    held = await _hold(host.http_path, 4)  # this uid's whole share
    refused = await exchange(reactor, host.http_path, _request())
    assert refused.status == 503
    assert refused.json()["error"]["type"] == "overloaded_error"
    assert refused.headers.get("retry-after") == "1"
    # Another peer (an address on TCP) is still served.
    client = host.tcp_agent("127.0.0.2")
    client.sendall(_request())
    answer = await deferToThread(_read_all, client)
    client.close()
    assert answer.startswith(b"HTTP/1.1 200 ")
    for agent in held:
        agent.abort()
    await sleep(0.05)
    assert (await exchange(reactor, host.http_path, _request())).status == 200


@pytest_twisted.ensureDeferred
async def test_past_the_face_cap_a_newcomer_is_answered_and_closed_at_once(
    make_host: MakeHost,
) -> None:
    host = await make_host()
    held = await _hold(host.http_path, 4)
    extra = [host.tcp_agent("127.0.0.3") for _ in range(2)]  # the face is now full
    await sleep(0.05)
    newcomer = host.tcp_agent("127.0.0.4")
    # Answered before it sent anything, and closed.
    answer = await deferToThread(_read_all, newcomer)
    newcomer.close()
    assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"overloaded_error" in answer
    for agent in held:
        agent.abort()
    for client in extra:
        client.close()


@pytest_twisted.ensureDeferred
async def test_the_body_budget_holds_and_a_request_that_fits_still_passes(
    make_host: MakeHost, upstream: Upstream
) -> None:
    host = await make_host(max_buffered_bytes=100_000, max_body=60_000)
    uploaders = []
    for _ in range(3):  # three slow uploads declare 90 000 bytes and send 10
        agent = await connect_agent(reactor, host.http_path)
        head = _request(body=b"x" * 30_000).split(b"\r\n\r\n")[0]
        agent.send(head + b"\r\n\r\n" + b"x" * 10)
        uploaders.append(agent)
    await sleep(0.05)
    assert host.service.http_face is not None
    assert host.service.http_face.site.guard.budget.reserved == 90_000
    big = await exchange(reactor, host.http_path, _request(body=b"y" * 20_000))
    assert big.status == 503
    assert big.json()["error"]["type"] == "overloaded_error"
    small = await exchange(reactor, host.http_path, _request())
    assert small.status == 200
    forwarded = len(upstream.received)
    for agent in uploaders:
        agent.abort()
    await sleep(0.05)
    assert host.service.http_face.site.guard.budget.reserved == 0
    assert (await exchange(reactor, host.http_path, _request(body=b"y" * 20_000))).status == 200
    assert len(upstream.received) == forwarded + 1


@pytest_twisted.ensureDeferred
async def test_a_full_http_face_leaves_the_credential_socket_answering(
    make_host: MakeHost,
) -> None:
    host = await make_host()
    held = await _hold(host.http_path, 4)
    extra = [host.tcp_agent("127.0.0.5") for _ in range(2)]
    await sleep(0.05)
    client = ProxySocketClient(reactor, host.rpc_path)
    try:
        answer = await client.request("list_api_keys", {})
        assert answer == {"keys": []}
    finally:
        await client.close()
        for agent in held:
            agent.abort()
        for tcp in extra:
            tcp.close()


@pytest_twisted.ensureDeferred
async def test_a_credential_socket_full_of_silent_peers_leaves_the_http_face_serving(
    make_host: MakeHost,
) -> None:
    host = await make_host()
    silent = await _hold(host.rpc_path, 3)  # the pending-handshake pool is full
    try:
        assert (await exchange(reactor, host.http_path, _request())).status == 200
    finally:
        for agent in silent:
            agent.abort()
