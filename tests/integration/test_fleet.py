"""
A fleet of C{twistd credproxy} processes on one real redis-server
(C{--store redis://...}), each with its HTTP face and credential socket:

 - An expired token under concurrent HTTP requests on three hosts makes
   exactly one call to the token endpoint fleet-wide; every request goes
   upstream with the new access token, and the rotated refresh token is the
   one stored.
 - A token saved through one host is read through the others at once (the
   announcement, not the cache's expiry, tells them).
 - Redis stopped and started again under load: 503 on the HTTP face and
   INTERNAL_ERROR "Credential store unavailable" on the socket while it is
   down, one log line per outage, service back on its own, nothing written
   anywhere else.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from credproxy.stores import RedisConnection, RedisTokenStore, Token
from credproxy.stores._crypto import ValueCipher, read_store_key_file
from credproxy.stores._redis import CACHE_TTL
from credproxy.stores._redis_target import parse_redis_url
from credproxy.testing import FakeOAuthServer, InlineBlockingCalls
from credproxy.wire import BlockingProxySocketClient, ProxyRequestError
from tests.integration.test_twistd import (
    STOPPED_BY_SIGTERM,
    Running,
    Upstream,
    post_messages,
    start,
    upstream,
    wait_exit,
    wait_serving,
)
from tests.redisserver import RedisServer, start_redis, unique_prefix, write_store_key

pytestmark = pytest.mark.slow
__all__ = ["upstream"]  # the fixture, used by name

REQUESTS_PER_HOST = 4
HOURS = 3600.0
STORE_DOWN_TEXT = "credproxy could not read its credential store"


@dataclass
class Fleet:
    base: str
    redis: RedisServer
    oauth: FakeOAuthServer
    upstream_url: str
    prefix: str
    key_file: str
    config: str
    hosts: list[Running]

    def store(self) -> RedisTokenStore:
        connection = RedisConnection(
            reactor, InlineBlockingCalls(), parse_redis_url(self.redis.url), prefix=self.prefix
        )
        return RedisTokenStore(connection, ValueCipher(read_store_key_file(self.key_file)))

    def stored(self, provider: str = "anthropic") -> Token | None:
        result: list[Token | None] = []
        store = self.store()
        store.get_token(provider).addCallback(result.append)
        store.connection.client.close()
        return result[0]

    def save(self, token: Token) -> None:
        store = self.store()
        store.save_token("anthropic", token)
        store.connection.client.close()

    def state_dir(self, name: str) -> str:
        return os.path.join(self.base, f"state-{name}")

    async def start(self, *names: str) -> list[Running]:
        started = []
        for name in names:
            runtime = os.path.join(self.base, name)
            os.mkdir(runtime, 0o700)
            started.append(
                start(
                    runtime,
                    "--store",
                    self.redis.url,
                    "--store-key-file",
                    self.key_file,
                    "--redis-prefix",
                    self.prefix,
                    "--state-dir",
                    self.state_dir(name),
                    "--config",
                    self.config,
                    "--upstream",
                    self.upstream_url,
                    env={"ANTHROPIC_API_KEY": ""},  # the stored token is the credential
                )
            )
        for each in started:
            await wait_serving(each, each.http_sock, each.cred_sock)
        self.hosts.extend(started)
        return started

    async def stop(self) -> None:
        for each in self.hosts:
            each.process.send_signal(signal.SIGTERM)
            assert await wait_exit(each) in STOPPED_BY_SIGTERM
            output = each.output()
            for secret in self.oauth.minted:
                assert secret not in output
            assert "Traceback" not in output, output


@pytest.fixture
def fleet_files(socket_dir: str) -> Iterator[tuple[str, str]]:
    yield socket_dir, write_store_key(socket_dir)


async def make_fleet(base: str, key_file: str, server: RedisServer, upstream_url: str) -> Fleet:
    oauth = FakeOAuthServer(reactor)
    oauth.listen(reactor)
    config = os.path.join(base, "oauth.toml")
    with open(config, "w") as f:
        f.write(oauth.oauth_toml())
    return Fleet(base, server, oauth, upstream_url, unique_prefix(), key_file, config, [])


async def cleanup(fleet: Fleet) -> None:
    for each in fleet.hosts:
        if each.process.poll() is None:
            each.process.kill()
            each.process.wait()
    await fleet.oauth.stop()


def request(path: str, op: str, payload: dict[str, Any]) -> dict[str, Any]:
    with BlockingProxySocketClient(path, request_timeout=20) as client:
        answer: dict[str, Any] = client.request(op, payload)
        return answer


def post_all(paths: list[str], per_host: int) -> list[tuple[int, bytes]]:
    barrier = threading.Barrier(len(paths) * per_host)
    answers: list[tuple[int, bytes]] = []
    lock = threading.Lock()

    def one(path: str) -> None:
        barrier.wait(30)
        answer = post_messages(path, stream=False)
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=one, args=(p,)) for p in paths for _ in range(per_host)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return answers


def save_fields_concurrently(paths: list[str], per_host: int = 8) -> list[str]:
    """
    C{per_host} clients per host, all at once, each saving a field of its
    own into the token of provider C{merged}.
    """
    barrier = threading.Barrier(len(paths) * per_host)
    names = [f"field_{p}_{i}" for p in range(len(paths)) for i in range(per_host)]

    def one(path: str, name: str) -> None:
        with BlockingProxySocketClient(path, request_timeout=20) as client:
            client.request("list_providers", {})  # connected and handshaken
            barrier.wait(30)
            client.request("save_token", {"provider": "merged", "token": {name: name}})

    threads = [
        threading.Thread(target=one, args=(paths[p], f"field_{p}_{i}"))
        for p in range(len(paths))
        for i in range(per_host)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return names


@pytest_twisted.ensureDeferred
async def test_three_hosts_refresh_once_and_see_each_others_saves(
    redis_server: RedisServer, fleet_files: tuple[str, str], upstream: Upstream
) -> None:
    base, key_file = fleet_files
    fleet = await make_fleet(base, key_file, redis_server, upstream.url)
    try:
        fleet.save(fleet.oauth.issue_token(expires_in=10 * HOURS))  # renewal stays far off
        hosts = await fleet.start("a", "b", "c")
        # Every host has read the login (each one's cache holds it)...
        for host in hosts:
            assert request(host.cred_sock, "get_token", {"provider": "anthropic"})
        # ...when another host stores one that has expired: the next requests must refresh.
        fleet.oauth.delay = 0.5  # the winner's call is still out while the others ask
        expired = fleet.oauth.issue_token(expires_in=-60)
        fleet.save(expired)
        await deferLater(reactor, 0.2, lambda: None)  # the announcement's way

        answers = await deferToThread(post_all, [h.http_sock for h in hosts], REQUESTS_PER_HOST)

        assert [status for status, _ in answers] == [200] * (3 * REQUESTS_PER_HOST), answers
        assert fleet.oauth.grants["refresh_token"] == 1
        stored = fleet.stored()
        assert stored is not None and stored.refresh_token is not None
        assert stored.refresh_token != expired.refresh_token
        assert fleet.oauth.is_live(stored.refresh_token)
        sent = [h.get("authorization") for h in upstream.recorded.headers]
        assert sent == [f"Bearer {stored.access_token}"] * (3 * REQUESTS_PER_HOST)

        # A token saved through one host is read through the others, well
        # before their caches would have expired.
        a, b, c = hosts
        for host in (b, c):
            with pytest.raises(ProxyRequestError) as absent:
                request(host.cred_sock, "get_token", {"provider": "other"})
            assert absent.value.code == "NOT_FOUND"  # now cached as absent
        saved_at = time.monotonic()
        request(a.cred_sock, "save_token", {"provider": "other", "token": {"access_token": "o-1"}})
        for host in (b, c):
            while True:
                try:
                    got = request(host.cred_sock, "get_token", {"provider": "other"})
                    break
                except ProxyRequestError:
                    assert time.monotonic() - saved_at < CACHE_TTL / 2, "not announced"
                    await deferLater(reactor, 0.02, lambda: None)
            assert got["access_token"] == "o-1"
        # Concurrent saves of different fields through all three hosts: each
        # is a compare-and-set, a lost race merges again, and no field is lost.
        fields = await deferToThread(save_fields_concurrently, [h.cred_sock for h in hosts])
        merged = fleet.stored("merged")
        assert merged is not None
        assert {k: merged[k] for k in fields} == {k: k for k in fields}
        await fleet.stop()
        for name in "abc":  # a Redis host keeps nothing on its disk
            assert not os.path.exists(os.path.join(fleet.state_dir(name), "tokens.json"))
    finally:
        await cleanup(fleet)


@dataclass
class Seen:
    http: list[tuple[float, int, bytes, str]]  # when, status, body, which host
    wire: list[tuple[float, str, str]]  # when, answer, which host


def load(paths: list[Running], stop: threading.Event, seen: Seen) -> None:
    """
    Requests on every host's two faces, one after another, until stopped.
    """
    while not stop.is_set():
        for host in paths:
            status, body = post_messages(host.http_sock, stream=False)
            seen.http.append((time.monotonic(), status, body, host.runtime))
            try:
                request(host.cred_sock, "get_token", {"provider": "anthropic"})
                seen.wire.append((time.monotonic(), "ok", host.runtime))
            except ProxyRequestError as e:
                seen.wire.append((time.monotonic(), f"{e.code} {e.message}", host.runtime))
        time.sleep(0.05)


@pytest_twisted.ensureDeferred
async def test_redis_stopped_and_started_again_under_load(
    fleet_files: tuple[str, str], upstream: Upstream
) -> None:
    base, key_file = fleet_files
    # This Redis keeps its data over the restart, as a deployed one does.
    server = start_redis(extra=("--appendonly", "yes", "--appendfsync", "always"))
    fleet = await make_fleet(base, key_file, server, upstream.url)
    stop = threading.Event()
    seen = Seen([], [])
    try:
        fleet.save(fleet.oauth.issue_token(expires_in=10 * HOURS))
        hosts = await fleet.start("a", "b")
        worker = threading.Thread(target=load, args=(hosts, stop, seen))
        worker.start()

        async def until(what: str, condition: Any, limit: float) -> float:
            deadline = time.monotonic() + limit
            while not condition():
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                await deferLater(reactor, 0.05, lambda: None)
            return time.monotonic()

        await until("requests served", lambda: len(seen.http) >= 4, 20)
        assert {s for _, s, _, _ in seen.http} == {200}
        server.stop()
        stopped = time.monotonic()
        everyone = {host.runtime for host in hosts}
        await until(
            "errors on both faces of every host",
            lambda: (
                {h for t, s, _, h in seen.http if t > stopped and s == 503} == everyone
                and {h for t, r, h in seen.wire if t > stopped and r != "ok"} == everyone
            ),
            CACHE_TTL + 10,
        )
        server.start()
        restarted = time.monotonic()
        await until(
            "service to resume",
            lambda: {h for t, s, _, h in seen.http if t > restarted and s == 200} == everyone,
            20,
        )
        stop.set()
        await deferToThread(worker.join, 30)

        during = [(s, b) for t, s, b, _ in seen.http if stopped < t < restarted]
        assert {s for s, _ in during} <= {200, 503}  # fresh cached reads, then 503
        for status, body in during:
            if status == 503:
                error = json.loads(body)["error"]
                assert error["type"] == "overloaded_error"
                assert STORE_DOWN_TEXT in error["message"]
        wire = {r for t, r, _ in seen.wire if stopped < t < restarted}
        assert wire <= {"ok", "INTERNAL_ERROR Credential store unavailable"}, wire
        assert "INTERNAL_ERROR Credential store unavailable" in wire
        await fleet.stop()
        for host in hosts:
            output = host.output()
            assert output.count("is unavailable (ConnectionError)") == 1, output
            assert output.count("answers again after") == 1, output
            assert STORE_DOWN_TEXT not in output  # not a line per request
        for name in "ab":  # nothing written anywhere as a fallback
            state = fleet.state_dir(name)
            assert not os.path.exists(state) or os.listdir(state) == [], os.listdir(state)
    finally:
        stop.set()
        await cleanup(fleet)
        server.remove()


@pytest_twisted.ensureDeferred
async def test_status_and_set_key_on_a_redis_store(
    redis_server: RedisServer, fleet_files: tuple[str, str]
) -> None:
    """
    The host commands open the Redis store too: set-key stores a key every
    host sees, and status shows the store as its URL (never a password)
    and whether Redis answers.
    """
    from tests.integration.test_cli import command

    base, key_file = fleet_files
    prefix = unique_prefix()
    password_file = os.path.join(base, "redis.pw")
    with open(os.open(password_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write("pw-status-5f3c0e\n")  # never shown, not even when Redis is unreachable
    stores = ["--store", redis_server.url, "--store-key-file", key_file, "--redis-prefix", prefix]

    stored = await deferToThread(
        command, base, "set-key", "anthropic", *stores, input="sk-ant-api03-fleet-key-77e1\n"
    )
    assert stored.returncode == 0, stored.stderr
    assert f"redis ({redis_server.url})" in stored.stdout

    shown = await deferToThread(command, base, "status", *stores)
    assert shown.returncode == 0, shown.stderr
    assert f"Store: redis ({redis_server.url})" in shown.stdout
    assert "Redis answers: yes" in shown.stdout
    assert "  anthropic" in shown.stdout
    report = json.loads((await deferToThread(command, base, "status", "--json", *stores)).stdout)
    assert report["store_answers"] is True and report["keys"] == ["anthropic"]

    dead = ["--store", "redis://127.0.0.1:1/0", "--store-key-file", key_file]
    down = await deferToThread(
        command, base, "status", *dead, "--redis-password-file", password_file
    )
    assert down.returncode == 1
    assert "Store: redis (redis://127.0.0.1:1/0)" in down.stdout
    assert "Redis answers: no" in down.stdout
    report = json.loads((await deferToThread(command, base, "status", "--json", *dead)).stdout)
    assert report["store_answers"] is False
    for output in (stored, shown, down):
        assert "pw-status-5f3c0e" not in output.stdout + output.stderr
        assert "sk-ant-api03-fleet-key-77e1" not in output.stdout + output.stderr
        assert "Traceback" not in output.stderr
