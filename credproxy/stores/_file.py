"""
The host's stores as JSON files, for hosts without a Secret Service: one
file per store (C{tokens.json}, C{keys.json}) in a private state directory
(mode 0700, files 0600).

A file is never half-written: a write goes to a temporary file in the same
directory, is fsynced, renamed over the old one, and the directory fsynced,
so a crash at any point leaves either the old or the new file. Several
credproxy processes may share the directory: a write takes an exclusive
fcntl lock on a sibling lock file, re-reads the file, applies its one
change, writes and unlocks, so two processes saving different entries both
keep theirs. Reads are cached in memory; C{invalidate} makes the next read
go to the file again. A file that is not ours (not JSON, wrong shape, too
large) is an error, never silently replaced: it may hold the only copy of a
refresh token.

Another process's write (C{credproxy set-key} while C{credproxy serve}
runs) must be seen without a restart, yet a cached read must stay cheap.
So every write by any host store, file or keyring, also bumps the state
directory's change marker (L{ChangeMarker}, the file C{changed}), and a
cached read first compares the marker's C{os.stat} with the one it last
saw: one system call on the reactor thread, no thread hop, no D-Bus call.
When it differs, the cache is dropped and the next read goes to the backend.

All other file I/O runs on L{IBlockingCalls}.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from credproxy._secret import Secret
from credproxy.stores._counters import RequestCounters
from credproxy.stores._interfaces import (
    DEFAULT_BUCKET,
    BucketStats,
    IHostProviderKeyStore,
    IHostTokenStore,
    StoreCorrupt,
    StoreError,
)
from credproxy.stores._threads import IBlockingCalls
from credproxy.stores._token import Token

log = Logger(namespace="credproxy.stores")

TOKENS_FILE = "tokens.json"
KEYS_FILE = "keys.json"
# The state directory's change marker: bumped by every write of every host
# store, so other processes' caches notice (see L{ChangeMarker}).
CHANGE_MARKER_FILE = "changed"
# The marker grows by one byte a write; past this it starts again from
# empty, so it stays tiny and its size still changes on every bump.
MARKER_MAX_SIZE = 4096
FILE_VERSION = 1
# The largest store file read or written. Tokens are a few KiB each; a file
# this large is not ours, and reading it whole must not exhaust memory.
MAX_FILE_SIZE = 16 * 1024 * 1024
# How long a write waits for another process's lock on the same file. A
# write holds it for milliseconds, so a longer wait means a stuck process.
LOCK_TIMEOUT = 10.0
_LOCK_POLL = 0.01
_TEMP_SUFFIX = ".tmp"

_S = TypeVar("_S")
_R = TypeVar("_R")
Entry = tuple[str, str]
TokenState = dict[Entry, Token]
KeyState = dict[str, Secret]


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(
    path: str, data: bytes, *, replace: Callable[[str, str], None] | None = None
) -> None:
    """
    Replace C{path} with C{data} so that a reader, or a crash at any point,
    sees either the old file or the new one: a temporary file (mode 0600) in
    the same directory, fsynced, renamed over C{path}, then the directory
    fsynced so the rename itself survives a power loss.

    @param replace: the rename (default C{os.replace}, looked up at call
        time); a test passes one that fails.
    """
    directory, name = os.path.split(path)
    fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=_TEMP_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        (replace or os.replace)(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_dir(directory)


def _remove_stale_temporaries(path: str) -> None:
    """
    Remove temporary files a crashed writer left behind. Only a writer holding
    the lock creates one, so while we hold it any that exist are garbage.
    """
    directory, name = os.path.split(path)
    prefix = f".{name}."
    with contextlib.suppress(OSError):
        for entry in os.listdir(directory):
            if entry.startswith(prefix) and entry.endswith(_TEMP_SUFFIX):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, entry))


def ensure_state_dir(directory: str) -> None:
    """
    Create the state directory with mode 0700, or check that an existing one
    is a directory of ours and make it private.

    @raise StoreError: if it cannot be created, is not a directory, or
        belongs to another user.
    """
    try:
        with contextlib.suppress(FileExistsError):  # something not a directory: see below
            os.makedirs(directory, mode=0o700, exist_ok=True)
        info = os.lstat(directory)
    except OSError as e:
        raise StoreError(f"cannot create state directory {directory}: {e.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise StoreError(f"state directory {directory} is not a directory")
    if info.st_uid != os.getuid():
        raise StoreError(f"state directory {directory} belongs to uid {info.st_uid}, not to us")
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(directory, 0o700)


@contextlib.contextmanager
def _locked(path: str, timeout: float) -> Iterator[None]:
    """
    Hold an exclusive lock on C{path}'s sibling lock file (never on the file
    itself, which the rename replaces), for at most C{timeout} seconds of waiting.
    """
    lock_path = path + ".lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StoreError(f"cannot open lock file {lock_path}: {e.strerror}") from None
    try:
        _flock_within(fd, lock_path, timeout)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _flock_within(fd: int, path: str, timeout: float) -> None:
    """
    Take an exclusive C{flock} on C{fd}, waiting at most C{timeout} seconds.

    @raise StoreError: naming C{path}, when it cannot be taken in time.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise StoreError(f"cannot lock {path}: {e.strerror}") from None
        if time.monotonic() >= deadline:
            raise StoreError(
                f"{path} stayed locked by another process for {timeout:g} s; not written"
            )
        time.sleep(_LOCK_POLL)


# What a cached read compares: the marker's inode, size, mtime and ctime.
# The size alone changes on every bump (one byte appended); the times and
# the inode cover the restart from empty and a marker someone replaced.
MarkerSignature = tuple[int, int, int, int]
# A bump's outcome: the marker's signature just before and just after it.
Bump = tuple[MarkerSignature | None, MarkerSignature | None]


def _signature(info: os.stat_result) -> MarkerSignature | None:
    """
    What a cached read compares. An empty marker counts as no marker: it was
    just created and never bumped (a bump empties and appends under one
    lock, so a locked look never sees a bumped marker empty; a reader that
    catches one in between merely re-reads once more).
    """
    if info.st_size == 0:
        return None
    return (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


class ChangeMarker:
    """
    The change marker of a state directory, the file C{changed} (mode 0600):
    every write of every host store on this host, in any process, appends a
    byte to it after the write is done, and caches compare its signature.

    Writers bump it under an exclusive C{flock} of the marker itself and
    report the signature before and after their bump, so a writer can tell
    whether anybody else bumped since it last looked: only then may it keep
    its cache (see L{MarkerWatch.wrote}). Readers never lock: a reader that
    stats the marker in the middle of a bump merely re-reads once more.
    """

    def __init__(self, directory: str, *, lock_timeout: float = LOCK_TIMEOUT) -> None:
        self.directory = directory
        self.path = os.path.join(directory, CHANGE_MARKER_FILE)
        self.lock_timeout = lock_timeout

    def __repr__(self) -> str:
        return f"<ChangeMarker {self.path}>"

    def current(self) -> MarkerSignature | None:
        """
        The marker's signature now, with one C{os.stat} (cheap enough for
        the reactor thread); None when there is no marker yet.

        @raise OSError: the marker cannot be examined (the caller then
            cannot trust its cache).
        """
        try:
            return _signature(os.stat(self.path))
        except FileNotFoundError:
            return None

    def bump(self) -> Bump:
        """
        Blocking (on the thread pool): append one byte to the marker,
        creating the state directory and the marker as needed.

        @return: the signature before and after this bump, both taken under
            the marker's lock.
        @raise StoreError: the marker cannot be created, locked or written.
        """
        ensure_state_dir(self.directory)
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as e:
            raise StoreError(f"cannot open the change marker {self.path}: {e.strerror}") from None
        try:
            _flock_within(fd, self.path, self.lock_timeout)
            before = _signature(os.fstat(fd))
            if before is not None and before[1] >= MARKER_MAX_SIZE:
                os.ftruncate(fd, 0)
            os.write(fd, b".")
            after = _signature(os.fstat(fd))
        except OSError as e:
            raise StoreError(f"cannot write the change marker {self.path}: {e.strerror}") from None
        finally:
            os.close(fd)  # and with it the lock
        return before, after


class MarkerWatch:
    """
    One store's view of a L{ChangeMarker}, on the reactor thread: the
    signature it last saw, so it knows when to drop its cache. Without a
    marker (stores made without a state directory) nothing ever changes.
    """

    def __init__(self, marker: ChangeMarker | None) -> None:
        self.marker = marker
        self._seen: MarkerSignature | None = None
        self._warned = False
        self.changed()  # the cache is empty: whatever the marker says now is seen

    def changed(self) -> bool:
        """
        Whether anybody wrote since this store last looked (one C{os.stat});
        either way, what the marker says now counts as seen. A marker that
        cannot be examined always counts as changed.
        """
        if self.marker is None:
            return False
        try:
            now = self.marker.current()
        except OSError:
            return True
        if now == self._seen:
            return False
        self._seen = now
        return True

    def wrote(self, bump: Bump | None) -> None:
        """
        This store's own write bumped the marker. When nobody else bumped it
        since this store last looked, its cache (just updated by the write)
        is current, and the new signature counts as seen; otherwise the next
        read notices the difference and re-reads. C{None}: no marker.
        """
        if bump is None:
            return
        before, after = bump
        if before == self._seen:
            self._seen = after

    def bump_failed(self, error: StoreError) -> None:
        """
        The write itself succeeded but the marker could not be bumped: other
        processes may keep answering from what they cached before it. Said
        once, not at every write.
        """
        if not self._warned:
            self._warned = True
            log.warn(
                "{problem}; other credproxy processes may not see this host's writes"
                " until they restart",
                problem=str(error),
            )


def bump_marker(marker: ChangeMarker | None) -> Bump | StoreError | None:
    """
    Blocking: bump C{marker} after a write that already succeeded, handing a
    failure back as a value rather than raising it, since the write stands.
    """
    if marker is None:
        return None
    try:
        return marker.bump()
    except StoreError as e:
        return e


def note_bump(watch: MarkerWatch, outcome: Bump | StoreError | None) -> None:
    """
    On the reactor: record what L{bump_marker} did in C{watch}.
    """
    if isinstance(outcome, StoreError):
        watch.bump_failed(outcome)
    else:
        watch.wrote(outcome)


class _StateFile(Generic[_S]):
    """
    One store file, on the blocking side (called on the thread pool only):
    bounded reads, and locked read-modify-write updates.
    """

    def __init__(
        self,
        path: str,
        kind: str,
        parse: Callable[[Any], _S],
        dump: Callable[[_S], Any],
        *,
        max_size: int,
        lock_timeout: float,
        marker: ChangeMarker | None = None,
    ) -> None:
        self.path = path
        self.kind = kind
        self.parse = parse
        self.dump = dump
        self.max_size = max_size
        self.lock_timeout = lock_timeout
        self.marker = marker

    def _too_large(self) -> StoreError:
        return StoreCorrupt(
            f"{self.path} is larger than {self.max_size} bytes; not a credproxy {self.kind} file"
        )

    def read(self) -> _S:
        """
        The file's content; a missing file (or directory) is an empty store.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return self.parse({"version": FILE_VERSION, self.kind: {}})
        except OSError as e:
            raise StoreError(f"cannot read {self.path}: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            if os.fstat(f.fileno()).st_size > self.max_size:
                raise self._too_large()
            data = f.read(self.max_size + 1)  # bounded even if it grows meanwhile
        if len(data) > self.max_size:
            raise self._too_large()
        try:
            return self.parse(json.loads(data))
        except (ValueError, TypeError, KeyError, AttributeError):
            # from None: a JSONDecodeError carries the whole document.
            raise StoreCorrupt(
                f"{self.path} is not a credproxy {self.kind} file (version {FILE_VERSION});"
                " credproxy will not overwrite it: repair or move it away"
            ) from None

    def update(self, change: Callable[[_S], _R]) -> tuple[_S, _R, Bump | StoreError | None]:
        """
        Under the lock: re-read the file (another process may have written
        it), apply C{change} to that content, write it back atomically, then
        bump the change marker (still under the lock, so the next writer of
        this file bumps after us).
        """
        directory = os.path.dirname(self.path)
        ensure_state_dir(directory)
        with _locked(self.path, self.lock_timeout):
            _remove_stale_temporaries(self.path)
            state = self.read()
            result = change(state)
            data = json.dumps(self.dump(state), indent=1, sort_keys=True).encode("utf-8")
            if len(data) > self.max_size:
                raise StoreError(
                    f"{self.path} would grow beyond {self.max_size} bytes; not written"
                )
            try:
                write_atomically(self.path, data)
            except OSError as e:
                raise StoreError(f"cannot write {self.path}: {e.strerror}") from None
            bumped = bump_marker(self.marker)
        return state, result, bumped


def _check_version(data: Any, field: str) -> dict[str, Any]:
    if not isinstance(data, dict) or data.get("version") != FILE_VERSION:
        raise ValueError
    members = data[field]
    if not isinstance(members, dict):
        raise ValueError
    return members


def _parse_tokens(data: Any) -> TokenState:
    state: TokenState = {}
    for provider, buckets in _check_version(data, "tokens").items():
        if not isinstance(buckets, dict):
            raise ValueError
        for bucket, token in buckets.items():
            if not isinstance(token, dict):
                raise ValueError
            state[(provider, bucket)] = Token(token)
    return state


def _dump_tokens(state: TokenState) -> dict[str, Any]:
    tokens: dict[str, dict[str, Any]] = {}
    for (provider, bucket), token in state.items():
        tokens.setdefault(provider, {})[bucket] = token.to_json()
    return {"version": FILE_VERSION, "tokens": tokens}


def _parse_keys(data: Any) -> KeyState:
    state: KeyState = {}
    for name, value in _check_version(data, "keys").items():
        if not isinstance(value, str):
            raise ValueError
        state[name] = Secret(value)
    return state


def _dump_keys(state: KeyState) -> dict[str, Any]:
    return {"version": FILE_VERSION, "keys": {name: key.reveal() for name, key in state.items()}}


class _CachedFile(Generic[_S]):
    """
    The reactor side of one store file: the cached content, reads that miss
    and writes serialized (so the cache follows the order of the writes), and
    a generation so a read that began before an C{invalidate} is not cached.
    A read first looks at the change marker, and forgets the cached content
    when anybody (another process, or another store) wrote since.
    """

    def __init__(self, file: _StateFile[_S], calls: IBlockingCalls) -> None:
        self.file = file
        self.calls = calls
        self.state: _S | None = None
        self._lock = DeferredLock()
        self._generation = 0
        self.watch = MarkerWatch(file.marker)

    def current(self) -> _S | None:
        """
        The cached content if it is still current, else None (the caller
        then reads the file).
        """
        if self.watch.changed():
            self.invalidate()
        return self.state

    def read(self, pick: Callable[[_S], _R]) -> Deferred[_R]:
        """
        C{pick} of the content. From a current cache that is the per-request
        path: one C{os.stat} of the marker, no Deferred chain, no thread hop.
        """
        state = self.current()
        if state is not None:
            return succeed(pick(state))
        result: Deferred[_S] = self._lock.run(self._read_missed)
        return result.addCallback(pick)

    def _read_missed(self) -> Deferred[_S]:
        if self.state is not None:
            return succeed(self.state)
        generation = self._generation

        def loaded(state: _S) -> _S:
            if generation == self._generation:
                self.state = state
            return state

        return self.calls.run(self.file.read).addCallback(loaded)

    def update(self, change: Callable[[_S], _R]) -> Deferred[_R]:
        result: Deferred[_R] = self._lock.run(self._update, change)
        return result

    def _update(self, change: Callable[[_S], _R]) -> Deferred[_R]:
        def written(outcome: tuple[_S, _R, Bump | StoreError | None]) -> _R:
            self.state, result, bumped = outcome
            note_bump(self.watch, bumped)
            return result

        def failed(failure: Failure) -> Failure:
            self.invalidate()  # the file's state is unknown now
            return failure

        d: Deferred[tuple[_S, _R, Bump | StoreError | None]] = self.calls.run(
            self.file.update, change
        )
        return d.addCallbacks(written, failed)

    def invalidate(self) -> None:
        self.state = None
        self._generation += 1


@dataclass(frozen=True)
class _Layout(Generic[_S]):
    """
    Which file of the state directory a store keeps, what it holds (the
    name of its one field, for messages too), and how its JSON reads and writes.
    """

    filename: str
    kind: str
    parse: Callable[[Any], _S]
    dump: Callable[[_S], Any]


class _FileStore(Generic[_S]):
    """
    What both file stores share: their file (C{_layout}) in a state
    directory, cached, and the change marker beside it.
    """

    _layout: _Layout[_S]

    def __init__(
        self,
        directory: str,
        calls: IBlockingCalls,
        *,
        max_size: int = MAX_FILE_SIZE,
        lock_timeout: float = LOCK_TIMEOUT,
    ) -> None:
        layout = self._layout
        self.path = os.path.join(directory, layout.filename)
        self.description = f"file ({self.path})"
        self._file = _CachedFile(
            _StateFile(
                self.path,
                layout.kind,
                layout.parse,
                layout.dump,
                max_size=max_size,
                lock_timeout=lock_timeout,
                marker=ChangeMarker(directory, lock_timeout=lock_timeout),
            ),
            calls,
        )


@implementer(IHostTokenStore)
class FileTokenStore(_FileStore[TokenState]):
    """
    OAuth tokens in C{tokens.json} of a state directory.
    """

    _layout = _Layout(TOKENS_FILE, "tokens", _parse_tokens, _dump_tokens)

    def __repr__(self) -> str:
        return f"<FileTokenStore {self.path}>"

    @cached_property
    def counters(self) -> RequestCounters:
        # Made on first use, so that the constructor stays the shared one.
        return RequestCounters()

    def get_token(self, provider: str, bucket: str | None = None) -> Deferred[Token | None]:
        entry = (provider, bucket or DEFAULT_BUCKET)
        return self._file.read(lambda state: state.get(entry))

    def save_token(self, provider: str, token: Token, bucket: str | None = None) -> Deferred[None]:
        entry = (provider, bucket or DEFAULT_BUCKET)
        token = Token(token)

        def change(state: TokenState) -> None:
            state[entry] = token

        return self._file.update(change)

    def remove_token(self, provider: str, bucket: str | None = None) -> Deferred[None]:
        entry = (provider, bucket or DEFAULT_BUCKET)

        def change(state: TokenState) -> None:
            state.pop(entry, None)

        def removed(result: None) -> None:
            self.counters.forget(provider, bucket)

        return self._file.update(change).addCallback(removed)

    def list_providers(self) -> Deferred[list[str]]:
        return self._file.read(lambda state: sorted({p for p, _ in state}))

    def list_buckets(self, provider: str) -> Deferred[list[str]]:
        return self._file.read(lambda state: sorted(b for p, b in state if p == provider))

    def get_bucket_stats(
        self, provider: str, bucket: str | None = None
    ) -> Deferred[BucketStats | None]:
        return self.counters.stats_if_stored(self.get_token(provider, bucket), provider, bucket)

    def record_request(self, provider: str, bucket: str | None, when: float) -> None:
        self.counters.record(provider, bucket, when)

    def invalidate(self, provider: str, bucket: str | None = None) -> None:
        # One file holds every entry: the next read re-reads all of it.
        self._file.invalidate()


@implementer(IHostProviderKeyStore)
class FileProviderKeyStore(_FileStore[KeyState]):
    """
    Named API keys in C{keys.json} of a state directory.
    """

    _layout = _Layout(KEYS_FILE, "keys", _parse_keys, _dump_keys)

    def __repr__(self) -> str:
        return f"<FileProviderKeyStore {self.path}>"

    def get_key(self, name: str) -> Deferred[Secret | None]:
        return self._file.read(lambda state: state.get(name))

    def save_key(self, name: str, key: Secret) -> Deferred[None]:
        def change(state: KeyState) -> None:
            state[name] = key

        return self._file.update(change)

    def delete_key(self, name: str) -> Deferred[bool]:
        def change(state: KeyState) -> bool:
            return state.pop(name, None) is not None

        return self._file.update(change)

    def list_keys(self) -> Deferred[list[str]]:
        return self._file.read(sorted)

    def has_key(self, name: str) -> Deferred[bool]:
        return self._file.read(lambda state: name in state)

    def invalidate(self, name: str) -> None:
        self._file.invalidate()
