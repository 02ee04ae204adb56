"""
Two C{twistd credproxy} processes on one host share a file store: ten
concurrent refreshes asked of each make exactly one call to the token
endpoint, every caller gets the same rotated token, and the refresh token
stored is the one the provider now honours.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from credproxy.stores import FileTokenStore
from credproxy.testing import FakeOAuthServer, InlineBlockingCalls
from tests.integration.test_twistd import (
    STOPPED_BY_SIGTERM,
    Running,
    start,
    wait_exit,
    wait_serving,
)

pytestmark = pytest.mark.slow

CALLERS_PER_PROCESS = 10
HOURS = 3600.0


def refresh_all(paths: list[str]) -> list[Any]:
    """
    C{CALLERS_PER_PROCESS} clients per socket, each on its own thread and
    connection, all sending C{refresh_token} at once.
    """
    from credproxy.wire import BlockingProxySocketClient

    barrier = threading.Barrier(len(paths) * CALLERS_PER_PROCESS)
    answers: list[Any] = []
    lock = threading.Lock()

    def one(path: str) -> None:
        with BlockingProxySocketClient(path, request_timeout=30) as client:
            client.request("list_providers", {})  # connected and handshaken
            barrier.wait(30)
            answer = client.request("refresh_token", {"provider": "anthropic"})
        with lock:
            answers.append(answer)

    threads = [
        threading.Thread(target=one, args=(path,))
        for path in paths
        for _ in range(CALLERS_PER_PROCESS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return answers


@pytest_twisted.ensureDeferred
async def test_two_processes_refresh_once_between_them(socket_dir: str) -> None:
    server = FakeOAuthServer(reactor)
    server.listen(reactor)
    state = os.path.join(socket_dir, "state")
    config = os.path.join(socket_dir, "oauth.toml")
    with open(config, "w") as f:
        f.write(server.oauth_toml())
    seeded = server.issue_token(expires_in=10 * HOURS)  # renewal stays far off
    store = FileTokenStore(state, InlineBlockingCalls())
    await store.save_token("anthropic", seeded)

    running: list[Running] = []
    try:
        for name in ("a", "b"):
            runtime = os.path.join(socket_dir, name)
            os.mkdir(runtime, 0o700)
            running.append(
                start(runtime, "--store", "file", "--state-dir", state, "--config", config)
            )
        for each in running:
            await wait_serving(each, each.cred_sock)

        answers = await deferToThread(refresh_all, [each.cred_sock for each in running])

        assert len(answers) == 2 * CALLERS_PER_PROCESS
        assert server.grants["refresh_token"] == 1
        assert {answer["access_token"] for answer in answers} != {seeded["access_token"]}
        assert len({answer["access_token"] for answer in answers}) == 1
        assert all("refresh_token" not in answer for answer in answers)
        store.invalidate("anthropic")
        stored = await store.get_token("anthropic")
        assert stored is not None and stored.refresh_token is not None
        assert stored.refresh_token != seeded.refresh_token
        assert server.is_live(stored.refresh_token)
        for each in running:
            each.process.send_signal(signal.SIGTERM)
            assert await wait_exit(each) in STOPPED_BY_SIGTERM
            output = each.output()
            for secret in server.minted:
                assert secret not in output
    finally:
        for each in running:
            if each.process.poll() is None:
                each.process.kill()
                each.process.wait()
        await server.stop()
