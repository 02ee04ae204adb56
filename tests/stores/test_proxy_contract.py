"""
The store contract through the credential socket: the sandbox side's
proxy-backed stores (Twisted and blocking) as a host connection to the real
server (RPCFace over a Broker on memory stores) on a real Unix socket.

What differs through the socket is stated, not skipped: a save never sets a
refresh token and merges over the stored token, no refresh token is ever
returned, and the key stores are read-only (keys are managed on the host).

The reactor runs in pytest-twisted's greenlet; C{wait} blocks on it. The
blocking stores run on a thread, since the server they talk to is served by
this same process's reactor.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase
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
from credproxy.stores import (
    BucketStats,
    IProviderKeyStore,
    ITokenStore,
    MemoryProviderKeyStore,
    MemoryTokenStore,
    Token,
)
from credproxy.wire import BlockingProxySocketClient, ProxySocketClient, RPCFace
from tests.stores.contract import KEY, KeyStoreContractMixin, TokenStoreContractMixin

if TYPE_CHECKING:
    _Base = SynchronousTestCase
else:
    _Base = object

_T = TypeVar("_T")
WAIT = 20.0  # seconds any one store call may take before the test fails


@implementer(ITokenStore)
class DeferringTokenStore:
    """
    A blocking token store's methods, each on a thread, as Deferreds.
    """

    def __init__(self, blocking: BlockingProxyTokenStore) -> None:
        self.blocking = blocking

    def __repr__(self) -> str:
        return f"<Deferring {self.blocking!r}>"

    def get_token(self, provider: str, bucket: str | None = None) -> Deferred[Token | None]:
        return deferToThread(self.blocking.get_token, provider, bucket)

    def save_token(self, provider: str, token: Token, bucket: str | None = None) -> Deferred[None]:
        return deferToThread(self.blocking.save_token, provider, token, bucket)

    def remove_token(self, provider: str, bucket: str | None = None) -> Deferred[None]:
        return deferToThread(self.blocking.remove_token, provider, bucket)

    def list_providers(self) -> Deferred[list[str]]:
        return deferToThread(self.blocking.list_providers)

    def list_buckets(self, provider: str) -> Deferred[list[str]]:
        return deferToThread(self.blocking.list_buckets, provider)

    def get_bucket_stats(
        self, provider: str, bucket: str | None = None
    ) -> Deferred[BucketStats | None]:
        return deferToThread(self.blocking.get_bucket_stats, provider, bucket)


@implementer(IProviderKeyStore)
class DeferringKeyStore:
    """
    A blocking key store's methods, each on a thread, as Deferreds.
    """

    def __init__(self, blocking: BlockingProxyProviderKeyStorage) -> None:
        self.blocking = blocking

    def __repr__(self) -> str:
        return f"<Deferring {self.blocking!r}>"

    def get_key(self, name: str) -> Deferred[Secret | None]:
        return deferToThread(self.blocking.get_key, name)

    def save_key(self, name: str, key: Secret) -> Deferred[None]:
        return deferToThread(self.blocking.save_key, name, key)

    def delete_key(self, name: str) -> Deferred[bool]:
        return deferToThread(self.blocking.delete_key, name)

    def list_keys(self) -> Deferred[list[str]]:
        return deferToThread(self.blocking.list_keys)

    def has_key(self, name: str) -> Deferred[bool]:
        return deferToThread(self.blocking.has_key, name)


class SocketMixin(_Base):
    """
    A real credential socket server for each test, and its clients. Mixed in
    before the contract, so that what it says about the socket wins.
    """

    keeps_refresh_token = False
    save_merges = True
    host_store = False
    read_only = True

    @pytest.fixture(autouse=True)
    def _serve(self, socket_dir: str) -> None:
        self.path = os.path.join(socket_dir, "cred.sock")
        self.host_tokens = MemoryTokenStore()
        self.host_key_store = MemoryProviderKeyStore()
        broker = Broker(reactor, self.host_tokens, self.host_key_store, renew=False)
        self.face = RPCFace(reactor, [unix_description(self.path)], broker)
        self.face.startService()
        self.clients: list[ProxySocketClient | BlockingProxySocketClient] = []

    def tearDown(self) -> None:
        for client in self.clients:
            if isinstance(client, ProxySocketClient):
                self.wait(client.close())
            else:
                client.close()
        self.wait(self.face.stopService())
        super().tearDown()

    def wait(self, d: Deferred[_T]) -> _T:
        result: _T = pytest_twisted.blockon(d.addTimeout(WAIT, reactor))
        return result

    def wait_failure(self, d: Deferred[Any]) -> BaseException:
        try:
            self.wait(d)
        except Exception as e:
            return e
        raise self.failureException(f"{d!r} succeeded")

    def record_request(self, provider: str, bucket: str | None, when: float) -> None:
        self.host_tokens.record_request(provider, bucket, when)

    def host_keys(self) -> IProviderKeyStore:
        return self.host_key_store

    def twisted_client(self) -> ProxySocketClient:
        client = ProxySocketClient(reactor, self.path)
        self.clients.append(client)
        return client

    def blocking_client(self) -> BlockingProxySocketClient:
        client = BlockingProxySocketClient(self.path)
        self.clients.append(client)
        return client


class ProxyTokenStoreContractTests(SocketMixin, TokenStoreContractMixin, SynchronousTestCase):
    def make_store(self) -> ITokenStore:
        return ProxyTokenStore(self.twisted_client())

    def test_a_stored_refresh_token_never_crosses(self) -> None:
        self.wait(
            self.host_tokens.save_token("p", Token({"access_token": "a", "refresh_token": "r"}))
        )
        got = self.wait(self.store.get_token("p"))
        self.assertEqual(dict(got or {}), {"access_token": "a"})
        self.wait(self.store.save_token("p", Token({"access_token": "b"})))
        kept = self.wait(self.host_tokens.get_token("p"))
        self.assertEqual(kept and kept.refresh_token, "r")  # the merge kept the host's


class BlockingProxyTokenStoreContractTests(
    SocketMixin, TokenStoreContractMixin, SynchronousTestCase
):
    def make_store(self) -> ITokenStore:
        return DeferringTokenStore(BlockingProxyTokenStore(self.blocking_client()))

    def test_has_every_method(self) -> None:
        for name in ITokenStore.names():
            self.assertTrue(callable(getattr(BlockingProxyTokenStore, name)), name)


class ProxyKeyStoreContractTests(SocketMixin, KeyStoreContractMixin, SynchronousTestCase):
    def make_store(self) -> IProviderKeyStore:
        return ProxyProviderKeyStorage(self.twisted_client())

    def test_refusal_names_the_reason(self) -> None:
        error = self.wait_failure(self.store.save_key("k", Secret(KEY)))
        self.assertIsInstance(error, SandboxKeyManagementError)
        self.assertNotIn(KEY, str(error) + repr(error))


class BlockingProxyKeyStoreContractTests(SocketMixin, KeyStoreContractMixin, SynchronousTestCase):
    def make_store(self) -> IProviderKeyStore:
        return DeferringKeyStore(BlockingProxyProviderKeyStorage(self.blocking_client()))

    def test_has_every_method(self) -> None:
        for name in IProviderKeyStore.names():
            self.assertTrue(callable(getattr(BlockingProxyProviderKeyStorage, name)), name)
