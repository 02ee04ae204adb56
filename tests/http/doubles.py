"""
Stand-ins for the edges of the HTTP face in unit tests: an upstream agent
whose answers a test hands out one by one, the answers themselves, a token
endpoint in memory, and a broker on memory stores and a Clock. The face, the
exchange and the broker under them are the real ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from credproxy._secret import Secret
from credproxy.broker import Broker
from credproxy.broker.credentials import ICredentialSource
from credproxy.http import HTTPProxyConfig, ProxySite
from credproxy.http._resource import ProxyResource
from credproxy.oauth._interfaces import FlowType, IOAuthProvider, OAuthError, OAuthErrorKind
from credproxy.stores._memory import MemoryProviderKeyStore, MemoryTokenStore
from credproxy.stores._token import Token
from credproxy.testing import ScriptedResponse, ScriptedUpstream, UpstreamRequest

PROVIDER = "anthropic"
REFUSAL = b'{"type":"error","error":{"type":"authentication_error","message":"provider says no"}}'


class FakeResponse(ScriptedResponse):
    """
    An upstream answer (L{ScriptedResponse}) with the headers of a real one:
    a content type and a request id. Held ones have no length, as streams.
    """

    def __init__(
        self,
        code: int,
        body: bytes = b"",
        *,
        content_type: bytes = b"application/json",
        hold: bool = False,
    ) -> None:
        super().__init__(
            code,
            body,
            {b"content-type": [content_type], b"request-id": [b"req_test"]},
            phrase=b"Unauthorized" if code == 401 else b"OK",
            hold=hold,
        )


class Sent(UpstreamRequest):
    """
    One request the proxy made upstream; answered with a prepared response.
    """

    def respond(self, response: ScriptedResponse) -> ScriptedResponse:  # type: ignore[override]
        return self.answer_with(response)


class ScriptedAgent(ScriptedUpstream):
    """
    The upstream hop: records each request (C{sent}); the test answers it.
    """

    request_type = Sent

    @property
    def sent(self) -> list[Sent]:
        return self.requests  # type: ignore[return-value]


@dataclass
class Served:
    """
    The HTTP face on a StringTransport: C{transport} holds what the agent got.
    """

    transport: StringTransport
    agent: ScriptedAgent
    channel: Any
    resource: ProxyResource

    def post(self, body: bytes, *, extra: bytes = b"") -> None:
        self.channel.dataReceived(
            b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: placeholder\r\n"
            + extra
            + b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )

    def hang_up(self) -> None:
        self.channel.connectionLost(Failure(ConnectionError("agent gone")))


def serve(credentials: ICredentialSource, clock: Clock, **config: Any) -> Served:
    agent = ScriptedAgent()
    settings = HTTPProxyConfig(upstream="http://upstream.invalid", **config)
    resource = ProxyResource(clock, settings, credentials, agent)
    site = ProxySite(resource, clock)
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
    transport = StringTransport()
    channel.makeConnection(transport)
    return Served(transport, agent, channel, resource)


def connect_another(served: Served) -> Served:
    """
    A second agent connection to the same face (same site, resource and
    upstream agent), for tests of what requests in flight share.
    """
    channel = served.channel.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1235))
    transport = StringTransport()
    channel.makeConnection(transport)
    return Served(transport, served.agent, channel, served.resource)


@implementer(IOAuthProvider)
class MemoryTokenEndpoint:
    """
    A provider whose token endpoint is in memory: each refresh mints the next
    token (a new access and refresh token, valid for C{lifetime} seconds),
    or fails with C{failure} when that is set. With C{hold} set, the answer
    waits until the test calls L{release}.
    """

    flow = FlowType.PKCE_REDIRECT

    def __init__(self, clock: Clock, name: str = PROVIDER, lifetime: float = 3600.0) -> None:
        self.name = name
        self._clock = clock
        self.lifetime = lifetime
        self.refreshes = 0
        self.failure: OAuthError | None = None
        self.hold = False
        self._held: list[Deferred[Token]] = []

    def refresh(self, refresh_token: Secret) -> Deferred[Token]:
        self.refreshes += 1
        if self.failure is not None:
            return fail(self.failure)
        if self.hold:
            held: Deferred[Token] = Deferred()
            self._held.append(held)
            return held
        return succeed(self._mint())

    def release(self) -> None:
        held, self._held = self._held, []
        for d in held:
            d.callback(self._mint())

    def _mint(self) -> Token:
        return Token(
            {
                "access_token": f"sk-ant-oat01-refreshed-{self.refreshes:02d}-access",
                "refresh_token": f"sk-ant-ort01-refreshed-{self.refreshes:02d}-refresh",
                "expiry": self._clock.seconds() + self.lifetime,
                "token_type": "Bearer",
            }
        )

    def refuse(self) -> None:
        """
        From now on answer as for a refresh token that was revoked.
        """
        self.failure = OAuthError(OAuthErrorKind.INVALID_GRANT, "invalid_grant")


@dataclass
class BrokerWorld:
    """
    A real broker on memory stores, a Clock, and an in-memory token endpoint.
    """

    clock: Clock = field(default_factory=Clock)
    tokens: MemoryTokenStore = field(default_factory=MemoryTokenStore)
    keys: MemoryProviderKeyStore = field(default_factory=MemoryProviderKeyStore)
    endpoint: MemoryTokenEndpoint = field(init=False)
    broker: Broker = field(init=False)

    def __post_init__(self) -> None:
        self.clock.advance(1_700_000_000)  # a plausible Unix time, so expiries look real
        self.endpoint = MemoryTokenEndpoint(self.clock)
        self.broker = Broker(
            self.clock, self.tokens, self.keys, providers={PROVIDER: self.endpoint}, renew=False
        )

    def store_token(
        self,
        access: str,
        *,
        expires_in: float = 3600.0,
        refresh: str | None = "sk-ant-ort01-stored-refresh-token",
        bucket: str = "default",
    ) -> None:
        fields: dict[str, Any] = {
            "access_token": access,
            "expiry": self.clock.seconds() + expires_in,
        }
        if refresh is not None:
            fields["refresh_token"] = refresh
        self.tokens.save_token(PROVIDER, Token(fields), bucket)

    def store_key(self, key: str, name: str = "anthropic") -> None:
        self.keys.save_key(name, Secret(key))

    def requests_counted(self, bucket: str = "default") -> int:
        stats = self.tokens.get_bucket_stats(PROVIDER, bucket)
        result: list[int] = []
        stats.addCallback(lambda s: result.append(s.request_count if s else 0))
        return result[0]
