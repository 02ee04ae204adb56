"""
Per-entry serialization of the broker's read-merge-write cycles.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from twisted.internet.defer import DeferredLock

T = TypeVar("T")


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
