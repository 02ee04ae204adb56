"""
The host's stores on Redis (C{--store redis://...}), shared by every
credproxy of a fleet.

What Redis holds, under one key prefix (C{credproxy:} unless told):

    <prefix>token:<provider>:<bucket>   a hash: v (version), d (sealed token JSON)
    <prefix>key:<name>                  a hash: v (version), d (sealed key)
    <prefix>tokens, <prefix>keys        sets: what is stored (names only)
    <prefix>version                     the counter every change takes its version from
    <prefix>invalidate                  the channel every change is announced on
    <prefix>lock:<provider>:<bucket>    the fleet's refresh locks (the broker's)

Names are percent-encoded, so no name can pose as another. Values are
sealed with AES-GCM (L{credproxy.stores._crypto}), the entry's names as
associated data. Saves and removes are Lua scripts: the write, the index,
the version and the announcement happen at once, and a save can be made
conditional on the version it read (L{ICompareAndSetTokenStore}).

Each host keeps a short read cache (L{CACHE_TTL}). The announcements carry
the version of the change, so a host drops exactly the entries that are
older than a change it hears of, and its own saves keep their cached value.
When the subscription is lost, missed announcements cannot be known: the
cache is cleared when it is back, and the TTL bounds what a host may serve
meanwhile.

Every Redis call goes through the shared L{RedisConnection}, which runs it
off the reactor thread and knows when Redis is down.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from functools import cached_property
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from credproxy._secret import Secret
from credproxy.stores._counters import IndexedTokenQueries, RequestCounters
from credproxy.stores._crypto import ValueCipher, associated_data
from credproxy.stores._interfaces import (
    DEFAULT_BUCKET,
    ICompareAndSetTokenStore,
    IHostProviderKeyStore,
    IHostTokenStore,
    StoreCorrupt,
    StoreError,
)
from credproxy.stores._redis_connection import AnnouncementListener, RedisConnection
from credproxy.stores._token import Token

_K = TypeVar("_K")
_V = TypeVar("_V")
Entry = tuple[str, str]

# How long a cached read is served without asking Redis: the announcements
# clear it sooner; this bounds what a host serves while they cannot reach it.
CACHE_TTL = 5.0
MAX_CACHED_ENTRIES = 4096
MAX_VALUE_BYTES = 1024 * 1024  # a sealed value; a token is a few KiB
MAX_INDEX_MEMBERS = 100_000

_SAVE = """
local current = redis.call('HGET', KEYS[1], 'v') or '0'
if ARGV[1] ~= '*' and current ~= ARGV[1] then return {0, current} end
local version = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], 'v', version, 'd', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('PUBLISH', ARGV[4], version .. ' ' .. ARGV[5])
return {1, version}
"""
_REMOVE = """
local existed = redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
local version = redis.call('INCR', KEYS[3])
redis.call('PUBLISH', ARGV[2], version .. ' ' .. ARGV[3])
return {existed, version}
"""


class _RedisEntries(AnnouncementListener, Generic[_K, _V]):
    """
    What both Redis stores share: the entries of one kind, their sealed
    values, the cache and the index.
    """

    kind: str
    index_name: str

    def __init__(self, connection: RedisConnection, cipher: ValueCipher) -> None:
        self.connection = connection
        self.cipher = cipher
        self.description = f"redis ({connection.description})"
        self.index_key = connection.key(self.index_name)
        self.version_key = connection.key("version")
        # entry -> (value or None when known absent, its version, when read)
        self._cache: dict[_K, tuple[_V | None, int, float]] = {}
        self._generation = 0
        self._save_script = connection.client.register_script(_SAVE)
        self._remove_script = connection.client.register_script(_REMOVE)
        connection.listen(self)

    # -- what each store says ---------------------------------------------------

    @abstractmethod
    def _names(self, entry: _K) -> tuple[str, ...]:
        """
        The names of C{entry}: its Redis key's parts and its associated data.
        """

    @abstractmethod
    def _member(self, entry: _K) -> str:
        """
        How the index and the announcements name C{entry}.
        """

    @abstractmethod
    def _parse_member(self, member: str) -> _K:
        """
        The entry an index member or announcement names.

        @raise ValueError: it names none.
        """

    @abstractmethod
    def _encode(self, value: _V) -> bytes:
        """
        A value as the plaintext that is sealed.
        """

    @abstractmethod
    def _decode(self, data: bytes, where: str) -> _V:
        """
        Opened plaintext as a value.

        @raise StoreCorrupt: it is not one.
        """

    def _what(self, entry: _K) -> str:
        return f"the {self.kind} {'/'.join(self._names(entry))}"

    def _key(self, entry: _K) -> str:
        return self.connection.key(self.kind, *self._names(entry))

    # -- blocking, on the store's threads ---------------------------------------

    def _read_blocking(self, entry: _K) -> tuple[_V | None, int]:
        key = self._key(entry)
        version, sealed = self.connection.client.hmget(key, ["v", "d"])
        if sealed is None:
            return None, 0
        if not isinstance(sealed, bytes):  # the client is made without decode_responses
            raise StoreCorrupt(f"Redis key {key} does not hold bytes")
        where = f"Redis key {key}"
        if len(sealed) > MAX_VALUE_BYTES:
            raise StoreCorrupt(f"{where} is larger than {MAX_VALUE_BYTES} bytes; not credproxy's")
        try:
            number = int(version)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise StoreCorrupt(f"{where} has no version; not changed") from None
        aad = associated_data(self.kind, *self._names(entry))
        plaintext, old_key = self.cipher.open(sealed, aad, where)
        value = self._decode(plaintext, where)
        if old_key:  # sealed under a key being retired: seal it under the current one
            saved, new_version = self._write_blocking(
                entry, self.cipher.seal(plaintext, aad), number
            )
            if saved:
                number = new_version
        return value, number

    def _write_blocking(self, entry: _K, sealed: bytes, expected: int | None) -> tuple[bool, int]:
        if len(sealed) > MAX_VALUE_BYTES:
            raise StoreError(f"{self._what(entry)} is larger than {MAX_VALUE_BYTES} bytes")
        member = self._member(entry)
        saved, version = self._save_script(
            keys=[self._key(entry), self.index_key, self.version_key],
            args=[
                "*" if expected is None else str(expected),
                sealed,
                member,
                self.connection.channel,
                f"{self.kind} {member}",
            ],
        )
        return bool(saved), int(version)

    def _remove_blocking(self, entry: _K) -> tuple[bool, int]:
        member = self._member(entry)
        existed, version = self._remove_script(
            keys=[self._key(entry), self.index_key, self.version_key],
            args=[member, self.connection.channel, f"{self.kind} {member}"],
        )
        return bool(existed), int(version)

    def _index_blocking(self) -> set[_K]:
        client = self.connection.client
        if client.scard(self.index_key) > MAX_INDEX_MEMBERS:
            raise StoreCorrupt(
                f"Redis key {self.index_key} has more than {MAX_INDEX_MEMBERS} members"
            )
        found: set[_K] = set()
        for member in client.smembers(self.index_key):
            try:
                text = member.decode("utf-8") if isinstance(member, bytes) else member
                found.add(self._parse_member(text))
            except ValueError:
                raise StoreCorrupt(f"Redis key {self.index_key} is not a credproxy index") from None
        return found

    # -- on the reactor ---------------------------------------------------------

    def _now(self) -> float:
        return float(self.connection.reactor.seconds())

    def _remember(self, entry: _K, value: _V | None, version: int) -> None:
        if entry not in self._cache and len(self._cache) >= MAX_CACHED_ENTRIES:
            del self._cache[next(iter(self._cache))]  # the oldest
        self._cache[entry] = (value, version, self._now())

    def _get(self, entry: _K) -> Deferred[_V | None]:
        cached = self._cache.get(entry)
        if cached is not None and self._now() - cached[2] < CACHE_TTL:
            return succeed(cached[0])
        return self._read(entry).addCallback(lambda outcome: outcome[0])

    def _read(self, entry: _K) -> Deferred[tuple[_V | None, int]]:
        generation = self._generation

        def read(outcome: tuple[_V | None, int]) -> tuple[_V | None, int]:
            if generation == self._generation:
                self._remember(entry, *outcome)
            return outcome

        return self.connection.call(self._read_blocking, entry).addCallback(read)

    def _save(self, entry: _K, value: _V, expected: int | None) -> Deferred[bool]:
        try:
            plaintext = self._encode(value)
        except StoreError as e:
            return fail(e)
        sealed = self.cipher.seal(plaintext, associated_data(self.kind, *self._names(entry)))

        def written(outcome: tuple[bool, int]) -> bool:
            saved, version = outcome
            if saved:
                self._remember(entry, value, version)
            else:
                self._cache.pop(entry, None)
            return saved

        def unknown(failure: Failure) -> Failure:
            self._cache.pop(entry, None)  # the write may or may not have happened
            return failure

        return self.connection.call(self._write_blocking, entry, sealed, expected).addCallbacks(
            written, unknown
        )

    def _remove(self, entry: _K) -> Deferred[bool]:
        def removed(outcome: tuple[bool, int]) -> bool:
            existed, version = outcome
            self._remember(entry, None, version)
            self._removed(entry)
            return existed

        def unknown(failure: Failure) -> Failure:
            self._cache.pop(entry, None)
            return failure

        return self.connection.call(self._remove_blocking, entry).addCallbacks(removed, unknown)

    def _removed(self, entry: _K) -> None:
        """
        Once C{entry} is removed: forget what else the store keeps of it.
        """

    def _entries(self) -> Deferred[set[_K]]:
        return self.connection.call(self._index_blocking)

    def _invalidate(self, entry: _K) -> None:
        self._cache.pop(entry, None)
        self._generation += 1

    def announced(self, kind: str, member: str, version: int) -> None:
        if kind != self.kind:
            return
        try:
            entry = self._parse_member(member)
        except ValueError:
            return
        cached = self._cache.get(entry)
        if cached is None or cached[1] < version:
            self._invalidate(entry)

    def clear(self) -> None:
        self._cache.clear()
        self._generation += 1


@implementer(IHostTokenStore, ICompareAndSetTokenStore)
class RedisTokenStore(_RedisEntries[Entry, Token], IndexedTokenQueries):
    """
    OAuth tokens on Redis, one sealed hash per provider and bucket.
    """

    kind = "token"
    index_name = "tokens"

    def __repr__(self) -> str:
        return f"<RedisTokenStore {self.connection.description} cached={len(self._cache)}>"

    @cached_property
    def counters(self) -> RequestCounters:
        return RequestCounters()

    def _names(self, entry: Entry) -> tuple[str, ...]:
        return entry

    def _member(self, entry: Entry) -> str:
        return json.dumps(list(entry), ensure_ascii=True, separators=(",", ":"))

    def _parse_member(self, member: str) -> Entry:
        try:
            data = json.loads(member)
        except ValueError:
            raise ValueError("not an entry") from None
        if (
            isinstance(data, list)
            and len(data) == 2
            and isinstance(data[0], str)
            and isinstance(data[1], str)
        ):
            return (data[0], data[1])
        raise ValueError("not an entry")

    def _encode(self, value: Token) -> bytes:
        return json.dumps(value.to_json(), separators=(",", ":")).encode("utf-8")

    def _decode(self, data: bytes, where: str) -> Token:
        try:
            fields = json.loads(data)
        except ValueError:
            raise StoreCorrupt(f"{where} does not hold a token; not changed") from None
        if not isinstance(fields, dict):
            raise StoreCorrupt(f"{where} does not hold a token; not changed")
        return Token(fields)

    def _removed(self, entry: Entry) -> None:
        self.counters.forget(*entry)

    @staticmethod
    def _entry(provider: str, bucket: str | None) -> Entry:
        return (provider, bucket or DEFAULT_BUCKET)

    def get_token(self, provider: str, bucket: str | None = None) -> Deferred[Token | None]:
        return self._get(self._entry(provider, bucket))

    def save_token(self, provider: str, token: Token, bucket: str | None = None) -> Deferred[None]:
        return self._save(self._entry(provider, bucket), Token(token), None).addCallback(
            lambda _: None
        )

    def read_token_version(
        self, provider: str, bucket: str | None = None
    ) -> Deferred[tuple[Token | None, int]]:
        return self._read(self._entry(provider, bucket))

    def save_token_if(
        self, provider: str, token: Token, bucket: str | None, version: int
    ) -> Deferred[bool]:
        return self._save(self._entry(provider, bucket), Token(token), version)

    def remove_token(self, provider: str, bucket: str | None = None) -> Deferred[None]:
        return self._remove(self._entry(provider, bucket)).addCallback(lambda _: None)

    def invalidate(self, provider: str, bucket: str | None = None) -> None:
        self._invalidate(self._entry(provider, bucket))


@implementer(IHostProviderKeyStore)
class RedisProviderKeyStore(_RedisEntries[str, Secret]):
    """
    Named API keys on Redis, one sealed hash each.
    """

    kind = "key"
    index_name = "keys"

    def __repr__(self) -> str:
        return f"<RedisProviderKeyStore {self.connection.description} cached={len(self._cache)}>"

    def _names(self, entry: str) -> tuple[str, ...]:
        return (entry,)

    def _member(self, entry: str) -> str:
        return entry

    def _parse_member(self, member: str) -> str:
        return member

    def _encode(self, value: Secret) -> bytes:
        return value.reveal().encode("utf-8", "surrogatepass")

    def _decode(self, data: bytes, where: str) -> Secret:
        try:
            return Secret(data.decode("utf-8", "surrogatepass"))
        except UnicodeDecodeError:
            raise StoreCorrupt(f"{where} does not hold a key; not changed") from None

    def get_key(self, name: str) -> Deferred[Secret | None]:
        return self._get(name)

    def save_key(self, name: str, key: Secret) -> Deferred[None]:
        return self._save(name, key, None).addCallback(lambda _: None)

    def delete_key(self, name: str) -> Deferred[bool]:
        return self._remove(name)

    def list_keys(self) -> Deferred[list[str]]:
        return self._entries().addCallback(sorted)

    def has_key(self, name: str) -> Deferred[bool]:
        return self.get_key(name).addCallback(lambda key: key is not None)

    def invalidate(self, name: str) -> None:
        self._invalidate(name)
