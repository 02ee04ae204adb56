"""
What both faces bound the same way: connection slots per face and per peer,
who a peer is, and the flood gate that keeps a refusal storm from becoming a
log storm. Each face keeps its own L{ConnectionSlots}, so a flood on one
never takes the other's.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Final

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from credproxy._listen import PeerCredentials, peer_credentials

# Connections one face keeps at once. Far below a default fd limit raised for
# a server (twistd and systemd units give 1024-65536 descriptors), so a
# flood on one face leaves descriptors for the other and for the upstream.
DEFAULT_MAX_CONNECTIONS: Final = 1024
# Connections one peer (a uid on a Unix socket, an address on TCP) keeps on
# one face: a quarter of the face, so one agent cannot take it all.
DEFAULT_MAX_CONNECTIONS_PER_PEER: Final = 256
# At most one refusal line per kind in this many seconds; the next says how
# many were not written.
FLOOD_LOG_INTERVAL: Final = 1.0


@dataclass(frozen=True)
class ConnectionLimits:
    """
    How many connections one face, and one peer on it, may hold.
    """

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_per_peer: int = DEFAULT_MAX_CONNECTIONS_PER_PEER

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_per_peer < 1:
            raise ValueError("connection limits must be at least 1")


class SlotRefusal:
    """
    Why a connection got no slot, as the audit line says it.
    """

    FACE_FULL: Final = "too_many_connections"
    PEER_FULL: Final = "too_many_connections_from_peer"


def peer_key(transport: object, credentials: PeerCredentials | None = None) -> Hashable:
    """
    Who is at the other end, for counting: the kernel-reported uid on a Unix
    socket (all of one user's processes are one peer), else the address.
    C{credentials} are the transport's, when the caller has read them already.
    """
    if credentials is None:
        credentials = peer_credentials(transport)
    if credentials is not None:
        return ("uid", credentials.uid)
    get_peer = getattr(transport, "getPeer", None)
    address = get_peer() if get_peer is not None else None
    return ("host", getattr(address, "host", None))


class ConnectionSlots:
    """
    The connections of one face, counted in total and per peer.
    """

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.total = 0
        self._per_peer: dict[Hashable, int] = {}

    def take(self, peer: Hashable) -> str | None:
        """
        Count a new connection of C{peer}, or say why it may not have one
        (a L{SlotRefusal}); a refused connection holds nothing.
        """
        if self.total >= self.limits.max_connections:
            return SlotRefusal.FACE_FULL
        held = self._per_peer.get(peer, 0)
        if held >= self.limits.max_per_peer:
            return SlotRefusal.PEER_FULL
        self.total += 1
        self._per_peer[peer] = held + 1
        return None

    def give_back(self, peer: Hashable) -> None:
        """
        Forget one connection of C{peer} that L{take} counted.
        """
        held = self._per_peer.get(peer, 0)
        if held <= 0:
            return
        self.total -= 1
        if held == 1:
            del self._per_peer[peer]
        else:
            self._per_peer[peer] = held - 1

    def held_by(self, peer: Hashable) -> int:
        return self._per_peer.get(peer, 0)


class FloodGate:
    """
    Lets through at most one line per kind per L{FLOOD_LOG_INTERVAL}: under a
    flood of refusals the log gets one line a second per kind, each saying
    how many like it were left out.
    """

    def __init__(self, clock: IReactorTime, interval: float = FLOOD_LOG_INTERVAL) -> None:
        self._clock = clock
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def admit(self, kind: str) -> int | None:
        """
        None when a line of this C{kind} must not be written now; otherwise
        the number of lines of this kind left out since the last one written.
        """
        now = self._clock.seconds()
        last = self._last.get(kind)
        if last is not None and now - last < self._interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return None
        self._last[kind] = now
        return self._suppressed.pop(kind, 0)

    def flush(self, kind: str) -> int:
        """
        The number of lines of this C{kind} left out since the last one
        written, for a summary line written now (when a flood has stopped,
        or at shutdown): without it the count of a flood's tail would wait
        for the next line of its kind, which may never come. The summary
        counts as a line, so the kind's interval starts again now.
        """
        self._last[kind] = self._clock.seconds()
        return self._suppressed.pop(kind, 0)


class FloodLog:
    """
    A L{FloodGate} that leaves no refusal uncounted: when a flood stops,
    the count of its tail (the lines left out since the last one written)
    goes to C{summarize(kind, count)} one interval later, or at L{stop}.
    """

    def __init__(
        self,
        clock: IReactorTime,
        summarize: Callable[[str, int], None],
        interval: float = FLOOD_LOG_INTERVAL,
    ) -> None:
        self._clock = clock
        self._summarize = summarize
        self._interval = interval
        self._gate = FloodGate(clock, interval)
        self._summaries: dict[str, IDelayedCall] = {}

    def admit(self, kind: str) -> int | None:
        """
        As L{FloodGate.admit}: None when this line of C{kind} (a fixed word)
        must not be written, else how many like it were left out before it.
        """
        suppressed = self._gate.admit(kind)
        if suppressed is None:
            if kind not in self._summaries:
                self._summaries[kind] = self._clock.callLater(self._interval, self._tail, kind)
            return None
        summary = self._summaries.pop(kind, None)
        if summary is not None and summary.active():
            summary.cancel()  # the line now written carries the count
        return suppressed

    def _tail(self, kind: str) -> None:
        del self._summaries[kind]
        left_out = self._gate.flush(kind)
        if left_out:
            self._summarize(kind, left_out)

    def stop(self) -> None:
        """
        Write every summary still owed now and cancel its timer (at shutdown,
        so no timer outlives the face and no count is lost).
        """
        for kind, summary in list(self._summaries.items()):
            if summary.active():
                summary.cancel()
                self._tail(kind)
        self._summaries.clear()
