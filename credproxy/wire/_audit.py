"""
The credential socket's audit trail: one structured line per connection
event and per op (the protocol reference (docs/wire.md)). It names ops, providers,
buckets and key names, never a token, key, code, verifier or session id;
a sandbox's misses name nothing (the op handlers leave those fields empty).
"""

from __future__ import annotations

from typing import Final

from twisted.internet.interfaces import IReactorTime

from credproxy._audit_trail import IAuditTrail
from credproxy._limits import FLOOD_LOG_INTERVAL, FloodLog
from credproxy.wire._ops import AuditRecord

AUDIT_NAMESPACE: Final = "credproxy.wire.audit"

# Names come from the client: cut them short and escape anything that is not
# printable ASCII, so a name can neither flood the log nor forge a line.
_NAME_LIMIT: Final = 128


def printable(name: str | None) -> str | None:
    if name is None:
        return None
    if len(name) <= _NAME_LIMIT and name.isascii() and name.isprintable():
        return name  # the usual case, checked in C
    shown = name[:_NAME_LIMIT].encode("ascii", "backslashreplace").decode("ascii")
    shown = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in shown)
    return shown + "..." if len(name) > _NAME_LIMIT else shown


def connection_event(trail: IAuditTrail, connection: int, event: str, **details: object) -> None:
    """
    C{event} is one of connected, handshake, refused, closed; C{details}
    are numbers, booleans and fixed words only.
    """
    shown = " ".join(f"{k}={v}" for k, v in details.items())
    trail.record(
        AUDIT_NAMESPACE,
        {"connection": connection, "event": event, **details},
        f"credential socket conn={connection} {event} {shown}",
    )


class RefusalLog:
    """
    The C{refused} lines of one server, through a L{FloodLog}: under a flood
    of refusals the log gets at most one line a second per kind, the next
    line of that kind says (C{suppressed=N}) how many were left out, and
    the count of a flood's tail comes in a C{refusals_suppressed} line.
    """

    def __init__(
        self, clock: IReactorTime, trail: IAuditTrail, interval: float = FLOOD_LOG_INTERVAL
    ) -> None:
        self._trail = trail
        self._log = FloodLog(clock, self._summarize, interval)

    def refused(self, connection: int, kind: str, **details: object) -> None:
        """
        One refusal of C{kind} (a fixed word, the gate keeps one entry per
        word); C{details} are numbers, booleans and fixed words only.
        """
        suppressed = self._log.admit(kind)
        if suppressed is not None:
            connection_event(
                self._trail, connection, "refused", reason=kind, **details, suppressed=suppressed
            )

    def closed_before_handshake(self, connection: int, reason: str) -> None:
        """
        A connection that went without a handshake (and without a refusal):
        its one C{closed} line, flood-gated like a refusal, so a flood of
        connections that never handshake stays a trickle in the log.
        C{reason} is a L{CloseReason} word or C{peer}.
        """
        kind = "closed_before_handshake_" + reason
        suppressed = self._log.admit(kind)
        if suppressed is not None:
            connection_event(
                self._trail,
                connection,
                "closed",
                reason=reason,
                handshaken=False,
                suppressed=suppressed,
            )

    def _summarize(self, kind: str, left_out: int) -> None:
        connection_event(self._trail, 0, "refusals_suppressed", reason=kind, suppressed=left_out)

    def stop(self) -> None:
        """
        Write every summary still owed now (at shutdown).
        """
        self._log.stop()


def op_done(trail: IAuditTrail, connection: int, record: AuditRecord, duration: float) -> None:
    """
    The op's line, rendered here in one f-string: a log observer then formats
    a single field instead of eight, which is most of an audit line's cost
    under twistd. The fields stay in the event for structured observers.
    """
    op = printable(record.op)
    provider, bucket, key = (
        printable(record.provider),
        printable(record.bucket),
        printable(record.key),
    )
    duration_ms = round(duration * 1000, 2)
    trail.record(
        AUDIT_NAMESPACE,
        {
            "connection": connection,
            "op": op,
            "provider": provider,
            "bucket": bucket,
            "key": key,
            "status": record.status,
            "count": record.count,
            "duration_ms": duration_ms,
        },
        f"credential socket conn={connection} op={op} provider={provider} bucket={bucket} "
        f"key={key} status={record.status} count={record.count} duration_ms={duration_ms}",
    )
