"""
The store factories: proxy-backed stores when a credential socket is named
(either variable), the host's own stores otherwise (as --store chooses), one
set per process and flavour, rebuilt (the old client closed) when the socket
path or the capability token changes, the token read once (its variable
removed, its descriptor closed), and no renewal and no timers in proxy mode.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from credproxy._secret import Secret
from credproxy.inner import (
    CAPABILITY_TOKEN_FD_ENV,
    CAPABILITY_TOKEN_FILE_ENV,
    LOGIN_SESSION_LIFETIME,
    STORE_ENV,
    BlockingProxyProviderKeyStorage,
    BlockingProxyTokenStore,
    ProxyProviderKeyStorage,
    ProxyTokenStore,
    create_blocking_provider_key_storage,
    create_blocking_token_store,
    create_login_backend,
    create_provider_key_storage,
    create_token_store,
    renewal_enabled,
    reset_store_factories,
)
from credproxy.inner._factories import CallerThreadCalls
from credproxy.stores import (
    FileProviderKeyStore,
    FileTokenStore,
    IProviderKeyStore,
    ITokenStore,
    MemoryProviderKeyStore,
    MemoryTokenStore,
    StoreTimeout,
    Token,
)
from credproxy.wire import ProxyClientClosed
from tests.inner.environment import SOCKET_VARIABLES, isolate
from tests.wire.threaded_fake_server import ThreadedFakeServer

CAPABILITY_A = "a1" * 32
CAPABILITY_B = "b2" * 32
ACCESS = "access-token-for-factory-tests"


def pipe_holding(text: str) -> int:
    """
    A descriptor to read C{text} from, as a host would hand it to a sandbox.
    """
    read_end, write_end = os.pipe()
    os.write(write_end, text.encode())
    os.close(write_end)
    return read_end


def closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as e:
        return e.errno == errno.EBADF
    os.close(fd)
    return False


class FactoryTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="credproxy-factories-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        isolate(os.path.join(self.directory, "state"), self.addCleanup)
        self.reactor = MemoryReactorClock()

    def token_file(self, value: str) -> str:
        path = tempfile.mktemp(dir=self.directory)  # noqa: S306 -- a private directory
        with open(path, "w") as f:
            f.write(value + "\n")
        return path


class ProxyModeTests(FactoryTestCase):
    def test_the_login_backend_outlives_a_login_session(self) -> None:
        with self.assertRaises(ValueError):
            create_login_backend(self.reactor)  # on the host, logins go through the broker
        os.environ["CREDPROXY_SOCKET"] = "/run/cred.sock"
        os.environ[CAPABILITY_TOKEN_FILE_ENV] = self.token_file(CAPABILITY_A)
        backend = create_login_backend(self.reactor)
        self.assertGreater(backend.client.idle_timeout, LOGIN_SESSION_LIFETIME)
        self.assertIn("/run/cred.sock", repr(backend.client))
        self.assertNotIn(CAPABILITY_TOKEN_FILE_ENV, os.environ)
        # its own connection: the stores' client keeps the default idle close
        tokens = create_token_store(self.reactor)
        assert isinstance(tokens, ProxyTokenStore)
        self.assertIsNot(backend.client, tokens.client)

    def test_socket_variables_select_the_proxy_stores(self) -> None:
        for name in SOCKET_VARIABLES:
            reset_store_factories()
            os.environ.pop("LLXPRT_CREDENTIAL_SOCKET", None)
            os.environ.pop("CREDPROXY_SOCKET", None)
            os.environ[name] = f"/run/{name}.sock"
            tokens = create_token_store(self.reactor)
            keys = create_provider_key_storage(self.reactor)
            assert isinstance(tokens, ProxyTokenStore) and isinstance(keys, ProxyProviderKeyStorage)
            self.assertTrue(verifyObject(ITokenStore, tokens))
            self.assertTrue(verifyObject(IProviderKeyStore, keys))
            self.assertIs(tokens.client, keys.client)  # one client per process
            self.assertIn(f"/run/{name}.sock", repr(tokens.client))
            blocking = create_blocking_token_store()
            blocking_keys = create_blocking_provider_key_storage()
            assert isinstance(blocking, BlockingProxyTokenStore)
            assert isinstance(blocking_keys, BlockingProxyProviderKeyStorage)
            self.assertIs(blocking.client, blocking_keys.client)
            self.assertEqual(blocking.client.path, f"/run/{name}.sock")

    def test_a_second_call_returns_the_same_stores(self) -> None:
        os.environ["CREDPROXY_SOCKET"] = "/run/cred.sock"
        tokens = create_token_store(self.reactor)
        self.assertIs(create_token_store(self.reactor), tokens)
        keys = create_provider_key_storage(self.reactor)
        self.assertIs(create_provider_key_storage(self.reactor), keys)
        self.assertIs(create_blocking_token_store(), create_blocking_token_store())
        self.assertIs(
            create_blocking_provider_key_storage(), create_blocking_provider_key_storage()
        )

    def test_a_changed_path_rebuilds_and_closes_the_old_client(self) -> None:
        os.environ["CREDPROXY_SOCKET"] = "/run/one.sock"
        old = create_token_store(self.reactor)
        assert isinstance(old, ProxyTokenStore)
        pending = old.get_token("anthropic")  # connecting, never answered
        self.assertNoResult(pending)
        os.environ["CREDPROXY_SOCKET"] = "/run/two.sock"
        new = create_token_store(self.reactor)
        assert isinstance(new, ProxyTokenStore)
        self.assertIsNot(new, old)
        self.assertIsNot(new.client, old.client)
        self.assertIn("/run/two.sock", repr(new.client))
        self.failureResultOf(pending, ProxyClientClosed)
        keys = create_provider_key_storage(self.reactor)
        assert isinstance(keys, ProxyProviderKeyStorage)
        self.assertIs(keys.client, new.client)

    def test_a_changed_token_rebuilds(self) -> None:
        os.environ["CREDPROXY_SOCKET"] = "/run/cred.sock"
        os.environ[CAPABILITY_TOKEN_FILE_ENV] = self.token_file(CAPABILITY_A)
        first = create_token_store(self.reactor)
        assert isinstance(first, ProxyTokenStore)
        self.assertEqual(first.client.capability_token, Secret(CAPABILITY_A))
        pending = first.get_token("anthropic")

        # The same token named again: nothing changes.
        os.environ[CAPABILITY_TOKEN_FILE_ENV] = self.token_file(CAPABILITY_A)
        self.assertIs(create_token_store(self.reactor), first)
        self.assertNoResult(pending)

        os.environ[CAPABILITY_TOKEN_FILE_ENV] = self.token_file(CAPABILITY_B)
        second = create_token_store(self.reactor)
        assert isinstance(second, ProxyTokenStore)
        self.assertIsNot(second, first)
        self.assertEqual(second.client.capability_token, Secret(CAPABILITY_B))
        self.failureResultOf(pending, ProxyClientClosed)
        self.assertNotIn(CAPABILITY_B, repr(second) + repr(second.client))

    def test_the_token_is_taken_once_from_a_descriptor(self) -> None:
        os.environ["CREDPROXY_SOCKET"] = "/run/cred.sock"
        fd = pipe_holding(CAPABILITY_A)
        os.environ[CAPABILITY_TOKEN_FD_ENV] = str(fd)
        tokens = create_token_store(self.reactor)
        assert isinstance(tokens, ProxyTokenStore)
        self.assertNotIn(CAPABILITY_TOKEN_FD_ENV, os.environ)
        self.assertTrue(closed(fd))
        self.assertEqual(tokens.client.capability_token, Secret(CAPABILITY_A))
        # Remembered: the other flavour, and later calls, use the same token.
        blocking = create_blocking_token_store()
        assert isinstance(blocking, BlockingProxyTokenStore)
        self.assertEqual(blocking.client.capability_token, Secret(CAPABILITY_A))
        self.assertIs(create_token_store(self.reactor), tokens)

    def test_the_token_file_variable_is_removed(self) -> None:
        os.environ["LLXPRT_CREDENTIAL_SOCKET"] = "/run/cred.sock"
        os.environ[CAPABILITY_TOKEN_FILE_ENV] = self.token_file(CAPABILITY_A)
        keys = create_blocking_provider_key_storage()
        assert isinstance(keys, BlockingProxyProviderKeyStorage)
        self.assertNotIn(CAPABILITY_TOKEN_FILE_ENV, os.environ)
        self.assertEqual(keys.client.capability_token, Secret(CAPABILITY_A))

    def test_no_token_means_a_client_without_one(self) -> None:
        os.environ["CREDPROXY_SOCKET"] = "/run/cred.sock"
        tokens = create_token_store(self.reactor)
        assert isinstance(tokens, ProxyTokenStore)
        self.assertIsNone(tokens.client.capability_token)

    def test_an_unreadable_token_fails_and_leaves_no_pointer(self) -> None:
        os.environ["CREDPROXY_SOCKET"] = "/run/cred.sock"
        os.environ[CAPABILITY_TOKEN_FD_ENV] = "not-a-number"
        with self.assertRaises(ValueError):
            create_token_store(self.reactor)
        self.assertNotIn(CAPABILITY_TOKEN_FD_ENV, os.environ)

    def test_proxy_mode_schedules_no_renewal(self) -> None:
        os.environ["CREDPROXY_SOCKET"] = "/run/cred.sock"
        self.assertFalse(renewal_enabled())
        create_token_store(self.reactor)
        create_provider_key_storage(self.reactor)
        create_blocking_token_store()
        create_blocking_provider_key_storage()
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.reactor.unixClients, [])  # nor a connection, until a request
        os.environ.pop("CREDPROXY_SOCKET")
        os.environ["LLXPRT_CREDENTIAL_SOCKET"] = "/run/cred.sock"
        self.assertFalse(renewal_enabled())

    def test_reset_closes_clients_and_forgets_the_token(self) -> None:
        os.environ["CREDPROXY_SOCKET"] = "/run/cred.sock"
        os.environ[CAPABILITY_TOKEN_FILE_ENV] = self.token_file(CAPABILITY_A)
        tokens = create_token_store(self.reactor)
        pending = tokens.get_token("anthropic")
        self.successResultOf(reset_store_factories())
        self.failureResultOf(pending, ProxyClientClosed)
        fresh = create_token_store(self.reactor)
        assert isinstance(fresh, ProxyTokenStore)
        self.assertIsNot(fresh, tokens)
        self.assertIsNone(fresh.client.capability_token)

    def test_another_reactor_gets_its_own_client(self) -> None:
        os.environ["CREDPROXY_SOCKET"] = "/run/cred.sock"
        first = create_token_store(self.reactor)
        other = MemoryReactorClock()
        second = create_token_store(other)
        assert isinstance(second, ProxyTokenStore)
        self.assertIsNot(second, first)
        self.assertIs(second.client.reactor, other)


class HostModeTests(FactoryTestCase):
    def test_memory(self) -> None:
        os.environ[STORE_ENV] = "memory"
        self.assertTrue(renewal_enabled())
        tokens = create_token_store(self.reactor)
        self.assertIsInstance(tokens, MemoryTokenStore)
        self.assertIsInstance(create_provider_key_storage(self.reactor), MemoryProviderKeyStore)
        self.assertIs(create_token_store(self.reactor), tokens)
        blocking = create_blocking_token_store()
        blocking.save_token("anthropic", Token({"access_token": ACCESS}))
        found = blocking.get_token("anthropic")
        self.assertEqual(found and found["access_token"], ACCESS)
        self.assertIs(create_blocking_token_store(), blocking)

    def test_file_in_the_state_directory(self) -> None:
        os.environ[STORE_ENV] = "file"
        state = os.path.join(os.environ["XDG_STATE_HOME"], "credproxy")
        tokens = create_token_store(self.reactor)
        keys = create_provider_key_storage(self.reactor)
        assert isinstance(tokens, FileTokenStore) and isinstance(keys, FileProviderKeyStore)
        self.assertEqual(tokens.path, os.path.join(state, "tokens.json"))
        self.assertEqual(keys.path, os.path.join(state, "keys.json"))

    def test_auto_without_a_secret_service_is_file(self) -> None:
        # tests/conftest.py hides the session bus, so no Secret Service answers.
        self.assertIsInstance(create_token_store(self.reactor), FileTokenStore)

    def test_an_unknown_store_kind_fails(self) -> None:
        os.environ[STORE_ENV] = "floppy"
        with self.assertRaises(ValueError):
            create_token_store(self.reactor)
        with self.assertRaises(ValueError):
            create_blocking_token_store()

    def test_a_changed_store_kind_rebuilds(self) -> None:
        os.environ[STORE_ENV] = "memory"
        memory = create_token_store(self.reactor)
        os.environ[STORE_ENV] = "file"
        self.assertIsInstance(create_token_store(self.reactor), FileTokenStore)
        self.assertIsNot(create_token_store(self.reactor), memory)

    def test_a_token_without_a_socket_is_refused(self) -> None:
        fd = pipe_holding(CAPABILITY_A)
        os.environ[CAPABILITY_TOKEN_FD_ENV] = str(fd)
        with self.assertRaises(ValueError) as raised:
            create_token_store(self.reactor)
        self.assertIn("no credential socket", str(raised.exception))
        self.assertNotIn(CAPABILITY_A, str(raised.exception))
        self.assertNotIn(CAPABILITY_TOKEN_FD_ENV, os.environ)
        self.assertTrue(closed(fd))

    def test_leaving_the_sandbox_closes_the_proxy_client(self) -> None:
        os.environ["CREDPROXY_SOCKET"] = "/run/cred.sock"
        proxy = create_token_store(self.reactor)
        pending = proxy.get_token("anthropic")
        os.environ.pop("CREDPROXY_SOCKET")
        os.environ[STORE_ENV] = "memory"
        self.assertIsInstance(create_token_store(self.reactor), MemoryTokenStore)
        self.failureResultOf(pending, ProxyClientClosed)


class CallerThreadCallsTests(SynchronousTestCase):
    def test_the_result_is_ready_on_return(self) -> None:
        calls = CallerThreadCalls(timeout=5)
        self.assertEqual(self.successResultOf(calls.run(lambda a, b: a + b, 2, 3)), 5)
        error = ValueError("boom")

        def failing() -> None:
            raise error

        self.assertIs(self.failureResultOf(calls.run(failing), ValueError).value, error)

    def test_a_call_that_never_returns_times_out(self) -> None:
        release = threading.Event()
        self.addCleanup(release.set)
        calls = CallerThreadCalls(timeout=0.2)
        started = time.monotonic()
        d = calls.run(release.wait)
        self.assertLess(time.monotonic() - started, 5)
        failure = self.failureResultOf(d, StoreTimeout)
        self.assertIn("0.2 s", str(failure.value))

    def test_the_timeout_must_be_positive(self) -> None:
        with self.assertRaises(ValueError):
            CallerThreadCalls(timeout=0)


# -- on real sockets and threads -----------------------------------------------


@pytest.fixture
def environment(tmp_path: Any) -> Iterator[str]:
    cleanups: list[Any] = []
    isolate(str(tmp_path / "state"), cleanups.append)
    try:
        yield os.path.join(str(tmp_path / "state"), "credproxy")
    finally:
        for cleanup in reversed(cleanups):
            cleanup()


@pytest_twisted.async_yield_fixture
async def twisted_environment(environment: str) -> AsyncIterator[str]:
    try:
        yield environment
    finally:
        await reset_store_factories()  # the host stores' thread pool stops


@pytest_twisted.ensureDeferred
async def test_host_file_stores_write_the_state_directory(twisted_environment: str) -> None:
    os.environ[STORE_ENV] = "file"
    tokens = create_token_store(reactor)
    await tokens.save_token("anthropic", Token({"access_token": ACCESS}), "work")
    with open(os.path.join(twisted_environment, "tokens.json")) as f:
        assert ACCESS in json.dumps(json.load(f))
    # The blocking twin reads the same file, from the backend, not a cache.
    found = create_blocking_token_store().get_token("anthropic", "work")
    assert found is not None and found["access_token"] == ACCESS
    create_blocking_provider_key_storage().save_key("openai", Secret("sk-factory-test-key-000"))
    key = await create_provider_key_storage(reactor).get_key("openai")
    assert key is not None and key.reveal() == "sk-factory-test-key-000"


def test_blocking_rebuild_closes_the_old_connection(environment: str, socket_dir: str) -> None:
    one = ThreadedFakeServer(os.path.join(socket_dir, "one.sock"))
    two = ThreadedFakeServer(os.path.join(socket_dir, "two.sock"))
    try:
        os.environ["CREDPROXY_SOCKET"] = one.path
        old = create_blocking_token_store()
        assert isinstance(old, BlockingProxyTokenStore)
        assert old.client.request("echo", {"n": 1}) == {"echo": {"n": 1}}
        assert old.client.version == 2
        os.environ["CREDPROXY_SOCKET"] = two.path
        new = create_blocking_token_store()
        assert isinstance(new, BlockingProxyTokenStore)
        assert new is not old and new.client is not old.client
        assert old.client.version is None
        deadline = time.monotonic() + 5
        while one.closed_peers < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert one.closed_peers == 1
        assert new.client.request("echo", {"n": 2}) == {"echo": {"n": 2}}
        assert two.ops() == ["echo"]
    finally:
        one.stop()
        two.stop()


def test_blocking_token_change_presents_the_new_token(environment: str, socket_dir: str) -> None:
    server = ThreadedFakeServer(os.path.join(socket_dir, "cred.sock"))
    token_file = os.path.join(socket_dir, "token")
    try:
        os.environ["CREDPROXY_SOCKET"] = server.path
        with open(token_file, "w") as f:
            f.write(CAPABILITY_A)
        os.environ[CAPABILITY_TOKEN_FILE_ENV] = token_file
        store = create_blocking_token_store()
        assert isinstance(store, BlockingProxyTokenStore)
        store.client.request("echo")
        fd = pipe_holding(CAPABILITY_B)
        os.environ[CAPABILITY_TOKEN_FD_ENV] = str(fd)
        rebuilt = create_blocking_token_store()
        assert isinstance(rebuilt, BlockingProxyTokenStore)
        assert rebuilt is not store and closed(fd)
        rebuilt.client.request("echo")
        handshakes = [json.loads(h) for h in server.handshakes]
        assert [h["payload"].get("capabilityToken") for h in handshakes] == [
            CAPABILITY_A,
            CAPABILITY_B,
        ]
    finally:
        server.stop()
