"""
Capturing twisted.logger events in tests, and rendering them the way an
observer would, so a test can assert that no secret reaches any field.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher


@contextmanager
def captured_log() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)


def log_text(events: list[LogEvent]) -> str:
    """
    Every event as an observer would write it: formatted text plus every
    field's repr, so a secret in any field is found.
    """
    return "\n".join(f"{formatEvent(e)} {e!r}" for e in events)
