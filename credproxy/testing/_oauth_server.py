"""
A real OAuth server for tests, as a twisted.web resource: Anthropic's
code-paste PKCE flow with a JSON token endpoint, and the RFC 8628 device
flow with form-encoded endpoints. It checks what a real server checks (the
PKCE verifier against the challenge, one-time codes, rotated refresh tokens,
polling intervals) so that a provider that gets any of it wrong fails.

Serve it on loopback with L{FakeOAuthServer.listen}, or in memory through
C{treq.testing.RequestTraversalAgent(server.resource())}.
"""

from __future__ import annotations

import json
import secrets
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, parse_qsl, quote, urlsplit

import orjson
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTCP, IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from credproxy.oauth._anthropic import PKCEProviderConfig, s256_challenge
from credproxy.oauth._config import OAuthConfig, parse_oauth_config
from credproxy.oauth._device import DEVICE_CODE_GRANT, DeviceCodeProviderConfig
from credproxy.stores._token import Token

# The server refuses request bodies above this (413); a token request is tiny.
MAX_REQUEST_BYTES = 64 * 1024
# The RFC 8628 section 3.5 increase on slow_down.
SLOW_DOWN_STEP = 5.0
_USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"  # RFC 8628 section 6.1: no vowels, no digits


@dataclass
class ReceivedRequest:
    """
    One request the server answered: its path, content type and fields.
    """

    path: str
    content_type: str
    fields: dict[str, str]

    def __repr__(self) -> str:  # the fields hold secrets
        return f"<ReceivedRequest {self.path} fields={sorted(self.fields)}>"


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    state: str
    challenge: str
    scope: str
    expires_at: float
    used: bool = False


@dataclass
class _Device:
    device_code: str
    client_id: str
    scope: str
    expires_at: float
    interval: float
    last_poll: float | None = None
    status: str = "pending"  # "approved", "denied", "issued"


@dataclass
class _Canned:
    status: int
    body: bytes
    headers: dict[bytes, bytes] = field(default_factory=dict)


class _OAuthResource(Resource):
    isLeaf = True

    def __init__(self, server: FakeOAuthServer) -> None:
        super().__init__()
        self._server = server

    def render_POST(self, request: Request) -> bytes | int:
        return self._server._handle(request)


class FakeOAuthServer:
    """
    An OAuth server with the state a real one keeps, and knobs for tests.

    @ivar reactor: schedules slow answers (L{delay}).
    @ivar clock: tells the time for expiry and polling intervals; the
        reactor unless another is given, so a test on real sockets can still
        move time by hand with a L{Clock}.
    @ivar minted: every secret the server made (access and refresh tokens,
        codes, device codes), for tests that scan logs and errors for them.
    @ivar calls: requests per path.
    @ivar grants: requests per grant type (C{authorization_code},
        C{refresh_token}, L{DEVICE_CODE_GRANT}), canned answers included.
    @ivar received: each request's path, content type and fields, in order.
    """

    AUTHORIZE_PATH = "/oauth/authorize"
    TOKEN_PATH = "/v1/oauth/token"  # JSON, as Anthropic's
    DEVICE_AUTHORIZATION_PATH = "/oauth/device/code"  # form
    FORM_TOKEN_PATH = "/oauth/token"  # form
    VERIFICATION_PATH = "/device"
    # Sent as every error's error_description: a test can check that no
    # provider text travels past the provider.
    PROVIDER_TEXT = "fake-provider-says: do not repeat me"

    def __init__(
        self,
        reactor: IReactorTime,
        *,
        clock: IReactorTime | None = None,
        client_id: str = "credproxy-test-client",
        redirect_uri: str = "https://console.anthropic.com/oauth/code/callback",
        scopes: tuple[str, ...] = ("org:create_api_key", "user:profile", "user:inference"),
        base_url: str = "http://127.0.0.1",
    ) -> None:
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.client_id = client_id
        self.client_secret: str | None = None  # when set, every call must send it
        self.redirect_uri = redirect_uri
        self.scopes = scopes
        self.base_url = base_url
        self.expires_in: float | None = 3600  # None: token answers carry no expires_in
        self.rotate_refresh_tokens = True  # False: refresh answers carry no refresh_token
        self.extra_fields: dict[str, Any] = {}  # merged into every token answer
        self.code_lifetime = 600.0
        self.device_expires_in = 600.0
        self.device_interval: float | None = 5.0  # None: the answer names no interval (5 s)
        self.delay = 0.0  # seconds before each answer is written
        self.minted: set[str] = set()
        self.access_tokens: list[str] = []  # every access token issued, in order
        self.calls: Counter[str] = Counter()
        self.grants: Counter[str] = Counter()
        self.received: list[ReceivedRequest] = []
        self.authorizations: list[dict[str, str]] = []  # the query of each authorize()
        self._codes: dict[str, _Code] = {}
        self._refresh: dict[str, str] = {}  # live refresh token -> scope
        self._devices: dict[str, _Device] = {}
        self._user_codes: dict[str, str] = {}  # user code -> device code
        self._canned: list[_Canned] = []
        self._delayed: dict[IDelayedCall, Request] = {}
        self._ports: list[IListeningPort] = []

    def __repr__(self) -> str:
        return f"<FakeOAuthServer {self.base_url}>"

    # --- serving ---------------------------------------------------------

    def resource(self) -> Resource:
        """
        The whole server as one twisted.web resource.
        """
        return _OAuthResource(self)

    def site(self, reactor: IReactorTime | None = None) -> Site:
        return Site(self.resource(), reactor=reactor if reactor is not None else self.reactor)

    def listen(self, reactor: IReactorTCP) -> IListeningPort:
        """
        Serve on 127.0.0.1 at a free port, and point L{base_url} (and so the
        config helpers) at it. L{stop} closes it.
        """
        port = reactor.listenTCP(0, self.site(), interface="127.0.0.1")  # type: ignore[arg-type]
        self._ports.append(port)
        self.base_url = f"http://127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]
        return port

    def stop(self) -> Deferred[None]:
        """
        Drop answers still waiting out their L{delay} and stop listening.
        """
        for call, request in list(self._delayed.items()):
            call.cancel()
            request.transport.abortConnection()  # type: ignore[union-attr]
        self._delayed.clear()
        ports, self._ports = self._ports, []
        if not ports:
            return succeed(None)
        d = gatherResults([maybeDeferred(p.stopListening) for p in ports])
        return d.addCallback(lambda _: None)

    # --- configuration for the providers under test -----------------------

    def url(self, path: str) -> str:
        return self.base_url + path

    def pkce_config(self, name: str = "anthropic") -> PKCEProviderConfig:
        """
        Settings for a code-paste provider against this server.
        """
        return PKCEProviderConfig(
            name=name,
            authorize_url=self.url(self.AUTHORIZE_PATH),
            token_url=self.url(self.TOKEN_PATH),
            client_id=self.client_id,
            redirect_uri=self.redirect_uri,
            scopes=self.scopes,
        )

    def device_config(self, name: str = "fake-device") -> DeviceCodeProviderConfig:
        """
        Settings for a device-code provider against this server.
        """
        return DeviceCodeProviderConfig(
            name=name,
            device_authorization_url=self.url(self.DEVICE_AUTHORIZATION_PATH),
            token_url=self.url(self.FORM_TOKEN_PATH),
            client_id=self.client_id,
            scopes=self.scopes,
        )

    def oauth_toml(self, device_name: str = "fake-device") -> str:
        """
        A config file pointing the built-in C{anthropic} provider and a
        device-code provider named C{device_name} at this server.
        """

        def s(value: str) -> str:
            return json.dumps(value)  # a JSON string is a TOML basic string

        scopes = "[" + ", ".join(s(x) for x in self.scopes) + "]"
        return (
            "[oauth.anthropic]\n"
            f"authorize_url = {s(self.url(self.AUTHORIZE_PATH))}\n"
            f"token_url = {s(self.url(self.TOKEN_PATH))}\n"
            f"client_id = {s(self.client_id)}\n"
            f"redirect_uri = {s(self.redirect_uri)}\n"
            f"scopes = {scopes}\n"
            "\n"
            f"[oauth.{s(device_name)}]\n"
            'flow = "device_code"\n'
            f"device_authorization_url = {s(self.url(self.DEVICE_AUTHORIZATION_PATH))}\n"
            f"token_url = {s(self.url(self.FORM_TOKEN_PATH))}\n"
            f"client_id = {s(self.client_id)}\n"
            f"scopes = {scopes}\n"
        )

    def oauth_config(self, device_name: str = "fake-device") -> OAuthConfig:
        """
        L{oauth_toml} read by the real config parser.
        """
        return parse_oauth_config(self.oauth_toml(device_name), "<FakeOAuthServer>")

    # --- the user and the operator, played by the test --------------------

    def authorize(self, auth_url: str) -> str:
        """
        Play the user's browser: check the authorization URL, remember its
        state and code challenge, and return what the callback page shows
        the user to paste, C{code#state}, with a fresh one-time code.

        @raise ValueError: naming the first parameter that is wrong.
        """
        parts = urlsplit(auth_url)
        if parts.path != urlsplit(self.url(self.AUTHORIZE_PATH)).path:
            raise ValueError("authorize: not this server's authorize path")
        query = parse_qs(parts.query, keep_blank_values=True)
        if any(len(v) != 1 for v in query.values()):
            raise ValueError("authorize: a parameter appears twice")
        params = {k: v[0] for k, v in query.items()}
        expected = {
            "code": "true",
            "client_id": self.client_id,
            "response_type": "code",
            "redirect_uri": self.redirect_uri,
            "code_challenge_method": "S256",
        }
        for name, value in expected.items():
            if params.get(name) != value:
                raise ValueError(f"authorize: {name} is missing or wrong")
        for name in ("scope", "code_challenge", "state"):
            if not params.get(name):
                raise ValueError(f"authorize: {name} is missing")
        self.authorizations.append(params)
        code = self._mint("fake-code-")
        self._codes[code] = _Code(
            client_id=params["client_id"],
            redirect_uri=params["redirect_uri"],
            state=params["state"],
            challenge=params["code_challenge"],
            scope=params["scope"],
            expires_at=self.clock.seconds() + self.code_lifetime,
        )
        return f"{code}#{params['state']}"

    def approve(self, user_code: str) -> None:
        """
        The user approves the device login showing C{user_code}.
        """
        self._device_for(user_code).status = "approved"

    def deny(self, user_code: str) -> None:
        """
        The user refuses the device login showing C{user_code}.
        """
        self._device_for(user_code).status = "denied"

    def _device_for(self, user_code: str) -> _Device:
        device_code = self._user_codes.get(user_code)
        if device_code is None:
            raise KeyError("no device login has that user code")
        return self._devices[device_code]

    def fail_next(self, n: int = 1, status: int = 503) -> None:
        """
        Answer the next C{n} requests, whatever they are, with C{status} and
        an OAuth error body (nothing else happens for them).
        """
        for _ in range(n):
            self.answer_next(status, {"error": "temporarily_unavailable"})

    def answer_next(
        self,
        status: int,
        body: bytes | Mapping[str, Any],
        headers: Mapping[bytes, bytes] | None = None,
    ) -> None:
        """
        Answer the next request not yet given a canned answer with exactly
        this (a mapping is sent as JSON with L{PROVIDER_TEXT} as its
        C{error_description} when it has an C{error}).
        """
        if not isinstance(body, bytes):
            answer = dict(body)
            if "error" in answer:
                answer.setdefault("error_description", self.PROVIDER_TEXT)
            body = orjson.dumps(answer)
        self._canned.append(_Canned(status, body, dict(headers or {})))

    def issue_token(self, *, expires_in: float | None = None, scope: str | None = None) -> Token:
        """
        A token as a store would hold it (absolute C{expiry}), whose refresh
        token is live here: for tests that start from a stored login.
        """
        scope = " ".join(self.scopes) if scope is None else scope
        answer = self._token_answer(scope, with_refresh=True)
        lifetime = answer.pop("expires_in", None)
        lifetime = expires_in if expires_in is not None else lifetime
        if lifetime is not None:
            answer["expiry"] = self.clock.seconds() + lifetime
        return Token(answer)

    @property
    def waiting(self) -> int:
        """
        How many answers are waiting out their L{delay}.
        """
        return len(self._delayed)

    def is_live(self, refresh_token: str) -> bool:
        """
        Whether C{refresh_token} would be accepted now.
        """
        return refresh_token in self._refresh

    # --- the endpoints ----------------------------------------------------

    def _mint(self, prefix: str) -> str:
        value = prefix + secrets.token_urlsafe(24)
        self.minted.add(value)
        return value

    def _token_answer(self, scope: str, with_refresh: bool) -> dict[str, Any]:
        access = self._mint("sk-ant-oat01-fake-")
        self.access_tokens.append(access)
        answer: dict[str, Any] = {"access_token": access, "token_type": "Bearer", "scope": scope}
        if self.expires_in is not None:
            answer["expires_in"] = self.expires_in
        if with_refresh:
            refresh = self._mint("sk-ant-ort01-fake-")
            self._refresh[refresh] = scope
            answer["refresh_token"] = refresh
        answer.update(self.extra_fields)
        return answer

    def _handle(self, request: Request) -> bytes | int:
        path = request.path.decode("utf-8", "replace")
        content_type = (request.getHeader(b"content-type") or b"").decode("latin-1")
        raw = request.content.read(MAX_REQUEST_BYTES + 1) if request.content else b""
        self.calls[path] += 1
        if len(raw) > MAX_REQUEST_BYTES:
            return self._answer(request, _Canned(413, b""))
        fields = self._fields(path, content_type, raw)
        if fields is not None:
            self.received.append(ReceivedRequest(path, content_type, fields))
            if "grant_type" in fields:
                self.grants[fields["grant_type"]] += 1
        if self._canned:
            return self._answer(request, self._canned.pop(0))
        if fields is None:
            return self._answer(request, self._error(400, "invalid_request"))
        return self._answer(request, self._route(path, fields))

    def _fields(self, path: str, content_type: str, raw: bytes) -> dict[str, str] | None:
        """
        The request's fields in the encoding its path expects, or None when
        the body is in another encoding or malformed.
        """
        media = content_type.split(";")[0].strip().lower()
        if path == self.TOKEN_PATH:
            if media != "application/json":
                return None
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                return None
            if not isinstance(body, dict) or not all(isinstance(v, str) for v in body.values()):
                return None
            return body
        if media != "application/x-www-form-urlencoded":
            return None
        try:
            pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=True)
        except (UnicodeDecodeError, ValueError):
            return None
        fields = dict(pairs)
        return fields if len(fields) == len(pairs) else None

    def _error(self, status: int, error: str) -> _Canned:
        body = orjson.dumps({"error": error, "error_description": self.PROVIDER_TEXT})
        return _Canned(status, body)

    def _ok(self, answer: Mapping[str, Any]) -> _Canned:
        return _Canned(200, orjson.dumps(answer), {b"cache-control": b"no-store"})

    def _route(self, path: str, fields: dict[str, str]) -> _Canned:
        if path == self.DEVICE_AUTHORIZATION_PATH:
            return self._device_authorization(fields)
        if path not in (self.TOKEN_PATH, self.FORM_TOKEN_PATH):
            return self._error(404, "invalid_request")
        if not self._client_ok(fields):
            return self._error(401, "invalid_client")
        grant = fields.get("grant_type")
        if grant == "authorization_code":
            return self._authorization_code(fields)
        if grant == "refresh_token":
            return self._refresh_grant(fields)
        if grant == DEVICE_CODE_GRANT:
            return self._device_grant(fields)
        return self._error(400, "unsupported_grant_type")

    def _client_ok(self, fields: dict[str, str]) -> bool:
        if fields.get("client_id") != self.client_id:
            return False
        return self.client_secret is None or fields.get("client_secret") == self.client_secret

    def _authorization_code(self, fields: dict[str, str]) -> _Canned:
        needed = ("code", "state", "redirect_uri", "code_verifier")
        if not all(fields.get(k) for k in needed):
            return self._error(400, "invalid_request")
        grant = self._codes.get(fields["code"])
        if grant is None or grant.used or self.clock.seconds() >= grant.expires_at:
            return self._error(400, "invalid_grant")
        grant.used = True  # spent by any attempt, as real servers do
        if (
            fields["redirect_uri"] != grant.redirect_uri
            or fields["state"] != grant.state
            or s256_challenge(fields["code_verifier"]) != grant.challenge
        ):
            return self._error(400, "invalid_grant")
        return self._ok(self._token_answer(grant.scope, with_refresh=True))

    def _refresh_grant(self, fields: dict[str, str]) -> _Canned:
        token = fields.get("refresh_token", "")
        if not token:
            return self._error(400, "invalid_request")
        if token not in self._refresh:
            return self._error(400, "invalid_grant")
        scope = self._refresh[token]
        if self.rotate_refresh_tokens:
            del self._refresh[token]  # rotation: the old one is spent
        return self._ok(self._token_answer(scope, with_refresh=self.rotate_refresh_tokens))

    def _device_authorization(self, fields: dict[str, str]) -> _Canned:
        if not self._client_ok(fields):
            return self._error(401, "invalid_client")
        device_code = self._mint("fake-device-code-")
        user_code = "-".join(
            "".join(secrets.choice(_USER_CODE_ALPHABET) for _ in range(4)) for _ in range(2)
        )
        interval = 5.0 if self.device_interval is None else self.device_interval
        self._devices[device_code] = _Device(
            device_code=device_code,
            client_id=fields["client_id"],
            scope=fields.get("scope", ""),
            expires_at=self.clock.seconds() + self.device_expires_in,
            interval=interval,
        )
        self._user_codes[user_code] = device_code
        verification = self.url(self.VERIFICATION_PATH)
        answer: dict[str, Any] = {
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": verification,
            "verification_uri_complete": f"{verification}?user_code={quote(user_code)}",
            "expires_in": self.device_expires_in,
        }
        if self.device_interval is not None:
            answer["interval"] = self.device_interval
        return self._ok(answer)

    def _device_grant(self, fields: dict[str, str]) -> _Canned:
        device = self._devices.get(fields.get("device_code", ""))
        if device is None or device.status == "issued":
            return self._error(400, "invalid_grant")
        now = self.clock.seconds()
        if now >= device.expires_at:
            return self._error(400, "expired_token")
        last, device.last_poll = device.last_poll, now
        if last is not None and now - last < device.interval:
            device.interval += SLOW_DOWN_STEP
            return self._error(400, "slow_down")
        if device.status == "denied":
            return self._error(400, "access_denied")
        if device.status == "pending":
            return self._error(400, "authorization_pending")
        device.status = "issued"
        return self._ok(self._token_answer(device.scope, with_refresh=True))

    def _answer(self, request: Request, canned: _Canned) -> bytes | int:
        def start() -> bytes:
            request.setResponseCode(canned.status)
            if canned.body:
                request.setHeader(b"content-type", b"application/json")
            for name, value in canned.headers.items():
                request.setHeader(name, value)
            return canned.body

        if self.delay <= 0:
            return start()

        def later() -> None:
            del self._delayed[call]
            request.write(start())
            request.finish()

        call = self.reactor.callLater(self.delay, later)
        self._delayed[call] = request

        def gone(_: object) -> None:
            if self._delayed.pop(call, None) is not None:
                call.cancel()

        request.notifyFinish().addErrback(gone)
        return NOT_DONE_YET
