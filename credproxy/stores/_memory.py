"""
Stores that keep everything in this process's memory: for tests, for
embedding, and for a host that should forget its credentials when it exits.
Every method answers with an already-fired Deferred, like a store whose
backend is instant.
"""

from __future__ import annotations

from collections import defaultdict

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from credproxy._secret import Secret
from credproxy.broker.tokens import Token
from credproxy.stores._interfaces import (
    DEFAULT_BUCKET,
    BucketStats,
    IProviderKeyStore,
    ITokenStore,
)


@implementer(ITokenStore)
class MemoryTokenStore:
    """
    Tokens by provider and bucket, with per-bucket request counters.
    """

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str], Token] = {}
        self._requests: defaultdict[tuple[str, str], int] = defaultdict(int)
        self._last_used: dict[tuple[str, str], float] = {}

    def __repr__(self) -> str:
        return f"<MemoryTokenStore entries={len(self._tokens)}>"

    def get_token(self, provider: str, bucket: str | None = None) -> Deferred[Token | None]:
        return succeed(self._tokens.get((provider, bucket or DEFAULT_BUCKET)))

    def save_token(self, provider: str, token: Token, bucket: str | None = None) -> Deferred[None]:
        self._tokens[(provider, bucket or DEFAULT_BUCKET)] = Token(token)
        return succeed(None)

    def remove_token(self, provider: str, bucket: str | None = None) -> Deferred[None]:
        self._tokens.pop((provider, bucket or DEFAULT_BUCKET), None)
        return succeed(None)

    def list_providers(self) -> Deferred[list[str]]:
        return succeed(sorted({provider for provider, _ in self._tokens}))

    def list_buckets(self, provider: str) -> Deferred[list[str]]:
        return succeed(sorted(b for p, b in self._tokens if p == provider))

    def record_request(self, provider: str, bucket: str | None, when: float) -> None:
        """
        Count one upstream request made with this bucket's token at Unix time C{when}.
        """
        entry = (provider, bucket or DEFAULT_BUCKET)
        self._requests[entry] += 1
        self._last_used[entry] = when

    def get_bucket_stats(
        self, provider: str, bucket: str | None = None
    ) -> Deferred[BucketStats | None]:
        entry = (provider, bucket or DEFAULT_BUCKET)
        if entry not in self._tokens:
            return succeed(None)
        total = sum(n for (p, _), n in self._requests.items() if p == provider)
        count = self._requests.get(entry, 0)
        return succeed(
            BucketStats(
                bucket=entry[1],
                request_count=count,
                percentage=100.0 * count / total if total else 0.0,
                last_used=self._last_used.get(entry),
            )
        )


@implementer(IProviderKeyStore)
class MemoryProviderKeyStore:
    """
    Named API keys, held as L{Secret}s.
    """

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
