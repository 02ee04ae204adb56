"""
Login sessions: the host's side of C{oauth_initiate}, C{oauth_exchange},
C{oauth_poll} and C{oauth_cancel}.

A login takes a person minutes (open a URL, approve, paste a code), so it
cannot be one request: C{initiate} starts it and hands back a session id,
and a later C{exchange} (code paste, PKCE) or C{poll} (device code) ends
it. Between the two, what the provider gave us (the PKCE verifier and
state, or the device code) stays here and never crosses the socket.

Each session id is a random 128-bit value, known only to the connection
that opened it, and bound to that connection (its I{owner}): another
connection naming it is told the session does not exist, exactly as for an
id nobody ever issued, so a leaked id cannot be used from elsewhere and an
id cannot be probed. Session ids are L{Secret}s here and never reach a log
line, an exception message or a C{repr}.

A session is single use. The first exchange spends it, whatever the
provider then answers (a PKCE code cannot be tried twice); a poll spends
it once the provider issued a token, refused the login, or rejected the
device code. A spent session is remembered until its lifetime ends only so
that a second use is told C{SESSION_ALREADY_USED} rather than "not found".

How many sessions are remembered is bounded per owner and overall
(L{MAX_SESSIONS_PER_OWNER}, L{MAX_SESSIONS}); spent sessions that nothing
is using are forgotten first when room is needed. Each lives at most
L{SESSION_LIFETIME} (less when the provider's device code expires
sooner); L{LoginSessions.start} sweeps expired ones every
L{SWEEP_INTERVAL}.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from credproxy._secret import Secret
from credproxy.broker._errors import LoginError, LoginFailure
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
from credproxy.stores._interfaces import DEFAULT_BUCKET
from credproxy.stores._token import Token

log = Logger(namespace="credproxy.broker.sessions")

# A session's lifetime, from the initiate answer: long enough to open a
# browser, sign in and approve, short enough that a forgotten session (and
# the verifier or device code it holds) does not linger. llxprt's default.
SESSION_LIFETIME: Final = 600.0
# How often expired sessions are swept. Expiry itself is exact (a session
# is refused the moment its lifetime ends); the sweep only frees memory.
SWEEP_INTERVAL: Final = 60.0
# Sessions one connection may hold at once: a person completes one login at
# a time, so this leaves room for a few providers or abandoned attempts and
# stops one connection from taking every slot.
MAX_SESSIONS_PER_OWNER: Final = 8
# Sessions the host holds at once, over every connection: each holds a
# provider's state and may make provider calls, so their number is bounded
# whatever the number of connections.
MAX_SESSIONS: Final = 64
# The poll interval when a provider names none (RFC 8628 section 3.2), and
# the one suggested for code-paste logins (llxprt's default).
DEFAULT_POLL_INTERVAL: Final = 5.0
# A slow_down adds this to the interval, for that poll and every later one
# (RFC 8628 section 3.5).
SLOW_DOWN_STEP: Final = 5.0
# Session ids: 16 random bytes, written as 32 lowercase hex digits.
SESSION_ID_BYTES: Final = 16

# The fixed texts a client may be shown. None holds anything the provider said.
NOT_FOUND_TEXT: Final = "OAuth session not found"
ALREADY_USED_TEXT: Final = "OAuth session already used"
ALREADY_COMPLETED_TEXT: Final = "OAuth session already completed"
EXPIRED_TEXT: Final = "OAuth session expired"
DEVICE_CODE_EXPIRED_TEXT: Final = "Device code expired"
ACCESS_DENIED_TEXT: Final = "User denied authorization"
INITIATION_FAILED_TEXT: Final = "OAuth flow initiation failed"
INITIATION_CANCELLED_TEXT: Final = "OAuth flow initiation was cancelled"
TOO_MANY_FOR_OWNER_TEXT: Final = "Too many OAuth sessions on this connection"
TOO_MANY_TEXT: Final = "Too many OAuth sessions in progress"
EXCHANGE_UNAVAILABLE_TEXT: Final = "OAuth code exchange failed: the provider could not be reached"
EXCHANGE_REJECTED_TEXT: Final = "OAuth code exchange failed: the code was rejected"
EXCHANGE_WRONG_FLOW_TEXT: Final = "OAuth session is a device code login: poll it instead"
POLL_UNAVAILABLE_TEXT: Final = "Poll failed: the provider could not be reached"
POLL_REJECTED_TEXT: Final = "Poll failed: the provider refused the login"
POLL_WRONG_FLOW_TEXT: Final = "OAuth session is a code paste login: exchange a code instead"


def _not_configured(provider: str) -> LoginError:
    return LoginError(
        LoginFailure.PROVIDER_NOT_CONFIGURED, f"No OAuth flow configured for provider: {provider}"
    )


@dataclass(frozen=True)
class InitiatedLogin:
    """
    What C{oauth_initiate} answers. The device fields are set for device
    code logins only; the user code is kept out of C{repr} since it is
    what a person types to approve this host.
    """

    flow_type: FlowType
    session_id: Secret
    poll_interval_ms: int
    auth_url: str = field(repr=False)  # a device login's may hold the user code
    verification_uri: str | None = None
    user_code: str | None = field(default=None, repr=False)
    verification_uri_complete: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class PollResult:
    """
    What one C{oauth_poll} learned: still C{pending} (with the new interval in
    seconds when the provider asked to slow down), or C{complete} with the
    token, which is already stored.
    """

    status: Literal["pending", "complete"]
    interval: float | None = None
    token: Token | None = None


class _Session:
    """
    One login in progress. Only L{LoginSessions} touches it.
    """

    __slots__ = (
        "bucket",
        "busy",
        "deadline",
        "device_code",
        "expired_text",
        "flow",
        "interval",
        "next_poll",
        "owner",
        "pkce",
        "provider",
        "provider_name",
        "ready",
        "session_id",
        "spent",
    )

    def __init__(
        self,
        session_id: Secret,
        owner: object,
        provider_name: str,
        provider: IOAuthProvider,
        bucket: str | None,
        flow: FlowType,
        deadline: float,
    ) -> None:
        self.session_id = session_id
        self.owner = owner
        self.provider_name = provider_name
        self.provider = provider
        self.bucket = bucket
        self.flow = flow
        self.deadline = deadline
        self.expired_text = EXPIRED_TEXT
        self.pkce: PKCELogin | None = None
        self.device_code: Secret | None = None
        self.interval = DEFAULT_POLL_INTERVAL
        self.next_poll = 0.0
        self.ready = False  # set once the provider has begun the login
        self.spent = False
        self.busy = False  # an exchange or poll is waiting for the provider

    def __repr__(self) -> str:
        return f"<login session provider={self.provider_name!r} flow={self.flow.value}>"


class LoginSessions:
    """
    The login sessions of one broker, keyed by their (secret) ids and bound
    to the owner (a connection, compared by identity) that opened them.

    An exchange or poll already waiting for the provider when its session
    is cancelled, dropped or stopped gets no token stored: the login was
    called off, so whatever the provider answers is discarded and the caller
    is told the session no longer exists.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        providers: Mapping[str, IOAuthProvider],
        store_login: Callable[[str, Token, str | None], Awaitable[None]],
    ) -> None:
        self._reactor = reactor
        self._providers = providers
        self._store_login = store_login
        # Insertion order is age order: eviction takes the oldest first.
        self._sessions: dict[Secret, _Session] = {}
        self._sweeper: LoopingCall | None = None

    def __repr__(self) -> str:
        return f"<LoginSessions sessions={len(self._sessions)}>"

    def __len__(self) -> int:
        """
        How many sessions are remembered (starting, pending or spent).
        """
        return len(self._sessions)

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """
        Sweep expired sessions every L{SWEEP_INTERVAL} on the reactor.
        """
        if self._sweeper is not None:
            return
        sweeper = LoopingCall(self.sweep)
        sweeper.clock = self._reactor
        self._sweeper = sweeper
        sweeper.start(SWEEP_INTERVAL, now=False).addErrback(self._sweep_failed)

    def stop(self) -> None:
        """
        Stop sweeping and forget every session.
        """
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None and sweeper.running:
            sweeper.stop()
        self._sessions.clear()

    def sweep(self) -> None:
        """
        Forget every expired session, except those whose exchange or poll is
        waiting for the provider: that call decides their end.
        """
        now = self._reactor.seconds()
        for session_id in [
            sid for sid, s in self._sessions.items() if s.deadline <= now and not s.busy
        ]:
            del self._sessions[session_id]

    def _sweep_failed(self, failure: Failure) -> None:
        self._sweeper = None
        kind = failure.type.__qualname__ if failure.type is not None else "unknown"
        log.error("login session sweep stopped: {kind}", kind=kind)

    def drop_owner(self, owner: object) -> None:
        """
        Forget every session of C{owner}: its connection has closed, and
        nobody else can name them.
        """
        for session_id in [sid for sid, s in self._sessions.items() if s.owner is owner]:
            del self._sessions[session_id]

    def cancel(self, owner: object, session_id: Secret) -> None:
        """
        Forget C{owner}'s session C{session_id}. An unknown id, or another
        owner's, is ignored: cancelling reveals nothing.
        """
        session = self._sessions.get(session_id)
        if session is not None and session.owner is owner:
            del self._sessions[session_id]

    def entry_of(self, owner: object, session_id: Secret) -> tuple[str, str] | None:
        """
        The provider and bucket of C{owner}'s session, for the audit line;
        None when C{owner} has no such session.
        """
        session = self._sessions.get(session_id)
        if session is None or session.owner is not owner or not session.ready:
            return None
        return session.provider_name, session.bucket or DEFAULT_BUCKET

    # -- initiate -------------------------------------------------------------

    async def initiate(
        self, owner: object, provider: str, bucket: str | None, redirect_uri: str | None
    ) -> InitiatedLogin:
        """
        Begin a login with C{provider}, whose token will be stored in
        C{bucket} (None: the default bucket). Raises L{LoginError}.
        """
        configured = self._providers.get(provider)
        if configured is None:
            raise _not_configured(provider)
        flow = _flow_of(configured)
        if flow is None:
            raise _not_configured(provider)
        self._make_room(owner)
        session_id = Secret(secrets.token_hex(SESSION_ID_BYTES))
        # The slot is taken before the provider is asked, so initiations
        # waiting on it count against the limits too.
        session = _Session(
            session_id,
            owner,
            provider,
            configured,
            bucket,
            flow,
            self._reactor.seconds() + SESSION_LIFETIME,
        )
        self._sessions[session_id] = session
        try:
            if flow is FlowType.PKCE_REDIRECT:
                assert IPKCEProvider.providedBy(configured)
                pkce: PKCELogin | None = configured.begin(redirect_uri)
                device: DeviceLogin | None = None
            else:
                assert IDeviceCodeProvider.providedBy(configured)
                pkce, device = None, await configured.begin()
        except CancelledError:
            self._discard(session)
            raise
        except Exception as e:
            self._discard(session)
            log.warn(
                "OAuth login for {provider} could not start: {kind}",
                provider=provider,
                kind=_describe(e),
            )
            raise LoginError(LoginFailure.FLOW_INITIATION_FAILED, INITIATION_FAILED_TEXT) from None
        if self._sessions.get(session_id) is not session:
            # Cancelled, dropped or stopped while the provider answered.
            raise LoginError(LoginFailure.FLOW_INITIATION_FAILED, INITIATION_CANCELLED_TEXT)
        now = self._reactor.seconds()
        session.deadline = now + SESSION_LIFETIME
        session.ready = True
        if pkce is not None:
            session.pkce = pkce
            return InitiatedLogin(
                flow_type=flow,
                session_id=session_id,
                poll_interval_ms=_milliseconds(DEFAULT_POLL_INTERVAL),
                auth_url=pkce.auth_url,
            )
        assert device is not None
        session.device_code = device.device_code
        if device.interval > 0:
            session.interval = device.interval
        if 0 < device.expires_in < SESSION_LIFETIME:
            session.deadline = now + device.expires_in
            session.expired_text = DEVICE_CODE_EXPIRED_TEXT
        return InitiatedLogin(
            flow_type=flow,
            session_id=session_id,
            poll_interval_ms=_milliseconds(session.interval),
            auth_url=device.verification_uri_complete or device.verification_uri,
            verification_uri=device.verification_uri,
            user_code=device.user_code,
            verification_uri_complete=device.verification_uri_complete,
        )

    def _make_room(self, owner: object) -> None:
        """
        Make room for one more session of C{owner}, forgetting idle spent
        sessions (oldest first) if that is what it takes; raise
        L{LoginError} when the limits still leave none.
        """
        if self._count(owner) >= MAX_SESSIONS_PER_OWNER:
            self._evict_spent(owner)
            if self._count(owner) >= MAX_SESSIONS_PER_OWNER:
                raise LoginError(LoginFailure.FLOW_INITIATION_FAILED, TOO_MANY_FOR_OWNER_TEXT)
        if len(self._sessions) >= MAX_SESSIONS:
            self._evict_spent(None)
            if len(self._sessions) >= MAX_SESSIONS:
                raise LoginError(LoginFailure.FLOW_INITIATION_FAILED, TOO_MANY_TEXT)

    def _count(self, owner: object) -> int:
        return sum(1 for s in self._sessions.values() if s.owner is owner)

    def _evict_spent(self, owner: object | None) -> None:
        for session in self._sessions.values():
            if session.spent and not session.busy and (owner is None or session.owner is owner):
                break
        else:
            return
        del self._sessions[session.session_id]

    # -- exchange -------------------------------------------------------------

    async def exchange(self, owner: object, session_id: Secret, code: Secret) -> Token:
        """
        End C{owner}'s code paste login with the pasted C{code}: the token is
        stored (refresh token and all) and returned, for the caller to
        sanitize. Raises L{LoginError}.

        A device code session is not spent by this: it is refused with
        C{EXCHANGE_FAILED}, and can still be polled.
        """
        session = self._usable(owner, session_id, ALREADY_USED_TEXT)
        if session.flow is not FlowType.PKCE_REDIRECT or session.pkce is None:
            raise LoginError(LoginFailure.EXCHANGE_FAILED, EXCHANGE_WRONG_FLOW_TEXT)
        assert IPKCEProvider.providedBy(session.provider)
        login, session.pkce = session.pkce, None  # spent before the provider is asked
        session.spent = True
        session.busy = True
        try:
            token = await session.provider.exchange(login, code)
        except OAuthError as e:
            log.warn(
                "OAuth code exchange for {provider} failed: {kind}",
                provider=session.provider_name,
                kind=_describe(e),
            )
            message = (
                EXCHANGE_UNAVAILABLE_TEXT
                if e.kind is OAuthErrorKind.TRANSIENT
                else EXCHANGE_REJECTED_TEXT
            )
            raise LoginError(LoginFailure.EXCHANGE_FAILED, message) from None
        finally:
            session.busy = False
        return await self._complete(session, token)

    # -- poll -----------------------------------------------------------------

    async def poll(self, owner: object, session_id: Secret) -> PollResult:
        """
        Ask the provider once whether C{owner}'s device code login was
        approved; when it was, the token is stored and returned. Raises
        L{LoginError}.

        A poll sooner than the interval after the last one, or while one is
        waiting for the provider, is answered C{pending} without asking the
        provider, so no client can make this host poll faster than the
        provider allows. A code paste session is refused with C{POLL_FAILED}
        and is not spent.
        """
        session = self._usable(owner, session_id, ALREADY_COMPLETED_TEXT)
        if session.flow is not FlowType.DEVICE_CODE or session.device_code is None:
            raise LoginError(LoginFailure.POLL_FAILED, POLL_WRONG_FLOW_TEXT)
        now = self._reactor.seconds()
        if session.busy or now < session.next_poll:
            return PollResult("pending")
        assert IDeviceCodeProvider.providedBy(session.provider)
        session.busy = True
        try:
            token = await session.provider.poll(session.device_code)
        except OAuthError as e:
            if self._sessions.get(session_id) is not session:
                raise LoginError(LoginFailure.SESSION_NOT_FOUND, NOT_FOUND_TEXT) from None
            return self._poll_refused(session, e)
        finally:
            session.busy = False
            session.next_poll = now + session.interval
        self._spend(session)
        return PollResult("complete", token=await self._complete(session, token))

    def _poll_refused(self, session: _Session, error: OAuthError) -> PollResult:
        """
        What a poll answers when the provider issued no token.
        """
        kind = error.kind
        if kind is OAuthErrorKind.PENDING:
            return PollResult("pending")
        if kind is OAuthErrorKind.SLOW_DOWN:
            session.interval += SLOW_DOWN_STEP
            return PollResult("pending", interval=session.interval)
        if kind is OAuthErrorKind.EXPIRED:
            self._discard(session)
            raise LoginError(LoginFailure.SESSION_EXPIRED, DEVICE_CODE_EXPIRED_TEXT)
        if kind is OAuthErrorKind.ACCESS_DENIED:
            self._spend(session)
            raise LoginError(LoginFailure.ACCESS_DENIED, ACCESS_DENIED_TEXT)
        log.warn(
            "OAuth device code poll for {provider} failed: {kind}",
            provider=session.provider_name,
            kind=_describe(error),
        )
        if kind is OAuthErrorKind.TRANSIENT:
            raise LoginError(LoginFailure.POLL_FAILED, POLL_UNAVAILABLE_TEXT)  # may be retried
        self._spend(session)
        raise LoginError(LoginFailure.POLL_FAILED, POLL_REJECTED_TEXT)

    # -- shared ---------------------------------------------------------------

    def _usable(self, owner: object, session_id: Secret, used_text: str) -> _Session:
        """
        C{owner}'s live, unspent session C{session_id}, or the L{LoginError}
        that says why there is none. An expired session is forgotten as it is
        refused, so its slot is free at once.
        """
        session = self._sessions.get(session_id)
        if session is None or session.owner is not owner or not session.ready:
            raise LoginError(LoginFailure.SESSION_NOT_FOUND, NOT_FOUND_TEXT)
        if self._reactor.seconds() >= session.deadline:
            self._discard(session)
            raise LoginError(LoginFailure.SESSION_EXPIRED, session.expired_text)
        if session.spent:
            raise LoginError(LoginFailure.SESSION_ALREADY_USED, used_text)
        return session

    async def _complete(self, session: _Session, token: Token) -> Token:
        """
        Store the token a login obtained, unless the session was called off
        while the provider answered.
        """
        if self._sessions.get(session.session_id) is not session:
            raise LoginError(LoginFailure.SESSION_NOT_FOUND, NOT_FOUND_TEXT)
        await self._store_login(session.provider_name, token, session.bucket)
        return token

    def _spend(self, session: _Session) -> None:
        session.spent = True
        session.pkce = None
        session.device_code = None

    def _discard(self, session: _Session) -> None:
        if self._sessions.get(session.session_id) is session:
            del self._sessions[session.session_id]


def _flow_of(provider: IOAuthProvider) -> FlowType | None:
    """
    The login flow C{provider} can carry through, or None when it offers
    only refresh (or claims a flow whose interface it does not provide).
    """
    flow = getattr(provider, "flow", None)
    if flow == FlowType.PKCE_REDIRECT and IPKCEProvider.providedBy(provider):
        return FlowType.PKCE_REDIRECT
    if flow == FlowType.DEVICE_CODE and IDeviceCodeProvider.providedBy(provider):
        return FlowType.DEVICE_CODE
    return None


def _milliseconds(seconds: float) -> int:
    return round(seconds * 1000)


def _describe(error: Exception) -> str:
    """
    What the log may say about a provider failure: an L{OAuthError}'s kind
    and safe detail, or any other exception's type (never its text, which
    might quote what the provider was handling).
    """
    if isinstance(error, OAuthError):
        return f"{error.kind.value} {error.detail}".rstrip()
    return type(error).__qualname__
