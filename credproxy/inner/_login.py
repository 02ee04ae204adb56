"""
Logging in from a terminal (llxprt-code's ProxyOAuthAdapter): start a login,
show the person what to open, take the pasted code or wait for the approval,
and finish it, calling the session off whenever it does not finish.

L{LoginAdapter} drives the conversation and knows neither sockets nor the
broker: it talks to an L{ILoginBackend} (L{SocketLoginBackend} over the
credential socket in a sandbox; the host's own login can supply one over its
broker) and an L{ILoginTerminal} (L{StdioTerminal} for a real one).

Only what has no session behind it reaches the terminal: the authorization
URL, the user code and the verification URIs. The session id and the pasted
code travel as L{Secret}s and are printed, logged and raised nowhere.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable
from typing import Any, Final, TextIO, TypeVar

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from zope.interface import Interface, implementer

from credproxy._secret import Secret
from credproxy.wire._client import ProxySocketClient
from credproxy.wire._client_errors import ProxyClientError
from credproxy.wire._spec import Op

# How long a login session lives on the host from its initiate answer
# (docs/broker.md, "Lifetime"); the wire does not say, so a login gives up
# then rather than wait on a session that no longer exists.
LOGIN_SESSION_LIFETIME: Final = 600.0
# How long calling a session off may take: it is best effort, and must not
# hold up reporting the failure that caused it.
CANCEL_TIMEOUT: Final = 10.0
# The device poll interval when the host names none, and the least one
# honoured (a host naming 0 must not make this client spin).
DEFAULT_POLL_INTERVAL: Final = 5.0
MIN_POLL_INTERVAL: Final = 0.1
# The longest line a terminal hands over: a pasted code is well under 1 KiB.
MAX_LINE_CHARS: Final = 64 * 1024

PKCE_REDIRECT: Final = "pkce_redirect"
DEVICE_CODE: Final = "device_code"

_T = TypeVar("_T")


class TerminalClosed(EOFError):
    """
    The terminal's input ended before a line was read.
    """

    def __init__(self) -> None:
        super().__init__("the terminal's input closed")


class LineTooLong(ValueError):
    """
    The terminal's input held a line longer than L{MAX_LINE_CHARS}.
    """

    def __init__(self) -> None:
        super().__init__(f"the input line is longer than {MAX_LINE_CHARS} characters")


class NoCodePasted(Exception):
    """
    An empty line where the code was expected: the person gave up.
    """

    def __init__(self) -> None:
        super().__init__("no code was pasted")


class LoginExpired(TimeoutError):
    """
    The login session's lifetime ended before the login did.
    """

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the login was not completed within {seconds:g} s")
        self.seconds = seconds


class UnexpectedLoginAnswer(Exception):
    """
    The backend answered a login step with a shape this client cannot use.
    The message names the step and the field, never a value.
    """


class ILoginBackend(Interface):
    """
    The four login steps. The dicts are the C{data} of the wire answers of
    C{oauth_initiate}, C{oauth_exchange} and C{oauth_poll}
    (docs/broker.md): C{initiate} answers C{flow_type}, C{session_id}
    (a str), C{pollIntervalMs}, C{auth_url} and, for a device code login,
    C{verification_uri}, C{user_code}, maybe C{verification_uri_complete};
    C{exchange} answers the token's fields; C{poll} answers
    C{{"status": "pending"}} (maybe with C{interval}, in seconds) or
    C{{"status": "complete", "token": {...}}}. A refused step fails; an
    exception with a C{message} attribute is shown by that text.
    """

    def initiate(provider: str, bucket: str | None) -> Deferred[dict[str, Any]]:
        """
        Start a login whose token goes to C{bucket} (None: the default).
        """

    def exchange(session_id: Secret, code: Secret) -> Deferred[dict[str, Any]]:
        """
        Finish a code paste login with the pasted C{code#state}.
        """

    def poll(session_id: Secret) -> Deferred[dict[str, Any]]:
        """
        Ask once whether a device code login was approved.
        """

    def cancel(session_id: Secret) -> Deferred[None]:
        """
        Call the session off; an unknown session is not an error.
        """


class ILoginTerminal(Interface):
    """
    Where the person sits: lines out, lines in.
    """

    def write_line(text: str) -> None:
        """
        Show one line.
        """

    def read_line() -> Deferred[str]:
        """
        The next line typed, without its line ending. Fails with
        L{TerminalClosed} at the end of the input. Cancelling it stops the
        wait. One read at a time.
        """


@implementer(ILoginBackend)
class SocketLoginBackend:
    """
    The login steps over the credential socket.

    The host binds a session to the connection that opened it and forgets
    it when that connection closes, so the client must keep its connection
    for the whole login: make it with C{idle_timeout} of at least
    L{LOGIN_SESSION_LIFETIME} (the default 300 s closes an idle connection
    while the person is still signing in).
    """

    def __init__(self, client: ProxySocketClient) -> None:
        self.client = client

    def __repr__(self) -> str:
        return f"<SocketLoginBackend {self.client!r}>"

    def initiate(self, provider: str, bucket: str | None) -> Deferred[dict[str, Any]]:
        payload: dict[str, Any] = {"provider": provider}
        if bucket is not None:
            payload["bucket"] = bucket
        return self.client.request(Op.OAUTH_INITIATE, payload)

    def exchange(self, session_id: Secret, code: Secret) -> Deferred[dict[str, Any]]:
        return self.client.request(
            Op.OAUTH_EXCHANGE, {"session_id": session_id.reveal(), "code": code.reveal()}
        )

    def poll(self, session_id: Secret) -> Deferred[dict[str, Any]]:
        return self.client.request(Op.OAUTH_POLL, {"session_id": session_id.reveal()})

    def cancel(self, session_id: Secret) -> Deferred[None]:
        d = self.client.request(Op.OAUTH_CANCEL, {"session_id": session_id.reveal()})
        return d.addCallback(lambda _: None)


@implementer(ILoginTerminal)
class StdioTerminal:
    """
    L{ILoginTerminal} on a text stream pair (stdin and stdout by default),
    for a reactor providing C{IReactorFromThreads}.

    Reading happens on a daemon thread, one line per C{read_line}, handed
    to the reactor with C{callFromThread}: the reactor never blocks, the
    streams keep their blocking mode (C{StandardIO} would make stdout
    non-blocking under everything else that prints), any input works
    (terminal, pipe or file), and a read nobody answers cannot keep the
    process from exiting. A cancelled read's thread keeps waiting: the
    line it gets goes to the next C{read_line}, if one is already waiting,
    and is dropped otherwise. Codes are shown on screen as they are
    pasted; nothing is hidden.
    """

    def __init__(
        self,
        reactor: Any,
        input: TextIO | None = None,
        output: TextIO | None = None,
    ) -> None:
        self._reactor = reactor
        self._input = input if input is not None else sys.stdin
        self._output = output if output is not None else sys.stdout
        self._waiter: Deferred[str] | None = None
        self._reading = False
        self._closed = False

    def __repr__(self) -> str:
        return "<StdioTerminal>"

    def write_line(self, text: str) -> None:
        self._output.write(text + "\n")
        self._output.flush()

    def read_line(self) -> Deferred[str]:
        if self._waiter is not None:
            return fail(RuntimeError("the terminal is already waiting for a line"))
        if self._closed:
            return fail(TerminalClosed())
        waiter: Deferred[str] = Deferred(self._forget)
        self._waiter = waiter
        if not self._reading:
            self._reading = True
            threading.Thread(target=self._read, name="credproxy-terminal", daemon=True).start()
        return waiter

    def _forget(self, waiter: Deferred[str]) -> None:
        if self._waiter is waiter:
            self._waiter = None

    def _read(self) -> None:
        try:
            line = self._input.readline(MAX_LINE_CHARS + 2)  # room for CR LF
        except (OSError, ValueError):  # a closed stream ends the input too
            line = ""
        self._reactor.callFromThread(self._arrived, line)

    def _arrived(self, line: str) -> None:
        self._reading = False
        waiter, self._waiter = self._waiter, None
        if not line:
            self._closed = True
        if waiter is None:
            return  # read for a prompt given up on
        text = line.rstrip("\r\n")
        if not line:
            waiter.errback(TerminalClosed())
        elif len(text) > MAX_LINE_CHARS:
            waiter.errback(LineTooLong())
        else:
            waiter.callback(text)


def _text(answer: object, field: str, step: str) -> str:
    value = answer.get(field) if isinstance(answer, dict) else None
    if not isinstance(value, str) or not value:
        raise UnexpectedLoginAnswer(f"the {step} answer has no usable {field}")
    return value


def _seconds(value: object, scale: float) -> float | None:
    """
    A positive finite number of seconds (C{value} times C{scale}), else None.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    seconds = value * scale
    if not math.isfinite(seconds) or seconds <= 0:
        return None
    return max(MIN_POLL_INTERVAL, seconds)


def _shown(error: BaseException) -> str:
    """
    The one line a failed login ends with. Text is shown only where it is
    known to be safe: this module's own, the credential socket clients'
    (fixed or the host's secret-free text), or a C{message} attribute (the
    contract of L{ILoginBackend}); otherwise the exception's type alone.
    """
    if isinstance(error, CancelledError | KeyboardInterrupt):
        return "Login cancelled."
    if isinstance(error, TerminalClosed):
        return "Login cancelled: the input closed before a code was pasted."
    if isinstance(error, NoCodePasted):
        return "Login cancelled: no code was pasted."
    if isinstance(error, LoginExpired | UnexpectedLoginAnswer | LineTooLong | ProxyClientError):
        return f"Login failed: {error}"
    message = getattr(error, "message", None)
    if isinstance(message, str) and message:
        return f"Login failed: {message}"
    return f"Login failed: {type(error).__name__}"


class LoginAdapter:
    """
    Carries logins from start to a stored token on a terminal (one at a
    time: they would share its input).

    A code paste login (C{pkce_redirect}) shows the authorization URL and
    exchanges the pasted C{code#state}; an empty line gives up. A device
    code login (C{device_code}) shows the user code and where to enter it,
    then polls every C{pollIntervalMs} (a C{pending} answer's C{interval}
    replaces it) until the login completes. Every wait ends with the
    session's lifetime (L{LoginExpired}).

    When the login does not complete (a refused step, an odd answer, the
    input closing, C{KeyboardInterrupt}, the lifetime ending, or the
    caller cancelling the Deferred), the session is called off
    (C{cancel}, best effort, for at most C{cancel_timeout} seconds), one
    line says why, and the Deferred fails with the original exception.
    A program that handles Ctrl-C by stopping the reactor should cancel
    the Deferred first so the session is called off.

    @param reactor: the clock for polling and every bound.
    """

    def __init__(
        self,
        backend: ILoginBackend,
        terminal: ILoginTerminal,
        reactor: IReactorTime,
        *,
        session_lifetime: float = LOGIN_SESSION_LIFETIME,
        cancel_timeout: float = CANCEL_TIMEOUT,
    ) -> None:
        if session_lifetime <= 0 or cancel_timeout <= 0:
            raise ValueError("session_lifetime and cancel_timeout must be positive")
        self.backend = backend
        self.terminal = terminal
        self.reactor = reactor
        self.session_lifetime = session_lifetime
        self.cancel_timeout = cancel_timeout

    def __repr__(self) -> str:
        return f"<LoginAdapter {self.backend!r}>"

    def login(self, provider: str, bucket: str | None = None) -> Deferred[dict[str, Any]]:
        """
        Log in to C{provider}, storing the token (on the host) in C{bucket}
        (None: the default bucket). Fires with the token's fields as the
        host answered them (never a refresh token).
        """
        return Deferred.fromCoroutine(self._login(provider, bucket))

    async def _login(self, provider: str, bucket: str | None) -> dict[str, Any]:
        try:
            started = await self.backend.initiate(provider, bucket)
            deadline = self.reactor.seconds() + self.session_lifetime
            session_id = Secret(_text(started, "session_id", "initiate"))
        except GeneratorExit:
            raise
        except BaseException as e:
            self.terminal.write_line(_shown(e))  # no session to call off
            raise
        try:
            flow = started.get("flow_type")
            if flow == PKCE_REDIRECT:
                token = await self._paste(session_id, started, deadline)
            elif flow == DEVICE_CODE:
                token = await self._device(session_id, started, deadline)
            else:
                raise UnexpectedLoginAnswer(
                    "the host offered a login flow this client does not know"
                )
        except GeneratorExit:
            raise
        except BaseException as e:
            await self._call_off(session_id)
            self.terminal.write_line(_shown(e))
            raise
        where = f"{provider}" if bucket is None else f"{provider} (bucket {bucket})"
        self.terminal.write_line(f"Logged in to {where}.")
        return token

    async def _paste(
        self, session_id: Secret, started: dict[str, Any], deadline: float
    ) -> dict[str, Any]:
        auth_url = _text(started, "auth_url", "initiate")
        self.terminal.write_line("Open this URL in a browser, sign in and approve:")
        self.terminal.write_line(auth_url)
        self.terminal.write_line("Then paste the code the page shows (code#state) and press Enter:")
        line = await self._until(self.terminal.read_line(), deadline)
        pasted = line.strip()
        if not pasted:
            raise NoCodePasted()
        token = await self._until(self.backend.exchange(session_id, Secret(pasted)), deadline)
        if not isinstance(token, dict):
            raise UnexpectedLoginAnswer("the exchange answer is not a token")
        return token

    async def _device(
        self, session_id: Secret, started: dict[str, Any], deadline: float
    ) -> dict[str, Any]:
        uri = _text(started, "verification_uri", "initiate")
        user_code = _text(started, "user_code", "initiate")
        self.terminal.write_line(f"To log in, open {uri} and enter the code {user_code}")
        complete = started.get("verification_uri_complete")
        if isinstance(complete, str) and complete:
            self.terminal.write_line(f"Or open {complete} (the code is filled in).")
        self.terminal.write_line("Waiting for approval...")
        interval = _seconds(started.get("pollIntervalMs"), 0.001) or DEFAULT_POLL_INTERVAL
        while True:
            await self._until(deferLater(self.reactor, interval), deadline)
            answer = await self._until(self.backend.poll(session_id), deadline)
            status = answer.get("status") if isinstance(answer, dict) else None
            if status == "complete":
                token = answer.get("token")
                if not isinstance(token, dict):
                    raise UnexpectedLoginAnswer("the poll answer has no usable token")
                return token
            if status != "pending":
                raise UnexpectedLoginAnswer("the poll answer has no usable status")
            interval = _seconds(answer.get("interval"), 1.0) or interval

    async def _until(self, d: Deferred[_T], deadline: float) -> _T:
        """
        C{d}'s result; cancelled, failing with L{LoginExpired}, at C{deadline}.
        """
        return await self._bounded(
            d, deadline - self.reactor.seconds(), lambda: LoginExpired(self.session_lifetime)
        )

    async def _bounded(
        self, d: Deferred[_T], seconds: float, expired: Callable[[], Exception]
    ) -> _T:
        if seconds <= 0:
            d.cancel()
            d.addErrback(lambda _: None)
            raise expired()
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            d.cancel()

        timer = self.reactor.callLater(seconds, expire)
        try:
            return await d
        except CancelledError:
            if timed_out:
                raise expired() from None
            raise
        finally:
            if timer.active():
                timer.cancel()

    async def _call_off(self, session_id: Secret) -> None:
        """
        Cancel the session, best effort: its failure (or a second
        cancellation of the login) must not hide why the login ended.
        """
        try:
            await self._bounded(
                self.backend.cancel(session_id),
                self.cancel_timeout,
                lambda: TimeoutError("cancel timed out"),
            )
        except Exception:
            return
