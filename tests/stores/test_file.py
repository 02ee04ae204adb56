"""
The file stores: the store contract, modes (directory 0700, files 0600),
atomic replacement (a failed or crashed rename leaves the old file), several
real processes writing one directory at once without losing an entry, the
lock wait bound, the file size bound, corrupt files as errors that are never
overwritten, and reads cached until the change marker says another store (or
another process) wrote, or until invalidated.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from typing import TypeVar

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from credproxy._secret import Secret
from credproxy.stores import (
    BlockingCalls,
    FileProviderKeyStore,
    FileTokenStore,
    IProviderKeyStore,
    ITokenStore,
    StoreCorrupt,
    StoreError,
    Token,
)
from credproxy.stores._file import (
    CHANGE_MARKER_FILE,
    MARKER_MAX_SIZE,
    MAX_FILE_SIZE,
    ChangeMarker,
    MarkerWatch,
    write_atomically,
)
from credproxy.testing import InlineBlockingCalls
from tests.logcapture import captured_log, log_text
from tests.stores.contract import (
    ACCESS,
    KEY,
    REFRESH,
    KeyStoreContractMixin,
    TokenStoreContractMixin,
    token,
)

_T = TypeVar("_T")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class FileCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = tempfile.mkdtemp(prefix="cp-files-")
        self.directory = os.path.join(self.base, "state", "credproxy")
        self.tokens_path = os.path.join(self.directory, "tokens.json")
        self.keys_path = os.path.join(self.directory, "keys.json")
        self.calls = InlineBlockingCalls()
        super().setUp()

    def tearDown(self) -> None:
        subprocess.run(["rm", "-rf", self.base], check=True)
        super().tearDown()

    def tokens(self, **kwargs: float) -> FileTokenStore:
        return FileTokenStore(self.directory, self.calls, **kwargs)  # type: ignore[arg-type]

    def keys(self) -> FileProviderKeyStore:
        return FileProviderKeyStore(self.directory, self.calls)

    def write_raw(self, path: str, data: bytes) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)

    def read_raw(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()


class FileTokenStoreContractTests(TokenStoreContractMixin, FileCase):
    def make_store(self) -> ITokenStore:
        return self.tokens()


class FileKeyStoreContractTests(KeyStoreContractMixin, FileCase):
    def make_store(self) -> IProviderKeyStore:
        return self.keys()


class FileTokenStoreTests(FileCase):
    def test_description(self) -> None:
        self.assertEqual(self.tokens().description, f"file ({self.tokens_path})")
        self.assertEqual(self.keys().description, f"file ({self.keys_path})")

    def test_nothing_is_created_by_reading(self) -> None:
        self.assertEqual(self.successResultOf(self.tokens().list_providers()), [])
        self.assertFalse(os.path.exists(self.directory))

    def test_modes(self) -> None:
        old = os.umask(0o022)
        try:
            self.successResultOf(self.tokens().save_token("anthropic", token()))
            self.successResultOf(self.keys().save_key("anthropic", Secret(KEY)))
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(os.stat(self.directory).st_mode), 0o700)
        names = ["tokens.json", "tokens.json.lock", "keys.json", "keys.json.lock", "changed"]
        for name in names:
            mode = stat.S_IMODE(os.stat(os.path.join(self.directory, name)).st_mode)
            self.assertEqual(mode, 0o600, name)

    def test_an_open_directory_is_made_private(self) -> None:
        os.makedirs(self.directory)
        os.chmod(self.directory, 0o755)  # noqa: S103 - the open directory under test
        self.successResultOf(self.tokens().save_token("anthropic", token()))
        self.assertEqual(stat.S_IMODE(os.stat(self.directory).st_mode), 0o700)

    def test_state_dir_not_a_directory(self) -> None:
        self.write_raw(self.directory, b"")
        error = self.failureResultOf(self.tokens().save_token("p", token()), StoreError).value
        self.assertIn("is not a directory", str(error))

    def test_content_on_disk(self) -> None:
        self.successResultOf(self.tokens().save_token("anthropic", token(), "work"))
        self.assertEqual(
            json.loads(self.read_raw(self.tokens_path)),
            {"version": 1, "tokens": {"anthropic": {"work": token().to_json()}}},
        )
        self.successResultOf(self.keys().save_key("openai", Secret(KEY)))
        self.assertEqual(
            json.loads(self.read_raw(self.keys_path)), {"version": 1, "keys": {"openai": KEY}}
        )

    def test_persists(self) -> None:
        self.successResultOf(self.tokens().save_token("anthropic", token(), "work"))
        got = self.successResultOf(self.tokens().get_token("anthropic", "work"))
        self.assertEqual(got and got.refresh_token, REFRESH)

    def test_reads_are_cached_while_nothing_changes(self) -> None:
        mine = self.tokens()
        self.successResultOf(mine.save_token("anthropic", token("old")))
        before = self.calls.calls
        for _ in range(3):  # its own write bumped the marker, and that costs no re-read
            self.successResultOf(mine.get_token("anthropic"))
            self.successResultOf(mine.list_providers())
            self.successResultOf(mine.get_bucket_stats("anthropic"))
        self.assertEqual(self.calls.calls, before)

    def test_another_stores_write_is_seen_by_the_next_read(self) -> None:
        mine, other = self.tokens(), self.tokens()  # other: another process
        self.successResultOf(mine.save_token("anthropic", token("old")))
        got = self.successResultOf(mine.get_token("anthropic"))
        self.assertEqual(got and got["access_token"], "old")
        self.successResultOf(other.save_token("anthropic", token("new")))
        self.successResultOf(other.save_token("openai", token()))
        before = self.calls.calls
        got = self.successResultOf(mine.get_token("anthropic"))
        self.assertEqual(got and got["access_token"], "new")
        self.assertEqual(self.successResultOf(mine.list_providers()), ["anthropic", "openai"])
        self.assertEqual(self.calls.calls, before + 1)  # one re-read, then cached again
        self.successResultOf(other.remove_token("openai"))
        self.assertEqual(self.successResultOf(mine.list_providers()), ["anthropic"])

    def test_a_change_behind_the_markers_back_needs_invalidate(self) -> None:
        mine = self.tokens()
        self.successResultOf(mine.save_token("anthropic", token("old")))
        changed = json.loads(self.read_raw(self.tokens_path))
        changed["tokens"]["anthropic"]["default"]["access_token"] = "new"
        self.write_raw(self.tokens_path, json.dumps(changed).encode())  # no marker bump
        got = self.successResultOf(mine.get_token("anthropic"))
        self.assertEqual(got and got["access_token"], "old")
        mine.invalidate("anthropic")
        got = self.successResultOf(mine.get_token("anthropic"))
        self.assertEqual(got and got["access_token"], "new")

    def test_a_write_keeps_what_another_process_wrote(self) -> None:
        mine, other = self.tokens(), self.tokens()
        self.successResultOf(mine.list_providers())  # cached: empty
        self.successResultOf(other.save_token("openai", token()))
        self.successResultOf(mine.save_token("anthropic", token()))
        self.assertEqual(self.successResultOf(mine.list_providers()), ["anthropic", "openai"])

    def test_key_reads_are_cached_until_another_store_writes(self) -> None:
        mine, other = self.keys(), self.keys()
        self.successResultOf(mine.save_key("anthropic", Secret("old")))
        before = self.calls.calls
        self.assertEqual(self.successResultOf(mine.get_key("anthropic")), Secret("old"))
        self.assertEqual(self.successResultOf(mine.list_keys()), ["anthropic"])
        self.assertEqual(self.calls.calls, before)
        self.successResultOf(other.save_key("anthropic", Secret("new")))
        self.successResultOf(other.save_key("openai", Secret("o")))
        self.assertEqual(self.successResultOf(mine.get_key("anthropic")), Secret("new"))
        self.assertEqual(self.successResultOf(mine.list_keys()), ["anthropic", "openai"])
        self.assertTrue(self.successResultOf(other.delete_key("openai")))
        self.assertFalse(self.successResultOf(mine.has_key("openai")))

    def test_a_key_write_is_seen_by_the_token_store_too(self) -> None:
        # One marker for the whole directory: a write to keys.json makes the
        # token store re-read once (harmless), and never miss a change.
        tokens = self.tokens()
        self.successResultOf(tokens.list_providers())
        self.successResultOf(self.keys().save_key("anthropic", Secret(KEY)))
        before = self.calls.calls
        self.successResultOf(tokens.list_providers())
        self.assertEqual(self.calls.calls, before + 1)

    # -- atomicity ------------------------------------------------------------

    def test_failed_rename_leaves_the_old_file(self) -> None:
        self.write_raw(self.tokens_path, b"old content")

        def fail_rename(source: str, target: str) -> None:
            self.assertEqual(stat.S_IMODE(os.stat(source).st_mode), 0o600)
            with open(source, "rb") as f:
                self.assertEqual(f.read(), b"new content")  # written in full before the rename
            raise OSError(28, "No space left on device")

        self.assertRaises(
            OSError, write_atomically, self.tokens_path, b"new content", replace=fail_rename
        )
        self.assertEqual(self.read_raw(self.tokens_path), b"old content")
        self.assertEqual(sorted(os.listdir(self.directory)), ["tokens.json"])  # no temporary left

    @pytest.mark.slow
    def test_crash_before_the_rename_leaves_the_old_file(self) -> None:
        store = self.tokens()
        self.successResultOf(store.save_token("anthropic", token("old")))
        before = self.read_raw(self.tokens_path)
        crash = textwrap.dedent(
            """
            import os, sys
            from credproxy.stores import FileTokenStore, Token
            from credproxy.testing import InlineBlockingCalls

            def die(source, target):
                os._exit(17)  # the process dies between the temporary's fsync and the rename

            os.replace = die
            store = FileTokenStore(sys.argv[1], InlineBlockingCalls())
            store.save_token("anthropic", Token({"access_token": "new"}))
            """
        )
        result = subprocess.run(
            [sys.executable, "-c", crash, self.directory], cwd=ROOT, timeout=60, check=False
        )
        self.assertEqual(result.returncode, 17)
        self.assertEqual(self.read_raw(self.tokens_path), before)
        leftovers = [n for n in os.listdir(self.directory) if n.endswith(".tmp")]
        self.assertEqual(len(leftovers), 1)  # the crashed writer's, written in full
        got = self.successResultOf(self.tokens().get_token("anthropic"))
        self.assertEqual(got and got["access_token"], "old")
        self.successResultOf(store.save_token("openai", token()))  # the next writer cleans up
        self.assertEqual([n for n in os.listdir(self.directory) if n.endswith(".tmp")], [])

    @pytest.mark.slow
    def test_processes_writing_at_once_lose_nothing(self) -> None:
        writer = textwrap.dedent(
            """
            import sys, time
            from credproxy._secret import Secret
            from credproxy.stores import FileProviderKeyStore, FileTokenStore, Token
            from credproxy.testing import InlineBlockingCalls

            directory, who = sys.argv[1], sys.argv[2]
            count, start = int(sys.argv[3]), float(sys.argv[4])
            tokens = FileTokenStore(directory, InlineBlockingCalls())
            keys = FileProviderKeyStore(directory, InlineBlockingCalls())
            while time.time() < start:
                time.sleep(0.001)
            for i in range(count):
                for d in (tokens.save_token(f"{who}-{i}", Token({"access_token": f"{who}{i}"})),
                          keys.save_key(f"{who}-{i}", Secret(f"k{who}{i}"))):
                    failures = []
                    d.addErrback(failures.append)
                    if failures:
                        failures[0].raiseException()
            """
        )
        writers, count = 4, 15
        start = time.time() + 1.5  # every process is up before any writes
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", writer, self.directory, f"w{n}", str(count), str(start)],
                cwd=ROOT,
            )
            for n in range(writers)
        ]
        self.assertEqual([p.wait(120) for p in processes], [0] * writers)
        expected = sorted(f"w{n}-{i}" for n in range(writers) for i in range(count))
        tokens = self.tokens()
        self.assertEqual(self.successResultOf(tokens.list_providers()), expected)
        got = self.successResultOf(tokens.get_token("w3-14"))
        self.assertEqual(got and got["access_token"], "w314")
        self.assertEqual(self.successResultOf(self.keys().list_keys()), expected)

    def test_lock_wait_is_bounded(self) -> None:
        store = self.tokens(lock_timeout=0.2)
        self.successResultOf(store.save_token("anthropic", token("old")))
        before = self.read_raw(self.tokens_path)
        fd = os.open(self.tokens_path + ".lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # another process holds it
            started = time.monotonic()
            d = store.save_token("anthropic", token("new"))
            waited = time.monotonic() - started
            error = self.failureResultOf(d, StoreError).value
            self.assertIn("stayed locked", str(error))
            self.assertGreaterEqual(waited, 0.2)
            self.assertLess(waited, 5.0)
            self.assertEqual(self.read_raw(self.tokens_path), before)
        finally:
            os.close(fd)
        self.successResultOf(store.save_token("anthropic", token("new")))

    # -- the change marker ------------------------------------------------------

    def test_every_write_bumps_the_marker(self) -> None:
        marker = os.path.join(self.directory, CHANGE_MARKER_FILE)
        store, keys = self.tokens(), self.keys()
        sizes = []
        self.successResultOf(store.save_token("anthropic", token()))
        sizes.append(os.stat(marker).st_size)
        self.successResultOf(store.remove_token("anthropic"))
        sizes.append(os.stat(marker).st_size)
        self.successResultOf(keys.save_key("k", Secret(KEY)))
        sizes.append(os.stat(marker).st_size)
        self.successResultOf(keys.delete_key("k"))
        sizes.append(os.stat(marker).st_size)
        self.assertEqual(sizes, [1, 2, 3, 4])
        self.assertEqual(stat.S_IMODE(os.stat(marker).st_mode), 0o600)
        self.assertNotIn(KEY.encode(), self.read_raw(marker))

    def test_the_marker_starts_again_when_full_and_still_changes(self) -> None:
        marker = ChangeMarker(self.directory)
        self.write_raw(marker.path, b"." * MARKER_MAX_SIZE)
        seen = marker.current()
        before, after = marker.bump()
        self.assertEqual(before, seen)
        self.assertNotEqual(after, before)
        self.assertEqual(os.path.getsize(marker.path), 1)

    def test_a_marker_that_is_a_symlink_is_refused(self) -> None:
        os.makedirs(self.directory)
        target = os.path.join(self.base, "elsewhere")
        os.symlink(target, os.path.join(self.directory, CHANGE_MARKER_FILE))
        self.assertRaises(StoreError, ChangeMarker(self.directory).bump)
        self.assertFalse(os.path.exists(target))

    def test_a_write_after_someone_elses_bump_does_not_hide_it(self) -> None:
        marker = ChangeMarker(self.directory)
        watch = MarkerWatch(marker)
        marker.bump()  # another process wrote, after this store last looked
        watch.wrote(marker.bump())  # then this store's own write
        self.assertTrue(watch.changed())  # the other write is not taken for ours
        self.assertFalse(watch.changed())
        watch.wrote(marker.bump())  # nobody else in between: the cache stays
        self.assertFalse(watch.changed())

    def test_a_marker_that_cannot_be_examined_always_counts_as_changed(self) -> None:
        class Unreadable(ChangeMarker):
            def current(self) -> tuple[int, int, int, int] | None:
                raise PermissionError(13, "Permission denied")

        watch = MarkerWatch(Unreadable(self.directory))
        self.assertTrue(watch.changed())
        self.assertTrue(watch.changed())
        self.assertFalse(MarkerWatch(None).changed())

    def test_a_write_whose_marker_cannot_be_bumped_stands_and_says_so(self) -> None:
        os.makedirs(os.path.join(self.directory, CHANGE_MARKER_FILE))  # not a file
        store = self.tokens()
        with captured_log() as events:
            self.successResultOf(store.save_token("anthropic", token()))
            self.successResultOf(store.save_token("openai", token()))
        got = self.successResultOf(self.tokens().get_token("anthropic"))
        self.assertEqual(got and got.refresh_token, REFRESH)
        warnings = [formatEvent(e) for e in events if "change marker" in formatEvent(e)]
        self.assertEqual(len(warnings), 1)  # said once, not at every write
        self.assertIn("may not see this host's writes", warnings[0])
        self.assertNotIn(REFRESH, log_text(events))

    # -- bounds and corruption ---------------------------------------------------

    def test_size_bound_on_read(self) -> None:
        self.write_raw(self.tokens_path, b"")
        with open(self.tokens_path, "r+b") as f:
            f.truncate(MAX_FILE_SIZE + 1)  # sparse: cheap to make
        store = self.tokens()
        error = self.failureResultOf(store.get_token("anthropic"), StoreCorrupt).value
        self.assertIn(f"larger than {MAX_FILE_SIZE} bytes", str(error))
        self.failureResultOf(store.save_token("anthropic", token()), StoreCorrupt)
        self.assertEqual(os.path.getsize(self.tokens_path), MAX_FILE_SIZE + 1)

    def test_a_file_at_the_size_bound_is_read(self) -> None:
        content = json.dumps({"version": 1, "tokens": {"p": {"default": {"access_token": "a"}}}})
        padded = content.encode() + b" " * (MAX_FILE_SIZE - len(content))
        self.write_raw(self.tokens_path, padded)
        self.assertEqual(os.path.getsize(self.tokens_path), MAX_FILE_SIZE)
        self.assertEqual(self.successResultOf(self.tokens().list_providers()), ["p"])

    def test_size_bound_on_write(self) -> None:
        store = self.tokens(max_size=4096)
        self.successResultOf(store.save_token("small", token()))
        before = self.read_raw(self.tokens_path)
        error = self.failureResultOf(
            store.save_token("big", token(padding="x" * 4096)), StoreError
        ).value
        self.assertIn("beyond 4096 bytes", str(error))
        self.assertEqual(self.read_raw(self.tokens_path), before)

    def test_corrupt_file_is_an_error_and_never_replaced(self) -> None:
        garbage = '{"version": 1, "tokens": {"p": {"default": {"refresh_token": "' + REFRESH
        self.write_raw(self.tokens_path, garbage.encode())
        store = self.tokens()
        error = self.failureResultOf(store.get_token("p"), StoreCorrupt).value
        self.assertIn(self.tokens_path, str(error))
        self.assertIn("will not overwrite", str(error))
        self.assertNotIn(REFRESH, str(error) + repr(error))
        self.assertIsNone(error.__cause__)
        self.failureResultOf(store.save_token("p", token()), StoreCorrupt)
        self.failureResultOf(store.remove_token("p"), StoreCorrupt)
        self.assertEqual(self.read_raw(self.tokens_path), garbage.encode())

    def test_not_our_shape(self) -> None:
        for content in [
            {"version": 2, "tokens": {}},
            {"tokens": {}},
            {"version": 1, "tokens": []},
            {"version": 1, "tokens": {"p": []}},
            {"version": 1, "tokens": {"p": {"default": "a token?"}}},
            [],
        ]:
            self.write_raw(self.tokens_path, json.dumps(content).encode())
            self.failureResultOf(self.tokens().list_providers(), StoreCorrupt)
        for keys in [{"version": 1, "keys": {"k": 5}}, {"version": 1, "tokens": {}}]:
            self.write_raw(self.keys_path, json.dumps(keys).encode())
            self.failureResultOf(self.keys().list_keys(), StoreCorrupt)

    def test_corruption_after_a_cached_read(self) -> None:
        store = self.tokens()
        self.successResultOf(store.save_token("p", token()))
        self.write_raw(self.tokens_path, b"\x00not json")
        self.failureResultOf(store.save_token("q", token()), StoreCorrupt)
        # The failed write dropped the cache: no stale answer now.
        self.failureResultOf(store.get_token("p"), StoreCorrupt)

    def test_key_values_never_in_errors(self) -> None:
        self.write_raw(self.keys_path, b'{"version": 1, "keys": {"k": "' + KEY.encode())
        error = self.failureResultOf(self.keys().get_key("k"), StoreCorrupt).value
        self.assertNotIn(KEY, str(error) + repr(error))
        self.assertNotIn(ACCESS, str(error))


@pytest.fixture
def state_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="cp-files-")
    yield os.path.join(path, "credproxy")
    subprocess.run(["rm", "-rf", path], check=True)


@pytest_twisted.ensureDeferred
async def test_on_real_threads(state_dir: str) -> None:
    calls = BlockingCalls(reactor)
    calls.startService()
    try:
        tokens = FileTokenStore(state_dir, calls)
        keys = FileProviderKeyStore(state_dir, calls)
        await tokens.save_token("anthropic", Token({"access_token": ACCESS}))
        await keys.save_key("anthropic", Secret(KEY))
        saves = [tokens.save_token(f"p{i}", Token({"access_token": str(i)})) for i in range(10)]
        for d in saves:
            await d
        fresh = FileTokenStore(state_dir, calls)
        assert await fresh.list_providers() == sorted(["anthropic"] + [f"p{i}" for i in range(10)])
        assert await FileProviderKeyStore(state_dir, calls).get_key("anthropic") == Secret(KEY)
    finally:
        await calls.stopService()


def _now(d: Deferred[_T]) -> _T:
    """
    The result of a Deferred that has already fired (the stores here run
    their calls inline).
    """
    results: list[_T] = []
    failures: list[Failure] = []
    d.addCallbacks(results.append, failures.append)
    if failures:
        failures[0].raiseException()
    assert results, "the Deferred has not fired"
    return results[0]


@pytest.mark.slow
def test_a_write_by_another_process_is_seen_by_the_next_read(state_dir: str) -> None:
    calls = InlineBlockingCalls()
    tokens, keys = FileTokenStore(state_dir, calls), FileProviderKeyStore(state_dir, calls)
    _now(tokens.save_token("anthropic", Token({"access_token": "old"})))
    first = _now(tokens.get_token("anthropic"))
    assert first is not None and first["access_token"] == "old"
    assert _now(keys.get_key("anthropic")) is None  # the absence is cached too
    cached = calls.calls
    assert _now(tokens.get_token("anthropic")) is not None and calls.calls == cached
    writer = textwrap.dedent(
        """
        import sys
        from credproxy._secret import Secret
        from credproxy.stores import FileProviderKeyStore, FileTokenStore, Token
        from credproxy.testing import InlineBlockingCalls

        directory, key = sys.argv[1], sys.argv[2]
        FileTokenStore(directory, InlineBlockingCalls()).save_token(
            "anthropic", Token({"access_token": "new"})
        )
        FileProviderKeyStore(directory, InlineBlockingCalls()).save_key("anthropic", Secret(key))
        """
    )
    subprocess.run([sys.executable, "-c", writer, state_dir, KEY], cwd=ROOT, timeout=60, check=True)
    got = _now(tokens.get_token("anthropic"))
    assert got is not None and got["access_token"] == "new"
    assert _now(keys.get_key("anthropic")) == Secret(KEY)
    assert calls.calls == cached + 2  # one re-read of each file, nothing more
