"""
Anthropic's login: authorization code with PKCE (S256) and state, where the
callback page shows the user C{code#state} to paste back, and JSON token
requests. Any provider built the same way can use it with its own settings.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass
from urllib.parse import quote, urlencode, urlsplit

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IAgent
from zope.interface import implementer

from credproxy._secret import Secret
from credproxy.oauth._http import (
    BodyEncoding,
    Detail,
    TokenEndpointClient,
    endpoint_url_problem,
    is_loopback_host,
    token_from_answer,
)
from credproxy.oauth._interfaces import (
    FlowType,
    IPKCEProvider,
    OAuthError,
    OAuthErrorKind,
    PKCELogin,
)
from credproxy.stores._token import Token

# RFC 7636 asks for 43 to 128 characters; 48 random bytes give 64.
VERIFIER_BYTES = 48
# The state is compared on the way back; 32 random bytes cannot be guessed.
STATE_BYTES = 32


@dataclass(frozen=True)
class PKCEProviderConfig:
    """
    The settings of a code-paste PKCE provider. Endpoint URLs are checked
    here too, so a provider built without the config file is as safe.
    """

    name: str
    authorize_url: str
    token_url: str
    client_id: str
    redirect_uri: str
    scopes: tuple[str, ...]

    def __post_init__(self) -> None:
        for key in ("authorize_url", "token_url"):
            problem = endpoint_url_problem(getattr(self, key))
            if problem is not None:
                raise ValueError(f"{key}: {problem}")


ANTHROPIC = PKCEProviderConfig(
    name="anthropic",
    authorize_url="https://claude.ai/oauth/authorize",
    token_url="https://console.anthropic.com/v1/oauth/token",  # noqa: S106 - a URL, not a secret
    client_id="9d1c250a-e61b-44d9-88ed-5944d1962f5e",
    redirect_uri="https://console.anthropic.com/oauth/code/callback",
    scopes=("org:create_api_key", "user:profile", "user:inference"),
)


def s256_challenge(verifier: str) -> str:
    """
    The RFC 7636 S256 code challenge: unpadded base64url of SHA-256.
    """
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def split_pasted_code(pasted: str) -> tuple[str, str]:
    """
    The code and state from what the callback page showed (C{code#state}),
    with surrounding whitespace from the paste removed. A missing part is "".
    """
    code, _, state = pasted.strip().partition("#")
    return code.strip(), state.strip()


@implementer(IPKCEProvider)
class AnthropicPKCEProvider:
    """
    Code-paste PKCE login and refresh against Anthropic's token endpoint (or
    any with the same shape), with JSON token requests.
    """

    flow = FlowType.PKCE_REDIRECT

    def __init__(
        self,
        config: PKCEProviderConfig,
        reactor: IReactorTime,
        agent: IAgent,
    ) -> None:
        self.name = config.name
        self.config = config
        self._reactor = reactor
        self._client = TokenEndpointClient(reactor, agent)

    def __repr__(self) -> str:
        return f"<AnthropicPKCEProvider {self.name!r}>"

    def begin(self, redirect_uri: str | None = None) -> PKCELogin:
        """
        A fresh verifier and state, and the authorization URL carrying the
        state and the verifier's S256 challenge (never the verifier).
        """
        redirect = self.config.redirect_uri if redirect_uri is None else redirect_uri
        if not redirect:
            raise ValueError("redirect_uri must not be empty")
        if not _acceptable_redirect(redirect, self.config.redirect_uri):
            # A client (perhaps a sandbox allowed to log in) must not send the
            # user's code to an address of its choosing.
            raise ValueError("redirect_uri is neither the configured one nor a loopback URL")
        verifier = secrets.token_urlsafe(VERIFIER_BYTES)
        state = secrets.token_urlsafe(STATE_BYTES)
        query = urlencode(
            [
                ("code", "true"),
                ("client_id", self.config.client_id),
                ("response_type", "code"),
                ("redirect_uri", redirect),
                ("scope", " ".join(self.config.scopes)),
                ("code_challenge", s256_challenge(verifier)),
                ("code_challenge_method", "S256"),
                ("state", state),
            ],
            quote_via=quote,
        )
        joiner = "&" if urlsplit(self.config.authorize_url).query else "?"
        return PKCELogin(
            auth_url=f"{self.config.authorize_url}{joiner}{query}",
            state=Secret(state),
            verifier=Secret(verifier),
            redirect_uri=redirect,
        )

    def exchange(self, login: PKCELogin, code: Secret) -> Deferred[Token]:
        """
        Trade the pasted C{code#state} for a token. A state that is not the
        login's is refused before anything is sent: the code may have been
        planted by someone else's login (CSRF), and sending it would spend it.
        """
        pasted_code, pasted_state = split_pasted_code(code.reveal())
        if not pasted_code or not login.state.matches(pasted_state):  # constant time
            return fail(OAuthError(OAuthErrorKind.REJECTED, Detail.STATE_MISMATCH))
        return self._token_call(
            {
                "grant_type": "authorization_code",
                "code": Secret(pasted_code),
                "state": login.state,
                "client_id": self.config.client_id,
                "redirect_uri": login.redirect_uri,
                "code_verifier": login.verifier,
            }
        )

    def refresh(self, refresh_token: Secret) -> Deferred[Token]:
        return self._token_call(
            {
                "grant_type": "refresh_token",
                "refresh_token": refresh_token,
                "client_id": self.config.client_id,
            }
        )

    def _token_call(self, fields: dict[str, str | Secret]) -> Deferred[Token]:
        d = self._client.post(self.config.token_url, fields, BodyEncoding.JSON)
        return d.addCallback(lambda answer: token_from_answer(answer, self._reactor.seconds()))


def _acceptable_redirect(redirect: str, configured: str) -> bool:
    """
    The configured redirect URI, or an http(s) URL on a loopback host (the
    native-app redirect of RFC 8252, whose listener runs on this machine).
    """
    if redirect == configured:
        return True
    parts = urlsplit(redirect)
    return parts.scheme in ("http", "https") and is_loopback_host(parts.hostname or "")
