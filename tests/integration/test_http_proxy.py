"""
The HTTP face end to end: agents on a real Unix socket, a real upstream on
loopback. Covers the seed's five cases and each numbered behaviour of issue 2.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import LogEvent, formatEvent
from twisted.web.server import NOT_DONE_YET, Request

from credproxy._secret import Secret
from tests.integration.agents import (
    PLACEHOLDER,
    connect_agent,
    exchange,
    messages_request,
)
from tests.integration.conftest import REAL_API_KEY, REAL_OAUTH_TOKEN, MakeProxy
from tests.integration.upstream import Received, Upstream, message_json, stream_events
from tests.logcapture import captured_log

CAPABILITY = "c" * 64


@pytest.fixture
def log_events() -> Iterator[list[LogEvent]]:
    with captured_log() as events:
        yield events


def assert_no_secrets(events: list[dict[str, object]], *secrets: str) -> None:
    for event in events:
        text = (formatEvent(event) or "") + repr(event)
        for secret in secrets:
            assert secret not in text, f"secret leaked into a log event: {event.get('log_format')}"


# -- the seed's five cases -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_api_key_is_injected(upstream: Upstream, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy({"ANTHROPIC_API_KEY": REAL_API_KEY})
    response = await exchange(reactor, proxy.path, messages_request())
    assert response.status == 200
    assert response.json()["content"][0]["text"] == "ok"
    (seen,) = upstream.received
    assert seen.header("x-api-key") == REAL_API_KEY
    assert seen.header("authorization") is None


@pytest_twisted.ensureDeferred
async def test_bearer_is_injected_with_the_oauth_beta(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy({"CLAUDE_CODE_OAUTH_TOKEN": REAL_OAUTH_TOKEN})
    request = messages_request(headers={"authorization": f"Bearer {PLACEHOLDER}"})
    response = await exchange(reactor, proxy.path, request)
    assert response.status == 200
    (seen,) = upstream.received
    assert seen.header("authorization") == f"Bearer {REAL_OAUTH_TOKEN}"
    assert seen.header("x-api-key") is None
    assert seen.headers["anthropic-beta"] == ["oauth-2025-04-20"]


@pytest_twisted.ensureDeferred
async def test_sse_passes_through_unchanged(upstream: Upstream, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy()
    response = await exchange(reactor, proxy.path, messages_request(stream=True))
    assert response.status == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert response.complete
    assert response.body == b"".join(stream_events(["Hello", ", world"]))


@pytest_twisted.ensureDeferred
async def test_other_paths_answer_404_in_the_api_shape(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy()
    for path in ("/v1/models", "/v1/messages/batches", "/", "/v1/complete"):
        response = await exchange(reactor, proxy.path, messages_request(path))
        assert response.status == 404
        body = response.json()
        assert body["type"] == "error"
        assert body["error"]["type"] == "not_found_error"
    assert upstream.received == []


@pytest_twisted.ensureDeferred
async def test_api_key_beats_oauth(upstream: Upstream, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(
        {"ANTHROPIC_API_KEY": REAL_API_KEY, "CLAUDE_CODE_OAUTH_TOKEN": REAL_OAUTH_TOKEN}
    )
    await exchange(reactor, proxy.path, messages_request())
    (seen,) = upstream.received
    assert seen.header("x-api-key") == REAL_API_KEY
    assert seen.header("authorization") is None


# -- 1. routing ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_known_paths_with_other_methods_answer_405(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy()
    for method in ("GET", "PUT", "DELETE"):
        response = await exchange(
            reactor, proxy.path, messages_request("/v1/messages", method=method)
        )
        assert response.status == 405
        assert response.headers["allow"] == "POST"
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert upstream.received == []


@pytest_twisted.ensureDeferred
async def test_count_tokens_is_forwarded_with_its_query_string(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy()
    await exchange(reactor, proxy.path, messages_request("/v1/messages/count_tokens?beta=true"))
    await exchange(reactor, proxy.path, messages_request("/v1/messages?beta=true"))
    assert [r.uri for r in upstream.received] == [
        b"/v1/messages/count_tokens?beta=true",
        b"/v1/messages?beta=true",
    ]


# -- 2. headers ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_header_policy_towards_upstream(upstream: Upstream, make_proxy: MakeProxy) -> None:
    proxy = await make_proxy({"CLAUDE_CODE_OAUTH_TOKEN": REAL_OAUTH_TOKEN})
    request = messages_request(
        headers={
            "x-api-key": PLACEHOLDER,
            "authorization": f"Bearer {PLACEHOLDER}",
            "anthropic-beta": "prompt-caching-2024-07-31, oauth-2025-04-20,files-api-2025-04-14",
            # twisted.web reads Connection tokens split on spaces: "close," would not close.
            "connection": "x-private-hop, close",
            "x-private-hop": "secret-hop",
            "keep-alive": "timeout=5",
            "proxy-authorization": "Basic abc",
            "te": "trailers",
            "upgrade": "h2c",
            "accept-encoding": "gzip, br",
            "cookie": "session=abc",
            "x-stainless-lang": "python",
            "user-agent": "Anthropic/Python 1.0",
        }
    )
    response = await exchange(reactor, proxy.path, request)
    assert response.status == 200
    (seen,) = upstream.received
    for gone in (
        "x-api-key",
        "connection",
        "x-private-hop",
        "keep-alive",
        "proxy-authorization",
        "te",
        "upgrade",
        "cookie",
    ):
        assert seen.header(gone) is None, gone
    assert seen.headers["authorization"] == [f"Bearer {REAL_OAUTH_TOKEN}"]
    assert seen.headers["anthropic-beta"] == [
        "prompt-caching-2024-07-31,oauth-2025-04-20,files-api-2025-04-14"
    ]
    assert seen.header("accept-encoding") == "identity"
    assert seen.header("host") == upstream.url.removeprefix("http://")
    assert seen.header("x-stainless-lang") == "python"
    assert seen.header("anthropic-version") == "2023-06-01"
    assert PLACEHOLDER.encode() not in seen.body


@pytest_twisted.ensureDeferred
async def test_header_policy_towards_the_agent(upstream: Upstream, make_proxy: MakeProxy) -> None:
    def answer(request: Request, received: Received) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"request-id", b"req_123")
        request.setHeader(b"keep-alive", b"timeout=5")
        request.setHeader(b"set-cookie", b"tracking=1")
        request.setHeader(b"anthropic-ratelimit-requests-remaining", b"42")
        return message_json()

    upstream.handler = answer
    proxy = await make_proxy()
    response = await exchange(reactor, proxy.path, messages_request())
    assert response.status == 200
    assert response.headers["request-id"] == "req_123"
    assert response.headers["anthropic-ratelimit-requests-remaining"] == "42"
    # (Twisted's HTTP client keeps an answer's Connection header to itself, so
    # headers it names cannot be told apart; the fixed hop-by-hop set is dropped.)
    for gone in ("keep-alive", "set-cookie"):
        assert gone not in response.headers
    assert response.body == message_json()


# -- 6. errors -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_no_credential_answers_401_without_contacting_upstream(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy({})
    response = await exchange(reactor, proxy.path, messages_request())
    assert response.status == 401
    error = response.json()["error"]
    assert error["type"] == "authentication_error"
    assert "ANTHROPIC_API_KEY" in error["message"]
    assert "CLAUDE_CODE_OAUTH_TOKEN" in error["message"]
    assert upstream.received == []


@pytest_twisted.ensureDeferred
async def test_unreachable_upstream_answers_502(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(upstream="http://127.0.0.1:9")  # discard port: nothing listens
    response = await exchange(reactor, proxy.path, messages_request())
    assert response.status == 502
    assert response.json()["error"]["type"] == "api_error"


@pytest_twisted.ensureDeferred
async def test_no_headers_within_first_byte_timeout_answers_504_and_cancels(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    upstream.handler = lambda request, received: NOT_DONE_YET
    proxy = await make_proxy(first_byte_timeout=0.3)
    response = await exchange(reactor, proxy.path, messages_request())
    assert response.status == 504
    assert response.json()["error"]["type"] == "api_error"
    await deferLater(reactor, 0.2)
    assert len(upstream.lost) == 1  # the upstream request was closed


@pytest_twisted.ensureDeferred
async def test_silent_stream_is_closed_after_the_idle_timeout(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    def silent_after_start(request: Request, received: Received) -> int:
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(stream_events([])[0])
        return NOT_DONE_YET

    upstream.handler = silent_after_start
    proxy = await make_proxy(stream_idle_timeout=0.3)
    agent = await connect_agent(reactor, proxy.path)
    agent.send(messages_request(stream=True))
    await agent.closed
    response = agent.response()
    assert response.status == 200
    assert not response.complete  # cut off, not ended: the agent can tell
    await deferLater(reactor, 0.1)
    assert len(upstream.lost) == 1


@pytest_twisted.ensureDeferred
async def test_upstream_errors_pass_through_unchanged(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    body = b'{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}'

    def limited(request: Request, received: Received) -> bytes:
        request.setResponseCode(429)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"retry-after", b"7")
        request.setHeader(b"request-id", b"req_429")
        return body

    upstream.handler = limited
    proxy = await make_proxy()
    response = await exchange(reactor, proxy.path, messages_request())
    assert (response.status, response.body) == (429, body)
    assert response.headers["retry-after"] == "7"
    assert response.headers["request-id"] == "req_429"


# -- 7. capability token -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_capability_token_is_required_when_configured(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(capability_token=Secret(CAPABILITY))
    refused: list[dict[str, str | None]] = [
        {"x-api-key": PLACEHOLDER},
        {"x-api-key": CAPABILITY[:-1]},
        {"x-api-key": None, "authorization": "Bearer wrong"},
    ]
    for headers in refused:
        response = await exchange(reactor, proxy.path, messages_request(headers=headers))
        assert response.status == 401
        assert response.json()["error"]["type"] == "authentication_error"
        assert CAPABILITY not in json.dumps(response.json())
    assert upstream.received == []
    accepted: list[dict[str, str | None]] = [
        {"x-api-key": CAPABILITY},
        {"x-api-key": None, "authorization": f"Bearer {CAPABILITY}"},
    ]
    for headers in accepted:
        response = await exchange(reactor, proxy.path, messages_request(headers=headers))
        assert response.status == 200
    assert [r.header("x-api-key") for r in upstream.received] == [REAL_API_KEY] * 2
    assert all(r.header("authorization") is None for r in upstream.received)


# -- 5. body limit ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_body_over_the_limit_by_content_length_is_refused_before_reading(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(max_body=1000)
    agent = await connect_agent(reactor, proxy.path)
    head = messages_request(body=b"", headers={"content-length": "5000", "expect": "100-continue"})
    agent.send(head)  # headers only: the answer must come without the body
    await agent.closed
    response = agent.response()
    assert b"100 Continue" not in bytes(agent.data)
    assert response.status == 413
    assert response.json()["error"]["type"] == "request_too_large"
    assert upstream.received == []


@pytest_twisted.ensureDeferred
async def test_chunked_body_over_the_limit_is_refused_while_reading(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy(max_body=1000)
    agent = await connect_agent(reactor, proxy.path)
    head = messages_request(
        body=b"", headers={"content-length": None, "transfer-encoding": "chunked"}
    )
    agent.send(head)
    for _ in range(3):
        agent.send(b"200\r\n" + b"x" * 0x200 + b"\r\n")
    await agent.closed
    assert agent.response().status == 413
    assert upstream.received == []


@pytest_twisted.ensureDeferred
async def test_body_at_the_limit_is_forwarded_intact(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    body = json.dumps({"model": "m", "messages": [], "pad": "x" * 2000}).encode()
    proxy = await make_proxy(max_body=len(body))
    response = await exchange(reactor, proxy.path, messages_request(body=body))
    assert response.status == 200
    assert upstream.received[0].body == body
    chunked = messages_request(
        body=b"", headers={"content-length": None, "transfer-encoding": "chunked"}
    )
    chunked += b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    response = await exchange(reactor, proxy.path, chunked)
    assert response.status == 200
    assert upstream.received[1].body == body


# -- 4. hang-ups ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_hang_up_before_headers_cancels_the_upstream_request(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    upstream.handler = lambda request, received: NOT_DONE_YET
    proxy = await make_proxy()
    agent = await connect_agent(reactor, proxy.path)
    arrived = upstream.next_request()
    agent.send(messages_request(stream=True))
    await arrived
    agent.abort()
    await deferLater(reactor, 0.1)
    assert len(upstream.lost) == 1
    assert proxy.in_flight == 0


@pytest_twisted.ensureDeferred
async def test_hang_up_mid_stream_closes_the_upstream_at_once(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    def endless(request: Request, received: Received) -> int:
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(stream_events(["x"])[0])
        return NOT_DONE_YET

    upstream.handler = endless
    proxy = await make_proxy()
    agent = await connect_agent(reactor, proxy.path)
    agent.send(messages_request(stream=True))
    await agent.received_at_least(100)
    agent.abort()
    await deferLater(reactor, 0.1)
    assert len(upstream.lost) == 1
    assert proxy.in_flight == 0


# -- 9. audit --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_one_audit_line_per_request_and_no_secret_in_any_log(
    upstream: Upstream, make_proxy: MakeProxy, log_events: list[dict[str, object]]
) -> None:
    proxy = await make_proxy(capability_token=Secret(CAPABILITY))
    ok = messages_request(stream=True, headers={"x-api-key": CAPABILITY})
    await exchange(reactor, proxy.path, ok)
    await exchange(reactor, proxy.path, messages_request(headers={"x-api-key": PLACEHOLDER}))

    def small(request: Request, received: Received) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return message_json(input_tokens=3, output_tokens=4)

    upstream.handler = small
    await exchange(reactor, proxy.path, messages_request(headers={"x-api-key": CAPABILITY}))
    audits = [e for e in log_events if e.get("log_namespace") == "credproxy.http.audit"]
    assert len(audits) == 3
    stream, refused, message = audits
    assert (stream["method"], stream["path"], stream["status"]) == ("POST", "/v1/messages", 200)
    assert (stream["model"], stream["input_tokens"], stream["output_tokens"]) == (
        "claude-sonnet-4-5-20250929",
        25,
        15,
    )
    assert stream["bytes"] == len(b"".join(stream_events(["Hello", ", world"])))
    assert isinstance(stream["duration_ms"], float)
    assert (refused["status"], refused["outcome"]) == (401, "bad_token")
    assert (message["input_tokens"], message["output_tokens"]) == (3, 4)
    assert_no_secrets(log_events, REAL_API_KEY, CAPABILITY, PLACEHOLDER)


# -- 10. graceful stop ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_stop_lets_inflight_streams_finish_then_closes_late_ones(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    # By agent: the upstream may get the two requests in either order.
    pending: dict[bytes, Request] = {}

    def held(request: Request, received: Received) -> int:
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(stream_events([])[0])
        pending[request.getHeader(b"x-test-agent") or b""] = request
        return NOT_DONE_YET

    upstream.handler = held
    proxy = await make_proxy(grace=0.5)
    finishing = await connect_agent(reactor, proxy.path)
    finishing.send(messages_request(stream=True, headers={"x-test-agent": "finishing"}))
    late = await connect_agent(reactor, proxy.path)
    late.send(messages_request(stream=True, headers={"x-test-agent": "late"}))
    await finishing.received_at_least(50)
    await late.received_at_least(50)
    assert sorted(pending) == [b"finishing", b"late"]

    stop_began = reactor.seconds()
    stopped = proxy.face.stopService()
    await deferLater(reactor, 0.05)
    assert not os.path.exists(proxy.path)  # no longer accepting
    for event in stream_events(["done"])[1:]:
        pending[b"finishing"].write(event)
    pending[b"finishing"].finish()
    await finishing.closed
    assert finishing.response().complete

    await stopped
    assert 0.45 < reactor.seconds() - stop_began < 2
    await late.closed
    assert not late.response().complete
    await deferLater(reactor, 0.05)
    assert len(upstream.lost) == 1


@pytest_twisted.ensureDeferred
async def test_face_refuses_tcp_without_a_capability_token(upstream: Upstream) -> None:
    from credproxy.broker.credentials import EnvironmentCredentialSource
    from credproxy.http import HTTPFace, HTTPFaceConfigError, HTTPProxyConfig

    with pytest.raises(HTTPFaceConfigError, match="without a capability token"):
        HTTPFace(
            reactor,
            ["tcp:port=0:interface=127.0.0.1"],
            HTTPProxyConfig(),
            EnvironmentCredentialSource({}),
        )
    face = HTTPFace(
        reactor,
        ["tcp:port=0:interface=127.0.0.1"],
        HTTPProxyConfig(capability_token=Secret(CAPABILITY), upstream=upstream.url),
        EnvironmentCredentialSource({}),
    )
    face.startService()
    await face.stopService()
