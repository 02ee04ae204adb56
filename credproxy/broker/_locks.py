"""
Per-entry serialization of the broker's read-merge-write cycles.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from twisted.internet.defer import DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from credproxy.stores._interfaces import ICompareAndSetTokenStore, IHostTokenStore, StoreError
from credproxy.stores._token import Token

T = TypeVar("T")

# Saves of one entry that may lose a compare-and-set race in a row before
# the broker gives up: each loss means another host saved the entry in the
# moment between our read and our save, so a few are already unlikely.
MAX_MERGE_ATTEMPTS = 8

# After a lost race the save waits a random time of up to
# MERGE_BACKOFF_FIRST seconds before it reads again, the bound doubling with
# each further loss up to MERGE_BACKOFF_MAX: hosts that collided spread out
# instead of colliding again in lockstep (without it, three hosts saving at
# once could make one of them lose eight times in a row). All the waits of
# one save together stay under 0.6 s.
MERGE_BACKOFF_FIRST = 0.005
MERGE_BACKOFF_MAX = 0.2


def merge_backoff_bound(losses: int) -> float:
    """
    The longest wait, in seconds, after the save's C{losses}-th lost race.
    """
    return min(MERGE_BACKOFF_MAX, MERGE_BACKOFF_FIRST * 2.0 ** (losses - 1))


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
    clock: IReactorTime,
    fresh: bool = False,
    uniform: Callable[[float, float], float] = random.uniform,
) -> Token | None:
    """
    Read the entry, C{merge} it (None: store nothing) and save the result:
    the one read-merge-write of the broker, run inside the entry's lock.

    On a store several hosts write (L{ICompareAndSetTokenStore}), the read
    is of Redis itself and the save succeeds only if nobody saved since; a
    lost race waits a random moment on C{clock} (see L{merge_backoff_bound};
    C{uniform(0, bound)} picks it) and reads and merges again, up to
    L{MAX_MERGE_ATTEMPTS} times. On
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
    for attempt in range(MAX_MERGE_ATTEMPTS):
        if attempt:
            await deferLater(clock, uniform(0.0, merge_backoff_bound(attempt)))
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
