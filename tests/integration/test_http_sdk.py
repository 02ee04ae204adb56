"""
The official anthropic SDK as the agent, over httpx's Unix-socket transport:
what it parses must be what the upstream sent.
"""

from __future__ import annotations

import anthropic
import httpx2 as httpx  # the SDK (2.x) is built on httpx2
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.integration.agents import PLACEHOLDER
from tests.integration.conftest import REAL_API_KEY, MakeProxy
from tests.integration.upstream import Upstream


def sdk_client(path: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        api_key=PLACEHOLDER,
        base_url="http://localhost",
        http_client=httpx.Client(transport=httpx.HTTPTransport(uds=path)),
        max_retries=0,
    )


def create(path: str) -> str:
    with sdk_client(path) as client:
        message = client.messages.create(
            model="claude-sonnet-4-6",
            max_tokens=64,
            messages=[{"role": "user", "content": "Hi"}],
        )
        block = message.content[0]
        assert message.usage.input_tokens == 11
        return block.text  # type: ignore[union-attr]


def stream(path: str) -> tuple[list[str], str]:
    with (
        sdk_client(path) as client,
        client.messages.stream(
            model="claude-sonnet-4-6",
            max_tokens=64,
            messages=[{"role": "user", "content": "Hi"}],
        ) as events,
    ):
        texts = list(events.text_stream)
        final = events.get_final_message()
        return texts, str(final.stop_reason)


@pytest_twisted.ensureDeferred
async def test_sdk_messages_create(upstream: Upstream, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy()
    text = await deferToThread(create, proxy.path)
    assert text == "ok"
    assert upstream.received[0].header("x-api-key") == REAL_API_KEY


@pytest_twisted.ensureDeferred
async def test_sdk_messages_stream(upstream: Upstream, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy()
    texts, stop_reason = await deferToThread(stream, proxy.path)
    assert texts == ["Hello", ", world"]
    assert stop_reason == "end_turn"
    assert upstream.received[0].header("x-api-key") == REAL_API_KEY


@pytest_twisted.ensureDeferred
async def test_sdk_sees_proxy_errors_in_the_api_shape(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy({})
    try:
        await deferToThread(create, proxy.path)
    except anthropic.AuthenticationError as e:
        assert e.status_code == 401
        assert "ANTHROPIC_API_KEY" in str(e)
    else:
        raise AssertionError("no credential must be a 401")
