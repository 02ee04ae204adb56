"""
Fixtures shared by the whole suite.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import pytest


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
