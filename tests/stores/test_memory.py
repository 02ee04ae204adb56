"""
The memory stores keep the store contract, describe themselves, and have
nothing to invalidate.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from credproxy.stores import (
    IProviderKeyStore,
    ITokenStore,
    MemoryProviderKeyStore,
    MemoryTokenStore,
)
from tests.stores.contract import KeyStoreContractMixin, TokenStoreContractMixin, token


class MemoryTokenStoreTests(TokenStoreContractMixin, SynchronousTestCase):
    def make_store(self) -> ITokenStore:
        return MemoryTokenStore()

    def test_description(self) -> None:
        self.assertEqual(MemoryTokenStore().description, "memory (forgotten at exit)")

    def test_invalidate_keeps_the_entry(self) -> None:
        store = MemoryTokenStore()
        self.successResultOf(store.save_token("anthropic", token()))
        store.invalidate("anthropic")
        store.invalidate("anthropic", "work")
        self.assertIsNotNone(self.successResultOf(store.get_token("anthropic")))


class MemoryKeyStoreTests(KeyStoreContractMixin, SynchronousTestCase):
    def make_store(self) -> IProviderKeyStore:
        return MemoryProviderKeyStore()

    def test_description(self) -> None:
        self.assertEqual(MemoryProviderKeyStore().description, "memory (forgotten at exit)")
