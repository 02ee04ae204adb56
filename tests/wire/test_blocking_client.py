"""
The blocking credential-socket client against a small threaded server on a
real Unix socket: handshake, correlation across threads, timeouts with cancel,
idle close, connection loss failing every waiting thread at once, reconnect.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from credproxy._secret import Secret
from credproxy.wire._blocking_client import BlockingProxySocketClient
from credproxy.wire._client_errors import (
    FrameTooLargeError,
    ProxyClientClosed,
    ProxyConnectionLost,
    ProxyRequestError,
    ProxyTimeoutError,
)
from credproxy.wire._spec import MAX_FRAME_V2, MAX_IN_FLIGHT, Message
from tests.wire.threaded_fake_server import ThreadedFakeServer

TOKEN = "cd" * 32


@pytest.fixture
def server(socket_dir: str) -> Iterator[ThreadedFakeServer]:
    fake = ThreadedFakeServer(os.path.join(socket_dir, "cred.sock"))
    yield fake
    fake.stop()


@pytest.fixture
def make_client(server: ThreadedFakeServer) -> Iterator[Callable[..., BlockingProxySocketClient]]:
    clients: list[BlockingProxySocketClient] = []

    def make(**kwargs: Any) -> BlockingProxySocketClient:
        client = BlockingProxySocketClient(server.path, **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_round_trip_and_handshake(
    server: ThreadedFakeServer, make_client: Callable[..., BlockingProxySocketClient]
) -> None:
    client = make_client(capability_token=Secret(TOKEN))
    assert server.handshakes == []  # lazy
    assert client.request("echo", {"a": 1}) == {"echo": {"a": 1}}
    assert server.handshakes == [
        (
            '{"v":2,"op":"handshake","payload":{"minVersion":1,"maxVersion":2,'
            f'"capabilityToken":"{TOKEN}"}}}}'
        ).encode()
    ]
    assert client.version == 2
    (sent,) = server.requests
    assert sent["v"] == 2 and uuid.UUID(sent["id"]).version == 4
    assert TOKEN not in repr(client)


def test_handshake_without_token(
    server: ThreadedFakeServer, make_client: Callable[..., BlockingProxySocketClient]
) -> None:
    make_client().request("echo")
    expected = b'{"v":2,"op":"handshake","payload":{"minVersion":1,"maxVersion":2}}'
    assert server.handshakes == [expected]


def test_version_1(
    server: ThreadedFakeServer, make_client: Callable[..., BlockingProxySocketClient]
) -> None:
    server.handshake_reply = {"v": 1, "op": "handshake", "ok": True}
    client = make_client()
    client.request("echo")
    assert client.version == 1
    assert server.requests[0]["v"] == 1


def test_handshake_rejected(
    server: ThreadedFakeServer, make_client: Callable[..., BlockingProxySocketClient]
) -> None:
    server.handshake_reply = {
        "v": 2,
        "op": "handshake",
        "ok": False,
        "code": "UNAUTHORIZED",
        "error": Message.BAD_CAPABILITY_TOKEN,
    }
    with pytest.raises(ProxyRequestError) as caught:
        make_client(capability_token=Secret(TOKEN)).request("echo")
    assert caught.value.code == "UNAUTHORIZED"
    assert str(caught.value) == Message.BAD_CAPABILITY_TOKEN
    assert TOKEN not in repr(caught.value)


def test_failure_answer(make_client: Callable[..., BlockingProxySocketClient]) -> None:
    text = "No token found for provider: p"
    with pytest.raises(ProxyRequestError) as caught:
        make_client().request("fail", {"code": "NOT_FOUND", "error": text})
    assert (caught.value.code, caught.value.message) == ("NOT_FOUND", text)


def test_timeout_sends_cancel_and_ignores_late_answer(
    server: ThreadedFakeServer, make_client: Callable[..., BlockingProxySocketClient]
) -> None:
    client = make_client()
    started = time.monotonic()
    with pytest.raises(ProxyTimeoutError):
        client.request("hang", timeout=0.2)
    assert 0.2 <= time.monotonic() - started < 2
    wait_for(lambda: "cancel" in server.ops())
    hung, cancel = server.requests
    assert cancel["payload"] == {"targetId": hung["id"]} and cancel["id"] != hung["id"]
    assert sorted(cancel) == ["id", "op", "payload", "v"]
    # the late CANCELLED answer and the cancel's answer are ignored; the connection lives on
    assert client.request("echo", {"n": 2}) == {"echo": {"n": 2}}
    assert len(server.handshakes) == 1
    assert client.pending == 0


def test_late_answer_after_timeout_is_ignored(
    server: ThreadedFakeServer, make_client: Callable[..., BlockingProxySocketClient]
) -> None:
    client = make_client()
    with pytest.raises(ProxyTimeoutError):
        client.request("delay", {"seconds": 0.3}, timeout=0.1)
    time.sleep(0.3)
    assert client.request("echo", {"n": 3}) == {"echo": {"n": 3}}


def test_default_timeout_and_bad_values(
    make_client: Callable[..., BlockingProxySocketClient],
) -> None:
    client = make_client(request_timeout=0.2)
    assert client.request_timeout == 0.2
    with pytest.raises(ProxyTimeoutError):
        client.request("hang")
    assert make_client(request_timeout=7200).request_timeout == 3600
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError):
            client.request("echo", timeout=bad)


def test_idle_close_and_reconnect(
    server: ThreadedFakeServer, make_client: Callable[..., BlockingProxySocketClient]
) -> None:
    client = make_client(idle_timeout=0.2)
    client.request("echo")
    wait_for(lambda: server.closed_peers == 1, 3)
    assert client.version is None
    assert client.request("echo", {"again": 1}) == {"echo": {"again": 1}}
    assert len(server.handshakes) == 2


def test_no_idle_close_while_pending(
    server: ThreadedFakeServer, make_client: Callable[..., BlockingProxySocketClient]
) -> None:
    client = make_client(idle_timeout=0.15)
    assert client.request("delay", {"seconds": 0.5}) == {"echo": {"seconds": 0.5}}
    assert server.closed_peers == 0
    assert len(server.handshakes) == 1


def test_loss_fails_every_waiting_thread_at_once(
    server: ThreadedFakeServer, make_client: Callable[..., BlockingProxySocketClient]
) -> None:
    client = make_client()
    errors: list[BaseException] = []
    done: list[float] = []

    def wait() -> None:
        try:
            client.request("hang")
        except BaseException as error:
            errors.append(error)
            done.append(time.monotonic())

    threads = [threading.Thread(target=wait) for _ in range(5)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(server.requests) == 5)
    dropped = time.monotonic()
    server.drop_connections()
    for thread in threads:
        thread.join(5)
    assert len(errors) == 5
    assert all(isinstance(e, ProxyConnectionLost) for e in errors)
    assert {str(e) for e in errors} == {"Credential proxy connection lost. Restart the session."}
    assert max(done) - dropped < 1.0  # their 30 s timeouts did not have to run out
    assert client.request("echo", {"after": 1}) == {"echo": {"after": 1}}
    assert len(server.handshakes) == 2


def test_many_threads_share_one_connection(
    server: ThreadedFakeServer, make_client: Callable[..., BlockingProxySocketClient]
) -> None:
    client = make_client()

    def work(n: int) -> None:
        for i in range(10):
            op = "delay" if i % 3 == 0 else "echo"
            payload = {"thread": n, "i": i, "seconds": 0.01 * ((n + i) % 4)}
            assert client.request(op, payload) == {"echo": payload}

    with ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(work, range(32)))
    assert len(server.handshakes) == 1
    assert len(server.requests) == 320
    assert len({m["id"] for m in server.requests}) == 320
    assert 1 < server.max_open <= MAX_IN_FLIGHT


def test_out_of_order_answers(make_client: Callable[..., BlockingProxySocketClient]) -> None:
    client = make_client()
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [
            pool.submit(client.request, "delay", {"seconds": s, "n": n})
            for n, s in enumerate((0.4, 0.3, 0.2, 0.0))
        ]
        results = [f.result(5) for f in futures]
    assert [r["echo"]["n"] for r in results] == [0, 1, 2, 3]


def test_inbound_violation_drops_connection(
    server: ThreadedFakeServer, make_client: Callable[..., BlockingProxySocketClient]
) -> None:
    client = make_client()
    with pytest.raises(ProxyConnectionLost):
        client.request("bad_data")
    assert client.request("echo") == {"echo": {}}
    assert len(server.handshakes) == 2


def test_refuses_oversized_request(
    server: ThreadedFakeServer, make_client: Callable[..., BlockingProxySocketClient]
) -> None:
    client = make_client()
    client.request("echo")
    with pytest.raises(FrameTooLargeError):
        client.request("echo", {"x": "y" * MAX_FRAME_V2})
    assert client.request("echo") == {"echo": {}}
    assert len(server.handshakes) == 1


def test_close_fails_pending_and_allows_reconnect(
    server: ThreadedFakeServer, make_client: Callable[..., BlockingProxySocketClient]
) -> None:
    client = make_client()
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            client.request("hang")
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=wait)
    thread.start()
    wait_for(lambda: len(server.requests) == 1)
    client.close()
    thread.join(5)
    assert [type(e) for e in errors] == [ProxyClientClosed]
    assert client.request("echo") == {"echo": {}}


def test_no_server(socket_dir: str) -> None:
    client = BlockingProxySocketClient(os.path.join(socket_dir, "none.sock"))
    with client, pytest.raises(ProxyConnectionLost) as caught:
        client.request("echo")
    assert str(caught.value) == Message.CONNECTION_LOST


def test_no_secret_in_errors(
    server: ThreadedFakeServer, make_client: Callable[..., BlockingProxySocketClient]
) -> None:
    client = make_client(capability_token=Secret(TOKEN))
    texts = [repr(client), str(client)]
    for op, timeout in (("hang", 0.05), ("bad_data", None)):
        try:
            client.request(op, timeout=timeout)
        except Exception as error:
            texts += [repr(error), str(error), json.dumps(error.args, default=repr)]
    assert len(texts) == 8
    assert not any(TOKEN in text for text in texts)
