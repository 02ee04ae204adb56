"""
The one audit line per request. It names what was asked and what it cost,
never a header value, so no credential or placeholder can reach it.
"""

from __future__ import annotations

import re

from twisted.logger import Logger

from credproxy.http._usage import Usage

audit_log = Logger(namespace="credproxy.http.audit")

# The model an agent asked for, when the answer did not say (errors, refusals);
# only the start of the body is searched.
_MODEL = re.compile(rb'"model"\s*:\s*"([A-Za-z0-9._:@/-]{1,128})"')
_MODEL_SEARCH_SPAN = 64 * 1024


def requested_model(body: bytes) -> str | None:
    match = _MODEL.search(body, 0, _MODEL_SEARCH_SPAN)
    return match.group(1).decode("ascii") if match else None


def audit(
    *,
    method: bytes,
    path: bytes,
    status: int,
    usage: Usage | None,
    request_body: bytes,
    response_bytes: int,
    duration: float,
    outcome: str = "ok",
) -> None:
    model = usage.model if usage is not None and usage.model else requested_model(request_body)
    fields = {
        "method": method.decode("ascii", "replace"),
        "path": path.decode("ascii", "replace"),
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
    audit_log.info("{line}", line=line, **fields)
