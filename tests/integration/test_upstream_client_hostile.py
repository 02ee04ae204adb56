"""
Hostile upstreams against the face's own upstream client
(L{credproxy.http._upstream_client}) where the case needs an agent of the
test's: the fuzzer of status lines, heads and chunked framing (its answers
and checks are in tests/integration/test_upstream_hostile.py), the screen
over TLS with a trust root of the test's, and verification of the name.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import maybeDeferred
from twisted.internet.ssl import Certificate, PrivateCertificate
from twisted.logger import LogEvent
from twisted.web.client import BrowserLikePolicyForHTTPS

from credproxy.http._face import UpstreamEndpoints
from credproxy.http._upstream_agent import UpstreamAgent
from credproxy.http._upstream_client import UpstreamPool
from tests.integration.agents import exchange, messages_request
from tests.integration.conftest import MakeProxy
from tests.integration.test_http_upstream_tls import TLSUpstream, make_pki, tls_upstream
from tests.integration.test_upstream_hostile import (
    FUZZ_EXAMPLES,
    MESSAGE,
    FuzzWorld,
    RawUpstream,
    _one_example,
    answer,
    ask,
    assert_malformed_502,
    assert_quiet_log,
    json_answer,
    log_events,
    raw_answers,
    raw_upstream,
    strict_answer,
)
from tests.logcapture import captured_log, log_text

pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")

# The fixtures these tests share with the modules they come from.
__all__ = ["log_events", "raw_upstream", "tls_upstream"]


def our_agent(pool: UpstreamPool, trust: Certificate | None = None) -> UpstreamAgent:
    """
    The face's own agent, over C{pool}, trusting C{trust} (else the platform).
    """
    policy = BrowserLikePolicyForHTTPS(trustRoot=trust) if trust else BrowserLikePolicyForHTTPS()
    return UpstreamAgent(UpstreamEndpoints(reactor, policy, 5.0), pool)


@pytest_twisted.async_yield_fixture
async def our_fuzz_world(
    raw_upstream: RawUpstream, make_proxy: MakeProxy
) -> AsyncIterator[FuzzWorld]:
    # A fresh upstream connection per request, as in the module it mirrors.
    pool = UpstreamPool(reactor, persistent=False)
    proxy = await make_proxy(
        upstream=raw_upstream.url,
        agent=our_agent(pool),
        first_byte_timeout=3.0,
        stream_idle_timeout=3.0,
    )
    try:
        yield FuzzWorld(raw_upstream, proxy, pool)
    finally:
        await pool.closeCachedConnections()


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(pieces=raw_answers())
@pytest_twisted.ensureDeferred
async def test_fuzz_hostile_upstream_answers_on_credproxys_client(
    our_fuzz_world: FuzzWorld, log_events: list[LogEvent], pieces: list[bytes]
) -> None:
    await _one_example(our_fuzz_world, pieces)
    assert_quiet_log(log_events)


@pytest_twisted.ensureDeferred
async def test_the_screen_works_over_tls_on_credproxys_client(
    make_proxy: MakeProxy, log_events: list[LogEvent]
) -> None:
    pki = make_pki()
    upstream = RawUpstream(script=answer(json_answer(b"X-Evil: \x00\r\n")))
    options = PrivateCertificate.loadPEM(pki.server_pem).options()
    port = reactor.listenSSL(0, upstream.factory(), options, interface="127.0.0.1")  # type: ignore[attr-defined]
    pool = UpstreamPool(reactor)
    try:
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        proxy = await make_proxy(
            upstream=f"https://localhost:{address.port}",
            agent=our_agent(pool, Certificate.loadPEM(pki.ca_pem)),
        )
        assert_malformed_502(await ask(proxy))
        upstream.script = answer(json_answer())
        got = strict_answer(bytes((await ask(proxy)).data))
        assert (got.status, got.body) == (200, MESSAGE)
        got = strict_answer(bytes((await ask(proxy)).data))
        assert got.status == 200
        # The refused answer's connection was closed; the good ones shared one.
        assert [c.requests for c in upstream.connections] == [1, 2]
    finally:
        await pool.closeCachedConnections()
        for connection in upstream.connections:
            if connection.transport is not None and not connection.lost.called:
                connection.transport.abortConnection()  # type: ignore[attr-defined]
        await maybeDeferred(port.stopListening)
    assert_quiet_log(log_events)


@pytest_twisted.ensureDeferred
async def test_trust_is_for_the_name_too_on_credproxys_client(
    tls_upstream: TLSUpstream, make_proxy: MakeProxy
) -> None:
    pool = UpstreamPool(reactor)
    agent: Any = our_agent(pool, Certificate.loadPEM(tls_upstream.pki.ca_pem))
    try:
        trusted = await make_proxy(upstream=tls_upstream.url, agent=agent)
        response = await exchange(reactor, trusted.path, messages_request())
        assert response.status == 200
        wrong_name = tls_upstream.url.replace("localhost", "127.0.0.1")
        proxy = await make_proxy(upstream=wrong_name, agent=agent)
        with captured_log() as events:
            response = await exchange(reactor, proxy.path, messages_request())
        assert response.status == 502
        assert "ResponseNeverReceived[service_identity.exceptions.VerificationError]" in (
            log_text(events)
        )
        assert len(tls_upstream.fake.received) == 1  # only the trusted request's
    finally:
        await pool.closeCachedConnections()
