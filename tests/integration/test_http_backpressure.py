"""
A slow or stalled agent pauses the upstream read: memory per stream stays
bounded whatever the stream's length, and the stream arrives intact after.
"""

from __future__ import annotations

import hashlib

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import deferLater
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from tests.integration.agents import connect_agent, messages_request
from tests.integration.conftest import MakeProxy
from tests.integration.upstream import Received, Upstream

CHUNK = bytes(range(256)) * 256  # 64 KiB
TOTAL_CHUNKS = 1600  # 100 MiB
MiB = 1024 * 1024


@implementer(IPushProducer)
class Firehose:
    """
    Writes chunks as fast as the proxy's connection accepts them.
    """

    def __init__(self, request: Request) -> None:
        self.request = request
        self.sent = 0
        self.paused = False
        self.stopped = False

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and not self.stopped:
            if self.sent == TOTAL_CHUNKS:
                self.stopped = True
                self.request.unregisterProducer()
                self.request.finish()
                return
            self.sent += 1
            self.request.write(CHUNK)

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.stopped = True


@pytest_twisted.ensureDeferred
async def test_stalled_agent_pauses_the_upstream_and_the_stream_arrives_intact(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    hoses: list[Firehose] = []

    def firehose(request: Request, received: Received) -> int:
        request.setHeader(b"content-type", b"application/octet-stream")
        hose = Firehose(request)
        hoses.append(hose)
        request.registerProducer(hose, True)
        hose.resumeProducing()
        return NOT_DONE_YET

    upstream.handler = firehose
    proxy = await make_proxy(stream_idle_timeout=2.0)
    agent = await connect_agent(reactor, proxy.path)
    agent.send(messages_request(stream=True, headers={"connection": "close"}))
    await agent.received_at_least(MiB)
    agent.pause()  # the agent stops reading
    await deferLater(reactor, 0.5)
    sent_while_stalled = hoses[0].sent
    await deferLater(reactor, 3.0)  # longer than the idle timeout: a stall is not idleness
    assert hoses[0].sent == sent_while_stalled  # the upstream is held, not buffered
    # What left the upstream and is not yet read by the agent: kernel socket
    # buffers on two hops plus the proxy's few write buffers.
    in_between = hoses[0].sent * len(CHUNK) - len(agent.data)
    assert in_between < 24 * MiB
    assert hoses[0].sent < TOTAL_CHUNKS // 2

    agent.resume()
    await agent.closed
    response = agent.response()
    assert response.status == 200
    assert response.complete
    assert len(response.body) == TOTAL_CHUNKS * len(CHUNK)
    assert hashlib.sha256(response.body).digest() == hashlib.sha256(CHUNK * TOTAL_CHUNKS).digest()
