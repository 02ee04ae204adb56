"""
The one audit line per request. It names what was asked and what it cost,
never a header value, so no credential or placeholder can reach it.
"""

from __future__ import annotations

import re
from typing import Final

from twisted.internet.interfaces import IReactorTime

from credproxy._audit_trail import IAuditTrail
from credproxy._limits import FloodLog
from credproxy.http._body import RequestBody
from credproxy.http._usage import Usage

AUDIT_NAMESPACE: Final = "credproxy.http.audit"

# The model an agent asked for, when the answer did not say (errors, refusals);
# only the start of the body is searched.
_MODEL = re.compile(rb'"model"\s*:\s*"([A-Za-z0-9._:@/-]{1,128})"')
_MODEL_SEARCH_SPAN = 64 * 1024
# An audit line shows at most this much of the path (never the query): the
# forwarded paths are short, and a bogus one must not fill the log.
MAX_AUDIT_PATH: Final = 256
_CUT_MARKER: Final = "...[cut]"
_EMPTY_BODY: Final = RequestBody()


def shown_path(path: bytes) -> str:
    """
    The path as an audit line shows it: printable ASCII, cut with a marker.
    """
    path = path.partition(b"?")[0]
    shown = path[:MAX_AUDIT_PATH].decode("ascii", "backslashreplace")
    if not shown.isprintable():
        shown = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in shown)
    return shown + _CUT_MARKER if len(path) > MAX_AUDIT_PATH else shown


def requested_model(body: RequestBody) -> str | None:
    match = _MODEL.search(body.prefix(_MODEL_SEARCH_SPAN), 0, _MODEL_SEARCH_SPAN)
    return match.group(1).decode("ascii") if match else None


def audit(
    trail: IAuditTrail,
    *,
    method: bytes,
    path: bytes,
    status: int,
    usage: Usage | None,
    request_body: RequestBody,
    response_bytes: int,
    duration: float,
    outcome: str = "ok",
    suppressed: int = 0,
    detail: str = "",
) -> None:
    model = usage.model if usage is not None and usage.model else requested_model(request_body)
    fields = {
        "method": method.decode("ascii", "replace"),
        "path": shown_path(path),
        "status": status,
        "outcome": outcome,
        "model": model,
        "input_tokens": usage.input_tokens if usage else None,
        "output_tokens": usage.output_tokens if usage else None,
        "bytes": response_bytes,
        "duration_ms": round(duration * 1000, 1),
    }
    # Rendered here in one f-string, so a log observer formats one field
    # instead of nine (most of an audit line's cost under twistd); the
    # fields stay in the event for structured observers.
    line = (
        f"{fields['method']} {fields['path']} {status} {outcome} model={model} "
        f"input_tokens={fields['input_tokens']} output_tokens={fields['output_tokens']} "
        f"bytes={response_bytes} duration_ms={fields['duration_ms']}"
    )
    if detail:
        line += " " + detail  # fixed words and numbers only
        fields["detail"] = detail
    if suppressed:
        # The flood gate left out this many refusals like this one.
        line += f" suppressed={suppressed}"
        fields["suppressed"] = suppressed
    trail.record(AUDIT_NAMESPACE, fields, line)


class RefusalAudit:
    """
    The audit lines of refusals, at most one per second per outcome (each
    saying how many like it were left out, and a C{refusals_suppressed}
    line for the tail of a flood), so a flood of bad requests costs the log
    one line a second. One per face; L{stop} it with the face.
    """

    def __init__(self, clock: IReactorTime, trail: IAuditTrail) -> None:
        self._clock = clock
        self._trail = trail
        self._log = FloodLog(clock, self._summarize)

    def refused(
        self,
        *,
        method: bytes,
        path: bytes,
        status: int,
        outcome: str,
        response_bytes: int,
        started: float | None = None,
        detail: str = "",
    ) -> None:
        """
        C{outcome} is one of a fixed set of words (the gate keeps one entry per word).
        """
        suppressed = self._log.admit(outcome)
        if suppressed is None:
            return
        now = self._clock.seconds()
        audit(
            self._trail,
            method=method,
            path=path,
            status=status,
            usage=None,
            request_body=_EMPTY_BODY,
            response_bytes=response_bytes,
            duration=now - started if started is not None else 0.0,
            outcome=outcome,
            suppressed=suppressed,
            detail=detail,
        )

    def _summarize(self, outcome: str, left_out: int) -> None:
        self._trail.record(
            AUDIT_NAMESPACE,
            {"event": "refusals_suppressed", "outcome": outcome, "suppressed": left_out},
            f"refusals_suppressed outcome={outcome} suppressed={left_out}",
        )

    def stop(self) -> None:
        """
        Write the counts still owed (at shutdown).
        """
        self._log.stop()
