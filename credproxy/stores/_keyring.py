"""
The host's stores in the desktop keyring (a Secret Service such as
gnome-keyring), through the C{keyring} library.

Every item belongs to the service C{credproxy}. Its username names what it
holds, with each name percent-encoded so that no provider, bucket or key name
(which may contain C{/}, C{:} or anything else) can be mistaken for another:

    token/<provider>/<bucket>   one token as a JSON object: access token,
                                refresh token and expiry written together
    key/<name>                  one API key, as is
    index/tokens, index/keys    what is stored, since a keyring cannot list

Backend calls block (a D-Bus round trip each), so they run on
L{IBlockingCalls}; reads are cached in memory, so a cached read makes no
call at all, and C{invalidate} forgets an entry another process may have
changed. All reads that miss the cache and all writes of one store are
serialized: an index update is a read-modify-write, and two at once would
lose an entry.

A keyring cannot tell us that another process wrote to it, so stores given
a state directory share the file stores' change marker there
(L{credproxy.stores._file.ChangeMarker}): each write bumps it, and a cached
read first compares its C{os.stat}, dropping the whole cache when anybody
wrote since. That keeps a cached read free of D-Bus calls and thread hops,
and lets C{credproxy set-key} reach a running service at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote

import keyring
from keyring.backend import KeyringBackend
from keyring.errors import KeyringLocked, PasswordDeleteError
from twisted.internet.defer import Deferred, DeferredLock, fail, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from credproxy._secret import Secret
from credproxy.stores._counters import RequestCounters
from credproxy.stores._file import (
    Bump,
    ChangeMarker,
    MarkerWatch,
    bump_marker,
    note_bump,
)
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

SERVICE = "credproxy"
TOKEN_INDEX_ITEM = "index/tokens"
KEY_INDEX_ITEM = "index/keys"
INDEX_VERSION = 1
# The largest item credproxy writes or parses. A token is a few KiB; an index
# of thousands of names stays far below. A bigger item is not ours.
MAX_ITEM_CHARS = 1024 * 1024

_T = TypeVar("_T")
Entry = tuple[str, str]


def token_item(provider: str, bucket: str | None = None) -> str:
    """
    The username of a token's item.
    """
    return f"token/{quote(provider, safe='')}/{quote(bucket or DEFAULT_BUCKET, safe='')}"


def key_item(name: str) -> str:
    """
    The username of an API key's item.
    """
    return f"key/{quote(name, safe='')}"


def backend_name(backend: KeyringBackend) -> str:
    """
    A short name of a keyring backend for descriptions: keyring calls most
    of its backend classes C{Keyring}, so the module says which one it is.
    """
    cls = type(backend)
    if cls.__name__ == "Keyring":
        return cls.__module__.rsplit(".", 1)[-1]
    return cls.__name__


def _entry_name(entry: Entry) -> str:
    return f"{entry[0]}/{entry[1]}"


def _failure(action: str, error: Exception) -> StoreError:
    """
    A backend's exception as a L{StoreError} naming only its type: backend
    messages are outside our control, and the cause is dropped for the same
    reason, so no value can travel on in it.
    """
    if isinstance(error, KeyringLocked):
        return StoreError(f"keyring: cannot {action}: the keyring is locked (unlock it first)")
    return StoreError(f"keyring: cannot {action}: the backend failed ({type(error).__name__})")


class _Items:
    """
    The blocking side: C{credproxy}'s items in one backend. Called on the
    thread pool only.
    """

    def __init__(self, backend: KeyringBackend) -> None:
        self.backend = backend

    def read(self, item: str, what: str) -> str | None:
        try:
            value = self.backend.get_password(SERVICE, item)
        except Exception as e:
            raise _failure(f"read {what}", e) from None
        if value is not None and len(value) > MAX_ITEM_CHARS:
            raise StoreCorrupt(
                f'keyring item "{item}" of service "{SERVICE}" is larger than'
                f" {MAX_ITEM_CHARS} characters; not credproxy's"
            )
        return value

    def write(self, item: str, value: str, what: str) -> None:
        try:
            self.backend.set_password(SERVICE, item, value)
        except Exception as e:
            raise _failure(f"write {what}", e) from None

    def delete(self, item: str, what: str) -> bool:
        try:
            self.backend.delete_password(SERVICE, item)
        except PasswordDeleteError:
            return False
        except Exception as e:
            raise _failure(f"delete {what}", e) from None
        return True

    def get_json(self, item: str, what: str) -> Any:
        text = self.read(item, what)
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError:
            # from None: a JSONDecodeError carries the whole document.
            raise StoreCorrupt(
                f'keyring item "{item}" of service "{SERVICE}" is not JSON; not changed'
            ) from None

    def read_index(self, item: str, field: str, parse: Callable[[Any], _T]) -> set[_T]:
        data = self.get_json(item, "the index")
        if data is None:
            return set()
        try:
            members = data[field]
            if data.get("version") != INDEX_VERSION or not isinstance(members, list):
                raise ValueError
            return {parse(member) for member in members}
        except (AttributeError, KeyError, TypeError, ValueError):
            raise StoreCorrupt(
                f'keyring item "{item}" of service "{SERVICE}" is not a credproxy index'
                f" (version {INDEX_VERSION}); not changed"
            ) from None

    def write_index(self, item: str, field: str, members: list[Any]) -> None:
        text = json.dumps({"version": INDEX_VERSION, field: sorted(members)})
        if len(text) > MAX_ITEM_CHARS:
            raise StoreError(f"keyring: the index {item} would exceed {MAX_ITEM_CHARS} characters")
        self.write(item, text, "the index")


def _parse_entry(member: Any) -> Entry:
    if (
        isinstance(member, list)
        and len(member) == 2
        and isinstance(member[0], str)
        and isinstance(member[1], str)
    ):
        return (member[0], member[1])
    raise ValueError


def _parse_name(member: Any) -> str:
    if isinstance(member, str):
        return member
    raise ValueError


class _KeyringStore:
    """
    What both keyring stores share: the backend, the serialization of
    misses and writes, the generation that keeps a read which started
    before an C{invalidate} from filling the cache with what it read, and
    the watch on the state directory's change marker (none without one).
    """

    def __init__(
        self, calls: IBlockingCalls, backend: KeyringBackend | None, state_dir: str | None
    ) -> None:
        self.calls = calls
        self.backend = backend if backend is not None else keyring.get_keyring()
        self.items = _Items(self.backend)
        self.description = f'keyring ({backend_name(self.backend)}, service "{SERVICE}")'
        self._lock = DeferredLock()
        self._generation = 0
        self.marker = ChangeMarker(state_dir) if state_dir is not None else None
        self._watch = MarkerWatch(self.marker)

    def _forget_everything(self) -> None:
        """
        Drop every cached read (each store knows its own cache).
        """
        raise NotImplementedError

    def _check_marker(self) -> None:
        """
        Before a cached read: forget the cache when anybody wrote since.
        """
        if self._watch.changed():
            self._forget_everything()

    def _bump(self) -> Bump | StoreError | None:
        """
        Blocking, at the end of every write: bump the marker, so other
        processes (and this host's other stores) see the write.
        """
        return bump_marker(self.marker)

    def _note(self, outcome: tuple[_T, Bump | StoreError | None]) -> _T:
        """
        On the reactor, after a write: record its bump in the watch.
        """
        result, bumped = outcome
        note_bump(self._watch, bumped)
        return result

    def _serialized(self, f: Callable[..., Deferred[_T]], *args: Any) -> Deferred[_T]:
        result: Deferred[_T] = self._lock.run(f, *args)
        return result

    def _load(
        self, fresh: Callable[[], bool], blocking: Callable[..., _T], *args: Any
    ) -> Deferred[_T | None]:
        """
        Run a read unless C{fresh()} says the cache has it by now (a read of
        the same entry that waited on the lock before this one).
        """
        if fresh():
            return succeed(None)
        return self.calls.run(blocking, *args)


@implementer(IHostTokenStore)
class KeyringTokenStore(_KeyringStore):
    """
    OAuth tokens in a keyring, one item per provider and bucket, with an index.

    It uses the backend it is given, or whatever C{keyring.get_keyring()}
    picks (which may be a plaintext file): L{open_host_stores} is how the
    host gets one that is certainly a Secret Service.
    """

    def __init__(
        self,
        calls: IBlockingCalls,
        backend: KeyringBackend | None = None,
        *,
        state_dir: str | None = None,
    ) -> None:
        super().__init__(calls, backend, state_dir)
        self._tokens: dict[Entry, Token | None] = {}
        self._index: set[Entry] | None = None
        self.counters = RequestCounters()

    def __repr__(self) -> str:
        return f"<KeyringTokenStore {backend_name(self.backend)} cached={len(self._tokens)}>"

    # -- blocking, on the pool --------------------------------------------------

    def _read_token(self, entry: Entry) -> Token | None:
        item = token_item(*entry)
        data = self.items.get_json(item, f"the token of {_entry_name(entry)}")
        if data is None:
            return None
        if not isinstance(data, dict):
            raise StoreCorrupt(
                f'keyring item "{item}" of service "{SERVICE}" is not a token object; not changed'
            )
        return Token(data)

    def _read_index(self) -> set[Entry]:
        return self.items.read_index(TOKEN_INDEX_ITEM, "tokens", _parse_entry)

    def _write_token(self, entry: Entry, text: str) -> tuple[set[Entry], Bump | StoreError | None]:
        # The index is read first: a corrupt one stops the write before anything changed.
        index = self._read_index()
        try:
            self.items.write(token_item(*entry), text, f"the token of {_entry_name(entry)}")
            if entry not in index:
                index.add(entry)
                self.items.write_index(TOKEN_INDEX_ITEM, "tokens", [list(e) for e in index])
        finally:
            bumped = self._bump()  # also when it failed half way: something may have changed
        return index, bumped

    def _delete_token(self, entry: Entry) -> tuple[set[Entry], Bump | StoreError | None]:
        # The item goes first: a failure in between leaves a name in the
        # index with no token, never a token that was meant to be removed.
        index = self._read_index()
        try:
            self.items.delete(token_item(*entry), f"the token of {_entry_name(entry)}")
            if entry in index:
                index.discard(entry)
                self.items.write_index(TOKEN_INDEX_ITEM, "tokens", [list(e) for e in index])
        finally:
            bumped = self._bump()
        return index, bumped

    # -- on the reactor ---------------------------------------------------------

    def _forget_everything(self) -> None:
        self._tokens.clear()
        self._index = None
        self._generation += 1

    def _forget_all(self, failure: Failure) -> Failure:
        """
        After a failed write the backend's state is unknown: read it again.
        """
        self._forget_everything()
        return failure

    def get_token(self, provider: str, bucket: str | None = None) -> Deferred[Token | None]:
        entry = (provider, bucket or DEFAULT_BUCKET)
        self._check_marker()
        if entry in self._tokens:
            return succeed(self._tokens[entry])
        return self._serialized(self._get_missed, entry)

    def _get_missed(self, entry: Entry) -> Deferred[Token | None]:
        generation = self._generation
        d = self._load(lambda: entry in self._tokens, self._read_token, entry)

        def loaded(token: Token | None) -> Token | None:
            if entry in self._tokens:
                return self._tokens[entry]
            if generation == self._generation:
                self._tokens[entry] = token
            return token

        return d.addCallback(loaded)

    def save_token(self, provider: str, token: Token, bucket: str | None = None) -> Deferred[None]:
        entry = (provider, bucket or DEFAULT_BUCKET)
        token = Token(token)
        text = json.dumps(token.to_json(), separators=(",", ":"))
        if len(text) > MAX_ITEM_CHARS:
            return fail(
                StoreError(
                    f"keyring: the token of {_entry_name(entry)} is larger than"
                    f" {MAX_ITEM_CHARS} characters; not saved"
                )
            )

        def written(index: set[Entry]) -> None:
            self._tokens[entry] = token
            self._index = index

        return self._serialized(
            lambda: (
                self.calls.run(self._write_token, entry, text)
                .addCallback(self._note)
                .addCallbacks(written, self._forget_all)
            )
        )

    def remove_token(self, provider: str, bucket: str | None = None) -> Deferred[None]:
        entry = (provider, bucket or DEFAULT_BUCKET)

        def removed(index: set[Entry]) -> None:
            self._tokens[entry] = None
            self._index = index
            self.counters.forget(provider, bucket)

        return self._serialized(
            lambda: (
                self.calls.run(self._delete_token, entry)
                .addCallback(self._note)
                .addCallbacks(removed, self._forget_all)
            )
        )

    def _entries(self) -> Deferred[set[Entry]]:
        self._check_marker()
        if self._index is not None:
            return succeed(self._index)
        return self._serialized(self._index_missed)

    def _index_missed(self) -> Deferred[set[Entry]]:
        generation = self._generation
        d = self._load(lambda: self._index is not None, self._read_index)

        def loaded(index: set[Entry] | None) -> set[Entry]:
            if self._index is not None:
                return self._index
            assert index is not None
            if generation == self._generation:
                self._index = index
            return index

        return d.addCallback(loaded)

    def list_providers(self) -> Deferred[list[str]]:
        return self._entries().addCallback(lambda index: sorted({p for p, _ in index}))

    def list_buckets(self, provider: str) -> Deferred[list[str]]:
        return self._entries().addCallback(
            lambda index: sorted(b for p, b in index if p == provider)
        )

    def get_bucket_stats(
        self, provider: str, bucket: str | None = None
    ) -> Deferred[BucketStats | None]:
        def stats(token: Token | None) -> BucketStats | None:
            return None if token is None else self.counters.stats(provider, bucket)

        return self.get_token(provider, bucket).addCallback(stats)

    def record_request(self, provider: str, bucket: str | None, when: float) -> None:
        self.counters.record(provider, bucket, when)

    def invalidate(self, provider: str, bucket: str | None = None) -> None:
        self._tokens.pop((provider, bucket or DEFAULT_BUCKET), None)
        self._index = None  # another process may have added or removed it too
        self._generation += 1


@implementer(IHostProviderKeyStore)
class KeyringProviderKeyStore(_KeyringStore):
    """
    Named API keys in a keyring, one item each, with an index.
    """

    def __init__(
        self,
        calls: IBlockingCalls,
        backend: KeyringBackend | None = None,
        *,
        state_dir: str | None = None,
    ) -> None:
        super().__init__(calls, backend, state_dir)
        self._keys: dict[str, Secret | None] = {}
        self._index: set[str] | None = None

    def __repr__(self) -> str:
        return f"<KeyringProviderKeyStore {backend_name(self.backend)} cached={len(self._keys)}>"

    # -- blocking, on the pool --------------------------------------------------

    def _read_key(self, name: str) -> Secret | None:
        value = self.items.read(key_item(name), f"the key {name}")
        return None if value is None else Secret(value)

    def _read_index(self) -> set[str]:
        return self.items.read_index(KEY_INDEX_ITEM, "keys", _parse_name)

    def _write_key(self, name: str, key: Secret) -> tuple[set[str], Bump | StoreError | None]:
        index = self._read_index()
        try:
            self.items.write(key_item(name), key.reveal(), f"the key {name}")
            if name not in index:
                index.add(name)
                self.items.write_index(KEY_INDEX_ITEM, "keys", list(index))
        finally:
            bumped = self._bump()  # also when it failed half way: something may have changed
        return index, bumped

    def _delete_key(self, name: str) -> tuple[tuple[bool, set[str]], Bump | StoreError | None]:
        index = self._read_index()
        try:
            existed = self.items.delete(key_item(name), f"the key {name}")
            if name in index:
                index.discard(name)
                self.items.write_index(KEY_INDEX_ITEM, "keys", list(index))
        finally:
            bumped = self._bump()
        return (existed, index), bumped

    # -- on the reactor ---------------------------------------------------------

    def _forget_everything(self) -> None:
        self._keys.clear()
        self._index = None
        self._generation += 1

    def _forget_all(self, failure: Failure) -> Failure:
        self._forget_everything()
        return failure

    def get_key(self, name: str) -> Deferred[Secret | None]:
        self._check_marker()
        if name in self._keys:
            return succeed(self._keys[name])
        return self._serialized(self._get_missed, name)

    def _get_missed(self, name: str) -> Deferred[Secret | None]:
        generation = self._generation
        d = self._load(lambda: name in self._keys, self._read_key, name)

        def loaded(key: Secret | None) -> Secret | None:
            if name in self._keys:
                return self._keys[name]
            if generation == self._generation:
                self._keys[name] = key
            return key

        return d.addCallback(loaded)

    def save_key(self, name: str, key: Secret) -> Deferred[None]:
        if len(key.reveal()) > MAX_ITEM_CHARS:
            return fail(
                StoreError(f"keyring: the key {name} is larger than {MAX_ITEM_CHARS} characters")
            )

        def written(index: set[str]) -> None:
            self._keys[name] = key
            self._index = index

        return self._serialized(
            lambda: (
                self.calls.run(self._write_key, name, key)
                .addCallback(self._note)
                .addCallbacks(written, self._forget_all)
            )
        )

    def delete_key(self, name: str) -> Deferred[bool]:
        def deleted(outcome: tuple[bool, set[str]]) -> bool:
            existed, self._index = outcome
            self._keys[name] = None
            return existed

        return self._serialized(
            lambda: (
                self.calls.run(self._delete_key, name)
                .addCallback(self._note)
                .addCallbacks(deleted, self._forget_all)
            )
        )

    def _names(self) -> Deferred[set[str]]:
        self._check_marker()
        if self._index is not None:
            return succeed(self._index)
        return self._serialized(self._index_missed)

    def _index_missed(self) -> Deferred[set[str]]:
        generation = self._generation
        d = self._load(lambda: self._index is not None, self._read_index)

        def loaded(index: set[str] | None) -> set[str]:
            if self._index is not None:
                return self._index
            assert index is not None
            if generation == self._generation:
                self._index = index
            return index

        return d.addCallback(loaded)

    def list_keys(self) -> Deferred[list[str]]:
        return self._names().addCallback(sorted)

    def has_key(self, name: str) -> Deferred[bool]:
        return self.get_key(name).addCallback(lambda key: key is not None)

    def invalidate(self, name: str) -> None:
        self._keys.pop(name, None)
        self._index = None
        self._generation += 1
