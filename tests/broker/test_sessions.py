"""
Login sessions (issue 7 section 6): ids, owners, single use, expiry, the
sweep, the limits, every exchange and poll outcome, and that no session
id, verifier, state, code or device code reaches a log line, a repr or an
exception.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from credproxy._secret import Secret
from credproxy.broker import LoginError, LoginFailure
from credproxy.broker._sessions import (
    ACCESS_DENIED_TEXT,
    ALREADY_COMPLETED_TEXT,
    ALREADY_USED_TEXT,
    DEFAULT_POLL_INTERVAL,
    DEVICE_CODE_EXPIRED_TEXT,
    EXCHANGE_REJECTED_TEXT,
    EXCHANGE_UNAVAILABLE_TEXT,
    EXCHANGE_WRONG_FLOW_TEXT,
    EXPIRED_TEXT,
    INITIATION_CANCELLED_TEXT,
    INITIATION_FAILED_TEXT,
    MAX_SESSIONS,
    MAX_SESSIONS_PER_OWNER,
    NOT_FOUND_TEXT,
    POLL_REJECTED_TEXT,
    POLL_UNAVAILABLE_TEXT,
    POLL_WRONG_FLOW_TEXT,
    SESSION_LIFETIME,
    SLOW_DOWN_STEP,
    SWEEP_INTERVAL,
    TOO_MANY_FOR_OWNER_TEXT,
    TOO_MANY_TEXT,
    InitiatedLogin,
    LoginSessions,
    PollResult,
)
from credproxy.oauth._interfaces import (
    DeviceLogin,
    FlowType,
    IDeviceCodeProvider,
    IOAuthProvider,
    IPKCEProvider,
    OAuthError,
    OAuthErrorKind,
    PKCELogin,
)
from credproxy.stores._token import Token
from tests.logcapture import captured_log, log_text

T = TypeVar("T")

VERIFIER = "pkce-verifier-7f3a9c1e5b2d4f6a8c0e"
STATE = "pkce-state-2b4d6f8a0c1e3a5c"
CODE = "pasted-authorization-code-91ab"
DEVICE_CODE = "device-code-5c7e9a1b3d5f"
USER_CODE = "WXYZ-1234"
ACCESS = "access-token-from-login-aa11"
REFRESH = "refresh-token-from-login-bb22"
AUTH_URL = "https://auth.example.test/authorize?challenge=abc"
VERIFICATION_URI = "https://auth.example.test/device"
VERIFICATION_URI_COMPLETE = "https://auth.example.test/device?user_code=WXYZ-1234"
SECRETS = (VERIFIER, STATE, CODE, DEVICE_CODE, REFRESH)


def login_token() -> Token:
    return Token(
        {
            "access_token": ACCESS,
            "refresh_token": REFRESH,
            "expiry": 1_900_000_000,
            "token_type": "Bearer",
        }
    )


@implementer(IPKCEProvider)
class FakePKCEProvider:
    """
    A code paste provider whose exchanges wait until the test answers them.
    """

    flow = FlowType.PKCE_REDIRECT

    def __init__(self, name: str = "anthropic") -> None:
        self.name = name
        self.begun: list[str | None] = []
        self.exchanges: list[tuple[PKCELogin, Secret, Deferred[Token]]] = []
        self.begin_error: Exception | None = None

    def begin(self, redirect_uri: str | None = None) -> PKCELogin:
        self.begun.append(redirect_uri)
        if self.begin_error is not None:
            raise self.begin_error
        return PKCELogin(
            auth_url=AUTH_URL,
            state=Secret(STATE),
            verifier=Secret(VERIFIER),
            redirect_uri=redirect_uri or "https://console.example.test/callback",
        )

    def exchange(self, login: PKCELogin, code: Secret) -> Deferred[Token]:
        d: Deferred[Token] = Deferred()
        self.exchanges.append((login, code, d))
        return d

    def refresh(self, refresh_token: Secret) -> Deferred[Token]:
        return fail(OAuthError(OAuthErrorKind.REJECTED))


@implementer(IDeviceCodeProvider)
class FakeDeviceProvider:
    """
    A device code provider whose begin and polls wait until the test answers.
    """

    flow = FlowType.DEVICE_CODE

    def __init__(self, name: str = "qwen") -> None:
        self.name = name
        self.begins: list[Deferred[DeviceLogin]] = []
        self.polls: list[tuple[Secret, Deferred[Token]]] = []

    def begin(self) -> Deferred[DeviceLogin]:
        d: Deferred[DeviceLogin] = Deferred()
        self.begins.append(d)
        return d

    def poll(self, device_code: Secret) -> Deferred[Token]:
        d: Deferred[Token] = Deferred()
        self.polls.append((device_code, d))
        return d

    def refresh(self, refresh_token: Secret) -> Deferred[Token]:
        return fail(OAuthError(OAuthErrorKind.REJECTED))


@implementer(IOAuthProvider)
class RefreshOnlyProvider:
    """
    A configured provider with no login flow this host can carry through.
    """

    name = "refresh-only"
    flow = "client_credentials"

    def refresh(self, refresh_token: Secret) -> Deferred[Token]:
        return fail(OAuthError(OAuthErrorKind.REJECTED))


def device_login(
    interval: float = 5.0,
    expires_in: float = 900.0,
    complete: str | None = VERIFICATION_URI_COMPLETE,
) -> DeviceLogin:
    return DeviceLogin(
        device_code=Secret(DEVICE_CODE),
        user_code=USER_CODE,
        verification_uri=VERIFICATION_URI,
        verification_uri_complete=complete,
        interval=interval,
        expires_in=expires_in,
    )


def run(coroutine: Coroutine[Any, Any, T]) -> Deferred[T]:
    return Deferred.fromCoroutine(coroutine)


class Harness(SynchronousTestCase):
    """
    A LoginSessions on a Clock with one provider of each flow and a
    store_login that records what it was given.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.pkce = FakePKCEProvider()
        self.device = FakeDeviceProvider()
        self.stored: list[tuple[str, Token, str | None]] = []
        self.sessions = LoginSessions(
            self.clock,
            {"anthropic": self.pkce, "qwen": self.device, "refresh-only": RefreshOnlyProvider()},
            self.store_login,
        )
        self.owner = object()
        self.other = object()

    async def store_login(self, provider: str, token: Token, bucket: str | None) -> None:
        self.stored.append((provider, token, bucket))

    def refused(self, d: Deferred[Any], reason: LoginFailure, message: str) -> LoginError:
        error = self.failureResultOf(d, LoginError).value
        assert isinstance(error, LoginError)
        self.assertEqual((error.reason, error.message), (reason, message))
        return error

    def start_pkce(self, owner: object | None = None, bucket: str | None = None) -> InitiatedLogin:
        return self.successResultOf(
            run(self.sessions.initiate(owner or self.owner, "anthropic", bucket, None))
        )

    def start_device(
        self, owner: object | None = None, login: DeviceLogin | None = None
    ) -> InitiatedLogin:
        d = run(self.sessions.initiate(owner or self.owner, "qwen", "work", None))
        self.device.begins[-1].callback(login or device_login())
        return self.successResultOf(d)

    def exchange(self, login: InitiatedLogin, owner: object | None = None) -> Deferred[Token]:
        return run(self.sessions.exchange(owner or self.owner, login.session_id, Secret(CODE)))

    def poll(self, login: InitiatedLogin, owner: object | None = None) -> Deferred[PollResult]:
        return run(self.sessions.poll(owner or self.owner, login.session_id))


class InitiateTests(Harness):
    def test_session_id_is_32_lowercase_hex_and_secret(self) -> None:
        ids = {self.start_pkce().session_id.reveal() for _ in range(MAX_SESSIONS_PER_OWNER)}
        self.assertEqual(len(ids), MAX_SESSIONS_PER_OWNER)
        for session_id in ids:
            self.assertRegex(session_id, r"\A[0-9a-f]{32}\Z")

    def test_pkce_answer(self) -> None:
        login = self.successResultOf(
            run(self.sessions.initiate(self.owner, "anthropic", None, "https://cb.test/x"))
        )
        self.assertIsInstance(login.session_id, Secret)
        self.assertEqual(login.flow_type, FlowType.PKCE_REDIRECT)
        self.assertEqual(login.auth_url, AUTH_URL)
        self.assertEqual(login.poll_interval_ms, DEFAULT_POLL_INTERVAL * 1000)
        self.assertIsNone(login.verification_uri)
        self.assertEqual(self.pkce.begun, ["https://cb.test/x"])
        self.assertNotIn(login.session_id.reveal(), repr(login))

    def test_device_answer(self) -> None:
        login = self.start_device(login=device_login(interval=7))
        self.assertEqual(login.flow_type, FlowType.DEVICE_CODE)
        self.assertEqual(login.poll_interval_ms, 7000)
        self.assertEqual(login.auth_url, VERIFICATION_URI_COMPLETE)
        self.assertEqual(login.verification_uri, VERIFICATION_URI)
        self.assertEqual(login.user_code, USER_CODE)
        self.assertEqual(login.verification_uri_complete, VERIFICATION_URI_COMPLETE)
        for hidden in (login.session_id.reveal(), USER_CODE, DEVICE_CODE):
            self.assertNotIn(hidden, repr(login))

    def test_device_without_complete_uri_points_at_verification_uri(self) -> None:
        login = self.start_device(login=device_login(complete=None))
        self.assertEqual(login.auth_url, VERIFICATION_URI)
        self.assertIsNone(login.verification_uri_complete)

    def test_device_without_interval_uses_the_default(self) -> None:
        login = self.start_device(login=device_login(interval=0))
        self.assertEqual(login.poll_interval_ms, DEFAULT_POLL_INTERVAL * 1000)

    def test_unknown_or_flowless_provider_is_not_configured(self) -> None:
        for provider in ("nope", "refresh-only"):
            self.refused(
                run(self.sessions.initiate(self.owner, provider, None, None)),
                LoginFailure.PROVIDER_NOT_CONFIGURED,
                f"No OAuth flow configured for provider: {provider}",
            )
        self.assertEqual(len(self.sessions), 0)

    def test_pkce_begin_failure_is_safe(self) -> None:
        self.pkce.begin_error = ValueError(f"bad redirect {VERIFIER}")
        with captured_log() as events:
            d = run(self.sessions.initiate(self.owner, "anthropic", None, None))
            error = self.refused(d, LoginFailure.FLOW_INITIATION_FAILED, INITIATION_FAILED_TEXT)
        self.assertNotIn(VERIFIER, repr(error.args))
        self.assertIn("ValueError", log_text(events))
        self.assertNotIn(VERIFIER, log_text(events))
        self.assertEqual(len(self.sessions), 0)

    def test_device_begin_failure_is_safe(self) -> None:
        d = run(self.sessions.initiate(self.owner, "qwen", None, None))
        self.device.begins[0].errback(OAuthError(OAuthErrorKind.TRANSIENT, "503"))
        self.refused(d, LoginFailure.FLOW_INITIATION_FAILED, INITIATION_FAILED_TEXT)
        self.assertEqual(len(self.sessions), 0)

    def test_cancelled_initiate_frees_its_slot(self) -> None:
        d = run(self.sessions.initiate(self.owner, "qwen", None, None))
        self.assertEqual(len(self.sessions), 1)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(len(self.sessions), 0)

    def test_owner_dropped_while_provider_begins(self) -> None:
        d = run(self.sessions.initiate(self.owner, "qwen", None, None))
        self.sessions.drop_owner(self.owner)
        self.device.begins[0].callback(device_login())
        self.refused(d, LoginFailure.FLOW_INITIATION_FAILED, INITIATION_CANCELLED_TEXT)
        self.assertEqual(len(self.sessions), 0)

    def test_starting_session_cannot_be_named(self) -> None:
        # Nobody knows the id before the answer; a guess of any id fails.
        run(self.sessions.initiate(self.owner, "qwen", None, None))
        self.assertEqual(len(self.sessions), 1)
        self.assertIsNone(self.sessions.entry_of(self.owner, Secret("0" * 32)))


class ExchangeTests(Harness):
    def test_exchange_stores_the_whole_token(self) -> None:
        login = self.start_pkce(bucket="work")
        d = self.exchange(login)
        [(pkce_login, code, answer)] = self.pkce.exchanges
        self.assertEqual(pkce_login.verifier, Secret(VERIFIER))
        self.assertEqual(code, Secret(CODE))
        self.assertNoResult(d)
        answer.callback(login_token())
        token = self.successResultOf(d)
        self.assertEqual(token.refresh_token, REFRESH)  # the op sanitizes, not the broker
        self.assertEqual(self.stored, [("anthropic", login_token(), "work")])

    def test_default_bucket_is_passed_as_none(self) -> None:
        d = self.exchange(self.start_pkce())
        self.pkce.exchanges[0][2].callback(login_token())
        self.successResultOf(d)
        self.assertIsNone(self.stored[0][2])

    def test_single_use(self) -> None:
        login = self.start_pkce()
        d = self.exchange(login)
        self.pkce.exchanges[0][2].callback(login_token())
        self.successResultOf(d)
        self.refused(self.exchange(login), LoginFailure.SESSION_ALREADY_USED, ALREADY_USED_TEXT)
        self.assertEqual(len(self.pkce.exchanges), 1)

    def test_second_exchange_while_first_waits(self) -> None:
        login = self.start_pkce()
        first = self.exchange(login)
        self.refused(self.exchange(login), LoginFailure.SESSION_ALREADY_USED, ALREADY_USED_TEXT)
        self.assertEqual(len(self.pkce.exchanges), 1)
        self.pkce.exchanges[0][2].callback(login_token())
        self.successResultOf(first)

    def test_refused_code_spends_the_session(self) -> None:
        for kind, message in (
            (OAuthErrorKind.INVALID_GRANT, EXCHANGE_REJECTED_TEXT),
            (OAuthErrorKind.REJECTED, EXCHANGE_REJECTED_TEXT),
            (OAuthErrorKind.TRANSIENT, EXCHANGE_UNAVAILABLE_TEXT),
        ):
            login = self.start_pkce()
            d = self.exchange(login)
            self.pkce.exchanges[-1][2].errback(OAuthError(kind, "400"))
            self.refused(d, LoginFailure.EXCHANGE_FAILED, message)
            self.refused(self.exchange(login), LoginFailure.SESSION_ALREADY_USED, ALREADY_USED_TEXT)
        self.assertEqual(self.stored, [])

    def test_unknown_and_other_owners_session_look_alike(self) -> None:
        login = self.start_pkce()
        unknown = InitiatedLogin(FlowType.PKCE_REDIRECT, Secret("a" * 32), 5000, AUTH_URL)
        theirs = self.refused(
            self.exchange(login, owner=self.other), LoginFailure.SESSION_NOT_FOUND, NOT_FOUND_TEXT
        )
        nobodys = self.refused(
            self.exchange(unknown), LoginFailure.SESSION_NOT_FOUND, NOT_FOUND_TEXT
        )
        self.assertEqual(theirs.args, nobodys.args)
        self.refused(
            self.poll(login, owner=self.other), LoginFailure.SESSION_NOT_FOUND, NOT_FOUND_TEXT
        )
        self.sessions.cancel(self.other, login.session_id)
        self.assertIsNone(self.sessions.entry_of(self.other, login.session_id))
        # Still the owner's, and unspent.
        self.assertEqual(
            self.sessions.entry_of(self.owner, login.session_id), ("anthropic", "default")
        )
        d = self.exchange(login)
        self.pkce.exchanges[0][2].callback(login_token())
        self.successResultOf(d)

    def test_expiry_at_exactly_the_lifetime(self) -> None:
        self.assertEqual(SESSION_LIFETIME, 600.0)
        just_in_time, too_late = self.start_pkce(), self.start_pkce()
        self.clock.advance(SESSION_LIFETIME - 0.001)
        d = self.exchange(just_in_time)
        self.pkce.exchanges[0][2].callback(login_token())
        self.successResultOf(d)
        self.clock.advance(0.001)
        self.refused(self.exchange(too_late), LoginFailure.SESSION_EXPIRED, EXPIRED_TEXT)
        self.assertEqual(len(self.pkce.exchanges), 1)
        # Told once, then forgotten.
        self.refused(self.exchange(too_late), LoginFailure.SESSION_NOT_FOUND, NOT_FOUND_TEXT)

    def test_device_session_given_a_code(self) -> None:
        login = self.start_device()
        self.refused(self.exchange(login), LoginFailure.EXCHANGE_FAILED, EXCHANGE_WRONG_FLOW_TEXT)
        # Not spent: it can still be polled.
        d = self.poll(login)
        self.device.polls[0][1].callback(login_token())
        self.assertEqual(self.successResultOf(d).status, "complete")

    def test_cancelled_during_exchange_stores_nothing(self) -> None:
        login = self.start_pkce()
        d = self.exchange(login)
        self.sessions.cancel(self.owner, login.session_id)
        self.pkce.exchanges[0][2].callback(login_token())
        self.refused(d, LoginFailure.SESSION_NOT_FOUND, NOT_FOUND_TEXT)
        self.assertEqual(self.stored, [])

    def test_store_failure_propagates(self) -> None:
        async def broken(provider: str, token: Token, bucket: str | None) -> None:
            raise OSError("keyring unavailable")

        self.sessions = LoginSessions(self.clock, {"anthropic": self.pkce}, broken)
        login = self.start_pkce()
        d = self.exchange(login)
        self.pkce.exchanges[0][2].callback(login_token())
        self.failureResultOf(d, OSError)
        self.refused(self.exchange(login), LoginFailure.SESSION_ALREADY_USED, ALREADY_USED_TEXT)


class PollTests(Harness):
    def answer(self, result: Token | OAuthError) -> None:
        d = self.device.polls[-1][1]
        if isinstance(result, Token):
            d.callback(result)
        else:
            d.errback(result)

    def test_pending_then_complete(self) -> None:
        login = self.start_device()
        d = self.poll(login)
        self.assertEqual(self.device.polls[0][0], Secret(DEVICE_CODE))
        self.answer(OAuthError(OAuthErrorKind.PENDING))
        self.assertEqual(self.successResultOf(d), PollResult("pending"))
        self.clock.advance(5)
        d = self.poll(login)
        self.answer(login_token())
        result = self.successResultOf(d)
        self.assertEqual(result.status, "complete")
        self.assertEqual(result.token, login_token())
        self.assertEqual(self.stored, [("qwen", login_token(), "work")])
        self.clock.advance(5)
        self.refused(self.poll(login), LoginFailure.SESSION_ALREADY_USED, ALREADY_COMPLETED_TEXT)
        self.assertEqual(len(self.device.polls), 2)

    def test_slow_down_raises_the_interval(self) -> None:
        login = self.start_device(login=device_login(interval=5))
        d = self.poll(login)
        self.answer(OAuthError(OAuthErrorKind.SLOW_DOWN))
        self.assertEqual(
            self.successResultOf(d), PollResult("pending", interval=5 + SLOW_DOWN_STEP)
        )
        # The new interval holds: a poll before it ends does not reach the provider.
        self.clock.advance(5 + SLOW_DOWN_STEP - 0.001)
        self.assertEqual(self.successResultOf(self.poll(login)), PollResult("pending"))
        self.assertEqual(len(self.device.polls), 1)
        self.clock.advance(0.001)
        self.poll(login)
        self.assertEqual(len(self.device.polls), 2)

    def test_early_and_overlapping_polls_do_not_reach_the_provider(self) -> None:
        login = self.start_device(login=device_login(interval=5))
        first = self.poll(login)
        self.assertEqual(self.successResultOf(self.poll(login)), PollResult("pending"))
        self.answer(OAuthError(OAuthErrorKind.PENDING))
        self.successResultOf(first)
        self.clock.advance(4.999)
        self.assertEqual(self.successResultOf(self.poll(login)), PollResult("pending"))
        self.assertEqual(len(self.device.polls), 1)

    def test_access_denied_spends_the_session(self) -> None:
        login = self.start_device()
        d = self.poll(login)
        self.answer(OAuthError(OAuthErrorKind.ACCESS_DENIED))
        self.refused(d, LoginFailure.ACCESS_DENIED, ACCESS_DENIED_TEXT)
        self.clock.advance(5)
        self.refused(self.poll(login), LoginFailure.SESSION_ALREADY_USED, ALREADY_COMPLETED_TEXT)
        self.assertEqual(self.stored, [])

    def test_expired_device_code_ends_the_session(self) -> None:
        login = self.start_device()
        d = self.poll(login)
        self.answer(OAuthError(OAuthErrorKind.EXPIRED))
        self.refused(d, LoginFailure.SESSION_EXPIRED, DEVICE_CODE_EXPIRED_TEXT)
        self.refused(self.poll(login), LoginFailure.SESSION_NOT_FOUND, NOT_FOUND_TEXT)

    def test_transient_failure_may_be_retried(self) -> None:
        login = self.start_device()
        d = self.poll(login)
        self.answer(OAuthError(OAuthErrorKind.TRANSIENT, "502"))
        self.refused(d, LoginFailure.POLL_FAILED, POLL_UNAVAILABLE_TEXT)
        self.clock.advance(5)
        d = self.poll(login)
        self.answer(login_token())
        self.assertEqual(self.successResultOf(d).status, "complete")

    def test_rejected_poll_spends_the_session(self) -> None:
        login = self.start_device()
        d = self.poll(login)
        self.answer(OAuthError(OAuthErrorKind.REJECTED, "400"))
        self.refused(d, LoginFailure.POLL_FAILED, POLL_REJECTED_TEXT)
        self.clock.advance(5)
        self.refused(self.poll(login), LoginFailure.SESSION_ALREADY_USED, ALREADY_COMPLETED_TEXT)

    def test_our_lifetime_bounds_a_long_device_code(self) -> None:
        login = self.start_device(login=device_login(expires_in=SESSION_LIFETIME * 3))
        self.clock.advance(SESSION_LIFETIME)
        self.refused(self.poll(login), LoginFailure.SESSION_EXPIRED, EXPIRED_TEXT)
        self.assertEqual(self.device.polls, [])

    def test_a_short_device_code_bounds_the_session(self) -> None:
        login = self.start_device(login=device_login(expires_in=300))
        self.clock.advance(299.999)
        self.poll(login)
        self.answer(OAuthError(OAuthErrorKind.PENDING))
        self.clock.advance(0.001)
        self.refused(self.poll(login), LoginFailure.SESSION_EXPIRED, DEVICE_CODE_EXPIRED_TEXT)
        self.assertEqual(len(self.device.polls), 1)

    def test_pkce_session_cannot_be_polled(self) -> None:
        login = self.start_pkce()
        self.refused(self.poll(login), LoginFailure.POLL_FAILED, POLL_WRONG_FLOW_TEXT)
        d = self.exchange(login)  # not spent
        self.pkce.exchanges[0][2].callback(login_token())
        self.successResultOf(d)

    def test_dropped_during_poll_stores_nothing(self) -> None:
        login = self.start_device()
        approved = self.poll(login)
        self.sessions.drop_owner(self.owner)
        self.answer(login_token())
        self.refused(approved, LoginFailure.SESSION_NOT_FOUND, NOT_FOUND_TEXT)
        login = self.start_device()
        denied = self.poll(login)
        self.sessions.cancel(self.owner, login.session_id)
        self.answer(OAuthError(OAuthErrorKind.ACCESS_DENIED))
        self.refused(denied, LoginFailure.SESSION_NOT_FOUND, NOT_FOUND_TEXT)
        self.assertEqual(self.stored, [])


class OwnerAndLifecycleTests(Harness):
    def test_cancel(self) -> None:
        login = self.start_pkce()
        self.sessions.cancel(self.owner, login.session_id)
        self.refused(self.exchange(login), LoginFailure.SESSION_NOT_FOUND, NOT_FOUND_TEXT)
        self.sessions.cancel(self.owner, login.session_id)  # again: nothing to do
        self.assertEqual(len(self.sessions), 0)

    def test_drop_owner_forgets_only_its_sessions(self) -> None:
        mine = [self.start_pkce(), self.start_device()]
        theirs = self.start_pkce(owner=self.other)
        self.sessions.drop_owner(self.owner)
        for login in mine:
            self.refused(self.exchange(login), LoginFailure.SESSION_NOT_FOUND, NOT_FOUND_TEXT)
        self.assertEqual(len(self.sessions), 1)
        d = self.exchange(theirs, owner=self.other)
        self.pkce.exchanges[0][2].callback(login_token())
        self.successResultOf(d)

    def test_sweep_every_interval_removes_expired_sessions(self) -> None:
        self.assertEqual(SWEEP_INTERVAL, 60.0)
        self.sessions.start()
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [SWEEP_INTERVAL])
        self.clock.advance(30)
        login = self.start_pkce()  # expires at 630: the sweep at 660 removes it
        self.clock.advance(SWEEP_INTERVAL - 30)
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [2 * SWEEP_INTERVAL])
        while self.clock.seconds() < 660 - SWEEP_INTERVAL:
            self.clock.advance(SWEEP_INTERVAL)  # one sweep at a time
        self.clock.advance(SWEEP_INTERVAL - 0.001)
        self.assertEqual(len(self.sessions), 1)  # expired at 630, not yet swept
        self.clock.advance(0.001)
        self.assertEqual(len(self.sessions), 0)
        # Swept: an expired session is now simply unknown.
        self.refused(self.exchange(login), LoginFailure.SESSION_NOT_FOUND, NOT_FOUND_TEXT)

    def test_without_the_sweep_expired_sessions_stay_until_touched(self) -> None:
        self.start_pkce()
        self.clock.advance(SESSION_LIFETIME * 2)
        self.assertEqual(len(self.sessions), 1)

    def test_sweep_spares_a_session_waiting_for_the_provider(self) -> None:
        self.sessions.start()
        login = self.start_pkce()
        d = self.exchange(login)
        self.clock.advance(SESSION_LIFETIME + SWEEP_INTERVAL)
        self.assertEqual(len(self.sessions), 1)
        self.pkce.exchanges[0][2].callback(login_token())
        self.successResultOf(d)
        self.assertEqual(len(self.stored), 1)

    def test_stop_clears_and_stops_sweeping(self) -> None:
        self.sessions.start()
        login = self.start_pkce()
        waiting = self.exchange(self.start_pkce())
        self.sessions.stop()
        self.assertEqual(len(self.sessions), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.refused(self.exchange(login), LoginFailure.SESSION_NOT_FOUND, NOT_FOUND_TEXT)
        self.pkce.exchanges[0][2].callback(login_token())
        self.refused(waiting, LoginFailure.SESSION_NOT_FOUND, NOT_FOUND_TEXT)
        self.assertEqual(self.stored, [])
        self.sessions.start()  # and it can start again
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.sessions.stop()


class LimitTests(Harness):
    def test_per_owner_limit(self) -> None:
        for _ in range(MAX_SESSIONS_PER_OWNER):
            self.start_pkce()
        self.refused(
            run(self.sessions.initiate(self.owner, "anthropic", None, None)),
            LoginFailure.FLOW_INITIATION_FAILED,
            TOO_MANY_FOR_OWNER_TEXT,
        )
        self.assertEqual(len(self.pkce.begun), MAX_SESSIONS_PER_OWNER)
        self.start_pkce(owner=self.other)  # others are not affected

    def test_starting_sessions_count(self) -> None:
        for _ in range(MAX_SESSIONS_PER_OWNER):
            run(self.sessions.initiate(self.owner, "qwen", None, None))
        self.refused(
            run(self.sessions.initiate(self.owner, "qwen", None, None)),
            LoginFailure.FLOW_INITIATION_FAILED,
            TOO_MANY_FOR_OWNER_TEXT,
        )
        self.assertEqual(len(self.device.begins), MAX_SESSIONS_PER_OWNER)

    def test_overall_limit(self) -> None:
        owners = [object() for _ in range(MAX_SESSIONS // MAX_SESSIONS_PER_OWNER + 1)]
        for n in range(MAX_SESSIONS):
            self.start_pkce(owner=owners[n // MAX_SESSIONS_PER_OWNER])
        self.refused(
            run(self.sessions.initiate(owners[-1], "anthropic", None, None)),
            LoginFailure.FLOW_INITIATION_FAILED,
            TOO_MANY_TEXT,
        )
        self.assertEqual(len(self.sessions), MAX_SESSIONS)

    def test_idle_spent_sessions_make_room(self) -> None:
        spent = self.start_pkce()
        d = self.exchange(spent)
        busy = self.start_pkce()
        waiting = self.exchange(busy)  # spent, but its exchange is still waiting
        self.pkce.exchanges[0][2].callback(login_token())
        self.successResultOf(d)
        for _ in range(MAX_SESSIONS_PER_OWNER - 2):
            self.start_pkce()
        self.start_pkce()  # room made by forgetting the idle spent session
        self.refused(self.exchange(spent), LoginFailure.SESSION_NOT_FOUND, NOT_FOUND_TEXT)
        self.refused(
            run(self.sessions.initiate(self.owner, "anthropic", None, None)),
            LoginFailure.FLOW_INITIATION_FAILED,
            TOO_MANY_FOR_OWNER_TEXT,
        )
        self.pkce.exchanges[1][2].callback(login_token())
        self.successResultOf(waiting)  # the busy one was kept


class SecrecyTests(Harness):
    def test_no_secret_in_logs_reprs_or_errors(self) -> None:
        outcomes: list[object] = []
        ids: list[str] = []
        with captured_log() as events:
            for kind in OAuthErrorKind:
                login = self.start_pkce()
                ids.append(login.session_id.reveal())
                self.exchange(login).addBoth(outcomes.append)
                self.pkce.exchanges[-1][2].errback(OAuthError(kind, "400"))
                login = self.start_device()
                ids.append(login.session_id.reveal())
                self.poll(login).addBoth(outcomes.append)
                self.device.polls[-1][1].errback(OAuthError(kind, "400"))
                self.sessions.drop_owner(self.owner)
            login = self.start_pkce()
            ids.append(login.session_id.reveal())
            self.exchange(login)
            shown = [repr(self.sessions), repr(login), log_text(events)]
            shown += [repr(s) for s in self.sessions._sessions.values()]
        errors = [o.value for o in outcomes if isinstance(o, Failure)]
        self.assertEqual(len(errors), 2 * len(OAuthErrorKind) - 2)  # all but pending, slow_down
        for error in errors:
            self.assertIsInstance(error, LoginError)
            assert error is not None
            shown.append(repr(error.args) + str(error) + repr(error))
        for text in shown:
            for secret in (*SECRETS, *ids):
                self.assertNotIn(secret, text)
