"""
Unix peers are identified by the kernel (SO_PEERCRED): a process of another
user is refused unless its uid is allowed. Needs root to run as another uid.
"""

from __future__ import annotations

import os
import subprocess

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.integration.conftest import MakeProxy
from tests.integration.upstream import Upstream
from tests.logcapture import captured_log

NOBODY = 65534

# The client must run as another user, who cannot reach root's virtualenv; it
# only needs the standard library, so the system interpreter does.
SYSTEM_PYTHON = "/usr/bin/python3"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid"),
    pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason="needs a system python3"),
]

CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
body = json.dumps({"model": "m", "max_tokens": 1, "messages": []}).encode()
s.sendall(b"POST /v1/messages HTTP/1.1\\r\\nhost: x\\r\\nconnection: close\\r\\n"
          b"x-api-key: p\\r\\ncontent-length: %d\\r\\n\\r\\n" % len(body) + body)
data = b""
while chunk := s.recv(65536):
    data += chunk
print(data.split(b" ")[1].decode())
"""


def as_nobody(path: str) -> str:
    result = subprocess.run(
        [SYSTEM_PYTHON, "-c", CLIENT, path],
        user=NOBODY,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return result.stdout.strip()


def open_to_others(path: str) -> None:
    os.chmod(os.path.dirname(path), 0o755)  # noqa: S103 - the test's own throwaway directory
    os.chmod(path, 0o666)  # noqa: S103 - so that the kernel check, not the mode, decides


@pytest_twisted.ensureDeferred
async def test_other_uid_is_refused_and_logged(upstream: Upstream, make_proxy: MakeProxy) -> None:
    with captured_log() as events:
        proxy = await make_proxy()
        open_to_others(proxy.path)
        assert await deferToThread(as_nobody, proxy.path) == "403"
    assert upstream.received == []
    assert any(
        e.get("outcome") == "peer_refused" and f"peer_uid={NOBODY}" in str(e.get("line"))
        for e in events
    )


@pytest_twisted.ensureDeferred
async def test_allowed_uid_is_served(upstream: Upstream, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(allowed_uids=frozenset({NOBODY}))
    open_to_others(proxy.path)
    assert await deferToThread(as_nobody, proxy.path) == "200"
    assert len(upstream.received) == 1
