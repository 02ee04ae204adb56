"""
Where the HTTP face gets the real upstream credential from.

Sources are pluggable (L{ICredentialSource}): the environment today, the
keyring and refreshed OAuth tokens later. The face asks for the current
credential on every request, so a source may rotate it at any time.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from twisted.internet.defer import Deferred, succeed
from zope.interface import Interface, implementer

from credproxy._secret import Secret


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
    """

    kind: CredentialKind
    secret: Secret
    source: str  # where it came from, for logs: "ANTHROPIC_API_KEY", "keyring", ...


class ICredentialSource(Interface):
    """
    Supplies the credential the HTTP face injects upstream.
    """

    def current_credential() -> Deferred[UpstreamCredential | None]:
        """
        The credential to use now, or L{None} when none is configured.
        """

    def how_to_configure() -> str:
        """
        A sentence telling a user how to give this source a credential; it is
        shown in the 401 answered when no credential is configured.
        """


@implementer(ICredentialSource)
class EnvironmentCredentialSource:
    """
    C{ANTHROPIC_API_KEY} (as x-api-key) or else C{CLAUDE_CODE_OAUTH_TOKEN} (as a
    Bearer token), read once from the proxy's own environment.
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

    def current_credential(self) -> Deferred[UpstreamCredential | None]:
        return succeed(self._credential)

    def how_to_configure(self) -> str:
        return (
            f"set {self.API_KEY_VARIABLE} (an API key) or {self.OAUTH_TOKEN_VARIABLE}"
            " (an OAuth access token) in the environment credproxy runs in"
        )

    def __repr__(self) -> str:
        kind = self._credential.kind.value if self._credential else "none"
        return f"<EnvironmentCredentialSource credential={kind}>"


@implementer(ICredentialSource)
class FirstAvailableCredentialSource:
    """
    Asks each source in turn and uses the first credential found.
    """

    def __init__(self, sources: Sequence[ICredentialSource]) -> None:
        self._sources = tuple(sources)

    async def _first(self) -> UpstreamCredential | None:
        for source in self._sources:
            credential = await source.current_credential()
            if credential is not None:
                return credential
        return None

    def current_credential(self) -> Deferred[UpstreamCredential | None]:
        return Deferred.fromCoroutine(self._first())

    def how_to_configure(self) -> str:
        return "; or ".join(source.how_to_configure() for source in self._sources)
