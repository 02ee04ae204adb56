"""
The HTTP face's gate, on the in-memory harness (credproxy.testing): a
request head is judged and admitted before any body byte is read, a refused
request is answered and its connection closed, heads that break a parsing
rule get their own status, and every deadline runs on the Clock.
"""

from __future__ import annotations

import os

from twisted.internet.address import IPv4Address
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from credproxy._limits import ConnectionLimits
from credproxy._secret import Secret
from credproxy.http._channel import MAX_LINGERING_REFUSALS, REFUSED_LINGER_SECONDS
from credproxy.http._head import MAX_HEAD, MAX_HEADER_LINE, MAX_HEADERS, MAX_REQUEST_TARGET
from credproxy.testing import AgentConnection, AgentTransport, FaceHarness, RawResponse
from tests.logcapture import captured_log

TOKEN = "t" * 64


def _head(*lines: bytes, request_line: bytes = b"POST /v1/messages HTTP/1.1") -> bytes:
    return b"\r\n".join([request_line, *lines]) + b"\r\n\r\n"


def _only(connection: AgentConnection) -> RawResponse:
    responses = connection.responses()
    assert len(responses) == 1, responses
    return responses[0]


class AdmissionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.face = FaceHarness({"capability_token": Secret(TOKEN)})

    def test_tokenless_request_is_refused_before_its_body(self) -> None:
        agent = self.face.connect()
        agent.send(_head(b"host: x", b"x-api-key: wrong", b"content-length: 31000000"))
        response = _only(agent)
        self.assertEqual(response.status, 401)
        self.assertIn(b"capability token", response.body)
        self.assertTrue(agent.transport.write_closed)
        # The body the agent goes on sending is dropped, never held.
        agent.send(b"x" * 65536)
        self.assertEqual(self.face.site.guard.budget.reserved, 0)
        self.assertEqual(self.face.upstream.requests, [])

    def test_100_continue_only_for_an_admitted_request(self) -> None:
        refused = self.face.connect()
        refused.send(_head(b"host: x", b"expect: 100-continue", b"content-length: 10"))
        self.assertNotIn(b"100 Continue", refused.received)
        self.assertEqual(_only(refused).status, 401)

        admitted = self.face.connect()
        admitted.send(
            _head(
                b"host: x",
                b"x-api-key: " + TOKEN.encode(),
                b"expect: 100-continue",
                b"content-length: 2",
            )
        )
        self.assertTrue(admitted.received.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"))
        admitted.send(b"{}")
        self.assertEqual(len(self.face.upstream.requests), 1)

    def test_refused_connection_lingers_then_is_aborted(self) -> None:
        agent = self.face.connect()
        agent.post(key=b"wrong")
        self.assertTrue(agent.transport.write_closed)
        self.assertFalse(agent.transport.aborted)
        self.face.clock.advance(REFUSED_LINGER_SECONDS)
        self.assertTrue(agent.transport.aborted)

    def test_agent_closing_first_cancels_the_linger(self) -> None:
        agent = self.face.connect()
        agent.post(key=b"wrong")
        agent.hang_up()
        self.assertEqual(self.face.clock.getDelayedCalls(), [])

    def test_other_uid_is_refused_with_403(self) -> None:
        face = FaceHarness()
        agent = face.connect(uid=4321)
        with captured_log() as events:
            agent.post()
        self.assertEqual(_only(agent).status, 403)
        self.assertTrue(agent.transport.write_closed)
        lines = [e["line"] for e in events if e.get("outcome") == "peer_refused"]
        self.assertEqual(len(lines), 1)
        self.assertIn("peer_uid=4321", lines[0])

    def test_own_uid_is_served(self) -> None:
        face = FaceHarness()
        agent = face.connect(uid=os.getuid())
        agent.post()
        self.assertEqual(len(face.upstream.requests), 1)

    def test_unknown_path_and_method_are_refused_before_the_body(self) -> None:
        agent = self.face.connect()
        agent.send(_head(b"host: x", b"content-length: 100", request_line=b"POST /v1/x HTTP/1.1"))
        self.assertEqual(_only(agent).status, 404)
        agent = self.face.connect()
        agent.send(_head(b"host: x", request_line=b"GET /v1/messages HTTP/1.1"))
        response = _only(agent)
        self.assertEqual(response.status, 405)
        self.assertEqual(response.header(b"allow"), b"POST")


class StrictParsingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.face = FaceHarness()

    def _status(self, data: bytes) -> int:
        agent = self.face.connect()
        agent.send(data)
        response = _only(agent)
        self.assertTrue(agent.closing)
        self.assertEqual(self.face.upstream.requests, [])
        return response.status

    def test_long_target_is_414_even_before_its_line_ends(self) -> None:
        self.assertEqual(self._status(b"POST /" + b"-" * (MAX_REQUEST_TARGET + 100)), 414)
        target = b"/v1/messages?" + b"-" * MAX_REQUEST_TARGET
        self.assertEqual(
            self._status(_head(b"host: x", request_line=b"POST " + target + b" HTTP/1.1")), 414
        )

    def test_long_header_line_is_431(self) -> None:
        line = b"x-long: " + b"-" * MAX_HEADER_LINE
        self.assertEqual(self._status(_head(b"host: x", line)), 431)
        # Also while the line is still arriving.
        self.assertEqual(self._status(b"POST /v1/messages HTTP/1.1\r\n" + line), 431)

    def test_large_head_is_431(self) -> None:
        lines = [b"x-h%d: %s" % (i, b"-" * 4000) for i in range(MAX_HEAD // 4000 + 1)]
        self.assertEqual(self._status(_head(b"host: x", *lines)), 431)

    def test_too_many_headers_is_431(self) -> None:
        lines = [b"x-h%d: 1" % i for i in range(MAX_HEADERS + 1)]
        self.assertEqual(self._status(_head(b"host: x", *lines)), 431)

    def test_target_bytes_outside_printable_ascii_are_400(self) -> None:
        for byte in (b"\x7f", b"\x80", b"\xb0", b"\xff", b"\x01"):
            with self.subTest(byte=byte):
                line = b"POST /v1/messages?q=" + byte + b" HTTP/1.1"
                self.assertEqual(self._status(_head(b"host: x", request_line=line)), 400)

    def test_absolute_and_asterisk_targets_are_400(self) -> None:
        for target in (b"http://evil/v1/messages", b"*"):
            with self.subTest(target=target):
                line = b"POST " + target + b" HTTP/1.1"
                self.assertEqual(self._status(_head(b"host: x", request_line=line)), 400)

    def test_host_rules(self) -> None:
        self.assertEqual(self._status(_head(b"host: a", b"Host: b")), 400)
        self.assertEqual(self._status(_head(b"x-api-key: p")), 400)
        # HTTP/1.0 needs none.
        agent = self.face.connect()
        agent.send(_head(b"content-length: 2", request_line=b"POST /v1/messages HTTP/1.0") + b"{}")
        self.assertEqual(len(self.face.upstream.requests), 1)

    def test_control_characters_in_values_are_400(self) -> None:
        for value in (b"a\x00b", b"a\x01b", b"a\x7fb", b"a\rb"):
            with self.subTest(value=value):
                self.assertEqual(self._status(_head(b"host: x", b"x-thing: " + value)), 400)

    def test_bare_line_feeds_and_folding_are_400(self) -> None:
        self.assertEqual(self._status(b"POST /v1/messages HTTP/1.1\nhost: x\r\n\r\n"), 400)
        self.assertEqual(self._status(_head(b"host: x", b"x-a: 1", b" folded")), 400)

    def test_malformed_names_and_lines_are_400(self) -> None:
        self.assertEqual(self._status(_head(b"host: x", b"bad name: 1")), 400)
        self.assertEqual(self._status(_head(b"host: x", b"no-colon")), 400)
        self.assertEqual(
            self._status(_head(b"host: x", request_line=b"POST /v1/messages HTTP/2.0")), 400
        )
        self.assertEqual(self._status(_head(b"host: x", request_line=b"POST  /v1 HTTP/1.1")), 400)

    def test_transfer_encodings_other_than_chunked_are_501(self) -> None:
        for value in (b"identity", b"gzip", b"gzip, chunked", b"chunked, gzip"):
            with self.subTest(value=value):
                self.assertEqual(
                    self._status(_head(b"host: x", b"transfer-encoding: " + value)), 501
                )
        self.assertEqual(
            self._status(
                _head(b"host: x", b"transfer-encoding: chunked", b"transfer-encoding: chunked")
            ),
            501,
        )

    def test_ambiguous_lengths_are_400(self) -> None:
        self.assertEqual(
            self._status(_head(b"host: x", b"transfer-encoding: chunked", b"content-length: 2")),
            400,
        )
        self.assertEqual(
            self._status(_head(b"host: x", b"content-length: 2", b"content-length: 2")), 400
        )
        self.assertEqual(self._status(_head(b"host: x", b"content-length: -1")), 400)
        self.assertEqual(self._status(_head(b"host: x", b"content-length: 0x10")), 400)

    def test_a_chunked_body_is_forwarded(self) -> None:
        agent = self.face.connect()
        agent.send(
            _head(b"host: x", b"x-api-key: p", b"transfer-encoding: Chunked")
            + b"2\r\n{}\r\n0\r\n\r\n"
        )
        [sent] = self.face.upstream.requests
        self.assertEqual(sent.body, b"{}")

    def test_leading_blank_lines_are_ignored(self) -> None:
        for blank_lines in (1, 2, 5):
            with self.subTest(blank_lines=blank_lines):
                face = FaceHarness()
                agent = face.connect()
                agent.send(b"\r\n" * blank_lines + _head(b"host: x", b"content-length: 2") + b"{}")
                [sent] = face.upstream.requests
                self.assertEqual(sent.body, b"{}")
                self.assertEqual(agent.received, b"")  # no bare 400 from twisted.web

    def test_a_pipelined_closing_request_with_a_late_body_is_forwarded(self) -> None:
        agent = self.face.connect()
        first = _head(b"host: x", b"content-length: 2") + b"{}"
        closing = _head(b"host: x", b"connection: close", b"content-length: 10") + b"12345"
        agent.send(first + closing)
        self.face.upstream.requests[0].respond()
        agent.send(b"67890")
        self.assertEqual(len(self.face.upstream.requests), 2)
        self.assertEqual(self.face.upstream.requests[1].body, b"1234567890")

    def test_a_head_in_many_pieces_passes(self) -> None:
        agent = self.face.connect()
        data = _head(b"host: x", b"x-api-key: p", b"content-length: 2") + b"{}"
        for i in range(len(data)):
            agent.send(data[i : i + 1])
        [sent] = self.face.upstream.requests
        self.assertEqual(sent.body, b"{}")

    def test_a_bad_pipelined_request_is_answered_after_the_good_one(self) -> None:
        agent = self.face.connect()
        good = _head(b"host: x", b"content-length: 2") + b"{}"
        bad = _head(b"host: a", b"host: b")
        agent.send(good + bad)
        [sent] = self.face.upstream.requests
        self.assertEqual(agent.responses(), [])
        sent.respond(200, b'{"ok":1}')
        first, second = agent.responses()
        self.assertEqual((first.status, second.status), (200, 400))
        self.assertEqual(len(self.face.upstream.requests), 1)


class DeadlineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.face = FaceHarness()
        self.clock = self.face.clock

    def test_a_trickled_head_gets_408_from_its_first_byte(self) -> None:
        agent = self.face.connect()
        data = _head(b"host: x", b"x-trickle: " + b"-" * 100)
        for byte in range(29):
            agent.send(data[byte : byte + 1])
            self.clock.advance(1)
        self.assertEqual(agent.responses(), [])
        agent.send(data[29:30])
        self.clock.advance(1)
        self.assertEqual(_only(agent).status, 408)
        self.assertTrue(agent.closing)

    def test_a_head_in_time_is_not_timed_out(self) -> None:
        agent = self.face.connect()
        data = _head(b"host: x", b"content-length: 2") + b"{}"
        agent.send(data[:10])
        self.clock.advance(29)
        agent.send(data[10:])
        self.clock.advance(100)
        self.assertEqual(agent.responses(), [])
        self.assertEqual(len(self.face.upstream.requests), 1)

    def test_a_stalled_body_gets_408(self) -> None:
        agent = self.face.connect()
        agent.send(_head(b"host: x", b"content-length: 10") + b"12345")
        self.clock.advance(59)
        self.assertEqual(agent.responses(), [])
        self.clock.advance(1)
        self.assertEqual(_only(agent).status, 408)
        self.assertIn(b"no progress", _only(agent).body)
        # Given up: its budget goes back now, not when the connection does.
        self.assertEqual(self.face.site.guard.budget.reserved, 0)
        agent.hang_up()
        self.assertEqual(self.face.site.guard.budget.reserved, 0)

    def test_a_connection_that_sends_nothing_gets_408_from_its_connection(self) -> None:
        agent = self.face.connect()
        self.clock.advance(29.9)
        self.assertEqual(agent.responses(), [])
        self.clock.advance(0.1)
        self.assertEqual(_only(agent).status, 408)
        self.assertTrue(agent.closing)
        agent.hang_up()
        self.assertEqual(self.face.site.guard.slots.total, 0)

    def test_a_body_trickled_past_the_total_gets_408(self) -> None:
        agent = self.face.connect()
        agent.send(_head(b"host: x", b"content-length: 100"))
        for _ in range(9):
            self.clock.advance(30)
            agent.send(b"x")
        self.assertEqual(agent.responses(), [])
        self.clock.advance(30)
        self.assertEqual(_only(agent).status, 408)
        self.assertIn(b"within 300 s", _only(agent).body)

    def test_each_kept_alive_request_gets_its_own_head_deadline(self) -> None:
        agent = self.face.connect()
        agent.post()
        self.face.upstream.requests[0].respond()
        self.clock.advance(200)  # idle between requests: not a head deadline
        agent.send(b"POST /v1/messages HTTP/1.1\r\n")
        self.clock.advance(29)
        self.assertEqual(len(agent.responses()), 1)
        self.clock.advance(1)
        self.assertEqual([r.status for r in agent.responses()], [200, 408])


class BudgetTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.face = FaceHarness({"max_buffered_bytes": 100, "max_body": 1000})
        self.budget = self.face.site.guard.budget

    def test_a_body_that_does_not_fit_gets_503_and_nothing_is_forwarded(self) -> None:
        holding = self.face.connect()
        holding.send(_head(b"host: x", b"content-length: 60") + b"x" * 10)
        self.assertEqual(self.budget.reserved, 60)
        over = self.face.connect()
        over.send(_head(b"host: x", b"expect: 100-continue", b"content-length: 50"))
        response = _only(over)
        self.assertEqual(response.status, 503)
        self.assertIn(b"overloaded_error", response.body)
        self.assertEqual(response.header(b"retry-after"), b"1")
        self.assertNotIn(b"100 Continue", over.received)
        self.assertEqual(self.face.upstream.requests, [])
        # A request that fits still goes through.
        fits = self.face.connect()
        fits.post(b"y" * 40)
        self.assertEqual(len(self.face.upstream.requests), 1)

    def test_the_budget_is_given_back_on_every_ending(self) -> None:
        answered = self.face.connect()
        answered.post(b"-" * 30)
        self.assertEqual(self.budget.reserved, 30)
        self.face.upstream.requests[0].respond()
        self.assertEqual(self.budget.reserved, 0)

        gone = self.face.connect()
        gone.send(_head(b"host: x", b"content-length: 30") + b"a")
        gone.hang_up()
        self.assertEqual(self.budget.reserved, 0)

        gone_while_forwarding = self.face.connect()
        gone_while_forwarding.post(b"-" * 30)
        gone_while_forwarding.hang_up()
        self.assertEqual(self.budget.reserved, 0)

    def test_a_chunked_body_is_refused_when_it_outgrows_the_budget(self) -> None:
        agent = self.face.connect()
        agent.send(_head(b"host: x", b"transfer-encoding: chunked"))
        agent.send(b"32\r\n" + b"-" * 50 + b"\r\n")
        self.assertEqual(self.budget.reserved, 50)
        agent.send(b"40\r\n" + b"-" * 64 + b"\r\n")
        self.assertEqual(_only(agent).status, 503)
        agent.hang_up()
        self.assertEqual(self.budget.reserved, 0)

    def test_an_oversized_body_gets_413_and_an_audit_line(self) -> None:
        agent = self.face.connect()
        with captured_log() as events:
            agent.send(_head(b"host: x", b"content-length: 1001"))
        self.assertEqual(_only(agent).status, 413)
        audits = [e for e in events if e.get("log_namespace") == "credproxy.http.audit"]
        self.assertEqual([(a["status"], a["outcome"]) for a in audits], [(413, "body_too_large")])


class LingeringTests(SynchronousTestCase):
    def test_past_the_lingering_bound_a_refused_connection_is_closed_at_once(self) -> None:
        face = FaceHarness({"capability_token": Secret(TOKEN)})
        agents = []
        for _ in range(MAX_LINGERING_REFUSALS):
            agent = face.connect()
            agent.post(key=b"wrong")
            agents.append(agent)
        self.assertTrue(
            all(a.transport.write_closed and not a.transport.disconnecting for a in agents)
        )
        self.assertEqual(face.site.guard.lingering, MAX_LINGERING_REFUSALS)
        one_more = face.connect()
        one_more.post(key=b"wrong")
        self.assertEqual(_only(one_more).status, 401)
        self.assertTrue(one_more.transport.disconnecting)
        self.assertFalse(one_more.transport.write_closed)
        agents[0].hang_up()
        self.assertEqual(face.site.guard.lingering, MAX_LINGERING_REFUSALS - 1)
        face.clock.advance(REFUSED_LINGER_SECONDS)
        for agent in agents[1:]:
            self.assertTrue(agent.transport.aborted)


class ConnectionCapTests(SynchronousTestCase):
    def test_past_the_face_cap_a_connection_is_answered_and_closed(self) -> None:
        face = FaceHarness({"limits": ConnectionLimits(max_connections=2, max_per_peer=2)})
        first, second = face.connect(host="10.0.0.1"), face.connect(host="10.0.0.2")
        third = face.connect(host="10.0.0.3")
        response = _only(third)
        self.assertEqual(response.status, 503)
        self.assertTrue(third.closing)
        self.assertEqual(face.site.guard.slots.total, 2)
        # The refused one holds no slot; a closed one gives its slot back.
        third.hang_up()
        first.hang_up()
        fourth = face.connect(host="10.0.0.4")
        fourth.post()
        self.assertEqual(len(face.upstream.requests), 1)
        del second

    def test_past_the_peer_cap_only_that_peer_is_refused(self) -> None:
        face = FaceHarness({"limits": ConnectionLimits(max_connections=10, max_per_peer=2)})
        held = [face.connect(uid=os.getuid()) for _ in range(2)]
        refused = face.connect(uid=os.getuid())
        self.assertEqual(_only(refused).status, 503)
        self.assertIn(b"as many connections", _only(refused).body)
        other = face.connect(host="127.0.0.1")
        other.post()
        self.assertEqual(len(face.upstream.requests), 1)
        self.assertEqual(len(held), 2)


class AuditTests(SynchronousTestCase):
    def test_an_unjudged_head_shows_only_known_words(self) -> None:
        face = FaceHarness({"max_body": 100})
        agent = face.connect()
        with captured_log() as events:
            agent.send(b"PO\x1b[2J\rST /x\x00y HTTP/1.1\r\nhost: x\r\n\r\n")
        [line] = [e for e in events if e.get("log_namespace") == "credproxy.http.audit"]
        self.assertEqual((line["method"], line["path"], line["status"]), ("-", "-", 400))

    def test_a_body_read_as_a_head_never_reaches_the_log(self) -> None:
        face = FaceHarness()
        agent = face.connect()
        body = b'{"content":"PROMPT-SECRET words"}\r\n\r\n'
        with captured_log() as events:
            agent.send(_head(b"host: x", b"content-length: 2") + body)  # 2 is short
            face.upstream.requests[0].respond()
        self.assertNotIn("PROMPT-SECRET", repr(events))
        audits = [e for e in events if e.get("log_namespace") == "credproxy.http.audit"]
        self.assertEqual(sorted(a["status"] for a in audits), [200, 400])

    def test_a_flood_of_refusals_writes_one_line_a_second_with_a_count(self) -> None:
        face = FaceHarness({"capability_token": Secret(TOKEN)})
        with captured_log() as events:
            for _ in range(10):
                face.connect().post(key=b"wrong")
            face.clock.advance(1)
            face.connect().post(key=b"wrong")
        lines = [e for e in events if e.get("log_namespace") == "credproxy.http.audit"]
        self.assertEqual(len(lines), 2)
        self.assertNotIn("suppressed", lines[0]["line"])
        self.assertEqual(lines[1]["suppressed"], 9)
        self.assertIn("suppressed=9", lines[1]["line"])

    def test_the_tail_of_a_flood_is_counted_when_it_stops(self) -> None:
        face = FaceHarness({"capability_token": Secret(TOKEN)})
        with captured_log() as events:
            for _ in range(5):
                face.connect().post(key=b"wrong")
            face.clock.advance(1)
        lines = [e["line"] for e in events if e.get("log_namespace") == "credproxy.http.audit"]
        self.assertEqual(len(lines), 2)
        self.assertEqual(lines[1], "refusals_suppressed outcome=bad_token suppressed=4")

    def test_the_counts_owed_are_written_when_the_face_closes(self) -> None:
        face = FaceHarness({"capability_token": Secret(TOKEN)})
        with captured_log() as events:
            for _ in range(3):
                face.connect().post(key=b"wrong")
            self.successResultOf(face.site.close())
            at_close = [e["line"] for e in events if "line" in e]
            face.clock.advance(5)  # its timer is gone: no second summary
            later = [e["line"] for e in events if "line" in e]
        self.assertEqual(at_close[-1], "refusals_suppressed outcome=bad_token suppressed=2")
        self.assertEqual(later, at_close)

    def test_the_audit_path_is_cut_and_has_no_query(self) -> None:
        face = FaceHarness()
        agent = face.connect()
        with captured_log() as events:
            agent.send(
                _head(
                    b"host: x",
                    request_line=b"POST /" + b"p" * 1000 + b"?secret-query=1 HTTP/1.1",
                )
            )
        [line] = [e for e in events if e.get("log_namespace") == "credproxy.http.audit"]
        self.assertEqual(line["path"], "/" + "p" * 255 + "...[cut]")
        self.assertNotIn("secret-query", repr(events))

    def test_a_query_is_never_audited_for_forwarded_requests(self) -> None:
        face = FaceHarness()
        agent = face.connect()
        with captured_log() as events:
            agent.post(path=b"/v1/messages?beta=true&x=private")
            face.upstream.requests[0].respond()
        [line] = [e for e in events if e.get("log_namespace") == "credproxy.http.audit"]
        self.assertEqual(line["path"], "/v1/messages")
        self.assertNotIn("private", repr(events))


class EmbeddedResourceTests(SynchronousTestCase):
    """
    The resource served by a twisted.web site of the embedder's own (no
    gate): admission and the target rule still hold, late, and the body is
    read from twisted.web's own body file.
    """

    def _serve(self, **config: object) -> tuple[FaceHarness, AgentConnection]:
        face = FaceHarness(dict(config))
        site = Site(face.resource, reactor=face.clock)
        transport = AgentTransport()
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        channel.makeConnection(transport)
        return face, AgentConnection(transport, channel)

    def test_a_wrong_token_is_refused(self) -> None:
        face, agent = self._serve(capability_token=Secret(TOKEN))
        agent.post(key=b"wrong")
        self.assertEqual(_only(agent).status, 401)
        self.assertEqual(face.upstream.requests, [])

    def test_a_bad_target_byte_is_400_without_a_traceback(self) -> None:
        face, agent = self._serve()
        with captured_log() as events:
            agent.post(path=b"/v1/messages?q=\x80")
        self.assertEqual(_only(agent).status, 400)
        self.assertEqual(face.upstream.requests, [])
        self.assertEqual([e for e in events if e.get("log_failure") is not None], [])

    def test_the_body_is_forwarded(self) -> None:
        face, agent = self._serve()
        agent.post(b'{"model":"m"}')
        [sent] = face.upstream.requests
        self.assertEqual(sent.body, b'{"model":"m"}')


class BodyStorageTests(SynchronousTestCase):
    def test_a_body_of_tiny_chunks_is_gathered_and_forwarded_whole(self) -> None:
        face = FaceHarness()
        agent = face.connect()
        agent.send(_head(b"host: x", b"transfer-encoding: chunked"))
        payload = bytes(range(256)) * 200  # 51 200 bytes as 1-byte chunks
        agent.send(b"".join(b"1\r\n" + payload[i : i + 1] + b"\r\n" for i in range(len(payload))))
        agent.send(b"0\r\n\r\n")
        [sent] = face.upstream.requests
        self.assertEqual(sent.body, payload)

    def test_stored_chunks_stay_few_whatever_the_pieces(self) -> None:
        from credproxy.http._body import MERGE_BELOW, RequestBody

        body = RequestBody()
        for _ in range(100_000):
            body.write(b"x")
        self.assertEqual(body.length, 100_000)
        self.assertLessEqual(len(body.chunks), 100_000 // MERGE_BELOW + 1)
        self.assertEqual(body.getvalue(), b"x" * 100_000)
        whole = b"y" * MERGE_BELOW
        body.write(whole)
        self.assertIs(body.chunks[-1], whole)  # a whole read is kept as it is


class HandOverTests(SynchronousTestCase):
    """
    The judged head reaches twisted.web without a second parse: the request
    it makes must be the one twisted.web's own parser would have made.
    """

    def setUp(self) -> None:
        self.face = FaceHarness()

    def test_headers_reach_the_request_as_sent_in_order(self) -> None:
        agent = self.face.connect()
        agent.send(
            _head(
                b"Host: x",
                b"anthropic-beta: first-2025",
                b"Anthropic-Version:   2023-06-01 \t",
                b"anthropic-beta: second-2025",
                b"content-type: application/json",
                b"content-length: 2",
            )
            + b"{}"
        )
        [sent] = self.face.upstream.requests
        self.assertEqual(
            sent.headers.getRawHeaders(b"anthropic-beta"), [b"first-2025", b"second-2025"]
        )
        self.assertEqual(sent.headers.getRawHeaders(b"anthropic-version"), [b"2023-06-01"])
        self.assertEqual(sent.uri, b"http://upstream.invalid/v1/messages")

    def test_the_query_is_kept_in_the_target(self) -> None:
        agent = self.face.connect()
        agent.send(
            _head(
                b"host: x",
                b"content-length: 2",
                request_line=b"POST /v1/messages?beta=true HTTP/1.1",
            )
            + b"{}"
        )
        [sent] = self.face.upstream.requests
        self.assertEqual(sent.uri, b"http://upstream.invalid/v1/messages?beta=true")

    def test_an_http_1_0_request_is_answered_and_closed(self) -> None:
        agent = self.face.connect()
        agent.send(_head(b"content-length: 2", request_line=b"POST /v1/messages HTTP/1.0") + b"{}")
        [sent] = self.face.upstream.requests
        sent.respond(body=b'{"ok":1}', headers={b"content-type": [b"application/json"]})
        response = _only(agent)
        self.assertEqual(response.status, 200)
        self.assertTrue(agent.received.startswith(b"HTTP/1.0 200 "))
        self.assertTrue(agent.transport.disconnecting)

    def test_a_bodyless_request_is_forwarded_at_once_and_the_next_one_follows(self) -> None:
        agent = self.face.connect()
        agent.send(_head(b"host: x") + _head(b"host: x", b"content-length: 2") + b"{}")
        self.assertEqual(len(self.face.upstream.requests), 1)
        self.assertEqual(self.face.upstream.requests[0].body, b"")
        self.face.upstream.requests[0].respond()
        self.assertEqual(len(self.face.upstream.requests), 2)
        self.assertEqual(self.face.upstream.requests[1].body, b"{}")

    def test_the_body_in_the_same_read_as_the_head_is_the_requests(self) -> None:
        agent = self.face.connect()
        agent.send(_head(b"host: x", b"content-length: 5") + b"12345")
        [sent] = self.face.upstream.requests
        self.assertEqual(sent.body, b"12345")

    def test_the_private_names_relied_on_exist(self) -> None:
        from twisted.web import http

        channel = http.HTTPChannel()
        self.assertEqual(channel._HTTPChannel__first_line, 1)  # type: ignore[attr-defined]
        self.assertIsNone(channel._transferDecoder)
        self.assertEqual(channel.length, 0)
        self.assertEqual(channel.requests, [])
        self.assertTrue(callable(channel._finishRequestBody))
        self.assertTrue(callable(http._IdentityTransferDecoder))
        self.assertTrue(callable(http._ChunkedTransferDecoder))
        # allContentReceived reads and deletes these three.
        source = http.HTTPChannel.allContentReceived.__code__.co_names
        for name in ("_command", "_path", "_version"):
            self.assertIn(name, source)

    def test_the_connections_own_address_is_asked_of_the_socket_once(self) -> None:
        agent = self.face.connect()
        asked: list[object] = []
        own = agent.transport.getHost

        def counted() -> object:
            asked.append(1)
            return own()

        agent.transport.getHost = counted  # type: ignore[method-assign]
        for _ in range(3):
            agent.send(_head(b"host: x", b"content-length: 2") + b"{}")
            self.face.upstream.requests[-1].respond()
        self.assertEqual(len(self.face.upstream.requests), 3)
        self.assertEqual(len(asked), 1)
        self.assertEqual(agent.channel.getHost(), own())
