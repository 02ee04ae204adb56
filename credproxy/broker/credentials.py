"""
Where the HTTP face gets the real upstream credential from.

Sources are pluggable (L{ICredentialSource}): the proxy's own environment, and
the broker's stores with their refreshed OAuth tokens. The face asks for the
current credential on every request, so a source may rotate it at any time;
it tells the source each time it forwarded a request (so buckets count their
use) and when the upstream refused a stored OAuth token (so the broker can
replace one the API expired early).
"""

from __future__ import annotations

import enum
import os
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from credproxy._secret import Secret
from credproxy.broker._errors import RefreshError, RefreshFailure
from credproxy.stores._interfaces import DEFAULT_BUCKET, StoreDown, StoreError
from credproxy.stores._token import Token

if TYPE_CHECKING:
    from credproxy.broker._broker import Broker

log = Logger(namespace="credproxy.broker")

# A stored token that expires within this many seconds is refreshed before a
# request uses it: the API checks the token when the request arrives, so the
# margin covers clock skew and the time the request spends getting there.
TOKEN_MIN_VALIDITY = 60.0

# Refresh failures that a later attempt may get past (the token endpoint was
# unreachable, or a refresh is cooling down); the others need a new login.
_TRANSIENT_FAILURES = frozenset({RefreshFailure.REFRESH_FAILED, RefreshFailure.RATE_LIMITED})


class CredentialKind(enum.Enum):
    """
    How a credential is presented upstream.
    """

    API_KEY = "api_key"  # x-api-key: <key>
    OAUTH = "oauth"  # Authorization: Bearer <token>, plus the OAuth beta flag


@dataclass(frozen=True)
class UpstreamCredential:
    """
    One real credential; its value is a L{Secret} so the dataclass repr hides it.

    C{provider} and C{bucket} name the stored OAuth token it was read from, so
    its use can be counted against that bucket and the broker can replace it
    when the upstream refuses it; both are None for environment credentials
    and API keys.
    """

    kind: CredentialKind
    secret: Secret
    source: str  # where it came from, for logs: "ANTHROPIC_API_KEY", "token store", ...
    provider: str | None = None
    bucket: str | None = None

    @property
    def replaceable(self) -> bool:
        """
        Whether a 401 to this credential may be answered by replacing it: only a
        stored OAuth token (which the broker can refresh) qualifies; an API key
        or a token from the environment is what it is.
        """
        return self.kind is CredentialKind.OAUTH and self.provider is not None


# The reason of a CredentialUnavailable whose shared store's server does not
# answer (Redis down): the HTTP face answers it with 503, a trouble of the
# moment; a store that answers with what it cannot read is STORE_UNREADABLE.
STORE_UNAVAILABLE = "store_unavailable"
STORE_UNREADABLE = "store_unreadable"


class CredentialUnavailable(Exception):
    """
    A source has a credential configured but cannot give a usable one now: its
    OAuth login can no longer be refreshed, or the refresh failed for the
    moment (C{transient}, with C{retry_after} seconds when known).

    C{message} is credproxy's own text, meant for the agent's 401 or 502: it
    never holds a provider's text or any credential. C{reason} is a fixed
    code for logs (a L{RefreshFailure} value).
    """

    def __init__(
        self,
        message: str,
        *,
        reason: str = "",
        transient: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.transient = transient
        self.retry_after = retry_after


class ICredentialSource(Interface):
    """
    Supplies the credential the HTTP face injects upstream.
    """

    def current_credential() -> Deferred[UpstreamCredential | None]:
        """
        The credential to use now, or L{None} when none is configured. Fails
        with L{CredentialUnavailable} when one is configured but unusable.
        """

    def how_to_configure() -> str:
        """
        A sentence telling a user how to give this source a credential; it is
        shown in the 401 answered when no credential is configured.
        """

    def credential_used(credential: UpstreamCredential) -> None:
        """
        One request was forwarded upstream with C{credential} (as given by
        this source). Called on every forwarded request, so it must be cheap.
        """

    def credential_rejected(credential: UpstreamCredential) -> Deferred[UpstreamCredential | None]:
        """
        The upstream answered 401 to C{credential} (a replaceable one, as given
        by this source): the credential to retry with once (normally a
        different one; the same one when the source knows nothing newer, so
        that the upstream's second answer is what the agent sees), or L{None}
        when this source has none. Fails with L{CredentialUnavailable} when
        the credential cannot be replaced (for instance, its login must be
        renewed on the host).
        """

    def describe() -> Deferred[str | None]:
        """
        Which credential is in use, for the start-up log line: its kind and
        where it comes from, never its value. L{None} when there is none, so
        the caller can warn that every request will be refused.
        """


def _describe(credential: UpstreamCredential) -> str:
    kind = "an API key" if credential.kind is CredentialKind.API_KEY else "an OAuth token"
    return f"{kind} from {credential.source}"


@implementer(ICredentialSource)
class EnvironmentCredentialSource:
    """
    C{ANTHROPIC_API_KEY} (as x-api-key) or else C{CLAUDE_CODE_OAUTH_TOKEN} (as a
    Bearer token), read once from the proxy's own environment. Nothing here
    can be refreshed, so a rejected credential has no replacement.
    """

    API_KEY_VARIABLE = "ANTHROPIC_API_KEY"
    OAUTH_TOKEN_VARIABLE = "CLAUDE_CODE_OAUTH_TOKEN"

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        api_key = environ.get(self.API_KEY_VARIABLE, "").strip()
        oauth = environ.get(self.OAUTH_TOKEN_VARIABLE, "").strip()
        self._credential: UpstreamCredential | None
        if api_key:
            self._credential = UpstreamCredential(
                CredentialKind.API_KEY, Secret(api_key), self.API_KEY_VARIABLE
            )
        elif oauth:
            self._credential = UpstreamCredential(
                CredentialKind.OAUTH, Secret(oauth), self.OAUTH_TOKEN_VARIABLE
            )
        else:
            self._credential = None

    @property
    def credential(self) -> UpstreamCredential | None:
        """
        What was read at construction, for sources that put the environment
        first without paying for a Deferred.
        """
        return self._credential

    def current_credential(self) -> Deferred[UpstreamCredential | None]:
        return succeed(self._credential)

    def how_to_configure(self) -> str:
        return (
            f"set {self.API_KEY_VARIABLE} (an API key) or {self.OAUTH_TOKEN_VARIABLE}"
            " (an OAuth access token) in the environment credproxy runs in"
        )

    def credential_used(self, credential: UpstreamCredential) -> None:
        """Nothing counts environment credentials."""

    def credential_rejected(
        self, credential: UpstreamCredential
    ) -> Deferred[UpstreamCredential | None]:
        return succeed(None)

    def describe(self) -> Deferred[str | None]:
        return succeed(_describe(self._credential) if self._credential else None)

    def __repr__(self) -> str:
        kind = self._credential.kind.value if self._credential else "none"
        return f"<EnvironmentCredentialSource credential={kind}>"


@implementer(ICredentialSource)
class BrokerCredentialSource:
    """
    The proxy's environment first (C{ANTHROPIC_API_KEY}, then
    C{CLAUDE_CODE_OAUTH_TOKEN}, read once, as L{EnvironmentCredentialSource}
    does), then the broker's stores, read on every request: the API key named
    C{key_name}, then the OAuth token of C{provider} in C{bucket}.

    The environment wins because it is the most explicit setting, made for
    this one process. A stored token is refreshed by the broker before it
    expires (L{TOKEN_MIN_VALIDITY}), counted per request against its bucket,
    and replaced once when the upstream refuses it. When it can no longer be
    refreshed, requests fail with L{CredentialUnavailable} telling the user
    to log in again on the host.
    """

    def __init__(
        self,
        broker: Broker,
        *,
        environ: Mapping[str, str] = os.environ,
        bucket: str = DEFAULT_BUCKET,
        key_name: str = "anthropic",
        provider: str = "anthropic",
    ) -> None:
        self._broker = broker
        self._environment = EnvironmentCredentialSource(environ)
        self._from_environment = self._environment.credential
        self._bucket = bucket
        self._key_name = key_name
        self._provider = provider
        self._token_source = f"the token store ({provider}, bucket {bucket})"
        self._key_source = f"the key store ({key_name})"

    def login_advice(self, provider: str | None = None) -> str:
        return f"run `credproxy login {provider or self._provider}` on the host"

    def __repr__(self) -> str:
        kind = self._from_environment.kind.value if self._from_environment else "none"
        return (
            f"<BrokerCredentialSource environment={kind} key={self._key_name}"
            f" provider={self._provider} bucket={self._bucket}>"
        )

    # -- ICredentialSource ----------------------------------------------------------

    def current_credential(self) -> Deferred[UpstreamCredential | None]:
        if self._from_environment is not None:
            return succeed(self._from_environment)
        return Deferred.fromCoroutine(self._stored()).addErrback(_store_unreadable)

    def how_to_configure(self) -> str:
        return (
            f"{self.login_advice()}; or {self._environment.how_to_configure()};"
            f" or store an API key named {self._key_name!r}"
        )

    def credential_used(self, credential: UpstreamCredential) -> None:
        if credential.provider is not None:
            self._broker.record_request(credential.provider, credential.bucket)

    def credential_rejected(
        self, credential: UpstreamCredential
    ) -> Deferred[UpstreamCredential | None]:
        if not credential.replaceable:
            return succeed(None)
        return Deferred.fromCoroutine(self._replace(credential))

    def describe(self) -> Deferred[str | None]:
        if self._from_environment is not None:
            return succeed(_describe(self._from_environment))
        return Deferred.fromCoroutine(self._describe_stored()).addErrback(_store_unreadable)

    # -- the stores -----------------------------------------------------------------

    async def _stored(self) -> UpstreamCredential | None:
        key = await self._broker.get_key(self._key_name)
        if key:
            return UpstreamCredential(CredentialKind.API_KEY, key, self._key_source)
        try:
            token = await self._broker.fresh_token(self._provider, self._bucket, TOKEN_MIN_VALIDITY)
        except RefreshError as error:
            raise self._unavailable(self._provider, self._bucket, error) from None
        if token is None:
            return None
        return self._token_credential(self._provider, self._bucket, token)

    async def _replace(self, credential: UpstreamCredential) -> UpstreamCredential:
        provider = credential.provider
        assert provider is not None  # replaceable
        bucket = credential.bucket or DEFAULT_BUCKET
        try:
            token = await self._broker.replace_rejected(
                provider, bucket, credential.secret.reveal()
            )
        except RefreshError as error:
            raise self._unavailable(provider, bucket, error) from None
        # Within the broker's cooldown after a refresh this may be the refused
        # token itself; the replay then earns the upstream's second refusal,
        # which reaches the agent as the upstream sent it.
        return self._token_credential(provider, bucket, token)

    def _token_credential(self, provider: str, bucket: str, token: Token) -> UpstreamCredential:
        access = token.access_token
        if access is None:
            raise self._unavailable(
                provider,
                bucket,
                RefreshError(RefreshFailure.REAUTH_REQUIRED, "stored token has no access token"),
            )
        return UpstreamCredential(
            CredentialKind.OAUTH, Secret(access), self._token_source, provider, bucket
        )

    def _unavailable(
        self, provider: str, bucket: str, error: RefreshError
    ) -> CredentialUnavailable:
        """
        The agent's view of a failed refresh: credproxy's own words and the
        failure's fixed code, never the provider's text.
        """
        reason = error.reason.value
        log.warn(
            "The stored OAuth token of {provider} (bucket {bucket}) is unusable: {reason}",
            provider=provider,
            bucket=bucket,
            reason=reason,
        )
        if error.reason in _TRANSIENT_FAILURES:
            return CredentialUnavailable(
                f"credproxy could not refresh its OAuth token for {provider} just now"
                f" ({reason}); try again shortly.",
                reason=reason,
                transient=True,
                retry_after=error.retry_after,
            )
        return CredentialUnavailable(
            f"credproxy's OAuth login for {provider} can no longer be used ({reason}):"
            f" {self.login_advice(provider)}.",
            reason=reason,
        )

    async def _describe_stored(self) -> str | None:
        if await self._broker.get_key(self._key_name):
            return f"an API key from {self._key_source}"
        token = await self._broker.get_token(self._provider, self._bucket)
        if token is None or token.access_token is None:
            return None
        if token.refresh_token is not None:
            renewal = "refreshed by credproxy before it expires"
        else:
            renewal = f"without a refresh token ({self.login_advice()} when it expires)"
        return f"an OAuth token from {self._token_source}, {renewal}"


def _store_unreadable(failure: Failure) -> NoReturn:
    """
    A store that cannot be read (a corrupt file, a Secret Service that does
    not answer) is a failure of the moment for the agent, told in
    credproxy's words; the store's own safe message goes to the log.
    """
    failure.trap(StoreError)
    down = failure.check(StoreDown) is not None
    # An outage of a shared store is logged by the store, once; not per request.
    emit = log.debug if down else log.error
    emit("The credential store cannot be read: {error}", error=str(failure.value))
    raise CredentialUnavailable(
        "credproxy could not read its credential store; see its log on the host.",
        reason=STORE_UNAVAILABLE if down else STORE_UNREADABLE,
        transient=True,
    )


@implementer(ICredentialSource)
class FirstAvailableCredentialSource:
    """
    Asks each source in turn and uses the first credential found. Use and
    rejection of a credential are reported to the source that gave it.
    """

    def __init__(self, sources: Sequence[ICredentialSource]) -> None:
        self._sources = tuple(sources)
        self._origins: weakref.WeakKeyDictionary[UpstreamCredential, ICredentialSource] = (
            weakref.WeakKeyDictionary()
        )

    async def _first(self) -> UpstreamCredential | None:
        for source in self._sources:
            credential = await source.current_credential()
            if credential is not None:
                self._origins[credential] = source
                return credential
        return None

    def current_credential(self) -> Deferred[UpstreamCredential | None]:
        return Deferred.fromCoroutine(self._first())

    def how_to_configure(self) -> str:
        return "; or ".join(source.how_to_configure() for source in self._sources)

    def credential_used(self, credential: UpstreamCredential) -> None:
        origin = self._origins.get(credential)
        if origin is not None:
            origin.credential_used(credential)

    def credential_rejected(
        self, credential: UpstreamCredential
    ) -> Deferred[UpstreamCredential | None]:
        origin = self._origins.get(credential)
        if origin is None:
            return succeed(None)
        return Deferred.fromCoroutine(self._replace(origin, credential))

    async def _replace(
        self, origin: ICredentialSource, credential: UpstreamCredential
    ) -> UpstreamCredential | None:
        replacement = await origin.credential_rejected(credential)
        if replacement is not None:
            self._origins[replacement] = origin
        return replacement

    async def _describe(self) -> str | None:
        for source in self._sources:
            described = await source.describe()
            if described:
                return described
        return None

    def describe(self) -> Deferred[str | None]:
        return Deferred.fromCoroutine(self._describe())
