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
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from functools import cached_property
from typing import Any, ClassVar, Generic, TypeVar
from urllib.parse import quote

import keyring
from keyring.backend import KeyringBackend
from keyring.errors import KeyringLocked, PasswordDeleteError
from twisted.internet.defer import Deferred, DeferredLock, fail, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from credproxy._secret import Secret
from credproxy.stores._counters import IndexedTokenQueries, RequestCounters
from credproxy.stores._file import (
    Bump,
    ChangeMarker,
    MarkerWatch,
    bump_marker,
    note_bump,
)
from credproxy.stores._interfaces import (
    DEFAULT_BUCKET,
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
# A write is tried this often when the Secret Service reports an item it has
# just found as gone (secretstorage's ItemNotFoundException): gnome-keyring
# does under concurrent writes to one collection, and the next try succeeds.
WRITE_ATTEMPTS = 3

_T = TypeVar("_T")
_K = TypeVar("_K", bound=Hashable)  # what a store keys its entries by
_V = TypeVar("_V")  # what an entry holds
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
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                self.backend.set_password(SERVICE, item, value)
                return
            except Exception as e:
                if type(e).__name__ == "ItemNotFoundException" and attempt < WRITE_ATTEMPTS:
                    continue
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


class _KeyringStore(ABC, Generic[_K, _V]):
    """
    What both keyring stores share: the backend; a cache of entries (a
    cached None: known to be absent) and of the index; the serialization of
    misses and writes; the generation that keeps a read which started
    before an C{invalidate} from filling the cache with what it read; and
    the watch on the state directory's change marker (none without one).

    Each store says where its entries and its index live (L{_item},
    C{_index_item}, C{_index_field}), how an entry is read (L{_read_value})
    and how the index names one (L{_parse_member}).
    """

    _index_item: ClassVar[str]
    _index_field: ClassVar[str]

    def __init__(
        self,
        calls: IBlockingCalls,
        backend: KeyringBackend | None = None,
        *,
        state_dir: str | None = None,
    ) -> None:
        self.calls = calls
        self.backend = backend if backend is not None else keyring.get_keyring()
        self.items = _Items(self.backend)
        self.description = f'keyring ({backend_name(self.backend)}, service "{SERVICE}")'
        self._cache: dict[_K, _V | None] = {}
        self._index: set[_K] | None = None
        self._lock = DeferredLock()
        self._generation = 0
        self.marker = ChangeMarker(state_dir) if state_dir is not None else None
        self._watch = MarkerWatch(self.marker)

    # -- what each store says ---------------------------------------------------

    @abstractmethod
    def _item(self, entry: _K) -> tuple[str, str]:
        """
        The username of C{entry}'s item, and how messages name the entry.
        """

    @abstractmethod
    def _read_value(self, entry: _K) -> _V | None:
        """
        Blocking: C{entry}'s value from the backend, None if it has none.
        """

    @abstractmethod
    def _parse_member(self, member: Any) -> _K:
        """
        One member of the index as an entry.

        @raise ValueError: it names no entry.
        """

    def _removed(self, entry: _K) -> None:
        """
        On the reactor, once C{entry} is removed: forget what else the store
        keeps of it (nothing, unless a store says otherwise).
        """

    # -- blocking, on the pool --------------------------------------------------

    def _bump(self) -> Bump | StoreError | None:
        """
        Blocking, at the end of every write: bump the marker, so other
        processes (and this host's other stores) see the write.
        """
        return bump_marker(self.marker)

    def _read_index(self) -> set[_K]:
        return self.items.read_index(self._index_item, self._index_field, self._parse_member)

    def _write_index(self, index: set[_K]) -> None:
        # json writes a tuple entry as the list that _parse_member reads back.
        self.items.write_index(self._index_item, self._index_field, list(index))

    def _write_entry(self, entry: _K, text: str) -> tuple[set[_K], Bump | StoreError | None]:
        # The index is read first: a corrupt one stops the write before anything changed.
        index = self._read_index()
        try:
            item, what = self._item(entry)
            self.items.write(item, text, what)
            if entry not in index:
                index.add(entry)
                self._write_index(index)
        finally:
            bumped = self._bump()  # also when it failed half way: something may have changed
        return index, bumped

    def _delete_entry(self, entry: _K) -> tuple[tuple[bool, set[_K]], Bump | StoreError | None]:
        # The item goes first: a failure in between leaves a name in the
        # index with no value, never a value that was meant to be removed.
        index = self._read_index()
        try:
            existed = self.items.delete(*self._item(entry))
            if entry in index:
                index.discard(entry)
                self._write_index(index)
        finally:
            bumped = self._bump()
        return (existed, index), bumped

    # -- on the reactor ---------------------------------------------------------

    def _forget_everything(self) -> None:
        """
        Drop every cached read.
        """
        self._cache.clear()
        self._index = None
        self._generation += 1

    def _forget_all(self, failure: Failure) -> Failure:
        """
        After a failed write the backend's state is unknown: read it again.
        """
        self._forget_everything()
        return failure

    def _check_marker(self) -> None:
        """
        Before a cached read: forget the cache when anybody wrote since.
        """
        if self._watch.changed():
            self._forget_everything()

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

    def _get(self, entry: _K) -> Deferred[_V | None]:
        """
        C{entry}'s value: a cached one at once (one C{os.stat} of the
        marker, no call to the backend and no thread hop), else read.
        """
        self._check_marker()
        if entry in self._cache:
            return succeed(self._cache[entry])
        return self._serialized(self._get_missed, entry)

    def _get_missed(self, entry: _K) -> Deferred[_V | None]:
        generation = self._generation
        d = self._load(lambda: entry in self._cache, self._read_value, entry)

        def loaded(value: _V | None) -> _V | None:
            if entry in self._cache:
                return self._cache[entry]
            if generation == self._generation:
                self._cache[entry] = value
            return value

        return d.addCallback(loaded)

    def _save(self, entry: _K, value: _V, text: str) -> Deferred[None]:
        """
        Write C{text} as C{entry}'s item; once written, C{value} is cached.
        """

        def written(index: set[_K]) -> None:
            self._cache[entry] = value
            self._index = index

        return self._serialized(
            lambda: (
                self.calls.run(self._write_entry, entry, text)
                .addCallback(self._note)
                .addCallbacks(written, self._forget_all)
            )
        )

    def _remove(self, entry: _K) -> Deferred[bool]:
        """
        Delete C{entry}'s item: whether it existed.
        """

        def removed(outcome: tuple[bool, set[_K]]) -> bool:
            existed, self._index = outcome
            self._cache[entry] = None
            self._removed(entry)
            return existed

        return self._serialized(
            lambda: (
                self.calls.run(self._delete_entry, entry)
                .addCallback(self._note)
                .addCallbacks(removed, self._forget_all)
            )
        )

    def _entries(self) -> Deferred[set[_K]]:
        """
        The index: a cached one at once, else read.
        """
        self._check_marker()
        if self._index is not None:
            return succeed(self._index)
        return self._serialized(self._index_missed)

    def _index_missed(self) -> Deferred[set[_K]]:
        generation = self._generation
        d = self._load(lambda: self._index is not None, self._read_index)

        def loaded(index: set[_K] | None) -> set[_K]:
            if self._index is not None:
                return self._index
            assert index is not None
            if generation == self._generation:
                self._index = index
            return index

        return d.addCallback(loaded)

    def _invalidate(self, entry: _K) -> None:
        self._cache.pop(entry, None)
        self._index = None  # another process may have added or removed it too
        self._generation += 1


@implementer(IHostTokenStore)
class KeyringTokenStore(_KeyringStore[Entry, Token], IndexedTokenQueries):
    """
    OAuth tokens in a keyring, one item per provider and bucket, with an index.

    It uses the backend it is given, or whatever C{keyring.get_keyring()}
    picks (which may be a plaintext file): L{open_host_stores} is how the
    host gets one that is certainly a Secret Service.
    """

    _index_item = TOKEN_INDEX_ITEM
    _index_field = "tokens"

    def __repr__(self) -> str:
        return f"<KeyringTokenStore {backend_name(self.backend)} cached={len(self._cache)}>"

    @cached_property
    def counters(self) -> RequestCounters:
        # Made on first use, so that the constructor stays the shared one.
        return RequestCounters()

    def _item(self, entry: Entry) -> tuple[str, str]:
        return token_item(*entry), f"the token of {_entry_name(entry)}"

    def _read_value(self, entry: Entry) -> Token | None:
        item, what = self._item(entry)
        data = self.items.get_json(item, what)
        if data is None:
            return None
        if not isinstance(data, dict):
            raise StoreCorrupt(
                f'keyring item "{item}" of service "{SERVICE}" is not a token object; not changed'
            )
        return Token(data)

    def _parse_member(self, member: Any) -> Entry:
        if (
            isinstance(member, list)
            and len(member) == 2
            and isinstance(member[0], str)
            and isinstance(member[1], str)
        ):
            return (member[0], member[1])
        raise ValueError

    def _removed(self, entry: Entry) -> None:
        self.counters.forget(*entry)

    def get_token(self, provider: str, bucket: str | None = None) -> Deferred[Token | None]:
        return self._get((provider, bucket or DEFAULT_BUCKET))

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
        return self._save(entry, token, text)

    def remove_token(self, provider: str, bucket: str | None = None) -> Deferred[None]:
        return self._remove((provider, bucket or DEFAULT_BUCKET)).addCallback(lambda _: None)

    def invalidate(self, provider: str, bucket: str | None = None) -> None:
        self._invalidate((provider, bucket or DEFAULT_BUCKET))


@implementer(IHostProviderKeyStore)
class KeyringProviderKeyStore(_KeyringStore[str, Secret]):
    """
    Named API keys in a keyring, one item each, with an index.
    """

    _index_item = KEY_INDEX_ITEM
    _index_field = "keys"

    def __repr__(self) -> str:
        return f"<KeyringProviderKeyStore {backend_name(self.backend)} cached={len(self._cache)}>"

    def _item(self, name: str) -> tuple[str, str]:
        return key_item(name), f"the key {name}"

    def _read_value(self, name: str) -> Secret | None:
        value = self.items.read(*self._item(name))
        return None if value is None else Secret(value)

    def _parse_member(self, member: Any) -> str:
        if isinstance(member, str):
            return member
        raise ValueError

    def get_key(self, name: str) -> Deferred[Secret | None]:
        return self._get(name)

    def save_key(self, name: str, key: Secret) -> Deferred[None]:
        if len(key.reveal()) > MAX_ITEM_CHARS:
            return fail(
                StoreError(f"keyring: the key {name} is larger than {MAX_ITEM_CHARS} characters")
            )
        return self._save(name, key, key.reveal())

    def delete_key(self, name: str) -> Deferred[bool]:
        return self._remove(name)

    def list_keys(self) -> Deferred[list[str]]:
        return self._entries().addCallback(sorted)

    def has_key(self, name: str) -> Deferred[bool]:
        return self.get_key(name).addCallback(lambda key: key is not None)

    def invalidate(self, name: str) -> None:
        self._invalidate(name)
