"""
What an OAuth provider does for the broker, whichever flow it speaks. The
broker refreshes through L{IOAuthProvider}, and logs in through
L{IPKCEProvider} (code paste) or L{IDeviceCodeProvider} (RFC 8628).

Providers talk to token endpoints; they never store anything. Every token
they return carries an absolute C{expiry} (Unix seconds, from the injected
clock), so callers never see C{expires_in}.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from credproxy._secret import Secret
from credproxy.stores._token import Token


class FlowType(enum.StrEnum):
    """
    The C{flow_type} an C{oauth_initiate} answer names.
    """

    PKCE_REDIRECT = "pkce_redirect"
    DEVICE_CODE = "device_code"


class OAuthErrorKind(enum.Enum):
    """
    Why a token-endpoint call did not give a token. Callers decide on the kind
    alone; a provider's own error text never travels further.
    """

    TRANSIENT = "transient"  # connection failure, timeout, 5xx, 429: a retry may succeed
    INVALID_GRANT = "invalid_grant"  # the refresh token or code was rejected (rotated, reused)
    REJECTED = "rejected"  # any other refusal, or an answer that is not a usable token
    PENDING = "authorization_pending"  # device flow: the user has not approved yet
    SLOW_DOWN = "slow_down"  # device flow: poll less often
    ACCESS_DENIED = "access_denied"  # device flow: the user said no
    EXPIRED = "expired_token"  # device flow: the device code ran out


class OAuthError(Exception):
    """
    A token-endpoint call failed. C{detail} is safe to log: an HTTP status or
    one of a fixed set of error names, never the provider's text.
    """

    def __init__(self, kind: OAuthErrorKind, detail: str = "") -> None:
        super().__init__(kind.value if not detail else f"{kind.value}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class PKCELogin:
    """
    A started code-paste login: the URL to show, and what the exchange needs.
    The URL carries the state, so the repr leaves it out.
    """

    auth_url: str = field(repr=False)
    state: Secret
    verifier: Secret
    redirect_uri: str


@dataclass(frozen=True)
class DeviceLogin:
    """
    A started device-code login (RFC 8628 section 3.2). The user code (also
    inside the complete URI) is for the user's eyes, not for logs.
    """

    device_code: Secret
    user_code: str = field(repr=False)
    verification_uri: str
    verification_uri_complete: str | None = field(repr=False)
    interval: float  # seconds between polls
    expires_in: float  # seconds the device code lives


class IOAuthProvider(Interface):
    """
    A configured provider: its name, its login flow, and refresh.
    """

    name = Attribute("The provider name tokens are stored under (C{anthropic}).")
    flow = Attribute("The L{FlowType} of its login.")

    def refresh(refresh_token: Secret) -> Deferred[Token]:
        """
        Exchange a refresh token for a new token (which may hold a rotated
        refresh token). Fails with L{OAuthError}.
        """


class IPKCEProvider(IOAuthProvider):
    """
    Authorization code with PKCE (S256) and state; the user pastes C{code#state}.
    """

    def begin(redirect_uri: str | None = None) -> PKCELogin:
        """
        A fresh verifier and state, and the authorization URL built from them.
        """

    def exchange(login: PKCELogin, code: Secret) -> Deferred[Token]:
        """
        Trade the pasted code for a token. Fails with L{OAuthError}.
        """


class IDeviceCodeProvider(IOAuthProvider):
    """
    The RFC 8628 device authorization grant.
    """

    def begin() -> Deferred[DeviceLogin]:
        """
        Ask the device authorization endpoint for a device and user code.
        Fails with L{OAuthError}.
        """

    def poll(device_code: Secret) -> Deferred[Token]:
        """
        Ask the token endpoint once. Fails with L{OAuthError} of kind
        C{PENDING}, C{SLOW_DOWN}, C{ACCESS_DENIED} or C{EXPIRED} while no
        token is issued.
        """
