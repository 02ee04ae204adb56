"""
Refreshes across OS processes: two credproxy processes (refresh_worker.py),
each a RefreshCoordinator with a FileRefreshLock and a FileTokenStore on one
shared state directory, against one FakeOAuthServer on loopback that rotates
refresh tokens as Anthropic's does. Only real processes show that the file
lock and the re-read under it keep a rotated refresh token from being spent
twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue, gatherResults
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from credproxy.stores import FileTokenStore
from credproxy.stores._token import Token
from credproxy.testing import InlineBlockingCalls
from credproxy.testing._oauth_server import FakeOAuthServer

pytestmark = pytest.mark.slow

WORKER = os.path.join(os.path.dirname(__file__), "refresh_worker.py")
PROVIDER, BUCKET = "anthropic", "default"
ANSWER_TIMEOUT = 30.0  # seconds for one worker answer (its start included)

clock: IReactorTime = reactor
processes: IReactorProcess = reactor


def digest(value: str | None) -> str | None:
    return None if value is None else hashlib.sha256(value.encode()).hexdigest()[:16]


class Worker(ProcessProtocol):
    """
    One refresh_worker.py process: C{ask} sends a command and waits for its
    JSON answer; stderr (its log) is kept for the secret scan.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.answers: DeferredQueue[dict[str, Any]] = DeferredQueue()
        self.ended: Deferred[None] = Deferred()
        self.stdout = b""
        self.stderr = b""

    def outReceived(self, data: bytes) -> None:
        self.stdout += data
        while b"\n" in self.stdout:
            line, self.stdout = self.stdout.split(b"\n", 1)
            self.answers.put(json.loads(line))

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)

    def send(self, command: str) -> None:
        self.transport.write(command.encode() + b"\n")  # type: ignore[union-attr]

    async def ask(self, command: str) -> dict[str, Any]:
        self.send(command)
        try:
            return await self.answers.get().addTimeout(ANSWER_TIMEOUT, clock)
        except Exception:
            raise AssertionError(f"{self.name} did not answer {command!r}:\n{self.log}") from None

    @property
    def log(self) -> str:
        return self.stderr.decode("utf-8", "replace")

    async def quit(self) -> None:
        if self.ended.called:
            return
        self.send("quit")
        try:
            await self.ended.addTimeout(10, clock)
        except Exception:
            with contextlib.suppress(ProcessExitedAlready):
                self.transport.signalProcess("KILL")  # type: ignore[union-attr]


class Setup:
    def __init__(self, base: str, server: FakeOAuthServer) -> None:
        self.state = os.path.join(base, "state")
        os.makedirs(self.state, mode=0o700)
        self.locks = os.path.join(self.state, "refresh-locks")
        self.server = server
        self.workers: list[Worker] = []

    def store(self) -> FileTokenStore:
        return FileTokenStore(self.state, InlineBlockingCalls())

    def stored(self) -> Token | None:
        result: list[Token | None] = []
        self.store().get_token(PROVIDER, BUCKET).addCallback(result.append)
        return result[0]

    def spawn(self, name: str, locks: str | None = None) -> Worker:
        worker = Worker(name)
        config = json.dumps(asdict(self.server.pkce_config(PROVIDER)))
        argv = [sys.executable, WORKER, self.state, locks or self.locks, config]
        processes.spawnProcess(worker, sys.executable, argv, env=dict(os.environ))
        self.workers.append(worker)
        return worker

    def scan_logs(self) -> None:
        logs = "".join(w.log for w in self.workers)
        for secret in self.server.minted:
            assert secret not in logs
        assert "Traceback" not in logs, logs


@pytest_twisted.async_yield_fixture
async def setup(tmp_path: Any) -> AsyncIterator[Setup]:
    server = FakeOAuthServer(reactor)
    server.listen(reactor)
    env = Setup(str(tmp_path), server)
    try:
        yield env
    finally:
        for worker in env.workers:
            await worker.quit()
        await server.stop()


async def until(condition: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    waited = 0.0
    while not condition():
        if waited >= limit:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(clock, 0.01, lambda: None)
        waited += 0.01


@pytest_twisted.ensureDeferred
async def test_ten_refreshes_in_each_of_two_processes_make_one_token_call(setup: Setup) -> None:
    server = setup.server
    server.delay = 0.5  # the winner's call is still out while the other process asks
    login = server.issue_token()
    await setup.store().save_token(PROVIDER, login, BUCKET)
    a, b = setup.spawn("a"), setup.spawn("b")
    assert await a.ask("prime") == {"stored": True}
    assert await b.ask("prime") == {"stored": True}

    answers = await gatherResults(
        [Deferred.fromCoroutine(a.ask("refresh 10")), Deferred.fromCoroutine(b.ask("refresh 10"))]
    )

    assert server.grants["refresh_token"] == 1
    stored = setup.stored()
    assert stored is not None and stored.refresh_token is not None
    assert stored.refresh_token != login.refresh_token  # the rotated one is stored...
    assert server.is_live(stored.refresh_token)  # ...and is the one the server now accepts
    for answer in answers:
        assert answer == {"tokens": [digest(stored.access_token)] * 10, "errors": []}
    logs = a.log + b.log
    assert logs.count(": refreshed after 1 provider call(s)") == 1
    assert logs.count(": adopted after 0 provider call(s)") == 1
    setup.scan_logs()


@pytest_twisted.ensureDeferred
async def test_invalid_grant_after_the_other_process_rotated_uses_its_token(
    setup: Setup,
) -> None:
    """
    Process b's lock does not cover process a (a lock lost on failover, or a
    process started with another lock directory): b spends the refresh
    token a has just rotated, gets invalid_grant, re-reads the store and
    answers a's token; nothing is deleted.
    """
    server = setup.server
    login = server.issue_token()
    await setup.store().save_token(PROVIDER, login, BUCKET)
    a = setup.spawn("a")
    b = setup.spawn("b", locks=os.path.join(setup.state, "other-locks"))
    assert await a.ask("prime") == {"stored": True}
    assert await b.ask("prime") == {"stored": True}  # b's cache holds the login

    server.delay = 1.0  # a's answer (and so a's save) comes 1 s after its call
    from_a = Deferred.fromCoroutine(a.ask("refresh 1"))
    await until(lambda: server.grants["refresh_token"] == 1, "a's token call")
    server.delay = 3.0  # b's refusal arrives well after a has saved
    from_b = Deferred.fromCoroutine(b.ask("refresh 10"))
    answer_a, answer_b = await gatherResults([from_a, from_b])

    assert server.grants["refresh_token"] == 2  # a's, and b's refused one
    stored = setup.stored()
    assert stored is not None and stored.refresh_token is not None
    assert server.is_live(stored.refresh_token)
    assert not server.is_live(login.refresh_token or "")
    assert answer_a == {"tokens": [digest(stored.access_token)], "errors": []}
    assert answer_b == {"tokens": [digest(stored.access_token)] * 10, "errors": []}
    assert b.log.count(": adopted after 1 provider call(s)") == 1
    setup.scan_logs()
