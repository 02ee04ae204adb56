"""
Per-bucket request counters, one implementation that every host store
composes, so that C{get_bucket_stats} answers the same whatever backs the
tokens. They live in this process's memory only: they describe this run's
traffic, and writing them to a keyring or file on every request would turn
each proxied request into a backend write.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred

from credproxy.stores._interfaces import DEFAULT_BUCKET, BucketStats
from credproxy.stores._token import Token

# Distinct (provider, bucket) entries counted at once. Buckets are few in
# practice; the bound keeps a caller that records arbitrary names from
# growing the process without limit. The least recently used entry goes.
MAX_COUNTED_ENTRIES = 4096


class RequestCounters:
    """
    How many upstream requests each bucket's token served, and when last.
    """

    def __init__(self, max_entries: int = MAX_COUNTED_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        # Insertion order is recency order: record() moves an entry to the end.
        self._entries: dict[tuple[str, str], tuple[int, float]] = {}

    def __repr__(self) -> str:
        return f"<RequestCounters entries={len(self._entries)}>"

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, provider: str, bucket: str | None, when: float) -> None:
        """
        Count one request made with this bucket's token at Unix time C{when}.
        """
        entry = (provider, bucket or DEFAULT_BUCKET)
        count, _ = self._entries.pop(entry, (0, 0.0))
        self._entries[entry] = (count + 1, when)
        while len(self._entries) > self.max_entries:
            del self._entries[next(iter(self._entries))]

    def forget(self, provider: str, bucket: str | None) -> None:
        """
        Drop the counters of a bucket whose token was removed, so a later token
        in that bucket starts from zero and removed buckets hold no memory.
        """
        self._entries.pop((provider, bucket or DEFAULT_BUCKET), None)

    def stats(self, provider: str, bucket: str | None) -> BucketStats:
        """
        The bucket's counters; its percentage is its share of the requests of
        all of C{provider}'s buckets.
        """
        name = bucket or DEFAULT_BUCKET
        total = sum(n for (p, _), (n, _) in self._entries.items() if p == provider)
        count, last = self._entries.get((provider, name), (0, None))
        return BucketStats(
            bucket=name,
            request_count=count,
            percentage=100.0 * count / total if total else 0.0,
            last_used=last,
        )

    def stats_if_stored(
        self, token: Deferred[Token | None], provider: str, bucket: str | None
    ) -> Deferred[BucketStats | None]:
        """
        L{stats} once C{token} (the store's read of that bucket) fires, or
        None when nothing is stored there: only a bucket holding a token has
        stats.
        """
        return token.addCallback(
            lambda stored: None if stored is None else self.stats(provider, bucket)
        )


class _IndexedTokenStore(Protocol):
    """
    What L{IndexedTokenQueries} needs of the store it is mixed into.
    """

    @property
    def counters(self) -> RequestCounters: ...

    def _entries(self) -> Deferred[set[tuple[str, str]]]: ...

    def get_token(self, provider: str, bucket: str | None = None) -> Deferred[Token | None]: ...


class IndexedTokenQueries:
    """
    The token store queries that follow from an index of (provider, bucket)
    entries and the request counters, for the stores that keep such an index
    (the keyring's and Redis's), mixed in after their base class.
    """

    def list_providers(self: _IndexedTokenStore) -> Deferred[list[str]]:
        return self._entries().addCallback(lambda index: sorted({p for p, _ in index}))

    def list_buckets(self: _IndexedTokenStore, provider: str) -> Deferred[list[str]]:
        return self._entries().addCallback(
            lambda index: sorted(b for p, b in index if p == provider)
        )

    def get_bucket_stats(
        self: _IndexedTokenStore, provider: str, bucket: str | None = None
    ) -> Deferred[BucketStats | None]:
        return self.counters.stats_if_stored(self.get_token(provider, bucket), provider, bucket)

    def record_request(
        self: _IndexedTokenStore, provider: str, bucket: str | None, when: float
    ) -> None:
        self.counters.record(provider, bucket, when)
