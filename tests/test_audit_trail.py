"""
The audit trails: twisted.logger events by default; a JSON-lines file of
their own, written in batches, refusing files others could read, following
rotation, and bounded while writes fail.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from credproxy._audit_trail import (
    FLUSH_INTERVAL,
    MAX_BUFFERED_BYTES,
    MAX_HELD_BYTES,
    REOPEN_CHECK_INTERVAL,
    AuditLogError,
    FileAuditTrail,
    LogAuditTrail,
)
from tests.logcapture import captured_log

NAMESPACE = "credproxy.http.audit"


def _lines(path: str) -> list[dict[str, object]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f.read().splitlines()]


class LogTrailTests(SynchronousTestCase):
    def test_a_record_is_an_info_event_with_its_fields(self) -> None:
        with captured_log() as events:
            LogAuditTrail().record(NAMESPACE, {"status": 200, "outcome": "ok"}, "POST / 200 ok")
        [event] = [e for e in events if e.get("log_namespace") == NAMESPACE]
        self.assertEqual(event["line"], "POST / 200 ok")
        self.assertEqual((event["status"], event["outcome"]), (200, "ok"))
        self.assertEqual(event["log_format"], "{line}")


class FileTrailTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp()
        self.addCleanup(_remove_tree, self.directory)
        self.path = os.path.join(self.directory, "audit.jsonl")
        self.clock = Clock()
        self.clock.advance(1_764_600_000.25)

    def trail(self, **kwargs: object) -> FileAuditTrail:
        trail = FileAuditTrail(self.clock, self.path, **kwargs)  # type: ignore[arg-type]
        trail.startService()
        self.addCleanup(trail.stopService)
        return trail

    def test_records_are_written_as_json_lines_within_the_flush_interval(self) -> None:
        trail = self.trail()
        trail.record(NAMESPACE, {"status": 200, "model": None}, "line")
        self.assertEqual(_lines(self.path), [])  # not yet
        self.clock.advance(FLUSH_INTERVAL)
        self.assertEqual(
            _lines(self.path),
            [
                {
                    "time": "2025-12-01T14:40:00.250Z",
                    "log": NAMESPACE,
                    "status": 200,
                    "model": None,
                }
            ],
        )
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)

    def test_a_full_buffer_is_written_at_once(self) -> None:
        trail = self.trail()
        big = "x" * 1000
        count = MAX_BUFFERED_BYTES // 1000 + 1
        for n in range(count):
            trail.record(NAMESPACE, {"n": n, "pad": big}, "line")
        # No time passed: the batch that reached the bound is in the file.
        self.assertGreaterEqual(os.path.getsize(self.path), MAX_BUFFERED_BYTES)
        self.assertEqual([r["n"] for r in _lines(self.path)], list(range(len(_lines(self.path)))))
        self.clock.advance(FLUSH_INTERVAL)
        self.assertEqual(len(_lines(self.path)), count)

    def test_stopping_writes_what_is_buffered_and_closes(self) -> None:
        trail = self.trail()
        trail.record(NAMESPACE, {"n": 1}, "line")
        trail.stopService()
        self.assertEqual([r["n"] for r in _lines(self.path)], [1])
        trail.record(NAMESPACE, {"n": 2}, "line")  # after the stop: dropped, no error
        self.assertEqual(len(_lines(self.path)), 1)

    def test_an_existing_file_is_appended_to(self) -> None:
        with open(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write('{"earlier":true}\n')
        trail = self.trail()
        trail.record(NAMESPACE, {"n": 1}, "line")
        trail.flush()
        self.assertEqual(_lines(self.path)[0], {"earlier": True})
        self.assertEqual(_lines(self.path)[1]["n"], 1)

    def test_files_others_may_read_links_and_non_files_are_refused(self) -> None:
        with open(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600), "w"):
            pass
        os.chmod(self.path, 0o640)
        with self.assertRaises(AuditLogError) as raised:
            FileAuditTrail(self.clock, self.path)
        self.assertIn("may be read or written by others (mode 640", str(raised.exception))
        link = os.path.join(self.directory, "link.jsonl")
        os.symlink(self.path, link)
        with self.assertRaises(AuditLogError) as raised:
            FileAuditTrail(self.clock, link)
        self.assertEqual(str(raised.exception), f"audit log {link} is a symbolic link")
        with self.assertRaises(AuditLogError) as raised:
            FileAuditTrail(self.clock, self.directory)
        self.assertIn("cannot open audit log", str(raised.exception))
        with self.assertRaises(AuditLogError) as raised:
            FileAuditTrail(self.clock, os.path.join(self.directory, "missing", "a.jsonl"))
        self.assertIn("No such file or directory", str(raised.exception))

    def test_a_rotated_file_is_followed_by_a_new_one_at_the_path(self) -> None:
        trail = self.trail()
        trail.record(NAMESPACE, {"n": 1}, "line")
        trail.flush()
        rotated = self.path + ".1"
        os.rename(self.path, rotated)
        self.clock.advance(REOPEN_CHECK_INTERVAL)
        trail.record(NAMESPACE, {"n": 2}, "line")
        trail.flush()
        self.assertEqual([r["n"] for r in _lines(rotated)], [1])
        self.assertEqual([r["n"] for r in _lines(self.path)], [2])
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)

    def test_while_writes_fail_records_are_held_to_a_bound_then_counted(self) -> None:
        failing = [True]

        def write(fd: int, data: bytes) -> int:
            if failing[0]:
                raise OSError(errno.ENOSPC, "No space left on device")
            return os.write(fd, data)

        trail = self.trail(write=write)
        pad = "y" * 4000
        sent = MAX_HELD_BYTES // 4000 + 50
        for n in range(sent):
            trail.record(NAMESPACE, {"n": n, "pad": pad}, "line")
        self.clock.advance(FLUSH_INTERVAL)
        self.assertGreater(trail.dropped, 0)
        dropped = trail.dropped
        failing[0] = False
        self.clock.advance(FLUSH_INTERVAL)
        records = _lines(self.path)
        kept = [r for r in records if "n" in r]
        self.assertEqual([r["n"] for r in kept], list(range(sent - dropped)))
        self.assertEqual(
            records[-1],
            {"log": "credproxy.audit", "event": "audit_records_dropped", "count": dropped},
        )
        self.assertEqual(trail.dropped, 0)


def _remove_tree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
