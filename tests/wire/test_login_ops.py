"""
The login ops (wire-protocol.md sections 4, 5 and 10) over a real Broker:
answer shapes, sanitizing, the sandbox refusals and their order, field
validation, error codes, what the audit record names, and that no session
id, verifier, state, code, device code or refresh token is in any answer
(besides initiate's session_id), audit record or log line.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from credproxy.broker import Broker, SandboxPolicy
from credproxy.oauth._interfaces import OAuthError, OAuthErrorKind
from credproxy.stores import MemoryProviderKeyStore, MemoryTokenStore
from credproxy.wire import CredentialServerFactory
from credproxy.wire._login_ops import oauth_cancel, oauth_exchange, oauth_initiate, oauth_poll
from credproxy.wire._ops import AuditRecord, OpContext, OpFailure, Payload, Status
from tests.broker.test_sessions import (
    ACCESS,
    AUTH_URL,
    CODE,
    SECRETS,
    USER_CODE,
    VERIFICATION_URI,
    VERIFICATION_URI_COMPLETE,
    FakeDeviceProvider,
    FakePKCEProvider,
    device_login,
    login_token,
)
from tests.logcapture import captured_log, log_text
from tests.wire.server_harness import Connection, request

Op = Callable[[OpContext, Payload, AuditRecord], Coroutine[Any, Any, dict[str, Any]]]

SANITIZED = {"access_token": ACCESS, "expiry": 1_900_000_000, "token_type": "Bearer"}


class LoginOpsCase(SynchronousTestCase):
    """
    A broker with one provider of each flow, and a host connection.
    """

    policy = SandboxPolicy()

    def setUp(self) -> None:
        self.clock = Clock()
        self.tokens = MemoryTokenStore()
        self.pkce = FakePKCEProvider()
        self.device = FakeDeviceProvider()
        self.broker = Broker(
            self.clock,
            self.tokens,
            MemoryProviderKeyStore(),
            providers={"anthropic": self.pkce, "qwen": self.device},
            sandbox=self.policy,
        )
        self.connection = object()
        self.records: list[AuditRecord] = []
        self.answers: list[dict[str, Any]] = []

    def context(self, sandbox: bool = False, connection: object | None = None) -> OpContext:
        return OpContext(self.broker, sandbox, connection or self.connection)

    def call(self, op: Op, payload: Payload, ctx: OpContext | None = None) -> Deferred[Any]:
        record = AuditRecord(op.__name__)
        self.records.append(record)
        d = Deferred.fromCoroutine(op(ctx or self.context(), payload, record))
        return d.addCallback(self._answered)

    def _answered(self, data: dict[str, Any]) -> dict[str, Any]:
        self.answers.append(data)
        return data

    def ok(self, op: Op, payload: Payload, ctx: OpContext | None = None) -> dict[str, Any]:
        data: dict[str, Any] = self.successResultOf(self.call(op, payload, ctx))
        return data

    def refused(
        self,
        op: Op,
        payload: Payload,
        code: str,
        message: str,
        ctx: OpContext | None = None,
    ) -> OpFailure:
        failure = self.failureResultOf(self.call(op, payload, ctx), OpFailure).value
        assert isinstance(failure, OpFailure)
        self.assertEqual((failure.code, failure.message), (code, message))
        return failure

    def initiate(self, provider: str = "anthropic", **payload: Any) -> dict[str, Any]:
        d = self.call(oauth_initiate, {"provider": provider, **payload})
        if provider == "qwen":
            self.device.begins[-1].callback(device_login())
        data: dict[str, Any] = self.successResultOf(d)
        return data

    def answer_exchange(self, result: Any) -> None:
        d = self.pkce.exchanges[-1][2]
        d.errback(result) if isinstance(result, Exception) else d.callback(result)

    def answer_poll(self, result: Any) -> None:
        d = self.device.polls[-1][1]
        d.errback(result) if isinstance(result, Exception) else d.callback(result)


class HostLoginTests(LoginOpsCase):
    def test_pkce_login(self) -> None:
        data = self.initiate(bucket="work", redirect_uri="https://cb.test/done")
        session_id = data.pop("session_id")
        self.assertRegex(session_id, r"\A[0-9a-f]{32}\Z")
        self.assertEqual(
            data, {"flow_type": "pkce_redirect", "pollIntervalMs": 5000, "auth_url": AUTH_URL}
        )
        self.assertEqual(self.pkce.begun, ["https://cb.test/done"])
        d = self.call(oauth_exchange, {"session_id": session_id, "code": CODE})
        self.answer_exchange(login_token())
        self.assertEqual(self.successResultOf(d), SANITIZED)
        stored = self.successResultOf(self.broker.get_token("anthropic", "work"))
        self.assertEqual(stored, login_token())  # stored with its refresh token
        self.assertEqual(
            [(r.op, r.provider, r.bucket) for r in self.records],
            [("oauth_initiate", "anthropic", "work"), ("oauth_exchange", "anthropic", "work")],
        )

    def test_device_login(self) -> None:
        data = self.initiate("qwen")
        session_id = data.pop("session_id")
        self.assertEqual(
            data,
            {
                "flow_type": "device_code",
                "pollIntervalMs": 5000,
                "auth_url": VERIFICATION_URI_COMPLETE,
                "verification_uri": VERIFICATION_URI,
                "user_code": USER_CODE,
                "verification_uri_complete": VERIFICATION_URI_COMPLETE,
            },
        )
        poll = {"session_id": session_id}
        d = self.call(oauth_poll, poll)
        self.answer_poll(OAuthError(OAuthErrorKind.PENDING))
        self.assertEqual(self.successResultOf(d), {"status": "pending"})
        self.clock.advance(5)
        d = self.call(oauth_poll, poll)
        self.answer_poll(OAuthError(OAuthErrorKind.SLOW_DOWN))
        answer = self.successResultOf(d)
        self.assertEqual(answer, {"status": "pending", "interval": 10})
        self.assertIsInstance(answer["interval"], int)  # written as JavaScript would: 10, not 10.0
        self.clock.advance(10)
        d = self.call(oauth_poll, poll)
        self.answer_poll(login_token())
        self.assertEqual(self.successResultOf(d), {"status": "complete", "token": SANITIZED})
        self.assertEqual(
            self.successResultOf(self.broker.get_token("qwen", "default")), login_token()
        )
        self.assertEqual({(r.provider, r.bucket) for r in self.records}, {("qwen", "default")})

    def test_device_answer_without_complete_uri(self) -> None:
        d = self.call(oauth_initiate, {"provider": "qwen"})
        self.device.begins[0].callback(device_login(complete=None))
        data = self.successResultOf(d)
        self.assertEqual(data["auth_url"], VERIFICATION_URI)
        self.assertNotIn("verification_uri_complete", data)

    def test_missing_fields(self) -> None:
        failures = []
        for bad in ({}, {"provider": ""}, {"provider": 7}):
            failures.append(
                self.refused(oauth_initiate, bad, "INVALID_REQUEST", "Missing provider")
            )
        for op in (oauth_exchange, oauth_poll, oauth_cancel):
            for payload in ({}, {"session_id": ""}, {"session_id": None, "code": CODE}):
                failures.append(self.refused(op, payload, "INVALID_REQUEST", "Missing session_id"))
        for payload in ({"session_id": "a" * 32}, {"session_id": "a" * 32, "code": ""}):
            failures.append(
                self.refused(oauth_exchange, payload, "INVALID_REQUEST", "Missing code")
            )
        self.assertEqual({f.status for f in failures}, {Status.INVALID})
        self.assertEqual((self.pkce.begun, self.pkce.exchanges), ([], []))

    def test_error_codes(self) -> None:
        failure = self.refused(
            oauth_initiate,
            {"provider": "nope"},
            "PROVIDER_NOT_CONFIGURED",
            "No OAuth flow configured for provider: nope",
        )
        self.assertEqual(failure.status, Status.NOT_FOUND)
        unknown = {"session_id": "a" * 32, "code": CODE}
        failure = self.refused(
            oauth_exchange, unknown, "SESSION_NOT_FOUND", "OAuth session not found"
        )
        self.assertEqual(failure.status, Status.NOT_FOUND)
        self.refused(oauth_poll, unknown, "SESSION_NOT_FOUND", "OAuth session not found")
        session = {"session_id": self.initiate()["session_id"], "code": CODE}
        d = self.call(oauth_exchange, session)
        self.answer_exchange(OAuthError(OAuthErrorKind.INVALID_GRANT))
        failure = self.failureResultOf(d, OpFailure).value
        assert isinstance(failure, OpFailure)
        self.assertEqual(failure.code, "EXCHANGE_FAILED")
        self.assertEqual(failure.status, Status.ERROR)
        self.refused(oauth_exchange, session, "SESSION_ALREADY_USED", "OAuth session already used")
        expired = {"session_id": self.initiate()["session_id"], "code": CODE}
        self.clock.advance(600)
        self.refused(oauth_exchange, expired, "SESSION_EXPIRED", "OAuth session expired")

    def test_poll_error_codes(self) -> None:
        for kind, code, message in (
            (OAuthErrorKind.ACCESS_DENIED, "ACCESS_DENIED", "User denied authorization"),
            (OAuthErrorKind.EXPIRED, "SESSION_EXPIRED", "Device code expired"),
            (
                OAuthErrorKind.TRANSIENT,
                "POLL_FAILED",
                "Poll failed: the provider could not be reached",
            ),
        ):
            session = {"session_id": self.initiate("qwen")["session_id"]}
            d = self.call(oauth_poll, session)
            self.answer_poll(OAuthError(kind))
            failure = self.failureResultOf(d, OpFailure).value
            assert isinstance(failure, OpFailure)
            self.assertEqual((failure.code, failure.message), (code, message))

    def test_another_connections_session_is_not_found(self) -> None:
        session_id = self.initiate()["session_id"]
        other = self.context(connection=object())
        for op, payload in (
            (oauth_exchange, {"session_id": session_id, "code": CODE}),
            (oauth_poll, {"session_id": session_id}),
        ):
            self.refused(op, payload, "SESSION_NOT_FOUND", "OAuth session not found", other)
        self.assertEqual(self.ok(oauth_cancel, {"session_id": session_id}, other), {})
        # Nothing about the session reached the other connection's audit records.
        self.assertEqual({r.provider for r in self.records[1:]}, {None})
        d = self.call(oauth_exchange, {"session_id": session_id, "code": CODE})
        self.answer_exchange(login_token())
        self.assertEqual(self.successResultOf(d), SANITIZED)

    def test_cancel(self) -> None:
        session_id = self.initiate()["session_id"]
        self.assertEqual(self.ok(oauth_cancel, {"session_id": session_id}), {})
        self.assertEqual(self.records[-1].provider, "anthropic")
        self.refused(
            oauth_exchange,
            {"session_id": session_id, "code": CODE},
            "SESSION_NOT_FOUND",
            "OAuth session not found",
        )
        self.assertEqual(self.ok(oauth_cancel, {"session_id": session_id}), {})

    def test_no_secret_in_answers_records_or_logs(self) -> None:
        with captured_log() as events:
            pkce_id = self.initiate()["session_id"]
            d = self.call(oauth_exchange, {"session_id": pkce_id, "code": CODE})
            self.answer_exchange(OAuthError(OAuthErrorKind.REJECTED, "400"))
            self.failureResultOf(d, OpFailure)
            pkce_id2 = self.initiate()["session_id"]
            d = self.call(oauth_exchange, {"session_id": pkce_id2, "code": CODE})
            self.answer_exchange(login_token())
            device_id = self.initiate("qwen")["session_id"]
            for result in (OAuthError(OAuthErrorKind.TRANSIENT, "503"), login_token()):
                d = self.call(oauth_poll, {"session_id": device_id})
                self.answer_poll(result)
                d.addErrback(lambda f: f.trap(OpFailure))
                self.clock.advance(5)
            self.ok(oauth_cancel, {"session_id": device_id})
        ids = [pkce_id, pkce_id2, device_id]
        answers = [dict(a) for a in self.answers]
        for answer in answers:
            answer.pop("session_id", None)  # the one place a session id belongs
        shown = [repr(answers), repr(self.records), log_text(events)]
        self.assertIn(SANITIZED, answers)  # the exchange answered
        self.assertIn({"status": "complete", "token": SANITIZED}, answers)
        for text in shown:
            for secret in (*SECRETS, *ids):
                self.assertNotIn(secret, text)


class SandboxRefusedTests(LoginOpsCase):
    def test_each_op_refused_before_its_fields(self) -> None:
        sandbox = self.context(sandbox=True)
        for op, message in (
            (oauth_initiate, "Sandbox connections cannot initiate OAuth"),
            (oauth_exchange, "Sandbox connections cannot exchange OAuth tokens"),
            (oauth_poll, "Sandbox connections cannot poll OAuth tokens"),
            (oauth_cancel, "Sandbox connections cannot cancel OAuth sessions"),
        ):
            for payload in ({}, {"provider": "anthropic", "session_id": "a" * 32, "code": CODE}):
                failure = self.refused(op, payload, "FORBIDDEN", message, sandbox)
                self.assertEqual(failure.status, Status.BLOCKED_SANDBOX)
        self.assertEqual(self.pkce.begun, [])
        self.assertEqual({(r.provider, r.bucket) for r in self.records}, {(None, None)})

    def test_sandbox_cannot_use_a_hosts_session(self) -> None:
        session_id = self.initiate()["session_id"]
        sandbox = OpContext(self.broker, True, self.connection)
        self.refused(
            oauth_exchange,
            {"session_id": session_id, "code": CODE},
            "FORBIDDEN",
            "Sandbox connections cannot exchange OAuth tokens",
            sandbox,
        )
        self.assertEqual(self.pkce.exchanges, [])


class SandboxAllowedTests(LoginOpsCase):
    policy = SandboxPolicy(readable=frozenset({"anthropic"}), allow_login=True)

    def test_sandbox_may_log_in_to_what_it_may_read(self) -> None:
        sandbox = self.context(sandbox=True)
        data = self.ok(oauth_initiate, {"provider": "anthropic"}, sandbox)
        d = self.call(oauth_exchange, {"session_id": data["session_id"], "code": CODE}, sandbox)
        self.answer_exchange(login_token())
        self.assertEqual(self.successResultOf(d), SANITIZED)

    def test_sandbox_may_not_log_in_to_what_it_may_not_read(self) -> None:
        sandbox = self.context(sandbox=True)
        failure = self.refused(
            oauth_initiate, {"provider": "qwen"}, "FORBIDDEN", "Access denied", sandbox
        )
        self.assertEqual(failure.status, Status.BLOCKED_SANDBOX)
        self.assertIsNone(self.records[-1].provider)  # a refused sandbox names nothing
        self.assertEqual(self.device.begins, [])

    def test_sandbox_fields_are_validated_after(self) -> None:
        sandbox = self.context(sandbox=True)
        self.refused(oauth_initiate, {}, "INVALID_REQUEST", "Missing provider", sandbox)
        self.refused(oauth_poll, {}, "INVALID_REQUEST", "Missing session_id", sandbox)


class OverTheConnectionTests(SynchronousTestCase):
    """
    The ops as registered on the server: sessions belong to the connection,
    and go when it closes; the audit line never names a session id.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.pkce = FakePKCEProvider()
        broker = Broker(
            self.clock,
            MemoryTokenStore(),
            MemoryProviderKeyStore(),
            providers={"anthropic": self.pkce},
        )
        self.broker = broker
        self.factory = CredentialServerFactory(self.clock, broker, None)

    def connection(self) -> Connection:
        return Connection(clock=self.clock, factory=self.factory).open()

    def test_sessions_are_bound_to_their_connection(self) -> None:
        first, second = self.connection(), self.connection()
        with captured_log() as events:
            answer = first.ask("1", "oauth_initiate", provider="anthropic")
            session_id = answer["data"]["session_id"]
            self.assertEqual(
                second.ask("2", "oauth_exchange", session_id=session_id, code=CODE),
                {
                    "id": "2",
                    "ok": False,
                    "code": "SESSION_NOT_FOUND",
                    "error": "OAuth session not found",
                },
            )
            first.send(request("3", "oauth_exchange", session_id=session_id, code=CODE))
            self.pkce.exchanges[0][2].callback(login_token())
            reply = first.reply()
            self.assertEqual(reply, {"id": "3", "ok": True, "data": SANITIZED})
        text = log_text(events)
        self.assertIn("op=oauth_exchange", text)
        for secret in (session_id, CODE, *SECRETS):
            self.assertNotIn(secret, text)

    def test_closing_the_connection_drops_its_sessions(self) -> None:
        first = self.connection()
        first.ask("1", "oauth_initiate", provider="anthropic")
        self.assertEqual(len(self.broker.sessions), 1)
        first.lose()
        self.assertEqual(len(self.broker.sessions), 0)
