"""
A synchronous stand-in for L{credproxy.stores.BlockingCalls}: the call runs
at once on the caller's thread, so a store over it can be tested with
C{successResultOf} and no reactor, while its backend stays real.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from credproxy.stores._interfaces import StoreNotRunning
from credproxy.stores._threads import IBlockingCalls

_T = TypeVar("_T")


@implementer(IBlockingCalls)
class InlineBlockingCalls:
    """
    Runs each call immediately and returns an already-fired Deferred.

    C{calls} counts the calls made (so a test can prove that a cached read
    made none) and C{names} records their function names in order. Setting
    C{running} to False makes calls fail as the real pool's do when stopped.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.names: list[str] = []
        self.running = True

    def __repr__(self) -> str:
        return f"<InlineBlockingCalls calls={self.calls}>"

    def run(self, f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        name = getattr(f, "__qualname__", type(f).__name__)
        if not self.running:
            return fail(StoreNotRunning(f"cannot run {name}: InlineBlockingCalls is stopped"))
        self.calls += 1
        self.names.append(name)
        try:
            result = f(*args)
        except Exception:
            return fail()
        return succeed(result)
