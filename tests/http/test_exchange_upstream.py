"""
The exchange against a strict, bounded upstream hop, on a StringTransport
and a Clock: the agent gets the standard reason phrase; a malformed upstream
answer is a 502 of credproxy's own (one warn line naming the defect, never
the bytes); what one reactor turn brings is written to the agent as one
write; a body that breaks before anything was written becomes a 502, after
it the agent's connection is aborted; and the cap on upstream requests in
flight, on every path a slot is taken and given back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import LogEvent, LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import ParseError, ResponseNeverReceived
from twisted.web.http import _MalformedChunkedDataError
from twisted.web.iweb import UNKNOWN_LENGTH

from credproxy._limits import ConnectionLimits
from credproxy.broker.credentials import BrokerCredentialSource, EnvironmentCredentialSource
from credproxy.http._exchange import MALFORMED_ANSWER, UPSTREAM_BUSY_RETRY_AFTER
from credproxy.http._upstream import (
    BAD_CHUNKED_FRAMING,
    QUEUE_FULL,
    WAIT_TIMEOUT,
    NoUpstreamSlot,
    UpstreamMalformed,
    UpstreamSlots,
)
from tests.http.doubles import REFUSAL, BrokerWorld, FakeResponse, Served, connect_another, serve
from tests.integration.agents import Parsed, parse_response
from tests.logcapture import captured_log, log_text

KEY = "sk-ant-api03-exchange-upstream-key-0123"
STORED = "sk-ant-oat01-stored-access-token-upstream"
BODY = b'{"model":"claude-sonnet-4-5-20250929","max_tokens":1,"messages":[]}'
MESSAGE = b'{"type":"message","usage":{"input_tokens":3,"output_tokens":4}}'
SSE_START = (
    b'event: message_start\ndata: {"type":"message_start","message":{"model":"m",'
    b'"usage":{"input_tokens":25,"output_tokens":1}}}\n\n'
)
SSE_DELTA = b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":15}}\n\n'


def chunks_of(raw: bytes) -> list[bytes]:
    """
    The chunks of a chunked HTTP answer, as written (twisted.web writes one
    chunk per C{request.write}).
    """
    body = raw.partition(b"\r\n\r\n")[2]
    chunks: list[bytes] = []
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        chunks.append(body[:size])
        body = body[size + 2 :]
    return chunks


def slots_of(served: Served) -> UpstreamSlots:
    slots: UpstreamSlots = served.resource._context.slots
    return slots


def held(code: int = 200, content_type: bytes = b"text/event-stream") -> FakeResponse:
    """
    An answer whose body the test sends piece by piece, of unknown length
    (so the agent's answer is chunked, one chunk per agent write).
    """
    response = FakeResponse(code, content_type=content_type, hold=True)
    assert response.length is UNKNOWN_LENGTH
    return response


def flush_calls(clock: Clock) -> list[Any]:
    return [
        c
        for c in clock.getDelayedCalls()
        if getattr(getattr(c, "func", None), "__name__", "") == "flush"
    ]


class UpstreamExchangeTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)

    def serve(self, **config: Any) -> Served:
        return serve(EnvironmentCredentialSource({"ANTHROPIC_API_KEY": KEY}), self.clock, **config)

    def answer(self, served: Served) -> Parsed:
        return parse_response(served.transport.value())

    @contextmanager
    def logged(self) -> Iterator[list[LogEvent]]:
        with captured_log() as events:
            yield events
        self.assertNotIn(KEY, log_text(events))
        self.assertEqual([e for e in events if "log_failure" in e], [])

    @staticmethod
    def audits(events: list[LogEvent]) -> list[LogEvent]:
        return [e for e in events if e.get("log_namespace") == "credproxy.http.audit"]

    @staticmethod
    def warnings(events: list[LogEvent]) -> list[str]:
        return [
            log_text([e])
            for e in events
            if e.get("log_level") == LogLevel.warn and e.get("log_namespace") == "credproxy.http"
        ]


class ReasonPhraseTests(UpstreamExchangeTestCase):
    def test_the_agent_gets_the_standard_phrase_never_the_upstreams(self) -> None:
        for code, phrase, standard in (
            (200, b"Totally\tFine \x80", b"OK"),
            (429, b"Slow Down Buddy", b"Too Many Requests"),
            (529, b"Overloaded", b"Unknown Status"),
        ):
            served = self.serve()
            served.post(BODY)
            response = FakeResponse(code, MESSAGE)
            response.phrase = phrase
            served.agent.sent[0].respond(response)
            raw = served.transport.value()
            self.assertTrue(raw.startswith(b"HTTP/1.1 %d %s\r\n" % (code, standard)), raw[:40])


class MalformedAnswerTests(UpstreamExchangeTestCase):
    def assert_malformed_502(self, served: Served) -> None:
        answer = self.answer(served)
        self.assertEqual(answer.status, 502)
        self.assertEqual(answer.headers["content-type"], "application/json")
        self.assertEqual(
            json.loads(answer.body),
            {"type": "error", "error": {"type": "api_error", "message": MALFORMED_ANSWER}},
        )
        self.assertTrue(served.transport.value().startswith(b"HTTP/1.1 502 Bad Gateway\r\n"))

    def test_a_refused_head_is_a_502_with_one_warning_naming_the_defect(self) -> None:
        served = self.serve()
        with self.logged() as events:
            served.post(BODY)
            served.agent.sent[0].answer.errback(
                Failure(ResponseNeverReceived([Failure(UpstreamMalformed("BARE_CR_OR_LF"))]))
            )
        self.assert_malformed_502(served)
        (warning,) = self.warnings(events)
        self.assertIn("malformed response: BARE_CR_OR_LF", warning)
        (audit,) = self.audits(events)
        self.assertEqual((audit["status"], audit["outcome"]), (502, "upstream_malformed"))

    def test_twisteds_own_parse_error_is_a_malformed_answer_too(self) -> None:
        served = self.serve()
        with self.logged():
            served.post(BODY)
            served.agent.sent[0].answer.errback(
                Failure(ResponseNeverReceived([Failure(ParseError("bad", b"\x00secret"))]))
            )
        self.assert_malformed_502(served)
        self.assertNotIn(b"secret", served.transport.value())

    def test_an_unreachable_upstream_is_told_apart(self) -> None:
        served = self.serve()
        with self.logged() as events:
            served.post(BODY)
            served.agent.sent[0].answer.errback(
                Failure(ResponseNeverReceived([Failure(ConnectionRefusedError())]))
            )
        answer = self.answer(served)
        self.assertEqual(answer.status, 502)
        self.assertIn("could not reach", json.loads(answer.body)["error"]["message"])
        self.assertEqual(self.audits(events)[0]["outcome"], "unreachable")


class CoalescingTests(UpstreamExchangeTestCase):
    def test_the_first_turns_pieces_are_one_write_then_each_read_goes_out(self) -> None:
        served = self.serve()
        with self.logged() as events:
            served.post(BODY)
            response = served.agent.sent[0].respond(held())
            pieces = [
                SSE_START[:10],
                SSE_START[10:],
                b"event: ping\n",
                b'data: {"type":"ping"}\n\n',
            ]
            for piece in pieces:
                response.send(piece)
            self.assertEqual(served.transport.value(), b"")  # nothing before the turn is over
            self.assertEqual(len(flush_calls(self.clock)), 1)  # one flush, however many chunks
            self.clock.advance(0)
            self.assertEqual(chunks_of(served.transport.value()), [b"".join(pieces)])
            # The answer has begun: each read (one dataReceived, whatever
            # chunks it held) is written as it comes, without a timer.
            response.send(SSE_DELTA)
            self.assertEqual(chunks_of(served.transport.value())[-1], SSE_DELTA)
            self.assertEqual(flush_calls(self.clock), [])
            response.send(b"event: message_stop\n")
            response.end()
        self.assertEqual(
            chunks_of(served.transport.value()),
            [b"".join(pieces), SSE_DELTA, b"event: message_stop\n"],
        )
        answer = self.answer(served)
        self.assertTrue(answer.complete)
        self.assertEqual(flush_calls(self.clock), [])
        (audit,) = self.audits(events)
        # The usage parser saw every byte, whatever the writes.
        self.assertEqual((audit["input_tokens"], audit["output_tokens"]), (25, 15))
        self.assertEqual(audit["bytes"], len(answer.body))

    def test_an_answer_delivered_whole_is_written_at_once(self) -> None:
        served = self.serve()
        served.post(BODY)
        served.agent.sent[0].respond(FakeResponse(200, MESSAGE))
        self.assertEqual(self.answer(served).body, MESSAGE)
        self.assertEqual(flush_calls(self.clock), [])

    def test_backpressure_still_pauses_the_upstream_and_the_idle_timer(self) -> None:
        served = self.serve(stream_idle_timeout=10.0)
        served.post(BODY)
        response = served.agent.sent[0].respond(held())
        response.send(SSE_START)
        self.clock.advance(0)
        served.channel.pauseProducing()  # the agent stopped reading
        self.assertEqual(response.transport.producerState, "paused")
        self.clock.advance(60)  # a stall is not idleness
        self.assertFalse(response.closed)
        served.channel.resumeProducing()
        self.assertEqual(response.transport.producerState, "producing")
        self.clock.advance(9)
        response.send(SSE_DELTA)  # restarts the idle timer
        self.clock.advance(9)
        self.assertFalse(response.closed)
        self.clock.advance(1.1)  # 10 s after the last bytes
        self.assertTrue(response.closed)
        response.break_off(ConnectionLost())
        self.assertTrue(served.transport.disconnected)  # cut off, not ended
        self.assertFalse(self.answer(served).complete)


class BrokenBodyTests(UpstreamExchangeTestCase):
    def test_malformed_body_before_any_write_is_a_502_without_upstream_headers(self) -> None:
        served = self.serve()
        with self.logged() as events:
            served.post(BODY)
            response = served.agent.sent[0].respond(held())
            response.send(b"hello, a good chunk")
            response.break_off(UpstreamMalformed(BAD_CHUNKED_FRAMING))
        answer = self.answer(served)
        self.assertEqual(answer.status, 502)
        self.assertEqual(json.loads(answer.body)["error"]["message"], MALFORMED_ANSWER)
        self.assertNotIn("request-id", answer.headers)  # the upstream's headers are gone
        self.assertEqual(answer.headers["content-type"], "application/json")
        self.assertNotIn(b"hello", served.transport.value())
        self.assertFalse(served.transport.disconnected)  # an answer, not a cut-off
        (warning,) = self.warnings(events)
        self.assertIn(BAD_CHUNKED_FRAMING, warning)
        self.assertEqual(self.audits(events)[0]["outcome"], "upstream_malformed")
        self.assertEqual(flush_calls(self.clock), [])

    def test_twisteds_chunk_error_is_recognised(self) -> None:
        served = self.serve()
        served.post(BODY)
        response = served.agent.sent[0].respond(held())
        response.break_off(_MalformedChunkedDataError("Chunk-size must be an integer."))
        self.assertEqual(json.loads(self.answer(served).body)["error"]["message"], MALFORMED_ANSWER)

    def test_a_known_length_is_replaced_by_the_errors_own(self) -> None:
        served = self.serve()
        served.post(BODY)
        response = FakeResponse(200, hold=True)
        response.length = 5000
        served.agent.sent[0].respond(response)
        response.break_off(ConnectionLost())
        answer = self.answer(served)
        self.assertEqual(answer.status, 502)
        self.assertEqual(int(answer.headers["content-length"]), len(answer.body))
        self.assertIn("broke off", json.loads(answer.body)["error"]["message"])

    def test_malformed_body_after_a_write_aborts_the_agents_connection(self) -> None:
        served = self.serve()
        with self.logged() as events:
            served.post(BODY)
            response = served.agent.sent[0].respond(held())
            response.send(SSE_START)
            self.clock.advance(0)
            response.send(b"data of the read before the break")
            written = served.transport.value()
            response.break_off(UpstreamMalformed(BAD_CHUNKED_FRAMING))
        self.assertTrue(served.transport.disconnected)
        self.assertEqual(served.transport.value(), written)  # cut off: no end, no error body
        self.assertIn(b"data of the read before the break", written)
        answer = self.answer(served)
        self.assertEqual(answer.status, 200)
        self.assertFalse(answer.complete)  # the agent's client sees a truncation
        self.assertEqual(self.audits(events)[0]["outcome"], "upstream_malformed")
        self.assertEqual(flush_calls(self.clock), [])


class UpstreamSlotsUnitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.slots = UpstreamSlots(self.clock, limit=2, wait_timeout=5.0, max_waiting=2)

    def results(self, d: Deferred[None]) -> list[object]:
        seen: list[object] = []
        d.addBoth(seen.append)
        return seen

    def test_slots_up_to_the_limit_then_a_queue_served_in_order(self) -> None:
        first, second = self.results(self.slots.acquire()), self.results(self.slots.acquire())
        self.assertEqual((first, second, self.slots.in_use), ([None], [None], 2))
        third, fourth = self.results(self.slots.acquire()), self.results(self.slots.acquire())
        self.assertEqual((third, fourth, self.slots.waiting), ([], [], 2))
        self.slots.release()
        self.assertEqual((third, fourth, self.slots.in_use), ([None], [], 2))  # handed over
        self.slots.release()
        self.assertEqual(fourth, [None])
        for _ in range(3):
            self.slots.release()
        self.assertEqual(self.slots.in_use, 0)  # never below zero
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_wait_times_out(self) -> None:
        self.slots.acquire()
        self.slots.acquire()
        waiting = self.results(self.slots.acquire())
        self.clock.advance(4.9)
        self.assertEqual(waiting, [])
        self.clock.advance(0.1)
        (failure,) = waiting
        assert isinstance(failure, Failure)
        self.assertEqual(failure.value.reason, WAIT_TIMEOUT)  # type: ignore[union-attr]
        self.assertEqual((self.slots.waiting, self.slots.in_use), (0, 2))

    def test_a_full_queue_refuses_at_once(self) -> None:
        for _ in range(4):
            self.slots.acquire()
        refused = self.results(self.slots.acquire())
        (failure,) = refused
        assert isinstance(failure, Failure)
        self.assertTrue(failure.check(NoUpstreamSlot))
        self.assertEqual(failure.value.reason, QUEUE_FULL)  # type: ignore[union-attr]

    def test_a_cancelled_wait_leaves_the_queue_at_once(self) -> None:
        self.slots.acquire()
        self.slots.acquire()
        wait = self.slots.acquire()
        wait.addErrback(lambda f: None)
        later = self.results(self.slots.acquire())
        wait.cancel()
        self.assertEqual(self.slots.waiting, 1)
        self.slots.release()
        self.assertEqual(later, [None])  # the next in line got it
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_limits_are_checked(self) -> None:
        with self.assertRaises(ValueError):
            UpstreamSlots(self.clock, limit=0, wait_timeout=1.0, max_waiting=1)


class SlotPathTests(UpstreamExchangeTestCase):
    """
    The slot is held from sending the upstream request until the exchange is
    done, and given back on every path.
    """

    def serve(self, **config: Any) -> Served:
        config.setdefault("max_upstream_connections", 1)
        config.setdefault("upstream_wait_timeout", 5.0)
        return super().serve(**config)

    def assert_free(self, served: Served) -> None:
        slots = slots_of(served)
        self.assertEqual((slots.in_use, slots.waiting), (0, 0))
        self.assertEqual(served.resource.in_flight, 0)

    def test_a_second_request_waits_and_goes_when_the_first_is_done(self) -> None:
        first = self.serve()
        second = connect_another(first)
        first.post(BODY)
        second.post(BODY)
        self.assertEqual(len(first.agent.sent), 1)  # the second waits, not forwarded
        self.assertEqual(slots_of(first).waiting, 1)
        first.agent.sent[0].respond(FakeResponse(200, MESSAGE))
        self.assertEqual(len(first.agent.sent), 2)
        self.assertEqual(slots_of(first).in_use, 1)
        first.agent.sent[1].respond(FakeResponse(200, MESSAGE))
        self.assertEqual((self.answer(first).status, self.answer(second).status), (200, 200))
        self.assert_free(first)

    def test_no_slot_in_time_is_a_503_and_never_forwarded(self) -> None:
        first = self.serve()
        second = connect_another(first)
        with self.logged() as events:
            first.post(BODY)
            second.post(BODY)
            self.clock.advance(5.0)
            answer = self.answer(second)
            self.assertEqual(answer.status, 503)
            self.assertEqual(answer.headers["retry-after"], str(UPSTREAM_BUSY_RETRY_AFTER))
            self.assertEqual(json.loads(answer.body)["error"]["type"], "overloaded_error")
            first.agent.sent[0].respond(FakeResponse(200, MESSAGE))
        self.assertEqual(len(first.agent.sent), 1)
        self.assertEqual([a["outcome"] for a in self.audits(events)], ["upstream_busy", "ok"])
        self.assert_free(first)

    def test_a_full_queue_is_a_503_at_once(self) -> None:
        served = self.serve(limits=ConnectionLimits(max_connections=2, max_per_peer=2))
        slots = slots_of(served)
        self.assertEqual(slots.max_waiting, 2)  # as long as the face has connections
        taken = [slots.acquire() for _ in range(3)]  # the slot and a full queue
        for wait in taken:
            wait.addErrback(lambda _: None)
        served.post(BODY)
        self.assertEqual(self.answer(served).status, 503)
        self.assertEqual(served.agent.sent, [])
        for wait in taken:
            wait.cancel()
        slots.release()
        self.assert_free(served)

    def test_an_agent_gone_while_waiting_leaves_the_queue_at_once(self) -> None:
        first = self.serve()
        second = connect_another(first)
        with self.logged() as events:
            first.post(BODY)
            second.post(BODY)
            second.hang_up()
            self.assertEqual(slots_of(first).waiting, 0)
            self.assertEqual(self.audits(events)[0]["outcome"], "agent_gone")
            first.agent.sent[0].respond(FakeResponse(200, MESSAGE))
        self.assertEqual(len(first.agent.sent), 1)
        self.assert_free(first)

    def test_given_back_after_a_first_byte_timeout(self) -> None:
        served = self.serve(first_byte_timeout=30.0)
        served.post(BODY)
        self.assertEqual(slots_of(served).in_use, 1)
        self.clock.advance(30.0)
        self.assertEqual(self.answer(served).status, 504)
        self.assert_free(served)

    def test_given_back_after_an_unreachable_or_malformed_upstream(self) -> None:
        for reason in (ConnectionRefusedError(), UpstreamMalformed("BAD_STATUS_LINE")):
            served = self.serve()
            served.post(BODY)
            served.agent.sent[0].answer.errback(Failure(ResponseNeverReceived([Failure(reason)])))
            self.assertEqual(self.answer(served).status, 502)
            self.assert_free(served)

    def test_given_back_after_a_broken_body(self) -> None:
        served = self.serve()
        served.post(BODY)
        response = served.agent.sent[0].respond(held())
        response.break_off(UpstreamMalformed(BAD_CHUNKED_FRAMING))
        self.assert_free(served)

    def test_given_back_when_the_agent_leaves_awaiting_headers(self) -> None:
        served = self.serve()
        served.post(BODY)
        served.hang_up()
        self.assertTrue(served.agent.sent[0].cancelled)
        self.assert_free(served)

    def test_held_until_the_upstream_stream_ends_when_the_agent_leaves_mid_stream(self) -> None:
        served = self.serve()
        served.post(BODY)
        response = served.agent.sent[0].respond(held())
        response.send(SSE_START)
        self.clock.advance(0)
        served.hang_up()
        self.assertTrue(response.closed)
        self.assertEqual(slots_of(served).in_use, 1)  # until the connection is really gone
        response.break_off(ConnectionLost())
        self.assert_free(served)

    def test_given_back_when_forwarding_fails_unexpectedly(self) -> None:
        served = self.serve()

        def broken(*args: object, **kwargs: object) -> Deferred[Any]:
            raise RuntimeError("boom")

        served.agent.request = broken  # type: ignore[method-assign]
        with captured_log() as events:
            served.post(BODY)
        self.assertEqual(self.answer(served).status, 502)
        self.assertEqual(len([e for e in events if "log_failure" in e]), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assert_free(served)

    def test_no_slot_is_taken_without_a_credential(self) -> None:
        served = serve(EnvironmentCredentialSource({}), self.clock, max_upstream_connections=1)
        served.post(BODY)
        self.assertEqual(self.answer(served).status, 401)
        self.assert_free(served)


class SlotReplayTests(SynchronousTestCase):
    def test_a_replay_keeps_its_one_slot(self) -> None:
        world = BrokerWorld()
        world.store_token(STORED)
        source = BrokerCredentialSource(world.broker, environ={})
        first = serve(source, world.clock, max_upstream_connections=1)
        second = connect_another(first)
        first.post(BODY)
        second.post(BODY)
        first.agent.sent[0].respond(FakeResponse(401, REFUSAL))
        # The replay went out on the first request's slot; the second still waits.
        self.assertEqual(len(first.agent.sent), 2)
        slots = slots_of(first)
        self.assertEqual((slots.in_use, slots.waiting), (1, 1))
        first.agent.sent[1].respond(FakeResponse(200, MESSAGE))
        self.assertEqual(len(first.agent.sent), 3)
        first.agent.sent[2].respond(FakeResponse(200, MESSAGE))
        self.assertEqual((slots.in_use, slots.waiting), (0, 0))

    def test_given_back_when_the_replacement_cannot_be_had(self) -> None:
        world = BrokerWorld()
        world.store_token(STORED)
        world.endpoint.refuse()
        source = BrokerCredentialSource(world.broker, environ={})
        served = serve(source, world.clock, max_upstream_connections=1)
        served.post(BODY)
        served.agent.sent[0].respond(FakeResponse(401, REFUSAL))
        self.assertEqual(parse_response(served.transport.value()).status, 401)
        slots = slots_of(served)
        self.assertEqual((slots.in_use, slots.waiting), (0, 0))
