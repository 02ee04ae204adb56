"""
Unix peers are identified by the kernel (SO_PEERCRED): a process of another
user is refused unless its uid is allowed. Needs root to run as another uid.
"""

from __future__ import annotations

import os

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.integration.conftest import MakeProxy
from tests.integration.unprivileged import NOBODY, SYSTEM_PYTHON, post_as_nobody
from tests.integration.upstream import Upstream
from tests.logcapture import captured_log

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid"),
    pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason="needs a system python3"),
]


def open_to_others(path: str) -> None:
    os.chmod(os.path.dirname(path), 0o755)  # noqa: S103 - the test's own throwaway directory
    os.chmod(path, 0o666)  # noqa: S103 - so that the kernel check, not the mode, decides


@pytest_twisted.ensureDeferred
async def test_other_uid_is_refused_and_logged(upstream: Upstream, make_proxy: MakeProxy) -> None:
    with captured_log() as events:
        proxy = await make_proxy()
        open_to_others(proxy.path)
        assert await deferToThread(post_as_nobody, proxy.path) == "403"
    assert upstream.received == []
    assert any(
        e.get("outcome") == "peer_refused" and f"peer_uid={NOBODY}" in str(e.get("line"))
        for e in events
    )


@pytest_twisted.ensureDeferred
async def test_allowed_uid_is_served(upstream: Upstream, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(allowed_uids=frozenset({NOBODY}))
    open_to_others(proxy.path)
    assert await deferToThread(post_as_nobody, proxy.path) == "200"
    assert len(upstream.received) == 1
