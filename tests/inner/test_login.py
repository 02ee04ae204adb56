"""
LoginAdapter on a scripted terminal and a backend double: both flows, the
poll interval and its changes, the session lifetime as the bound of every
wait, and the session called off (with one line saying why) on every way a
login can end without a token. Also the socket backend's payloads and the
stdio terminal on real streams and threads.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from credproxy._secret import Secret
from credproxy.inner import (
    LOGIN_SESSION_LIFETIME,
    ILoginBackend,
    ILoginTerminal,
    LineTooLong,
    LoginAdapter,
    LoginExpired,
    NoCodePasted,
    SocketLoginBackend,
    StdioTerminal,
    TerminalClosed,
    UnexpectedLoginAnswer,
)
from credproxy.inner._login import CANCEL_TIMEOUT, MAX_LINE_CHARS, MIN_POLL_INTERVAL
from credproxy.wire import ProxyRequestError
from credproxy.wire._client import ProxySocketClient
from tests.wire.client_fakes import FakeEndpoint

SESSION = "5e" * 16
CODE = "pasted-code-value-0123#state-value-4567"
AUTH_URL = "https://auth.example/authorize?state=state-value-4567"
TOKEN = {"access_token": "access-value-for-login-tests", "expiry": 1700000000}

PKCE = {
    "flow_type": "pkce_redirect",
    "session_id": SESSION,
    "pollIntervalMs": 5000,
    "auth_url": AUTH_URL,
}
DEVICE = {
    "flow_type": "device_code",
    "session_id": SESSION,
    "pollIntervalMs": 2000,
    "auth_url": "https://device.example/activate?code=WXYZ-1234",
    "verification_uri": "https://device.example/activate",
    "user_code": "WXYZ-1234",
    "verification_uri_complete": "https://device.example/activate?code=WXYZ-1234",
}


@implementer(ILoginTerminal)
class ScriptedTerminal:
    """
    Lines out are recorded; each read takes the next scripted entry: a str
    is typed, an exception fails the read (KeyboardInterrupt is raised, as
    Ctrl-C would be), None leaves the read waiting (in C{waiting}).
    """

    def __init__(self, *script: str | BaseException | None) -> None:
        self.script = list(script)
        self.out: list[str] = []
        self.waiting: list[Deferred[str]] = []

    def write_line(self, text: str) -> None:
        self.out.append(text)

    def read_line(self) -> Deferred[str]:
        entry = self.script.pop(0) if self.script else TerminalClosed()
        if isinstance(entry, KeyboardInterrupt):
            raise entry
        if isinstance(entry, BaseException):
            return fail(entry)
        if entry is None:
            d: Deferred[str] = Deferred()
            self.waiting.append(d)
            return d
        return succeed(entry)


Answer = Callable[..., Any]


@implementer(ILoginBackend)
class BackendDouble:
    """
    Records every step (with Secrets revealed) and answers each from
    C{script[step]}: a function of the step's arguments returning the data,
    a Deferred, or raising. Unscripted steps never answer; cancel answers {}.
    """

    def __init__(self, **script: Answer) -> None:
        self.script = script
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.hanging: list[Deferred[Any]] = []

    def _step(self, name: str, *args: Any) -> Deferred[Any]:
        self.calls.append((name, tuple(a.reveal() if isinstance(a, Secret) else a for a in args)))
        answer = self.script.get(name)
        if answer is None:
            if name == "cancel":
                return succeed(None)
            d: Deferred[Any] = Deferred()
            self.hanging.append(d)
            return d
        try:
            result = answer(*args)
        except Exception as e:
            return fail(e)
        return result if isinstance(result, Deferred) else succeed(result)

    def initiate(self, provider: str, bucket: str | None) -> Deferred[dict[str, Any]]:
        return self._step("initiate", provider, bucket)

    def exchange(self, session_id: Secret, code: Secret) -> Deferred[dict[str, Any]]:
        return self._step("exchange", session_id, code)

    def poll(self, session_id: Secret) -> Deferred[dict[str, Any]]:
        return self._step("poll", session_id)

    def cancel(self, session_id: Secret) -> Deferred[None]:
        return self._step("cancel", session_id)

    def steps(self) -> list[str]:
        return [name for name, _ in self.calls]


def answers(*results: Any) -> Answer:
    """
    A step answering C{results} in turn (an exception is raised).
    """
    queue = list(results)

    def step(*args: Any) -> Any:
        result = queue.pop(0)
        if isinstance(result, Exception):
            raise result
        return result

    return step


def refused(code: str, message: str) -> ProxyRequestError:
    return ProxyRequestError(code, message)


class LoginTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def adapter(self, backend: BackendDouble, terminal: ScriptedTerminal) -> LoginAdapter:
        return LoginAdapter(backend, terminal, self.clock)

    def assertNoSecretShown(self, terminal: ScriptedTerminal, *extra: object) -> None:
        shown = "\n".join(terminal.out) + "".join(repr(e) + str(e) for e in extra)
        for secret in (SESSION, CODE):
            self.assertNotIn(secret, shown)

    def assertCalledOff(self, backend: BackendDouble) -> None:
        self.assertEqual(backend.calls[-1], ("cancel", (SESSION,)))
        self.assertEqual(backend.steps().count("cancel"), 1)


class CodePasteTests(LoginTestCase):
    def test_shows_the_url_and_exchanges_the_paste(self) -> None:
        backend = BackendDouble(initiate=lambda p, b: PKCE, exchange=lambda s, c: TOKEN)
        terminal = ScriptedTerminal(f"  {CODE}  ")
        token = self.successResultOf(self.adapter(backend, terminal).login("anthropic", "work"))
        self.assertEqual(token, TOKEN)
        self.assertEqual(
            backend.calls,
            [("initiate", ("anthropic", "work")), ("exchange", (SESSION, CODE))],
        )
        self.assertIn(AUTH_URL, terminal.out)
        self.assertEqual(terminal.out[-1], "Logged in to anthropic (bucket work).")
        self.assertNoSecretShown(terminal)

    def test_the_default_bucket_is_left_out(self) -> None:
        backend = BackendDouble(initiate=lambda p, b: PKCE, exchange=lambda s, c: TOKEN)
        self.successResultOf(self.adapter(backend, ScriptedTerminal(CODE)).login("anthropic"))
        self.assertEqual(backend.calls[0], ("initiate", ("anthropic", None)))

    def test_a_refused_code_calls_the_session_off(self) -> None:
        error = refused("EXCHANGE_FAILED", "OAuth code exchange failed: the code was rejected")
        backend = BackendDouble(initiate=lambda p, b: PKCE, exchange=answers(error))
        terminal = ScriptedTerminal(CODE)
        d = self.adapter(backend, terminal).login("anthropic")
        self.assertIs(self.failureResultOf(d, ProxyRequestError).value, error)
        self.assertCalledOff(backend)
        self.assertEqual(
            terminal.out[-1], "Login failed: OAuth code exchange failed: the code was rejected"
        )
        self.assertNoSecretShown(terminal, error)

    def test_the_input_closing_calls_the_session_off(self) -> None:
        backend = BackendDouble(initiate=lambda p, b: PKCE)
        terminal = ScriptedTerminal(TerminalClosed())
        d = self.adapter(backend, terminal).login("anthropic")
        self.failureResultOf(d, TerminalClosed)
        self.assertEqual(backend.steps(), ["initiate", "cancel"])
        self.assertCalledOff(backend)
        self.assertEqual(
            terminal.out[-1], "Login cancelled: the input closed before a code was pasted."
        )

    def test_an_empty_paste_gives_up(self) -> None:
        backend = BackendDouble(initiate=lambda p, b: PKCE)
        terminal = ScriptedTerminal("   ")
        self.failureResultOf(self.adapter(backend, terminal).login("anthropic"), NoCodePasted)
        self.assertEqual(backend.steps(), ["initiate", "cancel"])
        self.assertEqual(terminal.out[-1], "Login cancelled: no code was pasted.")

    def test_keyboard_interrupt_calls_the_session_off(self) -> None:
        backend = BackendDouble(initiate=lambda p, b: PKCE)
        terminal = ScriptedTerminal(KeyboardInterrupt())
        d = self.adapter(backend, terminal).login("anthropic")
        self.failureResultOf(d, KeyboardInterrupt)
        self.assertCalledOff(backend)
        self.assertEqual(terminal.out[-1], "Login cancelled.")

    def test_cancelling_the_login_calls_the_session_off(self) -> None:
        backend = BackendDouble(initiate=lambda p, b: PKCE)
        terminal = ScriptedTerminal(None)
        d = self.adapter(backend, terminal).login("anthropic")
        self.assertNoResult(d)
        (read,) = terminal.waiting
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(read.called)  # the read was given up
        self.assertCalledOff(backend)
        self.assertEqual(terminal.out[-1], "Login cancelled.")

    def test_the_paste_wait_ends_with_the_session(self) -> None:
        backend = BackendDouble(initiate=lambda p, b: PKCE)
        terminal = ScriptedTerminal(None)
        d = self.adapter(backend, terminal).login("anthropic")
        self.clock.advance(LOGIN_SESSION_LIFETIME - 1)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.failureResultOf(d, LoginExpired)
        self.assertCalledOff(backend)
        self.assertTrue(terminal.out[-1].startswith("Login failed: the login was not completed"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_slow_exchange_ends_with_the_session(self) -> None:
        backend = BackendDouble(initiate=lambda p, b: PKCE)  # exchange hangs
        d = self.adapter(backend, ScriptedTerminal(CODE)).login("anthropic")
        self.clock.advance(LOGIN_SESSION_LIFETIME)
        self.failureResultOf(d, LoginExpired)
        (exchange,) = backend.hanging
        self.assertTrue(exchange.called)  # cancelled
        self.assertCalledOff(backend)

    def test_a_cancel_that_hangs_is_given_up(self) -> None:
        never: Deferred[None] = Deferred()
        error = refused("EXCHANGE_FAILED", "OAuth code exchange failed: the code was rejected")
        backend = BackendDouble(
            initiate=lambda p, b: PKCE, exchange=answers(error), cancel=lambda s: never
        )
        d = self.adapter(backend, ScriptedTerminal(CODE)).login("anthropic")
        self.assertNoResult(d)
        self.clock.advance(CANCEL_TIMEOUT)
        self.assertIs(self.failureResultOf(d, ProxyRequestError).value, error)
        self.assertTrue(never.called)  # cancelled, and its late answer ignored

    def test_a_failing_cancel_keeps_the_first_error(self) -> None:
        error = refused("EXCHANGE_FAILED", "OAuth code exchange failed: the code was rejected")
        backend = BackendDouble(
            initiate=lambda p, b: PKCE,
            exchange=answers(error),
            cancel=answers(refused("INTERNAL_ERROR", "Internal error")),
        )
        d = self.adapter(backend, ScriptedTerminal(CODE)).login("anthropic")
        self.assertIs(self.failureResultOf(d, ProxyRequestError).value, error)

    def test_an_answer_without_a_url_is_refused(self) -> None:
        started = {k: v for k, v in PKCE.items() if k != "auth_url"}
        backend = BackendDouble(initiate=lambda p, b: started)
        terminal = ScriptedTerminal(CODE)
        self.failureResultOf(self.adapter(backend, terminal).login("a"), UnexpectedLoginAnswer)
        self.assertCalledOff(backend)
        self.assertEqual(
            terminal.out[-1], "Login failed: the initiate answer has no usable auth_url"
        )


class StartTests(LoginTestCase):
    def test_a_refused_start_has_no_session_to_call_off(self) -> None:
        error = refused("PROVIDER_NOT_CONFIGURED", "No OAuth flow configured for provider: x")
        backend = BackendDouble(initiate=answers(error))
        terminal = ScriptedTerminal()
        d = self.adapter(backend, terminal).login("x")
        self.assertIs(self.failureResultOf(d, ProxyRequestError).value, error)
        self.assertEqual(backend.steps(), ["initiate"])
        self.assertEqual(terminal.out, ["Login failed: No OAuth flow configured for provider: x"])

    def test_an_answer_without_a_session_id_is_refused(self) -> None:
        backend = BackendDouble(initiate=lambda p, b: {"flow_type": "pkce_redirect"})
        d = self.adapter(backend, ScriptedTerminal()).login("x")
        self.failureResultOf(d, UnexpectedLoginAnswer)
        self.assertEqual(backend.steps(), ["initiate"])

    def test_an_unknown_flow_calls_the_session_off(self) -> None:
        backend = BackendDouble(initiate=lambda p, b: {**PKCE, "flow_type": "browser_redirect"})
        terminal = ScriptedTerminal()
        d = self.adapter(backend, terminal).login("x")
        self.failureResultOf(d, UnexpectedLoginAnswer)
        self.assertCalledOff(backend)
        self.assertIn("does not know", terminal.out[-1])

    def test_an_error_of_unknown_text_shows_only_its_type(self) -> None:
        class Oops(Exception):
            pass

        backend = BackendDouble(initiate=answers(Oops("quoting " + SESSION)))
        terminal = ScriptedTerminal()
        self.failureResultOf(self.adapter(backend, terminal).login("x"), Oops)
        self.assertEqual(terminal.out, ["Login failed: Oops"])

    def test_limits_must_be_positive(self) -> None:
        with self.assertRaises(ValueError):
            LoginAdapter(BackendDouble(), ScriptedTerminal(), self.clock, session_lifetime=0)
        with self.assertRaises(ValueError):
            LoginAdapter(BackendDouble(), ScriptedTerminal(), self.clock, cancel_timeout=0)


class DeviceCodeTests(LoginTestCase):
    def test_shows_the_code_and_polls_at_the_interval(self) -> None:
        backend = BackendDouble(
            initiate=lambda p, b: DEVICE,
            poll=answers({"status": "pending"}, {"status": "complete", "token": TOKEN}),
        )
        terminal = ScriptedTerminal()
        d = self.adapter(backend, terminal).login("example")
        self.assertIn(
            "To log in, open https://device.example/activate and enter the code WXYZ-1234",
            terminal.out,
        )
        self.assertIn(
            "Or open https://device.example/activate?code=WXYZ-1234 (the code is filled in).",
            terminal.out,
        )
        self.clock.advance(1.999)
        self.assertEqual(backend.steps(), ["initiate"])  # not before pollIntervalMs
        self.clock.advance(0.001)
        self.assertEqual(backend.steps(), ["initiate", "poll"])
        self.clock.advance(1.999)
        self.assertEqual(backend.steps().count("poll"), 1)
        self.clock.advance(0.001)
        self.assertEqual(self.successResultOf(d), TOKEN)
        self.assertEqual(backend.calls[1:], [("poll", (SESSION,)), ("poll", (SESSION,))])
        self.assertEqual(terminal.out[-1], "Logged in to example.")
        self.assertNoSecretShown(terminal)

    def test_a_pending_answer_can_change_the_interval(self) -> None:
        backend = BackendDouble(
            initiate=lambda p, b: DEVICE,
            poll=answers(
                {"status": "pending", "interval": 7},
                {"status": "complete", "token": TOKEN},
            ),
        )
        d = self.adapter(backend, ScriptedTerminal()).login("example")
        self.clock.advance(2)
        self.clock.advance(6.9)
        self.assertEqual(backend.steps().count("poll"), 1)
        self.clock.advance(0.1)
        self.assertEqual(self.successResultOf(d), TOKEN)

    def test_without_the_complete_uri(self) -> None:
        started = {k: v for k, v in DEVICE.items() if k != "verification_uri_complete"}
        backend = BackendDouble(
            initiate=lambda p, b: started, poll=lambda s: {"status": "complete", "token": TOKEN}
        )
        terminal = ScriptedTerminal()
        d = self.adapter(backend, terminal).login("example")
        self.clock.advance(2)
        self.successResultOf(d)
        self.assertFalse(any(line.startswith("Or open") for line in terminal.out))

    def test_an_interval_too_small_or_missing(self) -> None:
        for interval, expected in ((0, 5.0), ("fast", 5.0), (True, 5.0), (1, MIN_POLL_INTERVAL)):
            backend = BackendDouble(
                initiate=lambda p, b, i=interval: {**DEVICE, "pollIntervalMs": i},
                poll=lambda s: {"status": "complete", "token": TOKEN},
            )
            d = self.adapter(backend, ScriptedTerminal()).login("example")
            self.clock.advance(expected * 0.99)
            self.assertNoResult(d)
            self.clock.advance(expected * 0.01)
            self.successResultOf(d)

    def test_denied_calls_the_session_off(self) -> None:
        error = refused("ACCESS_DENIED", "User denied authorization")
        backend = BackendDouble(initiate=lambda p, b: DEVICE, poll=answers(error))
        terminal = ScriptedTerminal()
        d = self.adapter(backend, terminal).login("example")
        self.clock.advance(2)
        self.assertIs(self.failureResultOf(d, ProxyRequestError).value, error)
        self.assertCalledOff(backend)
        self.assertEqual(terminal.out[-1], "Login failed: User denied authorization")

    def test_polling_ends_with_the_session(self) -> None:
        backend = BackendDouble(initiate=lambda p, b: DEVICE, poll=lambda s: {"status": "pending"})
        terminal = ScriptedTerminal()
        d = self.adapter(backend, terminal).login("example")
        self.clock.pump([1.0] * int(LOGIN_SESSION_LIFETIME - 1))
        self.assertNoResult(d)
        self.clock.advance(1)
        self.failureResultOf(d, LoginExpired)
        # Every 2 s until the lifetime ends, and not once after.
        self.assertEqual(backend.steps().count("poll"), LOGIN_SESSION_LIFETIME / 2)
        self.assertCalledOff(backend)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancelling_while_waiting_to_poll(self) -> None:
        backend = BackendDouble(initiate=lambda p, b: DEVICE)
        terminal = ScriptedTerminal()
        d = self.adapter(backend, terminal).login("example")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(backend.steps(), ["initiate", "cancel"])
        self.assertEqual(self.clock.getDelayedCalls(), [])  # the poll timer is gone too
        self.assertEqual(terminal.out[-1], "Login cancelled.")

    def test_an_odd_poll_answer(self) -> None:
        for answer in ({"status": "weird"}, {"status": "complete"}):
            backend = BackendDouble(initiate=lambda p, b: DEVICE, poll=lambda s, a=answer: a)
            d = self.adapter(backend, ScriptedTerminal()).login("example")
            self.clock.advance(2)
            self.failureResultOf(d, UnexpectedLoginAnswer)
            self.assertCalledOff(backend)


class SocketBackendTests(SynchronousTestCase):
    def test_the_four_steps_on_the_wire(self) -> None:
        endpoint = FakeEndpoint()
        backend = SocketLoginBackend(ProxySocketClient(Clock(), endpoint))
        self.assertTrue(verifyObject(ILoginBackend, backend))
        sent: list[dict[str, Any]] = []

        def step(d: Deferred[Any], data: dict[str, Any]) -> Any:
            server = endpoint.last
            if not sent:
                server.accept()
            (request,) = server.read()
            sent.append(request)
            server.answer(request, data)
            return self.successResultOf(d)

        self.assertEqual(step(backend.initiate("anthropic", None), PKCE), PKCE)
        step(backend.initiate("example", "work"), DEVICE)
        self.assertEqual(step(backend.exchange(Secret(SESSION), Secret(CODE)), TOKEN), TOKEN)
        step(backend.poll(Secret(SESSION)), {"status": "pending"})
        self.assertIsNone(step(backend.cancel(Secret(SESSION)), {}))
        self.assertEqual(
            [(r["op"], r["payload"]) for r in sent],
            [
                ("oauth_initiate", {"provider": "anthropic"}),
                ("oauth_initiate", {"provider": "example", "bucket": "work"}),
                ("oauth_exchange", {"session_id": SESSION, "code": CODE}),
                ("oauth_poll", {"session_id": SESSION}),
                ("oauth_cancel", {"session_id": SESSION}),
            ],
        )
        self.assertNotIn(SESSION, repr(backend))


# -- the stdio terminal, on real streams and a real reactor --------------------


def test_stdio_terminal_provides_the_interface() -> None:
    assert verifyObject(ILoginTerminal, StdioTerminal(reactor, io.StringIO(), io.StringIO()))


def test_stdio_terminal_writes_lines() -> None:
    out = io.StringIO()
    StdioTerminal(reactor, io.StringIO(), out).write_line("hello")
    assert out.getvalue() == "hello\n"


@pytest_twisted.ensureDeferred
async def test_stdio_terminal_reads_lines_then_eof() -> None:
    terminal = StdioTerminal(reactor, io.StringIO("first\r\nsecond\n"), io.StringIO())
    assert await terminal.read_line() == "first"
    assert await terminal.read_line() == "second"
    with pytest.raises(TerminalClosed):
        await terminal.read_line()
    with pytest.raises(TerminalClosed):  # and stays closed
        await terminal.read_line()


@pytest_twisted.ensureDeferred
async def test_stdio_terminal_refuses_an_overlong_line() -> None:
    terminal = StdioTerminal(reactor, io.StringIO("x" * (MAX_LINE_CHARS + 10)), io.StringIO())
    with pytest.raises(LineTooLong):
        await terminal.read_line()
    exact = StdioTerminal(
        reactor, io.StringIO("y" * MAX_LINE_CHARS + "\r\n" + "z" * MAX_LINE_CHARS), io.StringIO()
    )
    assert await exact.read_line() == "y" * MAX_LINE_CHARS
    assert await exact.read_line() == "z" * MAX_LINE_CHARS


@pytest_twisted.ensureDeferred
async def test_stdio_terminal_cancel_then_read_again() -> None:
    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd, "r") as source:
        terminal = StdioTerminal(reactor, source, io.StringIO())
        first = terminal.read_line()
        first.cancel()
        with pytest.raises(CancelledError):
            await first
        second = terminal.read_line()  # the waiting reader thread serves it
        with pytest.raises(RuntimeError):
            await terminal.read_line()  # one read at a time
        os.write(write_fd, b"typed later\n")
        assert await second == "typed later"
        os.close(write_fd)
        with pytest.raises(TerminalClosed):
            await terminal.read_line()
