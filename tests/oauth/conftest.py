"""
The fake OAuth server on a real loopback port, with the providers the real
config parser builds for it over the default agent.

The server's own notion of time (device-code expiry, polling intervals) is a
L{Clock} the test moves; the network and the providers' deadlines run on
the real reactor.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.web.iweb import IAgent

from credproxy.oauth import (
    AnthropicPKCEProvider,
    DeviceCodeProvider,
    build_providers,
    default_oauth_agent,
)
from credproxy.testing import FakeOAuthServer

DEVICE_PROVIDER = "fake-device"


@dataclass
class Loopback:
    server: FakeOAuthServer
    clock: Clock  # the server's time
    agent: IAgent
    anthropic: AnthropicPKCEProvider
    device: DeviceCodeProvider


@pytest_twisted.async_yield_fixture
async def loopback() -> AsyncIterator[Loopback]:
    clock = Clock()
    clock.advance(reactor.seconds())
    server = FakeOAuthServer(reactor, clock=clock)
    server.listen(reactor)
    agent = default_oauth_agent(reactor)
    providers = build_providers(server.oauth_config(DEVICE_PROVIDER), reactor, agent)
    anthropic, device = providers["anthropic"], providers[DEVICE_PROVIDER]
    assert isinstance(anthropic, AnthropicPKCEProvider)
    assert isinstance(device, DeviceCodeProvider)
    try:
        yield Loopback(server, clock, agent, anthropic, device)
    finally:
        await server.stop()
