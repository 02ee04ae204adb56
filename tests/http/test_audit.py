"""
The audit line as observers write it: the same text through twisted.logger's
flattened fast path as through its formatter, in text and in JSON.
"""

from __future__ import annotations

import json

from twisted.logger import LogEvent, eventAsJSON, eventFromJSON, formatEvent
from twisted.logger._flatten import KeyFlattener
from twisted.trial.unittest import SynchronousTestCase

from credproxy.http._audit import _LINE_KEY, audit
from credproxy.http._body import RequestBody
from credproxy.http._usage import Usage
from tests.logcapture import captured_log

EXPECTED = (
    "POST /v1/messages 200 ok model=claude-test input_tokens=12 output_tokens=34 "
    "bytes=567 duration_ms=8.9"
)


def _one_audit_event() -> LogEvent:
    with captured_log() as events:
        audit(
            method=b"POST",
            path=b"/v1/messages?beta=true",
            status=200,
            usage=Usage("claude-test", 12, 34),
            request_body=RequestBody(),
            response_bytes=567,
            duration=0.0089,
        )
    (event,) = [e for e in events if e["log_namespace"] == "credproxy.http.audit"]
    return event


class AuditLineTests(SynchronousTestCase):
    def test_the_text_is_the_line(self) -> None:
        self.assertEqual(formatEvent(_one_audit_event()), EXPECTED)

    def test_the_flattened_text_is_what_the_formatter_gives(self) -> None:
        event = dict(_one_audit_event())
        fast = formatEvent(event)
        del event["log_flattened"]
        self.assertEqual(formatEvent(event), fast)

    def test_the_key_is_twisteds_own(self) -> None:
        self.assertEqual(_LINE_KEY, KeyFlattener().flatKey("line", "", "s"))
        self.assertEqual(_LINE_KEY, "line!s:")

    def test_json_keeps_the_fields_and_reads_back_as_the_line(self) -> None:
        event = _one_audit_event()
        serialized = eventAsJSON(event)
        fields = json.loads(serialized)
        self.assertEqual(fields["status"], 200)
        self.assertEqual(fields["input_tokens"], 12)
        self.assertEqual(formatEvent(eventFromJSON(serialized)), EXPECTED)
