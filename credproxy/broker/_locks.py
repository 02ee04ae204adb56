"""
Per-entry serialization of the broker's read-merge-write cycles.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from twisted.internet.defer import DeferredLock

from credproxy.stores._interfaces import ICompareAndSetTokenStore, IHostTokenStore, StoreError
from credproxy.stores._token import Token

T = TypeVar("T")

# Saves of one entry that may lose a compare-and-set race in a row before
# the broker gives up: each loss means another host saved the entry in the
# moment between our read and our save, so a few are already unlikely.
MAX_MERGE_ATTEMPTS = 8


class EntryLocks:
    """
    One lock per (provider, bucket) while someone holds or awaits it, so a
    save's read-merge-write cannot interleave with another save or a refresh
    and lose a field. Unused locks are dropped, so the map stays as small as
    the number of writes in flight.
    """

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], DeferredLock] = {}

    def __len__(self) -> int:
        return len(self._locks)

    async def run(self, entry: tuple[str, str], work: Callable[[], Awaitable[T]]) -> T:
        lock = self._locks.setdefault(entry, DeferredLock())
        await lock.acquire()
        try:
            return await work()
        finally:
            lock.release()
            if not lock.locked and not lock.waiting and self._locks.get(entry) is lock:
                del self._locks[entry]


async def merge_into_store(
    store: IHostTokenStore,
    provider: str,
    bucket: str,
    merge: Callable[[Token | None], Token | None],
    *,
    fresh: bool = False,
) -> Token | None:
    """
    Read the entry, C{merge} it (None: store nothing) and save the result:
    the one read-merge-write of the broker, run inside the entry's lock.

    On a store several hosts write (L{ICompareAndSetTokenStore}), the read
    is of Redis itself and the save succeeds only if nobody saved since; a
    lost race reads and merges again, up to L{MAX_MERGE_ATTEMPTS} times. On
    other stores the entry lock alone serializes it; C{fresh} first forgets
    any cached read, since another process may have written.

    @raise StoreError: the store failed, or the entry kept changing.
    """
    if not ICompareAndSetTokenStore.providedBy(store):
        if fresh:
            store.invalidate(provider, bucket)
        merged = merge(await store.get_token(provider, bucket))
        if merged is not None:
            await store.save_token(provider, merged, bucket)
        return merged
    shared = ICompareAndSetTokenStore(store)
    for _ in range(MAX_MERGE_ATTEMPTS):
        current, version = await shared.read_token_version(provider, bucket)
        merged = merge(current)
        if merged is None:
            return None
        if await shared.save_token_if(provider, merged, bucket, version):
            return merged
    raise StoreError(
        f"the token of {provider}/{bucket} changed under {MAX_MERGE_ATTEMPTS} saves in a row;"
        " not saved"
    )
