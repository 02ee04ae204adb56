"""
Fixtures shared by the whole suite.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.redisserver import RedisServer


@pytest.fixture(autouse=True)
def private_state_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Every test's default state directory is a throwaway one, and no test
    reaches the developer's own Secret Service by accident: a test that
    wants a keyring starts its own (tests/stores/conftest.py).
    """
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)


@pytest.fixture
def socket_dir() -> Iterator[str]:
    """
    A fresh private directory with a short path: Unix socket paths are limited
    to 107 bytes, which pytest's own tmp_path can exceed.
    """
    path = tempfile.mkdtemp(prefix="cp-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def pytest_configure(config: pytest.Config) -> None:
    from tests.leakcheck import LEAK_CHECK

    LEAK_CHECK.install()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """
    Fail the run when any secret minted during it reached any log event.
    """
    from tests.leakcheck import LEAK_CHECK

    LEAK_CHECK.uninstall()
    leaks = LEAK_CHECK.leaks()
    if leaks:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        for secret, text in leaks[:10]:
            where = text.replace(secret, "<THE SECRET>")[:300]
            line = f"A secret minted by the tests reached a log event: {where}"
            if reporter is not None:
                reporter.write_line(line, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """
    One redis-server for the whole session (tests keep apart by key prefix);
    tests that stop or kill Redis start their own with C{start_redis}.
    """
    from tests.redisserver import start_redis

    server = start_redis()  # skips when redis-server is not installed
    try:
        yield server
    finally:
        server.remove()
