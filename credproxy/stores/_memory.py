"""
Stores that keep everything in this process's memory: for tests, for
embedding, and for a host that should forget its credentials when it exits.
Every method answers with an already-fired Deferred, like a store whose
backend is instant.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from credproxy._secret import Secret
from credproxy.stores._counters import RequestCounters
from credproxy.stores._interfaces import (
    DEFAULT_BUCKET,
    BucketStats,
    IHostProviderKeyStore,
    IHostTokenStore,
)
from credproxy.stores._token import Token

MEMORY_DESCRIPTION = "memory (forgotten at exit)"


@implementer(IHostTokenStore)
class MemoryTokenStore:
    """
    Tokens by provider and bucket, with per-bucket request counters.
    Nothing else writes this memory, so L{invalidate} has nothing to forget.
    """

    description = MEMORY_DESCRIPTION

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str], Token] = {}
        self.counters = RequestCounters()

    def __repr__(self) -> str:
        return f"<MemoryTokenStore entries={len(self._tokens)}>"

    def get_token(self, provider: str, bucket: str | None = None) -> Deferred[Token | None]:
        return succeed(self._tokens.get((provider, bucket or DEFAULT_BUCKET)))

    def save_token(self, provider: str, token: Token, bucket: str | None = None) -> Deferred[None]:
        self._tokens[(provider, bucket or DEFAULT_BUCKET)] = Token(token)
        return succeed(None)

    def remove_token(self, provider: str, bucket: str | None = None) -> Deferred[None]:
        self._tokens.pop((provider, bucket or DEFAULT_BUCKET), None)
        self.counters.forget(provider, bucket)
        return succeed(None)

    def list_providers(self) -> Deferred[list[str]]:
        return succeed(sorted({provider for provider, _ in self._tokens}))

    def list_buckets(self, provider: str) -> Deferred[list[str]]:
        return succeed(sorted(b for p, b in self._tokens if p == provider))

    def record_request(self, provider: str, bucket: str | None, when: float) -> None:
        self.counters.record(provider, bucket, when)

    def invalidate(self, provider: str, bucket: str | None = None) -> None:
        pass

    def get_bucket_stats(
        self, provider: str, bucket: str | None = None
    ) -> Deferred[BucketStats | None]:
        if (provider, bucket or DEFAULT_BUCKET) not in self._tokens:
            return succeed(None)
        return succeed(self.counters.stats(provider, bucket))


@implementer(IHostProviderKeyStore)
class MemoryProviderKeyStore:
    """
    Named API keys, held as L{Secret}s.
    """

    description = MEMORY_DESCRIPTION

    def __init__(self) -> None:
        self._keys: dict[str, Secret] = {}

    def __repr__(self) -> str:
        return f"<MemoryProviderKeyStore keys={len(self._keys)}>"

    def get_key(self, name: str) -> Deferred[Secret | None]:
        return succeed(self._keys.get(name))

    def save_key(self, name: str, key: Secret) -> Deferred[None]:
        self._keys[name] = key
        return succeed(None)

    def delete_key(self, name: str) -> Deferred[bool]:
        return succeed(self._keys.pop(name, None) is not None)

    def list_keys(self) -> Deferred[list[str]]:
        return succeed(sorted(self._keys))

    def has_key(self, name: str) -> Deferred[bool]:
        return succeed(name in self._keys)

    def invalidate(self, name: str) -> None:
        pass
