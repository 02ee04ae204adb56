"""
The exchange and its credential, on a StringTransport and a Clock, over a
real broker with memory stores: each forwarded request counts against its
bucket, a stored OAuth token the upstream refuses is replaced and the
request replayed once (never for API keys or environment tokens, never
twice), a second refusal reaches the agent as sent, and a login that can no
longer be refreshed gets credproxy's own 401.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from twisted.internet.defer import fail
from twisted.logger import LogEvent, LogLevel
from twisted.trial.unittest import SynchronousTestCase

from credproxy.broker.credentials import BrokerCredentialSource
from credproxy.http._headers import OAUTH_BETA_FLAG
from credproxy.oauth._interfaces import OAuthError, OAuthErrorKind
from credproxy.stores import StoreCorrupt, StoreDown
from tests.http.doubles import REFUSAL, BrokerWorld, FakeResponse, Served, serve
from tests.integration.agents import Parsed, parse_response
from tests.logcapture import captured_log, log_text

STORED = "sk-ant-oat01-stored-access-token-0123"
REFRESHED = "sk-ant-oat01-refreshed-01-access"
STORED_KEY = "sk-ant-api03-stored-key-value-0123"
ENV_KEY = "sk-ant-api03-environment-key-0123"
ENV_OAUTH = "sk-ant-oat01-environment-token-0123"
BODY = b'{"model":"claude-sonnet-4-5-20250929","max_tokens":1,"messages":[]}'
MESSAGE = b'{"type":"message","model":"claude-sonnet-4-5-20250929","usage":{"input_tokens":1}}'


def bearer(token: str) -> bytes:
    return b"Bearer " + token.encode()


class ExchangeCredentialTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.world = BrokerWorld()

    def serve(self, environ: dict[str, str] | None = None, **config: Any) -> Served:
        source = BrokerCredentialSource(self.world.broker, environ=environ or {})
        return serve(source, self.world.clock, **config)

    def answer(self, served: Served) -> Parsed:
        return parse_response(served.transport.value())

    @contextmanager
    def audits(self) -> Iterator[list[LogEvent]]:
        with captured_log() as events:
            audits: list[LogEvent] = []
            yield audits
        audits.extend(e for e in events if e.get("log_namespace") == "credproxy.http.audit")
        text = log_text(events)
        for secret in (STORED, REFRESHED, STORED_KEY, ENV_KEY, ENV_OAUTH):
            self.assertNotIn(secret, text)

    # -- counting and refreshing -------------------------------------------------------

    def test_each_forwarded_request_counts_against_the_tokens_bucket(self) -> None:
        self.world.store_token(STORED)
        served = self.serve()
        for expected in (1, 2):
            served.post(BODY)
            self.assertEqual(self.world.requests_counted(), expected)
            served.agent.sent[-1].respond(FakeResponse(200, MESSAGE))
        self.assertEqual(
            [s.header(b"authorization") for s in served.agent.sent], [bearer(STORED)] * 2
        )

    def test_environment_and_key_requests_are_not_counted(self) -> None:
        self.world.store_token(STORED)
        self.world.store_key(STORED_KEY)
        for served in (self.serve(), self.serve({"CLAUDE_CODE_OAUTH_TOKEN": ENV_OAUTH})):
            served.post(BODY)
            served.agent.sent[0].respond(FakeResponse(200, MESSAGE))
            self.assertEqual(self.answer(served).status, 200)
        self.assertEqual(self.world.requests_counted(), 0)

    def test_a_token_about_to_expire_is_refreshed_before_forwarding(self) -> None:
        self.world.store_token(STORED, expires_in=30)
        served = self.serve()
        served.post(BODY)
        (sent,) = served.agent.sent
        self.assertEqual(sent.header(b"authorization"), bearer(REFRESHED))
        self.assertEqual(self.world.endpoint.refreshes, 1)

    # -- the replay -------------------------------------------------------------------

    def test_a_refused_stored_token_is_replaced_and_the_request_replayed_once(self) -> None:
        self.world.store_token(STORED)
        served = self.serve()
        with self.audits() as audits:
            served.post(BODY, extra=b"anthropic-beta: files-api-2025-04-14\r\n")
            first = served.agent.sent[0].respond(FakeResponse(401, REFUSAL))
            # Decided at headers time: the refusal was closed unread, the agent got nothing.
            self.assertTrue(first.closed)
            self.assertEqual(served.transport.value(), b"")
            self.assertEqual(self.world.endpoint.refreshes, 1)
            original, replay = served.agent.sent
            self.assertEqual(original.header(b"authorization"), bearer(STORED))
            self.assertEqual(replay.header(b"authorization"), bearer(REFRESHED))
            self.assertEqual((replay.uri, replay.body), (original.uri, original.body))
            self.assertEqual(replay.body, BODY)
            self.assertEqual(
                replay.header(b"anthropic-beta"), b"files-api-2025-04-14," + OAUTH_BETA_FLAG
            )
            replay.respond(FakeResponse(200, MESSAGE))
        answer = self.answer(served)
        self.assertEqual((answer.status, answer.body), (200, MESSAGE))
        self.assertNotIn(b"provider says no", served.transport.value())
        self.assertEqual(self.world.requests_counted(), 2)
        (line,) = audits
        self.assertEqual((line["status"], line["outcome"]), (200, "replayed"))
        self.assertEqual(served.resource.in_flight, 0)

    def test_a_second_refusal_reaches_the_agent_as_the_upstream_sent_it(self) -> None:
        self.world.store_token(STORED)
        served = self.serve()
        with self.audits() as audits:
            served.post(BODY)
            served.agent.sent[0].respond(FakeResponse(401, REFUSAL))
            second = served.agent.sent[1].respond(FakeResponse(401, REFUSAL))
        self.assertFalse(second.closed)
        answer = self.answer(served)
        self.assertEqual((answer.status, answer.body), (401, REFUSAL))
        self.assertEqual(answer.headers["request-id"], "req_test")
        self.assertEqual(len(served.agent.sent), 2)  # never a third
        self.assertEqual(self.world.endpoint.refreshes, 1)
        self.assertEqual([(a["status"], a["outcome"]) for a in audits], [(401, "replayed")])

    def test_a_refusal_within_the_refresh_cooldown_is_replayed_with_the_same_token(self) -> None:
        # The broker refreshed moments ago and knows nothing newer: the replay
        # earns the upstream's own second refusal for the agent.
        self.world.store_token(STORED)
        served = self.serve()
        served.post(BODY)
        served.agent.sent[0].respond(FakeResponse(401, REFUSAL))
        served.agent.sent[1].respond(FakeResponse(200, MESSAGE))
        served.post(BODY)
        served.agent.sent[2].respond(FakeResponse(401, REFUSAL))
        self.assertEqual(len(served.agent.sent), 4)
        self.assertEqual(served.agent.sent[3].header(b"authorization"), bearer(REFRESHED))
        served.agent.sent[3].respond(FakeResponse(401, REFUSAL))
        self.assertTrue(served.transport.value().endswith(REFUSAL))
        self.assertEqual(self.world.endpoint.refreshes, 1)

    def test_api_keys_are_never_replayed(self) -> None:
        self.world.store_token(STORED)
        self.world.store_key(STORED_KEY)
        for served in (self.serve(), self.serve({"ANTHROPIC_API_KEY": ENV_KEY})):
            served.post(BODY)
            served.agent.sent[0].respond(FakeResponse(401, REFUSAL))
            answer = self.answer(served)
            self.assertEqual((answer.status, answer.body), (401, REFUSAL))
            self.assertEqual(len(served.agent.sent), 1)
        self.assertEqual(self.world.endpoint.refreshes, 0)

    def test_an_environment_oauth_token_is_never_replayed(self) -> None:
        self.world.store_token(STORED)
        served = self.serve({"CLAUDE_CODE_OAUTH_TOKEN": ENV_OAUTH})
        served.post(BODY)
        served.agent.sent[0].respond(FakeResponse(401, REFUSAL))
        self.assertEqual((self.answer(served).status, self.answer(served).body), (401, REFUSAL))
        self.assertEqual(len(served.agent.sent), 1)
        self.assertEqual(self.world.endpoint.refreshes, 0)

    def test_a_refusal_inside_a_started_answer_is_not_replayed(self) -> None:
        # Once the headers were passed on, the answer is the agent's: an error
        # event inside a 200 stream is streamed through, never replayed.
        self.world.store_token(STORED)
        served = self.serve()
        served.post(BODY)
        stream = served.agent.sent[0].respond(
            FakeResponse(200, content_type=b"text/event-stream", hold=True)
        )
        stream.send(b"event: error\ndata: " + REFUSAL + b"\n\n")
        stream.end()
        self.assertEqual(len(served.agent.sent), 1)
        self.assertIn(b"authentication_error", served.transport.value())
        self.assertEqual(self.world.endpoint.refreshes, 0)

    # -- when no refresh is possible ------------------------------------------------------

    def assert_log_in_again(self, answer: Parsed) -> None:
        self.assertEqual(answer.status, 401)
        error = json.loads(answer.body)["error"]
        self.assertEqual(error["type"], "authentication_error")
        self.assertIn("run `credproxy login anthropic` on the host", error["message"])
        self.assertNotIn("provider says no", error["message"])

    def test_a_refused_token_that_cannot_be_refreshed_gets_the_clear_401(self) -> None:
        self.world.store_token(STORED)
        self.world.endpoint.refuse()
        served = self.serve()
        with self.audits() as audits:
            served.post(BODY)
            served.agent.sent[0].respond(FakeResponse(401, REFUSAL))
        self.assert_log_in_again(self.answer(served))
        self.assertEqual(len(served.agent.sent), 1)
        self.assertEqual(
            [(a["status"], a["outcome"]) for a in audits], [(401, "credential_unavailable")]
        )

    def test_an_expired_login_is_refused_without_contacting_the_upstream(self) -> None:
        self.world.store_token(STORED, expires_in=-5, refresh=None)
        served = self.serve()
        served.post(BODY)
        self.assert_log_in_again(self.answer(served))
        self.assertEqual(served.agent.sent, [])
        self.assertEqual(self.world.requests_counted(), 0)

    def test_a_refresh_cooling_down_is_a_502_with_retry_after(self) -> None:
        self.world.endpoint.lifetime = 10.0
        self.world.store_token(STORED, expires_in=-5)
        served = self.serve()
        served.post(BODY)  # refreshed: valid for 10 s, cooldown 30 s
        served.agent.sent[0].respond(FakeResponse(200, MESSAGE))
        self.world.clock.advance(15)
        served.transport.clear()
        served.post(BODY)
        answer = self.answer(served)
        self.assertEqual(answer.status, 502)
        self.assertEqual(json.loads(answer.body)["error"]["type"], "api_error")
        self.assertEqual(answer.headers["retry-after"], "15")
        self.assertEqual(len(served.agent.sent), 1)

    def test_a_store_that_does_not_answer_is_a_503(self) -> None:
        """
        A shared store's server down (Redis) is the host's trouble of the
        moment: 503, never a request upstream, and no log line per request
        (the store says it once per outage).
        """
        self.world.store_token(STORED)
        self.world.tokens.get_token = lambda *a: fail(  # type: ignore[method-assign]
            StoreDown("Redis store redis://127.0.0.1:6379/0 is unavailable")
        )
        served = self.serve()
        with captured_log() as events:
            served.post(BODY)
        answer = self.answer(served)
        self.assertEqual(answer.status, 503)
        self.assertEqual(json.loads(answer.body)["error"]["type"], "overloaded_error")
        self.assertIn(
            "could not read its credential store", json.loads(answer.body)["error"]["message"]
        )
        self.assertEqual(served.agent.sent, [])
        self.assertEqual([e for e in events if e["log_level"] >= LogLevel.warn], [])

    def test_a_store_that_cannot_be_read_is_a_502(self) -> None:
        self.world.tokens.get_token = lambda *a: fail(  # type: ignore[method-assign]
            StoreCorrupt("the token file is not JSON; not changed")
        )
        served = self.serve()
        with captured_log() as events:
            served.post(BODY)
        self.assertEqual(self.answer(served).status, 502)
        self.assertIn("The credential store cannot be read", log_text(events))

    def test_an_unreachable_token_endpoint_is_a_502(self) -> None:
        self.world.store_token(STORED, expires_in=-5)
        self.world.endpoint.failure = OAuthError(OAuthErrorKind.TRANSIENT, "503")
        served = self.serve()
        served.post(BODY)
        for _ in range(10):  # the broker's retries
            self.world.clock.advance(5)
        answer = self.answer(served)
        self.assertEqual(answer.status, 502)
        self.assertIn("try again", json.loads(answer.body)["error"]["message"])
        self.assertEqual(served.agent.sent, [])

    # -- hang-ups and timers around the replay ------------------------------------------------

    def test_an_agent_gone_while_the_replacement_is_awaited_ends_the_exchange(self) -> None:
        self.world.store_token(STORED)
        self.world.endpoint.hold = True
        served = self.serve()
        with self.audits() as audits:
            served.post(BODY)
            served.agent.sent[0].respond(FakeResponse(401, REFUSAL))
            self.assertEqual(self.world.endpoint.refreshes, 1)
            served.hang_up()
            self.assertEqual(served.resource.in_flight, 0)
            self.world.endpoint.release()  # the refresh lands after all, and is stored
        self.assertEqual(len(served.agent.sent), 1)
        self.assertEqual([a["outcome"] for a in audits], ["agent_gone"])
        stored = self.successResultOf(self.world.tokens.get_token("anthropic"))
        assert stored is not None
        self.assertEqual(stored.access_token, REFRESHED)

    def test_the_replay_has_its_own_first_byte_deadline(self) -> None:
        self.world.store_token(STORED)
        served = self.serve(first_byte_timeout=30.0)
        served.post(BODY)
        self.world.clock.advance(20)
        served.agent.sent[0].respond(FakeResponse(401, REFUSAL))
        self.world.clock.advance(29.9)
        self.assertEqual(served.transport.value(), b"")
        self.world.clock.advance(0.1)
        self.assertTrue(served.agent.sent[1].cancelled)
        self.assertEqual(self.answer(served).status, 504)
