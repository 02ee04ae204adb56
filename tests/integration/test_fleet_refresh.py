"""
Refreshes across a fleet: credproxy hosts (redis_refresh_worker.py), each a
RefreshCoordinator with the Redis token store and the fleet's Redis refresh
lock, on one real redis-server, against one FakeOAuthServer that rotates
refresh tokens as Anthropic's does.

 - Ten refreshes asked of each of three hosts make one token call.
 - The lock holder killed (SIGKILL) while its token call hangs: the lock
   expires, another host refreshes, no token is lost, nobody is logged out.
 - A host whose lock does not cover the others (as after a failover) spends
   a refresh token another host has just rotated: its invalid_grant re-reads
   the store and it uses the other host's token; nothing is lost.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import asdict, replace
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater

from credproxy.stores import RedisConnection, RedisTokenStore, Token
from credproxy.stores._crypto import ValueCipher, read_store_key_file
from credproxy.stores._redis_target import parse_redis_url
from credproxy.testing import InlineBlockingCalls
from credproxy.testing._oauth_server import FakeOAuthServer
from tests.integration.test_refresh_processes import (
    BUCKET,
    PROVIDER,
    Worker,
    digest,
    processes,
    until,
)
from tests.redisserver import RedisServer, unique_prefix, write_store_key

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOCK_TTL = 1.0  # seconds a killed holder keeps the lock


class Fleet:
    def __init__(self, base: str, server: FakeOAuthServer, redis_server: RedisServer) -> None:
        self.server = server
        self.redis = redis_server
        self.prefix = unique_prefix()
        self.key_file = write_store_key(base)
        self.workers: list[Worker] = []
        connection = RedisConnection(
            reactor, InlineBlockingCalls(), parse_redis_url(redis_server.url), prefix=self.prefix
        )
        self.store = RedisTokenStore(connection, ValueCipher(read_store_key_file(self.key_file)))

    def stored(self) -> Token | None:
        result: list[Token | None] = []
        self.store.invalidate(PROVIDER, BUCKET)
        self.store.get_token(PROVIDER, BUCKET).addCallback(result.append)
        return result[0]

    def spawn(
        self, name: str, token_url: str | None = None, lock_prefix: str | None = None
    ) -> Worker:
        worker = Worker(name)
        config = self.server.pkce_config(PROVIDER)
        if token_url is not None:
            config = replace(config, token_url=token_url)
        argv = [
            sys.executable,
            "-m",
            "tests.integration.redis_refresh_worker",
            self.redis.url,
            self.prefix,
            self.key_file,
            json.dumps(asdict(config)),
            str(LOCK_TTL),
            *([lock_prefix] if lock_prefix else []),
        ]
        processes.spawnProcess(worker, sys.executable, argv, env=dict(os.environ), path=ROOT)
        self.workers.append(worker)
        return worker

    def scan_logs(self) -> None:
        logs = "".join(w.log for w in self.workers)
        for secret in self.server.minted:
            assert secret not in logs
        assert "Traceback" not in logs, logs


@pytest_twisted.async_yield_fixture
async def fleet(tmp_path: Any, redis_server: RedisServer) -> AsyncIterator[Fleet]:
    server = FakeOAuthServer(reactor)
    server.listen(reactor)
    env = Fleet(str(tmp_path), server, redis_server)
    try:
        yield env
    finally:
        for worker in env.workers:
            await worker.quit()
        await server.stop()
        env.store.connection.client.close()


@pytest_twisted.ensureDeferred
async def test_ten_refreshes_on_each_of_three_hosts_make_one_token_call(fleet: Fleet) -> None:
    server = fleet.server
    server.delay = 0.5  # the winner's call is still out while the others ask
    login = server.issue_token()
    await fleet.store.save_token(PROVIDER, login, BUCKET)
    hosts = [fleet.spawn(name) for name in "abc"]
    for host in hosts:
        assert await host.ask("prime") == {"stored": True}

    answers = await gatherResults([Deferred.fromCoroutine(h.ask("refresh 10")) for h in hosts])

    assert server.grants["refresh_token"] == 1
    stored = fleet.stored()
    assert stored is not None and stored.refresh_token is not None
    assert stored.refresh_token != login.refresh_token
    assert server.is_live(stored.refresh_token)
    for answer in answers:
        assert answer == {"tokens": [digest(stored.access_token)] * 10, "errors": []}
    logs = "".join(h.log for h in hosts)
    assert logs.count(": refreshed after 1 provider call(s)") == 1
    assert logs.count(": adopted after 0 provider call(s)") == 2
    fleet.scan_logs()


@pytest_twisted.ensureDeferred
async def test_the_lock_holder_killed_mid_refresh(fleet: Fleet) -> None:
    server = fleet.server
    # Host a's token endpoint takes its call and never answers: a is stuck
    # inside its refresh, holding the lock, when it is killed.
    hole = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")  # type: ignore[arg-type]
    try:
        address = hole.getHost()
        assert isinstance(address, IPv4Address)
        login = server.issue_token()
        await fleet.store.save_token(PROVIDER, login, BUCKET)
        a = fleet.spawn("a", token_url=f"http://127.0.0.1:{address.port}/v1/oauth/token")
        b = fleet.spawn("b")
        assert await a.ask("prime") == {"stored": True}
        assert await b.ask("prime") == {"stored": True}
        lock_key = f"{fleet.prefix}lock:{PROVIDER}:{BUCKET}"
        raw = fleet.redis.client()

        a.send("refresh 1")
        await until(lambda: raw.exists(lock_key) == 1, "a to take the lock")
        refreshed = Deferred.fromCoroutine(b.ask("refresh 5"))  # b waits on a's lock
        # Longer than the lock's TTL: a, alive, keeps extending it, and b waits.
        await deferLater(reactor, 1.5 * LOCK_TTL, lambda: None)
        assert not refreshed.called
        assert server.grants["refresh_token"] == 0
        a.transport.signalProcess(signal.SIGKILL)  # type: ignore[union-attr]
        await a.ended.addTimeout(10, reactor)

        answer = await refreshed
        stored = fleet.stored()
        assert stored is not None and stored.refresh_token is not None
        assert server.grants["refresh_token"] == 1  # b's: a's never reached the server
        assert server.is_live(stored.refresh_token)  # nothing lost: the rotated one is stored
        assert answer == {"tokens": [digest(stored.access_token)] * 5, "errors": []}
        # b gives it back on its store threads, after the answers went out.
        await until(lambda: raw.exists(lock_key) == 0, "b to give the lock back")
        # A host started after the crash is not logged out either.
        c = fleet.spawn("c")
        assert await c.ask("prime") == {"stored": True}
        raw.close()
    finally:
        await maybeDeferred(hole.stopListening)
    fleet.scan_logs()


@pytest_twisted.ensureDeferred
async def test_a_host_without_the_lock_is_saved_by_the_re_read(fleet: Fleet) -> None:
    server = fleet.server
    login = server.issue_token()
    await fleet.store.save_token(PROVIDER, login, BUCKET)
    a = fleet.spawn("a")
    b = fleet.spawn("b", lock_prefix=unique_prefix())
    assert await a.ask("prime") == {"stored": True}
    assert await b.ask("prime") == {"stored": True}

    server.delay = 1.0  # a's answer (and so a's save) comes 1 s after its call
    from_a = Deferred.fromCoroutine(a.ask("refresh 1"))
    await until(lambda: server.grants["refresh_token"] == 1, "a's token call")
    server.delay = 3.0  # b's refusal arrives well after a has saved
    from_b = Deferred.fromCoroutine(b.ask("refresh 5"))
    answer_a, answer_b = await gatherResults([from_a, from_b])

    assert server.grants["refresh_token"] == 2  # a's, and b's refused one
    stored = fleet.stored()
    assert stored is not None and stored.refresh_token is not None
    assert server.is_live(stored.refresh_token)
    assert not server.is_live(login.refresh_token or "")
    assert answer_a == {"tokens": [digest(stored.access_token)], "errors": []}
    assert answer_b == {"tokens": [digest(stored.access_token)] * 5, "errors": []}
    assert b.log.count(": adopted after 1 provider call(s)") == 1
    fleet.scan_logs()
