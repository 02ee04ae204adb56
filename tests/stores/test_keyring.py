"""
The keyring stores against a real Secret Service (gnome-keyring on a private
bus, see conftest.py): the store contract, one item per token cross-checked
with secret-tool, reads cached (a cached read makes no backend call),
invalidate, another store's write seen through the state directory's change
marker (still with no backend call while nothing changed), unambiguous item
names, an index that concurrent writes do not lose entries from, and backend
failures and corrupt items as clear errors that show no value.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from typing import Any, cast

import pytest
import pytest_twisted
from keyring.backend import KeyringBackend
from keyring.backends import fail as fail_backend
from keyring.backends.SecretService import Keyring as SecretServiceKeyring
from keyring.errors import PasswordSetError
from secretstorage.exceptions import ItemNotFoundException
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.trial.unittest import SynchronousTestCase

from credproxy._secret import Secret
from credproxy.stores import (
    BlockingCalls,
    IProviderKeyStore,
    ITokenStore,
    KeyringProviderKeyStore,
    KeyringTokenStore,
    StoreCorrupt,
    StoreError,
    Token,
)
from credproxy.stores._keyring import (
    KEY_INDEX_ITEM,
    MAX_ITEM_CHARS,
    SERVICE,
    TOKEN_INDEX_ITEM,
    WRITE_ATTEMPTS,
    key_item,
    token_item,
)
from credproxy.testing import InlineBlockingCalls
from tests.stores.conftest import SecretServiceBus
from tests.stores.contract import (
    ACCESS,
    KEY,
    REFRESH,
    KeyStoreContractMixin,
    TokenStoreContractMixin,
    token,
)


class CountingBackend:
    """
    The real Secret Service backend, with a count of the calls made to it
    (each is a D-Bus round trip), and writes that can be made to fail.
    """

    def __init__(self, inner: KeyringBackend) -> None:
        self.inner = inner
        self.calls: list[tuple[str, str]] = []
        self.fail_writes = False
        self.vanishing_writes = 0  # writes that first find their item gone

    def get_password(self, service: str, username: str) -> str | None:
        self.calls.append(("get", username))
        return self.inner.get_password(service, username)

    def set_password(self, service: str, username: str, password: str) -> None:
        self.calls.append(("set", username))
        if self.fail_writes:
            raise PasswordSetError("refused by the test")
        if self.vanishing_writes:
            self.vanishing_writes -= 1
            raise ItemNotFoundException("gone, as under concurrent writes")
        self.inner.set_password(service, username, password)

    def delete_password(self, service: str, username: str) -> None:
        self.calls.append(("delete", username))
        self.inner.delete_password(service, username)


class KeyringCase(SynchronousTestCase):
    @pytest.fixture(autouse=True)
    def _on_the_test_bus(self, secret_service: SecretServiceBus) -> None:
        self.bus = secret_service
        self.service = SecretServiceKeyring()
        self.backend = CountingBackend(self.service)
        self.calls = InlineBlockingCalls()
        base = tempfile.mkdtemp(prefix="cp-keyring-state-")
        self.addCleanup(shutil.rmtree, base, True)
        self.state_dir = os.path.join(base, "credproxy")

    def tokens(self, *, marked: bool = False) -> KeyringTokenStore:
        return KeyringTokenStore(
            self.calls,
            cast(KeyringBackend, self.backend),
            state_dir=self.state_dir if marked else None,
        )

    def keys(self, *, marked: bool = False) -> KeyringProviderKeyStore:
        return KeyringProviderKeyStore(
            self.calls,
            cast(KeyringBackend, self.backend),
            state_dir=self.state_dir if marked else None,
        )

    def secret_tool(self, username: str) -> str:
        return subprocess.run(
            ["secret-tool", "lookup", "service", SERVICE, "username", username],
            env=self.bus.environ,
            capture_output=True,
            check=True,
            timeout=30,
        ).stdout.decode()


class KeyringTokenStoreContractTests(TokenStoreContractMixin, KeyringCase):
    def make_store(self) -> ITokenStore:
        return self.tokens()


class KeyringKeyStoreContractTests(KeyStoreContractMixin, KeyringCase):
    def make_store(self) -> IProviderKeyStore:
        return self.keys()


class ItemNameTests(SynchronousTestCase):
    def test_names(self) -> None:
        self.assertEqual(token_item("anthropic"), "token/anthropic/default")
        self.assertEqual(token_item("a:b", "c/d"), "token/a%3Ab/c%2Fd")
        self.assertEqual(key_item("openai/work"), "key/openai%2Fwork")

    def test_unambiguous(self) -> None:
        pairs = [
            ("a/b", "c"),
            ("a", "b/c"),
            ("a:b", "c"),
            ("a", "b:c"),
            ("a%2Fb", "c"),
            ("index", "tokens"),
            ("a", None),
            ("a", "default"),
        ]
        names = {token_item(p, b) for p, b in pairs}
        self.assertEqual(len(names), len(pairs) - 1)  # only None and "default" are one bucket
        keys = {key_item(n) for n in ["a/b", "a%2Fb", "a:b", "tokens"]}
        self.assertEqual(len(keys), 4)
        self.assertTrue(names.isdisjoint(keys))
        self.assertFalse({TOKEN_INDEX_ITEM, KEY_INDEX_ITEM} & (names | keys))


class KeyringTokenStoreTests(KeyringCase):
    def test_description(self) -> None:
        store = KeyringTokenStore(self.calls, self.service)
        self.assertEqual(store.description, 'keyring (SecretService, service "credproxy")')

    def test_one_item_cross_checked_with_secret_tool(self) -> None:
        self.successResultOf(self.tokens().save_token("anthropic", token(), "work"))
        stored = json.loads(self.secret_tool("token/anthropic/work"))
        self.assertEqual(stored, token().to_json())
        self.assertEqual(
            (stored["access_token"], stored["refresh_token"], stored["expiry"]),
            (ACCESS, REFRESH, 1900000000),
        )
        index = json.loads(self.secret_tool(TOKEN_INDEX_ITEM))
        self.assertEqual(index, {"version": 1, "tokens": [["anthropic", "work"]]})

    def test_cached_read_makes_no_backend_call(self) -> None:
        self.successResultOf(self.tokens().save_token("anthropic", token()))
        store = self.tokens()  # a fresh cache, as after a restart
        self.backend.calls.clear()
        calls_before = self.calls.calls
        got = self.successResultOf(store.get_token("anthropic"))
        self.assertEqual(got and got["access_token"], ACCESS)
        self.assertEqual(self.backend.calls, [("get", "token/anthropic/default")])
        for _ in range(3):
            self.successResultOf(store.get_token("anthropic"))
            self.successResultOf(store.get_bucket_stats("anthropic"))
        self.assertEqual(len(self.backend.calls), 1)
        self.assertEqual(self.calls.calls, calls_before + 1)

    def test_absence_is_cached_too(self) -> None:
        store = self.tokens()
        self.assertIsNone(self.successResultOf(store.get_token("nobody")))
        self.assertIsNone(self.successResultOf(store.get_token("nobody")))
        self.successResultOf(store.list_providers())
        self.successResultOf(store.list_buckets("nobody"))
        self.successResultOf(store.list_providers())
        self.assertEqual(
            self.backend.calls,
            [("get", "token/nobody/default"), ("get", TOKEN_INDEX_ITEM)],
        )

    def test_a_write_fills_the_cache(self) -> None:
        store = self.tokens()
        self.successResultOf(store.save_token("anthropic", token()))
        self.backend.calls.clear()
        self.successResultOf(store.get_token("anthropic"))
        self.assertEqual(self.successResultOf(store.list_providers()), ["anthropic"])
        self.assertEqual(self.backend.calls, [])

    def test_invalidate(self) -> None:
        mine, other = self.tokens(), self.tokens()  # other: another process
        self.successResultOf(mine.save_token("anthropic", token("old")))
        self.successResultOf(other.save_token("anthropic", token("new")))
        self.successResultOf(other.save_token("openai", token()))
        got = self.successResultOf(mine.get_token("anthropic"))
        self.assertEqual(got and got["access_token"], "old")  # cached
        mine.invalidate("anthropic")
        got = self.successResultOf(mine.get_token("anthropic"))
        self.assertEqual(got and got["access_token"], "new")
        self.assertEqual(self.successResultOf(mine.list_providers()), ["anthropic", "openai"])

    def test_another_stores_write_is_seen_through_the_marker(self) -> None:
        mine, other = self.tokens(marked=True), self.tokens(marked=True)  # other: a process
        self.successResultOf(mine.save_token("anthropic", token("old")))
        self.backend.calls.clear()
        for _ in range(3):  # its own write costs no re-read
            got = self.successResultOf(mine.get_token("anthropic"))
            self.assertEqual(got and got["access_token"], "old")
            self.successResultOf(mine.list_providers())
        self.assertEqual(self.backend.calls, [])
        self.successResultOf(other.save_token("anthropic", token("new")))
        self.successResultOf(other.save_token("openai", token()))
        self.backend.calls.clear()
        calls_before = self.calls.calls
        got = self.successResultOf(mine.get_token("anthropic"))
        self.assertEqual(got and got["access_token"], "new")
        self.assertEqual(self.successResultOf(mine.list_providers()), ["anthropic", "openai"])
        self.successResultOf(mine.get_token("anthropic"))
        self.assertEqual(
            self.backend.calls, [("get", "token/anthropic/default"), ("get", TOKEN_INDEX_ITEM)]
        )
        self.assertEqual(self.calls.calls, calls_before + 2)
        self.successResultOf(other.remove_token("openai"))
        self.assertEqual(self.successResultOf(mine.list_providers()), ["anthropic"])
        self.assertTrue(os.path.exists(os.path.join(self.state_dir, "changed")))

    def test_index_survives_a_restart(self) -> None:
        store = self.tokens()
        self.successResultOf(store.save_token("a:b", token(), "x/y"))
        self.successResultOf(store.save_token("c", token()))
        self.successResultOf(store.remove_token("c"))
        fresh = self.tokens()
        self.assertEqual(self.successResultOf(fresh.list_providers()), ["a:b"])
        self.assertEqual(self.successResultOf(fresh.list_buckets("a:b")), ["x/y"])

    def test_removed_item_is_gone_from_the_backend(self) -> None:
        store = self.tokens()
        self.successResultOf(store.save_token("anthropic", token()))
        self.successResultOf(store.remove_token("anthropic"))
        self.assertIsNone(self.service.get_password(SERVICE, token_item("anthropic")))

    def test_failed_write_forgets_the_cache(self) -> None:
        store = self.tokens()
        self.successResultOf(store.save_token("anthropic", token("old")))
        self.backend.fail_writes = True
        error = self.failureResultOf(store.save_token("anthropic", token("new")), StoreError)
        self.assertIn("PasswordSetError", str(error.value))
        self.backend.calls.clear()
        got = self.successResultOf(store.get_token("anthropic"))
        self.assertEqual(got and got["access_token"], "old")
        self.assertEqual(self.backend.calls, [("get", "token/anthropic/default")])

    def test_backend_failure_is_a_clear_error_without_values(self) -> None:
        store = KeyringTokenStore(self.calls, fail_backend.Keyring())
        for d in [
            store.get_token("anthropic"),
            store.save_token("anthropic", token()),
            store.remove_token("anthropic"),
            store.list_providers(),
        ]:
            error = self.failureResultOf(d, StoreError).value
            self.assertIn("NoKeyringError", str(error))
            self.assertIsNone(error.__cause__)
            for shown in (str(error), repr(error)):
                self.assertNotIn(ACCESS, shown)
                self.assertNotIn(REFRESH, shown)

    def test_corrupt_token_item(self) -> None:
        self.service.set_password(SERVICE, token_item("anthropic"), '{"access_token": "' + ACCESS)
        error = self.failureResultOf(self.tokens().get_token("anthropic"), StoreCorrupt).value
        self.assertIn('"token/anthropic/default"', str(error))
        self.assertNotIn(ACCESS, str(error) + repr(error))
        self.service.set_password(SERVICE, token_item("openai"), "[1, 2]")
        self.failureResultOf(self.tokens().get_token("openai"), StoreCorrupt)

    def test_corrupt_index_is_never_replaced(self) -> None:
        self.service.set_password(SERVICE, TOKEN_INDEX_ITEM, '{"version": 1, "tokens": {}}')
        store = self.tokens()
        self.failureResultOf(store.list_providers(), StoreCorrupt)
        self.failureResultOf(store.save_token("anthropic", token()), StoreCorrupt)
        self.failureResultOf(store.remove_token("anthropic"), StoreCorrupt)
        self.assertEqual(
            self.service.get_password(SERVICE, TOKEN_INDEX_ITEM), '{"version": 1, "tokens": {}}'
        )
        self.assertIsNone(self.service.get_password(SERVICE, token_item("anthropic")))

    def test_item_size_bound(self) -> None:
        store = self.tokens()
        big = token(padding="x" * MAX_ITEM_CHARS)
        error = self.failureResultOf(store.save_token("anthropic", big), StoreError).value
        self.assertIn(str(MAX_ITEM_CHARS), str(error))
        self.assertEqual(self.backend.calls, [])
        fits = token(padding="x" * (MAX_ITEM_CHARS - 200))
        self.successResultOf(store.save_token("anthropic", fits))
        self.service.set_password(SERVICE, token_item("openai"), "x" * (MAX_ITEM_CHARS + 1))
        self.failureResultOf(store.get_token("openai"), StoreCorrupt)


class VanishingItemTests(KeyringCase):
    def test_a_write_that_finds_its_item_gone_is_tried_again(self) -> None:
        store = self.tokens()
        self.backend.vanishing_writes = WRITE_ATTEMPTS - 1
        self.successResultOf(store.save_token("anthropic", token("acc-retried")))
        got = self.successResultOf(self.tokens().get_token("anthropic"))
        assert got is not None and got["access_token"] == "acc-retried"

    def test_a_write_that_keeps_finding_it_gone_fails_after_its_attempts(self) -> None:
        store = self.tokens()
        self.backend.vanishing_writes = WRITE_ATTEMPTS
        failure = self.failureResultOf(store.save_token("anthropic", token("acc-gone")), StoreError)
        self.assertIn("ItemNotFoundException", str(failure.value))
        self.assertNotIn("acc-gone", str(failure.value))
        self.assertEqual(
            [c for c in self.backend.calls if c == ("set", token_item("anthropic"))],
            [("set", token_item("anthropic"))] * WRITE_ATTEMPTS,
        )


class KeyringKeyStoreTests(KeyringCase):
    def test_key_item_cross_checked_with_secret_tool(self) -> None:
        self.successResultOf(self.keys().save_key("openai:work", Secret(KEY)))
        self.assertEqual(self.secret_tool("key/openai%3Awork"), KEY)
        self.assertEqual(
            json.loads(self.secret_tool(KEY_INDEX_ITEM)), {"version": 1, "keys": ["openai:work"]}
        )

    def test_cached_read_makes_no_backend_call(self) -> None:
        self.successResultOf(self.keys().save_key("anthropic", Secret(KEY)))
        store = self.keys()
        self.backend.calls.clear()
        for _ in range(3):
            self.assertEqual(self.successResultOf(store.get_key("anthropic")), Secret(KEY))
            self.assertTrue(self.successResultOf(store.has_key("anthropic")))
            self.assertFalse(self.successResultOf(store.has_key("nobody")))
            self.successResultOf(store.list_keys())
        self.assertEqual(
            self.backend.calls,
            [("get", "key/anthropic"), ("get", "key/nobody"), ("get", KEY_INDEX_ITEM)],
        )

    def test_invalidate(self) -> None:
        mine, other = self.keys(), self.keys()
        self.successResultOf(mine.save_key("anthropic", Secret("old")))
        self.successResultOf(other.save_key("anthropic", Secret("new")))
        self.assertEqual(self.successResultOf(mine.get_key("anthropic")), Secret("old"))
        mine.invalidate("anthropic")
        self.assertEqual(self.successResultOf(mine.get_key("anthropic")), Secret("new"))

    def test_another_stores_key_write_is_seen_through_the_marker(self) -> None:
        mine, other = self.keys(marked=True), self.keys(marked=True)
        self.assertIsNone(self.successResultOf(mine.get_key("anthropic")))  # absence cached
        self.assertEqual(self.successResultOf(mine.list_keys()), [])
        self.backend.calls.clear()
        self.assertIsNone(self.successResultOf(mine.get_key("anthropic")))
        self.assertEqual(self.backend.calls, [])
        self.successResultOf(other.save_key("anthropic", Secret(KEY)))
        self.assertEqual(self.successResultOf(mine.get_key("anthropic")), Secret(KEY))
        self.assertEqual(self.successResultOf(mine.list_keys()), ["anthropic"])
        self.assertTrue(self.successResultOf(other.delete_key("anthropic")))
        self.assertFalse(self.successResultOf(mine.has_key("anthropic")))

    def test_a_failed_write_still_bumps_the_marker(self) -> None:
        # The item may have been written before the index write failed.
        store = self.keys(marked=True)
        self.backend.fail_writes = True
        self.failureResultOf(store.save_key("anthropic", Secret(KEY)), StoreError)
        with open(os.path.join(self.state_dir, "changed"), "rb") as f:
            self.assertEqual(f.read(), b".")

    def test_backend_failure_shows_no_key(self) -> None:
        store = KeyringProviderKeyStore(self.calls, fail_backend.Keyring())
        error = self.failureResultOf(store.save_key("anthropic", Secret(KEY)), StoreError).value
        self.assertIn("NoKeyringError", str(error))
        self.assertNotIn(KEY, str(error) + repr(error))
        self.failureResultOf(store.delete_key("anthropic"), StoreError)
        self.failureResultOf(store.list_keys(), StoreError)

    def test_key_size_bound(self) -> None:
        store = self.keys()
        self.failureResultOf(store.save_key("big", Secret("k" * (MAX_ITEM_CHARS + 1))), StoreError)
        self.assertEqual(self.backend.calls, [])


@pytest_twisted.ensureDeferred
async def test_concurrent_writes_keep_every_index_entry(secret_service: SecretServiceBus) -> None:
    calls = BlockingCalls(reactor, max_threads=4)
    calls.startService()
    try:
        backend = SecretServiceKeyring()
        tokens = KeyringTokenStore(calls, backend)
        keys = KeyringProviderKeyStore(calls, backend)
        writes: list[Any] = []
        for i in range(12):
            writes.append(tokens.save_token(f"provider-{i}", Token({"access_token": f"a{i}"})))
            writes.append(keys.save_key(f"key-{i}", Secret(f"k{i}")))
        await gatherResults(writes)
        await gatherResults([tokens.remove_token(f"provider-{i}") for i in range(0, 12, 3)])
        fresh_tokens = KeyringTokenStore(calls, backend)
        expected = sorted(f"provider-{i}" for i in range(12) if i % 3)
        assert await fresh_tokens.list_providers() == expected
        assert await KeyringProviderKeyStore(calls, backend).list_keys() == sorted(
            f"key-{i}" for i in range(12)
        )
        got = await fresh_tokens.get_token("provider-4")
        assert got is not None and got["access_token"] == "a4"
    finally:
        await calls.stopService()
