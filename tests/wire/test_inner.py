"""
The sandbox-side stores over the credential socket: the method to op mapping
(llxprt's ProxyTokenStore / ProxyProviderKeyStorage), NOT_FOUND as None, the
read-only key store, answer shapes, the environment helpers, and that no
token, key or capability token shows in a repr or error.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from credproxy._secret import Secret
from credproxy.broker.tokens import Token
from credproxy.inner import (
    CAPABILITY_TOKEN_FD_ENV,
    CAPABILITY_TOKEN_FILE_ENV,
    BlockingProxyProviderKeyStorage,
    BlockingProxyTokenStore,
    ProxyProviderKeyStorage,
    ProxyTokenStore,
    SandboxKeyManagementError,
    read_capability_token,
    socket_path_from_environment,
    take_capability_token,
)
from credproxy.stores import BucketStats, IProviderKeyStore, ITokenStore
from credproxy.wire._blocking_client import BlockingProxySocketClient
from credproxy.wire._client import ProxySocketClient
from credproxy.wire._client_errors import ProtocolViolation, ProxyRequestError
from credproxy.wire._spec import Message
from tests.wire.client_fakes import FakeEndpoint, FakeServerConnection
from tests.wire.threaded_fake_server import ThreadedFakeServer

ACCESS = "access-value-1234"
REFRESH = "refresh-value-5678"
KEY = "sk-key-value-9999"
CAPABILITY = "ef" * 32


class StoreTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.endpoint = FakeEndpoint()
        self.client = ProxySocketClient(Clock(), self.endpoint)
        self.tokens = ProxyTokenStore(self.client)
        self.keys = ProxyProviderKeyStorage(self.client)
        self.server: FakeServerConnection | None = None

    def sent(self) -> dict[str, Any]:
        """
        The one request the store sent (accepting the handshake first).
        """
        if self.server is None:
            self.server = self.endpoint.last
            self.server.accept()
        (request,) = self.server.read()
        return request

    def exchange(self, d: Deferred[Any], data: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        request = self.sent()
        assert self.server is not None
        self.server.answer(request, data)
        return request, self.successResultOf(d)

    def refused(self, d: Deferred[Any], code: str, error: str) -> tuple[dict[str, Any], Any]:
        request = self.sent()
        assert self.server is not None
        self.server.refuse(request, code, error)
        return request, d


class TokenStoreTests(StoreTestCase):
    def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(ITokenStore, self.tokens))

    def test_get_token(self) -> None:
        request, token = self.exchange(
            self.tokens.get_token("anthropic"),
            {"access_token": ACCESS, "expiry": 1700000000, "token_type": "Bearer"},
        )
        self.assertEqual(
            (request["op"], request["payload"]), ("get_token", {"provider": "anthropic"})
        )
        self.assertIsInstance(token, Token)
        self.assertEqual(token["access_token"], ACCESS)
        self.assertNotIn(ACCESS, repr(token))

    def test_get_token_bucket(self) -> None:
        request, _ = self.exchange(self.tokens.get_token("p", "work"), {"access_token": ACCESS})
        self.assertEqual(request["payload"], {"provider": "p", "bucket": "work"})

    def test_get_token_drops_a_refresh_token(self) -> None:
        _, token = self.exchange(
            self.tokens.get_token("p"), {"access_token": ACCESS, "refresh_token": REFRESH}
        )
        self.assertNotIn("refresh_token", token)

    def test_get_token_not_found_is_none(self) -> None:
        _, d = self.refused(
            self.tokens.get_token("p"), "NOT_FOUND", "No token found for provider: p"
        )
        self.assertIsNone(self.successResultOf(d))

    def test_get_token_forbidden_fails(self) -> None:
        _, d = self.refused(self.tokens.get_token("p"), "FORBIDDEN", Message.ACCESS_DENIED)
        self.assertEqual(self.failureResultOf(d, ProxyRequestError).value.code, "FORBIDDEN")

    def test_save_token(self) -> None:
        token = Token({"access_token": ACCESS, "refresh_token": REFRESH, "expiry": 5})
        request, result = self.exchange(self.tokens.save_token("p", token, "b"), {})
        self.assertEqual(request["op"], "save_token")
        self.assertEqual(
            request["payload"], {"provider": "p", "bucket": "b", "token": token.to_json()}
        )
        self.assertIsNone(result)

    def test_save_token_forbidden(self) -> None:
        _, d = self.refused(
            self.tokens.save_token("p", Token({"access_token": ACCESS})),
            "FORBIDDEN",
            Message.ACCESS_DENIED,
        )
        error = self.failureResultOf(d, ProxyRequestError).value
        self.assertNotIn(ACCESS, repr(error) + str(error))

    def test_remove_token(self) -> None:
        request, result = self.exchange(self.tokens.remove_token("p"), {})
        self.assertEqual(
            (request["op"], request["payload"], result), ("remove_token", {"provider": "p"}, None)
        )

    def test_list_providers(self) -> None:
        request, result = self.exchange(self.tokens.list_providers(), {"providers": ["a", "b"]})
        self.assertEqual(
            (request["op"], request["payload"], result), ("list_providers", {}, ["a", "b"])
        )

    def test_list_buckets(self) -> None:
        request, result = self.exchange(self.tokens.list_buckets("p"), {"buckets": ["default"]})
        self.assertEqual(
            (request["op"], request["payload"], result),
            ("list_buckets", {"provider": "p"}, ["default"]),
        )

    def test_bucket_stats(self) -> None:
        request, stats = self.exchange(
            self.tokens.get_bucket_stats("p", "b"),
            {"bucket": "b", "requestCount": 3, "percentage": 12.5, "lastUsed": 1700000000500},
        )
        self.assertEqual(
            (request["op"], request["payload"]),
            ("get_bucket_stats", {"provider": "p", "bucket": "b"}),
        )
        self.assertEqual(stats, BucketStats("b", 3, 12.5, 1700000000.5))  # ms on the wire

    def test_bucket_stats_sandbox_zeros(self) -> None:
        _, stats = self.exchange(
            self.tokens.get_bucket_stats("p"),
            {"bucket": "default", "requestCount": 0, "percentage": 0},
        )
        self.assertEqual(stats, BucketStats("default", 0, 0.0, None))

    def test_bucket_stats_not_found(self) -> None:
        _, d = self.refused(
            self.tokens.get_bucket_stats("p"), "NOT_FOUND", "No stats found for p/default"
        )
        self.assertIsNone(self.successResultOf(d))


class MalformedAnswerTests(StoreTestCase):
    def check(self, call: Callable[[], Deferred[Any]], data: dict[str, Any]) -> None:
        self.setUp()
        d = call()
        request = self.sent()
        assert self.server is not None
        self.server.answer(request, data)
        self.failureResultOf(d, ProtocolViolation)

    def test_malformed(self) -> None:
        self.check(lambda: self.tokens.list_providers(), {})
        self.check(lambda: self.tokens.list_providers(), {"providers": "a"})
        self.check(lambda: self.tokens.list_buckets("p"), {"buckets": [1]})
        self.check(lambda: self.tokens.get_bucket_stats("p"), {"requestCount": "3"})
        self.check(lambda: self.keys.get_key("k"), {})
        self.check(lambda: self.keys.has_key("k"), {"exists": 1})
        self.check(lambda: self.keys.list_keys(), {"keys": None})


class KeyStoreTests(StoreTestCase):
    def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IProviderKeyStore, self.keys))

    def test_get_key(self) -> None:
        request, key = self.exchange(self.keys.get_key("anthropic"), {"key": KEY})
        self.assertEqual(
            (request["op"], request["payload"]), ("get_api_key", {"name": "anthropic"})
        )
        self.assertIsInstance(key, Secret)
        self.assertEqual(key.reveal(), KEY)
        self.assertNotIn(KEY, repr(key))

    def test_get_key_not_found(self) -> None:
        _, d = self.refused(self.keys.get_key("k"), "NOT_FOUND", "No API key found for: k")
        self.assertIsNone(self.successResultOf(d))

    def test_get_key_forbidden(self) -> None:
        _, d = self.refused(self.keys.get_key("k"), "FORBIDDEN", Message.ACCESS_DENIED)
        self.failureResultOf(d, ProxyRequestError)

    def test_list_keys(self) -> None:
        request, names = self.exchange(self.keys.list_keys(), {"keys": ["a"]})
        self.assertEqual((request["op"], names), ("list_api_keys", ["a"]))

    def test_has_key(self) -> None:
        request, exists = self.exchange(self.keys.has_key("a"), {"exists": True})
        self.assertEqual(
            (request["op"], request["payload"], exists), ("has_api_key", {"name": "a"}, True)
        )

    def test_save_and_delete_refused_locally(self) -> None:
        for d in (self.keys.save_key("k", Secret(KEY)), self.keys.delete_key("k")):
            error = self.failureResultOf(d, SandboxKeyManagementError).value
            self.assertEqual(
                str(error),
                "API key management is not available in sandbox mode. Manage keys on the host.",
            )
            self.assertNotIn(KEY, repr(error))
        self.assertEqual(self.endpoint.connections, [])

    def test_reprs(self) -> None:
        client = ProxySocketClient(Clock(), self.endpoint, capability_token=Secret(CAPABILITY))
        for obj in (client, ProxyTokenStore(client), ProxyProviderKeyStorage(client)):
            self.assertNotIn(CAPABILITY, repr(obj))


# -- blocking stores over a real socket --------------------------------------


@pytest.fixture
def server(socket_dir: str) -> Iterator[ThreadedFakeServer]:
    fake = ThreadedFakeServer(os.path.join(socket_dir, "cred.sock"))
    yield fake
    fake.stop()


@pytest.fixture
def client(server: ThreadedFakeServer) -> Iterator[BlockingProxySocketClient]:
    with BlockingProxySocketClient(server.path, request_timeout=5) as blocking:
        yield blocking


def ok(data: dict[str, Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda payload: {"ok": True, "data": data}


def refuse(code: str, error: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda payload: {"ok": False, "code": code, "error": error}


def test_blocking_token_store(
    server: ThreadedFakeServer, client: BlockingProxySocketClient
) -> None:
    store = BlockingProxyTokenStore(client)
    server.scripted.update(
        {
            "get_token": ok({"access_token": ACCESS, "refresh_token": REFRESH}),
            "save_token": ok({}),
            "remove_token": ok({}),
            "list_providers": ok({"providers": ["a"]}),
            "list_buckets": ok({"buckets": ["default", "w"]}),
            "get_bucket_stats": ok({"bucket": "w", "requestCount": 2, "percentage": 1}),
        }
    )
    token = store.get_token("a", "w")
    assert token is not None and dict(token) == {"access_token": ACCESS}
    store.save_token("a", Token({"access_token": ACCESS}))
    store.remove_token("a")
    assert store.list_providers() == ["a"]
    assert store.list_buckets("a") == ["default", "w"]
    assert store.get_bucket_stats("a", "w") == BucketStats("w", 2, 1.0)
    assert [(m["op"], m["payload"]) for m in server.requests] == [
        ("get_token", {"provider": "a", "bucket": "w"}),
        ("save_token", {"provider": "a", "token": {"access_token": ACCESS}}),
        ("remove_token", {"provider": "a"}),
        ("list_providers", {}),
        ("list_buckets", {"provider": "a"}),
        ("get_bucket_stats", {"provider": "a", "bucket": "w"}),
    ]
    assert ACCESS not in repr(store) and ACCESS not in repr(token)


def test_blocking_not_found_and_forbidden(
    server: ThreadedFakeServer, client: BlockingProxySocketClient
) -> None:
    store = BlockingProxyTokenStore(client)
    server.scripted["get_token"] = refuse("NOT_FOUND", "No token found for provider: a")
    server.scripted["get_bucket_stats"] = refuse("NOT_FOUND", "No stats found for a/default")
    assert store.get_token("a") is None
    assert store.get_bucket_stats("a") is None
    server.scripted["get_token"] = refuse("FORBIDDEN", Message.ACCESS_DENIED)
    with pytest.raises(ProxyRequestError) as caught:
        store.get_token("a")
    assert caught.value.code == "FORBIDDEN"


def test_blocking_key_storage(
    server: ThreadedFakeServer, client: BlockingProxySocketClient
) -> None:
    keys = BlockingProxyProviderKeyStorage(client)
    server.scripted.update(
        {
            "get_api_key": ok({"key": KEY}),
            "list_api_keys": ok({"keys": ["k"]}),
            "has_api_key": ok({"exists": False}),
        }
    )
    key = keys.get_key("k")
    assert key is not None and key.reveal() == KEY and KEY not in repr(key)
    assert keys.list_keys() == ["k"]
    assert keys.has_key("k") is False
    server.scripted["get_api_key"] = refuse("NOT_FOUND", "No API key found for: k")
    assert keys.get_key("k") is None
    for call in (lambda: keys.save_key("k", Secret(KEY)), lambda: keys.delete_key("k")):
        with pytest.raises(SandboxKeyManagementError, match=r"^API key management is not"):
            call()
    assert [m["op"] for m in server.requests] == [
        "get_api_key",
        "list_api_keys",
        "has_api_key",
        "get_api_key",
    ]


# -- environment ---------------------------------------------------------------


def test_socket_path_from_environment() -> None:
    assert socket_path_from_environment({}) is None
    assert socket_path_from_environment({"CREDPROXY_SOCKET": "/b"}) == "/b"
    assert (
        socket_path_from_environment({"LLXPRT_CREDENTIAL_SOCKET": "/a", "CREDPROXY_SOCKET": "/b"})
        == "/a"
    )
    assert (
        socket_path_from_environment({"LLXPRT_CREDENTIAL_SOCKET": "", "CREDPROXY_SOCKET": "/b"})
        == "/b"
    )


def test_take_token_from_file(tmp_path: Any) -> None:
    path = tmp_path / "token"
    path.write_text(CAPABILITY + "\n")
    env = {CAPABILITY_TOKEN_FILE_ENV: str(path), "OTHER": "x"}
    token = take_capability_token(env)
    assert token is not None and token.reveal() == CAPABILITY
    assert env == {"OTHER": "x"}
    assert take_capability_token(env) is None


def test_take_token_from_descriptor_closes_it() -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, CAPABILITY.encode())
    os.close(write_end)
    env = {CAPABILITY_TOKEN_FD_ENV: str(read_end), CAPABILITY_TOKEN_FILE_ENV: "/nonexistent"}
    token = take_capability_token(env)
    assert token is not None and token.reveal() == CAPABILITY
    assert env == {}
    with pytest.raises(OSError):
        os.fstat(read_end)


def test_bad_descriptor_values() -> None:
    with pytest.raises(ValueError, match="not a descriptor number"):
        take_capability_token({CAPABILITY_TOKEN_FD_ENV: "abc"})
    read_end, write_end = os.pipe()
    os.close(write_end)
    with pytest.raises(ValueError, match="empty"):
        read_capability_token(read_end)


def test_child_processes_inherit_no_token_pointer(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "token"
    path.write_text(CAPABILITY)
    monkeypatch.setenv(CAPABILITY_TOKEN_FILE_ENV, str(path))
    monkeypatch.setenv(CAPABILITY_TOKEN_FD_ENV, "")
    token = take_capability_token()
    assert token is not None
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(sorted(os.environ))"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert CAPABILITY_TOKEN_FILE_ENV not in child.stdout
    assert CAPABILITY_TOKEN_FD_ENV not in child.stdout
    assert CAPABILITY not in child.stdout
