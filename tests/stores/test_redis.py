"""
The Redis stores against a real redis-server (one per session; each test
has a key prefix of its own): the store contract; what Redis holds (nothing
in plain text, and a value moved to another entry does not decrypt); the
read cache, its TTL and the announcements that clear it; the
compare-and-set save; key rotation; every bound; and the refusals of a bad
URL, key file or password file.

Calls run inline (L{InlineBlockingCalls}) and time is a L{Clock}, so each
test is synchronous while every Redis call is real.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
import redis
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase

from credproxy._secret import Secret
from credproxy.broker import RedisRefreshLock
from credproxy.broker._locks import (
    MAX_MERGE_ATTEMPTS,
    MERGE_BACKOFF_FIRST,
    MERGE_BACKOFF_MAX,
    merge_backoff_bound,
    merge_into_store,
)
from credproxy.cli import Console, new_token
from credproxy.stores import (
    BlockingCalls,
    ICompareAndSetTokenStore,
    IProviderKeyStore,
    ITokenStore,
    RedisConnection,
    RedisProviderKeyStore,
    RedisStoreConfig,
    RedisTokenStore,
    StoreCorrupt,
    StoreDown,
    StoreError,
    StoreUnavailable,
    Token,
    open_host_stores,
)
from credproxy.stores import _redis as redis_module
from credproxy.stores._crypto import ValueCipher, key_id, read_store_key_file
from credproxy.stores._redis_connection import MAX_ANNOUNCEMENT_BYTES
from credproxy.stores._redis_target import parse_redis_url
from credproxy.testing import InlineBlockingCalls
from tests.logcapture import captured_log, log_text
from tests.redisserver import RedisServer, unique_prefix, write_store_key
from tests.stores.contract import (
    ACCESS,
    KEY,
    REFRESH,
    KeyStoreContractMixin,
    TokenStoreContractMixin,
    token,
)

# What docs/fleet.md tells operators to allow credproxy's ACL user.
ACL_COMMANDS = (
    *("ping", "hmget", "scard", "smembers", "set", "evalsha", "script|load", "subscribe"),
    *("client|setname", "select"),
    *("hget", "hset", "incr", "sadd", "srem", "del", "publish", "get", "pexpire", "pttl"),
)
KEY_ONE = bytes.fromhex("5c" * 16 + "a3" * 16)
KEY_TWO = bytes.fromhex("19" * 16 + "e7" * 16)


@pytest.fixture(autouse=True)
def _server(request: pytest.FixtureRequest, redis_server: RedisServer) -> None:
    if request.instance is not None:
        request.instance.server = redis_server


def _bytes(value: object) -> bytes:
    assert isinstance(value, bytes)  # the test client does not decode
    return value


class RedisCase(SynchronousTestCase):
    server: RedisServer

    def setUp(self) -> None:
        self.clock = Clock()
        self.calls = InlineBlockingCalls()
        self.prefix = unique_prefix()
        self.raw = self.server.client()
        super().setUp()

    def tearDown(self) -> None:
        with contextlib.suppress(redis.ConnectionError):  # an outage test's server is gone
            keys = list(self.raw.scan_iter(match=f"{self.prefix}*"))
            if keys:
                self.raw.delete(*keys)
        self.raw.close()
        super().tearDown()

    def connection(self, url: str | None = None, **kwargs: Any) -> RedisConnection:
        target = parse_redis_url(url or self.server.url)
        connection = RedisConnection(self.clock, self.calls, target, prefix=self.prefix, **kwargs)
        self.addCleanup(connection.client.close)
        return connection

    def tokens(self, cipher: ValueCipher | None = None, **kwargs: Any) -> RedisTokenStore:
        return RedisTokenStore(self.connection(**kwargs), cipher or ValueCipher(KEY_ONE))

    def keys(self, cipher: ValueCipher | None = None) -> RedisProviderKeyStore:
        return RedisProviderKeyStore(self.connection(), cipher or ValueCipher(KEY_ONE))

    def everything_stored(self) -> bytes:
        """
        Every key under the test's prefix and every value, as Redis holds them.
        """
        dump = b""
        for key in self.raw.scan_iter(match=f"{self.prefix}*"):
            kind = self.raw.type(key)
            dump += key + b"\n"
            if kind == b"hash":
                for field, value in self.raw.hgetall(key).items():
                    dump += _bytes(field) + b"=" + _bytes(value) + b"\n"
            elif kind == b"set":
                dump += b"\n".join(_bytes(m) for m in self.raw.smembers(key)) + b"\n"
            else:
                dump += _bytes(self.raw.get(key) or b"") + b"\n"
        return dump


class RedisTokenStoreContractTests(TokenStoreContractMixin, RedisCase):
    def make_store(self) -> ITokenStore:
        return self.tokens()


class RedisKeyStoreContractTests(KeyStoreContractMixin, RedisCase):
    def make_store(self) -> IProviderKeyStore:
        return self.keys()


class AtRestTests(RedisCase):
    def test_nothing_in_plain_text(self) -> None:
        """
        A dump of every key and value (as C{redis-cli --scan} and the value
        commands show them) holds no access token, refresh token or key.
        """
        self.successResultOf(self.tokens().save_token("anthropic", token(), "work"))
        self.successResultOf(self.keys().save_key("openai", Secret(KEY)))
        dump = self.everything_stored()
        scanned = subprocess.run(
            ["redis-cli", "-p", str(self.server.port), "--scan", "--pattern", f"{self.prefix}*"],
            capture_output=True,
            check=True,
            timeout=10,
        ).stdout
        self.assertEqual(sorted(scanned.split()), sorted(self.raw.scan_iter(f"{self.prefix}*")))
        self.assertIn(b"anthropic", dump)  # names are not secret: the dump is real
        for secret in (ACCESS, REFRESH, KEY, "Bearer", "1900000000"):
            self.assertNotIn(secret.encode(), dump)

    def test_a_value_copied_to_another_entry_does_not_decrypt(self) -> None:
        tokens = self.tokens()
        self.successResultOf(tokens.save_token("anthropic", token()))
        self.successResultOf(tokens.save_token("other", token("other-access-9d1f")))
        source = f"{self.prefix}token:anthropic:default"
        target = f"{self.prefix}token:other:default"
        self.raw.hset(target, "d", self.raw.hget(source, "d") or b"")
        tokens.invalidate("other")
        error = self.failureResultOf(tokens.get_token("other"), StoreCorrupt).value
        self.assertIn("does not decrypt", str(error))
        self.assertNotIn(ACCESS, str(error))

        keys = self.keys()
        self.successResultOf(keys.save_key("a", Secret(KEY)))
        self.successResultOf(keys.save_key("b", Secret("sk-other-8e2c")))
        self.raw.hset(f"{self.prefix}key:b", "d", self.raw.hget(f"{self.prefix}key:a", "d") or b"")
        keys.invalidate("b")
        self.failureResultOf(keys.get_key("b"), StoreCorrupt)

    def test_another_key_cannot_read_it(self) -> None:
        self.successResultOf(self.tokens().save_token("anthropic", token()))
        other = self.tokens(ValueCipher(KEY_TWO))
        error = self.failureResultOf(other.get_token("anthropic"), StoreCorrupt).value
        self.assertIn(key_id(KEY_ONE).hex(), str(error))
        self.assertIn("--store-old-key-file", str(error))

    def test_an_altered_value_does_not_decrypt(self) -> None:
        tokens = self.tokens()
        self.successResultOf(tokens.save_token("anthropic", token()))
        key = f"{self.prefix}token:anthropic:default"
        sealed = bytearray(_bytes(self.raw.hget(key, "d")))
        sealed[-1] ^= 1
        self.raw.hset(key, "d", bytes(sealed))
        tokens.invalidate("anthropic")
        self.failureResultOf(tokens.get_token("anthropic"), StoreCorrupt)

    def test_not_a_sealed_value(self) -> None:
        tokens = self.tokens()
        self.raw.hset(f"{self.prefix}token:anthropic:default", mapping={"v": 1, "d": b"plain"})
        error = self.failureResultOf(tokens.get_token("anthropic"), StoreCorrupt).value
        self.assertIn("not a value credproxy sealed", str(error))

    def test_an_old_key_is_read_and_its_values_sealed_again(self) -> None:
        self.successResultOf(self.tokens().save_token("anthropic", token()))
        rotated = self.tokens(ValueCipher(KEY_TWO, [KEY_ONE]))
        got = self.successResultOf(rotated.get_token("anthropic"))
        self.assertEqual(got and got.access_token, ACCESS)
        sealed = self.raw.hget(f"{self.prefix}token:anthropic:default", "d") or b""
        self.assertEqual(sealed[1:9], key_id(KEY_TWO))
        only_new = self.tokens(ValueCipher(KEY_TWO))
        self.assertEqual(
            self.successResultOf(only_new.get_token("anthropic")), got
        )  # the old key is no longer needed


class CacheTests(RedisCase):
    def test_a_warm_read_makes_no_call(self) -> None:
        tokens = self.tokens()
        self.successResultOf(tokens.save_token("anthropic", token()))
        before = self.calls.calls
        for _ in range(3):
            self.successResultOf(tokens.get_token("anthropic"))
        self.assertEqual(self.calls.calls, before)

    def test_the_cache_expires(self) -> None:
        mine, theirs = self.tokens(), self.tokens()
        self.successResultOf(mine.save_token("anthropic", token("first")))
        self.successResultOf(mine.get_token("anthropic"))
        self.successResultOf(theirs.save_token("anthropic", token("second")))
        cached = self.successResultOf(mine.get_token("anthropic"))
        self.assertEqual(cached and cached.access_token, "first")  # no announcement heard
        self.clock.advance(redis_module.CACHE_TTL)
        fresh = self.successResultOf(mine.get_token("anthropic"))
        self.assertEqual(fresh and fresh.access_token, "second")

    def test_an_announcement_of_a_newer_version_clears_the_entry(self) -> None:
        mine, theirs = self.tokens(), self.tokens()
        self.successResultOf(mine.save_token("anthropic", token("first")))
        self.successResultOf(theirs.save_token("anthropic", token("second")))
        _, version = self.successResultOf(theirs.read_token_version("anthropic"))
        member = json.dumps(["anthropic", "default"], separators=(",", ":"))
        mine.connection._announced(f"{version} token {member}".encode())
        got = self.successResultOf(mine.get_token("anthropic"))
        self.assertEqual(got and got.access_token, "second")

    def test_an_announcement_of_our_own_save_keeps_the_cache(self) -> None:
        tokens = self.tokens()
        self.successResultOf(tokens.save_token("anthropic", token()))
        _, version = self.successResultOf(tokens.read_token_version("anthropic"))
        before = self.calls.calls
        member = json.dumps(["anthropic", "default"], separators=(",", ":"))
        tokens.connection._announced(f"{version} token {member}".encode())
        self.successResultOf(tokens.get_token("anthropic"))
        self.assertEqual(self.calls.calls, before)

    def test_junk_announcements_are_ignored(self) -> None:
        tokens = self.tokens()
        self.successResultOf(tokens.save_token("anthropic", token()))
        before = self.calls.calls
        member = json.dumps(["anthropic", "default"], separators=(",", ":"))
        too_long = f"999999 token {member}".encode() + b" " * MAX_ANNOUNCEMENT_BYTES
        for junk in (b"", b"x token y", b"12 token [1]", "ü".encode(), too_long, 12):
            tokens.connection._announced(junk)
        self.successResultOf(tokens.get_token("anthropic"))
        self.assertEqual(self.calls.calls, before)

    def test_the_cache_is_bounded(self) -> None:
        self.patch(redis_module, "MAX_CACHED_ENTRIES", 3)
        keys = self.keys()
        for name in "abcd":
            self.successResultOf(keys.save_key(name, Secret(f"sk-{name}-71c")))
        self.assertEqual(len(keys._cache), 3)
        self.assertNotIn("a", keys._cache)  # the oldest went


class CompareAndSetTests(RedisCase):
    def test_a_save_on_a_stale_version_is_refused(self) -> None:
        mine, theirs = self.tokens(), self.tokens()
        self.successResultOf(mine.save_token("anthropic", token()))
        _, version = self.successResultOf(mine.read_token_version("anthropic"))
        self.successResultOf(theirs.save_token("anthropic", token("theirs")))
        self.assertFalse(
            self.successResultOf(mine.save_token_if("anthropic", token("mine"), None, version))
        )
        got = self.successResultOf(theirs.get_token("anthropic"))
        self.assertEqual(got and got.access_token, "theirs")

    def test_version_zero_means_still_absent(self) -> None:
        mine, theirs = self.tokens(), self.tokens()
        self.assertEqual(self.successResultOf(mine.read_token_version("p")), (None, 0))
        self.assertTrue(self.successResultOf(theirs.save_token_if("p", token(), None, 0)))
        self.assertFalse(self.successResultOf(mine.save_token_if("p", token("late"), None, 0)))

    def test_two_interleaved_merges_of_different_fields_both_survive(self) -> None:
        """
        Host A reads, host B saves a field in the moment before A saves: A's
        save loses the race, reads again and merges again.
        """
        host_a, host_b = self.tokens(), self.tokens()
        self.successResultOf(host_a.save_token("anthropic", token()))
        merges = []

        def merge_a(current: Token | None) -> Token:
            merges.append(current)
            if len(merges) == 1:  # B saves its field between A's read and A's save
                stored = self.successResultOf(host_b.read_token_version("anthropic"))[0]
                assert stored is not None
                self.successResultOf(
                    host_b.save_token("anthropic", Token({**stored, "scope_b": "from-b"}))
                )
            assert current is not None
            return Token({**current, "scope_a": "from-a"})

        merging = Deferred.fromCoroutine(
            merge_into_store(host_a, "anthropic", "default", merge_a, clock=self.clock)
        )
        self.assertNoResult(merging)  # the lost race waits a moment before it reads again
        self.assertEqual(len(merges), 1)
        self.clock.advance(merge_backoff_bound(1))
        merged = self.successResultOf(merging)
        self.assertEqual(len(merges), 2)
        host_b.invalidate("anthropic")
        stored = self.successResultOf(host_b.get_token("anthropic"))
        assert stored is not None and merged is not None
        self.assertEqual((stored["scope_a"], stored["scope_b"]), ("from-a", "from-b"))
        self.assertEqual(stored.refresh_token, REFRESH)

    def test_a_merge_that_keeps_losing_gives_up(self) -> None:

        host_a, host_b = self.tokens(), self.tokens()
        self.successResultOf(host_a.save_token("anthropic", token()))
        merges = 0

        def merge_a(current: Token | None) -> Token:
            nonlocal merges
            merges += 1
            self.successResultOf(host_b.save_token("anthropic", token(f"b{merges}")))
            return token("a")

        bounds: list[float] = []

        def longest(low: float, high: float) -> float:
            bounds.append(high)
            return high

        merging = Deferred.fromCoroutine(
            merge_into_store(
                host_a, "anthropic", "default", merge_a, clock=self.clock, uniform=longest
            )
        )
        waited = 0.0
        while not merging.called and waited < 10:
            self.clock.advance(MERGE_BACKOFF_MAX)
            waited += MERGE_BACKOFF_MAX
        error = self.failureResultOf(merging, StoreError).value
        self.assertEqual(merges, MAX_MERGE_ATTEMPTS)
        self.assertIn("changed under", str(error))
        # One wait after each lost race but the last, each bound double the
        # one before, up to the cap; together under the documented 0.6 s.
        self.assertEqual(bounds, [merge_backoff_bound(n) for n in range(1, MAX_MERGE_ATTEMPTS)])
        self.assertEqual(
            bounds[:3], [MERGE_BACKOFF_FIRST, 2 * MERGE_BACKOFF_FIRST, 4 * MERGE_BACKOFF_FIRST]
        )
        self.assertEqual(max(bounds), MERGE_BACKOFF_MAX)
        self.assertLess(sum(bounds), 0.6)


class BoundsTests(RedisCase):
    def test_a_value_too_large_is_not_saved(self) -> None:
        self.patch(redis_module, "MAX_VALUE_BYTES", 200)
        keys = self.keys()
        error = self.failureResultOf(keys.save_key("big", Secret("k" * 300)), StoreError).value
        self.assertIn("larger than 200 bytes", str(error))
        self.assertEqual(self.successResultOf(keys.list_keys()), [])

    def test_a_value_too_large_in_redis_is_not_read(self) -> None:
        keys = self.keys()
        self.successResultOf(keys.save_key("big", Secret("k" * 300)))
        self.patch(redis_module, "MAX_VALUE_BYTES", 200)
        keys.invalidate("big")
        self.failureResultOf(keys.get_key("big"), StoreCorrupt)

    def test_an_index_too_large_is_not_read(self) -> None:
        self.patch(redis_module, "MAX_INDEX_MEMBERS", 2)
        keys = self.keys()
        for name in "abc":
            self.successResultOf(keys.save_key(name, Secret("sk-bound-4e1")))
        self.failureResultOf(keys.list_keys(), StoreCorrupt)

    def test_an_index_member_not_ours(self) -> None:
        tokens = self.tokens()
        self.raw.sadd(f"{self.prefix}tokens", b"not json")
        self.failureResultOf(tokens.list_providers(), StoreCorrupt)


class TargetTests(RedisCase):
    def test_unix_socket(self) -> None:
        tokens = self.tokens(url=self.server.unix_url)
        self.successResultOf(tokens.save_token("anthropic", token()))
        self.assertEqual(self.successResultOf(self.tokens().get_token("anthropic")), token())
        self.assertEqual(tokens.description, f"redis (unix://{self.server.unix_path}?db=0)")

    def test_description_names_no_password(self) -> None:
        target = parse_redis_url("rediss://fleet@redis.example:6380/3")
        self.assertEqual(target.description, "rediss://fleet@redis.example:6380/3")
        self.assertEqual(parse_redis_url("redis://[::1]/2").description, "redis://[::1]:6379/2")

    def test_refusals(self) -> None:
        for url, why in [
            ("redis://user:hunter2-pw@h:1/0", "--redis-password-file"),
            ("redis://:hunter2-pw@h:1/0", "--redis-password-file"),
            ("redis://h:1/16", "from 0 to 15"),
            ("redis://h:1/x", "from 0 to 15"),
            ("redis://h:99999/0", "not a Redis URL"),
            ("redis:///0", "names no host"),
            ("redis://h/0?ssl=1", "no ?query"),
            ("redis://h/0#f", "#fragment"),
            ("unix://relative/sock", "unix:///PATH"),
            ("unix:///s?timeout=1", "unix:///PATH"),
            ("http://h/0", "not a Redis URL"),
        ]:
            with self.assertRaises(StoreUnavailable) as raised:
                parse_redis_url(url)
            message = str(raised.exception)
            self.assertIn(why, message, url)
            self.assertNotIn("hunter2", message)
            self.assertNotIn("\n", message)

    def test_an_acl_user_with_a_password_from_a_file(self) -> None:
        user, password = f"u{self.prefix[1:-1]}", "acl-pw-6c0d1b"
        self.raw.acl_setuser(
            user,
            enabled=True,
            passwords=[f"+{password}"],
            keys=[f"{self.prefix}*"],
            channels=[f"{self.prefix}*"],
            commands=[f"+{command}" for command in ACL_COMMANDS],
        )
        self.addCleanup(self.raw.acl_deluser, user)
        directory = tempfile.mkdtemp(prefix="cp-redis-pw-")
        self.addCleanup(subprocess.run, ["rm", "-rf", directory], check=True)
        key_file = write_store_key(directory)
        password_file = os.path.join(directory, "password")
        fd = os.open(password_file, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, password.encode() + b"\n")
        os.close(fd)
        url = f"redis://{user}@127.0.0.1:{self.server.port}/0"
        config = RedisStoreConfig(
            key_file=key_file, password_file=password_file, prefix=self.prefix
        )
        stores = open_host_stores(url, directory, self.calls, reactor=self.clock, redis=config)
        assert stores.redis is not None
        self.addCleanup(stores.redis.client.close)
        self.successResultOf(stores.keys.save_key("k", Secret(KEY)))
        stores.keys.invalidate("k")
        self.assertEqual(self.successResultOf(stores.keys.get_key("k")), Secret(KEY))
        self.assertEqual(self.successResultOf(stores.keys.list_keys()), ["k"])
        self.successResultOf(stores.tokens.save_token("p", token()))
        shared = ICompareAndSetTokenStore(stores.tokens)
        self.assertFalse(self.successResultOf(shared.save_token_if("p", token(), None, 0)))
        self.successResultOf(stores.tokens.remove_token("p"))
        self.assertTrue(self.successResultOf(stores.redis.ping()))
        lock = RedisRefreshLock(self.clock, stores.redis)
        held = self.successResultOf(lock.acquire("p", "default"))
        self.clock.advance(lock.ttl / 3)  # extended
        self.assertGreater(self.raw.pttl(f"{self.prefix}lock:p:default"), (lock.ttl - 1) * 1000)
        held.release()
        self.assertEqual(self.raw.exists(f"{self.prefix}lock:p:default"), 0)
        pubsub = stores.redis.client.pubsub()
        pubsub.subscribe(stores.redis.channel)
        message = pubsub.get_message(timeout=5)
        self.assertEqual(message and message["type"], "subscribe")
        pubsub.close()
        self.assertNotIn(password, stores.description + repr(stores.keys) + repr(stores.redis))

        # The ACL allows only its prefix: another prefix is refused.
        other = RedisStoreConfig(key_file=key_file, password_file=password_file, prefix="other:")
        outside = open_host_stores(url, directory, self.calls, reactor=self.clock, redis=other)
        assert outside.redis is not None
        self.addCleanup(outside.redis.client.close)
        error = self.failureResultOf(outside.keys.save_key("k", Secret(KEY)), StoreError).value
        self.assertIn("NoPermissionError", str(error))

        wrong = os.path.join(directory, "wrong")
        fd = os.open(wrong, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"not-the-password-2f9\n")
        os.close(fd)
        config = RedisStoreConfig(key_file=key_file, password_file=wrong, prefix=self.prefix)
        refused = open_host_stores(url, directory, self.calls, reactor=self.clock, redis=config)
        assert refused.redis is not None
        self.addCleanup(refused.redis.client.close)
        with captured_log() as events:
            self.failureResultOf(refused.keys.get_key("k"), StoreDown)
        self.assertIn("AuthenticationError", log_text(events))


class KeyFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="cp-redis-key-")
        self.addCleanup(subprocess.run, ["rm", "-rf", self.directory], check=True)

    def write(self, name: str, content: str, mode: int = 0o600) -> str:
        path = os.path.join(self.directory, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, mode)
        os.write(fd, content.encode())
        os.close(fd)
        os.chmod(path, mode)
        return path

    def open(self, **config: Any) -> None:
        open_host_stores(
            "redis://127.0.0.1:1/0",
            self.directory,
            InlineBlockingCalls(),
            reactor=Clock(),
            redis=RedisStoreConfig(**config),
        )

    def test_the_new_token_format_is_a_key(self) -> None:
        path = os.path.join(self.directory, "made")
        console = Console(io.StringIO(), io.StringIO(), io.StringIO())
        self.assertEqual(new_token(path, force=False, console=console), 0)
        self.assertEqual(len(read_store_key_file(path)), 32)

    def test_refusals(self) -> None:
        good = "ab12" * 16
        cases: list[tuple[dict[str, Any], str]] = [
            ({}, "needs --store-key-file"),
            ({"key_file": os.path.join(self.directory, "missing")}, "cannot read store key file"),
            ({"key_file": self.write("short", "ab12" * 8)}, "fewer than 64 bytes"),
            ({"key_file": self.write("long", good + "00")}, "64 hex digits"),
            ({"key_file": self.write("nothex", "zz" * 32)}, "64 hex digits"),
            ({"key_file": self.write("shared", good, 0o644)}, "readable by group or others"),
            (
                {"key_file": self.write("k", good), "old_key_files": (self.write("o", "x"),)},
                "fewer than 64 bytes",
            ),
            (
                {"key_file": self.write("k2", good), "password_file": self.write("p", "")},
                "Redis password file",
            ),
            (
                {
                    "key_file": self.write("k3", good),
                    "password_file": self.write("p2", "pw", 0o640),
                },
                "readable by group or others",
            ),
            ({"key_file": self.write("k4", good), "ca_file": "/etc/ssl/ca.pem"}, "rediss://"),
            ({"key_file": self.write("k5", good), "prefix": ""}, "prefix"),
        ]
        for config, why in cases:
            with self.assertRaises(StoreUnavailable) as raised:
                self.open(**config)
            message = str(raised.exception)
            self.assertIn(why, message, config)
            self.assertNotIn("\n", message)
            self.assertNotIn(good, message)


@pytest.fixture
def throwaway_redis() -> Iterator[RedisServer]:
    from tests.redisserver import start_redis

    server = start_redis()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
def _throwaway(request: pytest.FixtureRequest, throwaway_redis: RedisServer) -> None:
    request.instance.server = throwaway_redis


@pytest.mark.usefixtures("_throwaway")
class OutageTests(RedisCase):
    """
    On a Redis of its own, stopped and started again.
    """

    def test_down_then_back(self) -> None:
        tokens = self.tokens()
        self.successResultOf(tokens.save_token("anthropic", token()))
        self.server.stop()
        with captured_log() as events:
            # A fresh cached read still answers.
            self.assertEqual(self.successResultOf(tokens.get_token("anthropic")), token())
            self.clock.advance(redis_module.CACHE_TTL)
            first = self.failureResultOf(tokens.get_token("anthropic"), StoreDown).value
            calls = self.calls.calls
            for _ in range(5):  # known to be down: answered at once, no call made
                self.failureResultOf(tokens.get_token("anthropic"), StoreDown)
                self.failureResultOf(tokens.save_token("anthropic", token()), StoreDown)
            self.assertEqual(self.calls.calls, calls)
            # The probe backs off: 0.2, 0.4, 0.8 ... s, each one call.
            delays = []
            for _ in range(4):
                delay = self.clock.getDelayedCalls()[0].getTime() - self.clock.seconds()
                delays.append(round(delay, 3))
                self.clock.advance(delay)
            self.assertEqual(delays, [0.2, 0.4, 0.8, 1.6])
            self.assertEqual(self.calls.calls, calls + 4)
            self.server.start()
            self.clock.advance(self.clock.getDelayedCalls()[0].getTime() - self.clock.seconds())
            self.assertEqual(self.clock.getDelayedCalls(), [])
            # Back, and read again: this Redis restarted empty (no persistence),
            # and the cache, cleared on recovery, does not pretend otherwise.
            self.assertIsNone(self.successResultOf(tokens.get_token("anthropic")))
            self.successResultOf(tokens.save_token("anthropic", token()))
        lines = [formatEvent(event) for event in events]
        self.assertEqual(sum("is unavailable (ConnectionError)" in line for line in lines), 1)
        self.assertEqual(sum("answers again after" in line for line in lines), 1)
        self.assertIn(self.server.url.rsplit("/", 1)[0].replace("redis://", ""), str(first))

    def test_a_save_that_fails_forgets_the_cached_entry(self) -> None:
        keys = self.keys()
        self.successResultOf(keys.save_key("k", Secret(KEY)))
        self.server.stop()
        self.failureResultOf(keys.save_key("k", Secret("sk-new-0b7")), StoreDown)
        self.assertNotIn("k", keys._cache)  # the write's fate is unknown


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[RedisServer]:
    """
    A redis-server that also speaks TLS, with a certificate for localhost
    from a CA made for this run only.
    """
    from tests.integration.test_http_upstream_tls import make_pki
    from tests.redisserver import TLSFiles, start_redis

    pki = make_pki()
    directory = tempfile.mkdtemp(prefix="cp-redis-tls-")
    ca = os.path.join(directory, "ca.pem")
    cert_and_key = os.path.join(directory, "server.pem")
    with open(ca, "wb") as f:
        f.write(pki.ca_pem)
    with open(os.open(cert_and_key, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
        f.write(pki.server_pem)
    server = start_redis(tls=TLSFiles(ca, cert_and_key))
    try:
        yield server
    finally:
        server.remove()
        subprocess.run(["rm", "-rf", directory], check=True)


@pytest.fixture
def _tls(request: pytest.FixtureRequest, tls_redis: RedisServer) -> None:
    request.instance.server = tls_redis


@pytest.mark.usefixtures("_tls")
class TLSTests(RedisCase):
    def ca(self) -> str:
        assert self.server.tls is not None
        return self.server.tls.ca

    def test_verified_tls(self) -> None:
        url = f"rediss://localhost:{self.server.tls_port}/0"
        tokens = self.tokens(url=url, ca_file=self.ca())
        self.successResultOf(tokens.save_token("anthropic", token()))
        self.assertEqual(self.successResultOf(self.tokens().get_token("anthropic")), token())
        self.assertEqual(tokens.description, f"redis (rediss://localhost:{self.server.tls_port}/0)")

    def test_an_untrusted_certificate_is_refused(self) -> None:
        tokens = self.tokens(url=f"rediss://localhost:{self.server.tls_port}/0")  # system CAs
        with captured_log() as events:
            self.failureResultOf(tokens.get_token("anthropic"), StoreDown)
        self.assertIn("is unavailable (ConnectionError)", log_text(events))

    def test_a_certificate_for_another_name_is_refused(self) -> None:
        url = f"rediss://127.0.0.1:{self.server.tls_port}/0"  # the certificate names localhost
        tokens = self.tokens(url=url, ca_file=self.ca())
        with captured_log():
            self.failureResultOf(tokens.get_token("anthropic"), StoreDown)

    def test_plain_redis_on_the_tls_port_does_not_work(self) -> None:
        tokens = self.tokens(url=f"redis://127.0.0.1:{self.server.tls_port}/0")
        with captured_log():
            self.failureResultOf(tokens.get_token("anthropic"), StoreDown)


@pytest_twisted.ensureDeferred
async def test_the_subscriber_hears_other_hosts_and_subscribes_again(
    redis_server: RedisServer,
) -> None:
    """
    With the real reactor and the store's threads: another host's save
    clears this host's cached entry through the announcement alone (well
    within the cache's lifetime), and after the subscription is killed the
    subscriber subscribes again by itself and clears the cache.
    """
    from twisted.internet import reactor

    prefix = unique_prefix()
    calls = BlockingCalls(reactor)
    calls.startService()
    connection = RedisConnection(reactor, calls, parse_redis_url(redis_server.url), prefix=prefix)
    mine = RedisTokenStore(connection, ValueCipher(KEY_ONE))
    other = RedisTokenStore(
        RedisConnection(reactor, calls, parse_redis_url(redis_server.url), prefix=prefix),
        ValueCipher(KEY_ONE),
    )
    raw = redis_server.client()

    async def until(what: str, condition: Any) -> None:
        for _ in range(200):
            if condition():
                return
            await deferLater(reactor, 0.01, lambda: None)
        raise AssertionError(f"timed out waiting for {what}")

    connection.startService()
    try:
        await until("the subscription", lambda: connection.subscribed)
        await other.save_token("anthropic", token("first"))
        assert (await mine.get_token("anthropic")) == token("first")  # cached now
        await other.save_token("anthropic", token("second"))
        await until("the announcement", lambda: ("anthropic", "default") not in mine._cache)
        assert (await mine.get_token("anthropic")) == token("second")

        raw.client_kill_filter(_type="pubsub")
        await until("the subscription lost", lambda: not connection.subscribed)
        await until("subscribed again", lambda: connection.subscribed)
        assert mine._cache == {}  # what was missed meanwhile cannot be known
    finally:
        connection.stopService()
        await calls.stopService()
        for key in raw.scan_iter(match=f"{prefix}*"):
            raw.delete(key)
        raw.close()
