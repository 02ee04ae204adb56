"""
Real-socket fixtures: the fake API on loopback TCP and the HTTP face on a
Unix socket, both torn down (ports, pools, timers) after each test.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred

from credproxy._listen import unix_description
from credproxy.broker.credentials import EnvironmentCredentialSource, ICredentialSource
from credproxy.http import HTTPFace, HTTPProxyConfig
from tests.integration.upstream import Upstream

REAL_API_KEY = "sk-ant-api03-REAL-key-for-tests-0123456789abcdef"
REAL_OAUTH_TOKEN = "sk-ant-oat01-REAL-oauth-token-for-tests-0123456789"


@pytest_twisted.async_yield_fixture
async def upstream() -> AsyncIterator[Upstream]:
    fake = Upstream()
    fake.port = reactor.listenTCP(0, fake.site(), interface="127.0.0.1")  # type: ignore[arg-type]
    try:
        yield fake
    finally:
        await maybeDeferred(fake.port.stopListening)


@dataclass
class RunningProxy:
    face: HTTPFace
    path: str

    @property
    def in_flight(self) -> int:
        return self.face.site.proxy.in_flight


MakeProxy = Callable[..., Awaitable[RunningProxy]]


@pytest_twisted.async_yield_fixture
async def make_proxy(upstream: Upstream, socket_dir: str) -> AsyncIterator[MakeProxy]:
    """
    Start the HTTP face on a Unix socket: C{await make_proxy(environ=..., **config)}.
    """
    faces: list[HTTPFace] = []

    async def make(
        environ: dict[str, str] | None = None,
        credentials: ICredentialSource | None = None,
        grace: float = 5.0,
        agent: Any = None,
        **config: Any,
    ) -> RunningProxy:
        path = os.path.join(socket_dir, f"http{len(faces)}.sock")
        settings = replace(HTTPProxyConfig(upstream=upstream.url), **config)
        source = credentials or EnvironmentCredentialSource(
            environ if environ is not None else {"ANTHROPIC_API_KEY": REAL_API_KEY}
        )
        face = HTTPFace(
            reactor, [unix_description(path)], settings, source, grace=grace, agent=agent
        )
        face.startService()
        faces.append(face)
        return RunningProxy(face, path)

    try:
        yield make
    finally:
        for face in faces:
            if face.running:
                await face.stopService()
