"""
The RFC 8628 device authorization grant, with form-encoded requests as the
RFC has them: ask for a device code and a user code, then poll the token
endpoint until the user approves or the code runs out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IAgent
from zope.interface import implementer

from credproxy._secret import Secret
from credproxy.oauth._http import (
    BodyEncoding,
    Detail,
    TokenEndpointClient,
    endpoint_url_problem,
    positive_number,
    token_from_answer,
)
from credproxy.oauth._interfaces import (
    DeviceLogin,
    FlowType,
    IDeviceCodeProvider,
    OAuthError,
    OAuthErrorKind,
)
from credproxy.stores._token import Token

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# RFC 8628 section 3.2: the interval when the answer names none.
DEFAULT_INTERVAL = 5.0


@dataclass(frozen=True)
class DeviceCodeProviderConfig:
    """
    The settings of an RFC 8628 provider. C{client_secret}, for providers
    that want one even from devices, is sent in the form body.
    """

    name: str
    device_authorization_url: str
    token_url: str
    client_id: str
    scopes: tuple[str, ...] = ()
    client_secret: Secret | None = None

    def __post_init__(self) -> None:
        for key in ("device_authorization_url", "token_url"):
            problem = endpoint_url_problem(getattr(self, key))
            if problem is not None:
                raise ValueError(f"{key}: {problem}")


def _display_text(value: object) -> str | None:
    """
    A string the user is shown, or None: printable only, so an endpoint
    cannot put terminal control sequences in front of the user.
    """
    if isinstance(value, str) and value and value.isprintable():
        return value
    return None


def _display_url(value: object) -> str | None:
    text = _display_text(value)
    if text is None:
        return None
    try:
        parts = urlsplit(text)
    except ValueError:
        return None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return None
    return text


def device_login_from_answer(answer: Mapping[str, Any]) -> DeviceLogin:
    """
    The L{DeviceLogin} in a device authorization answer (RFC 8628 section
    3.2). C{verification_url} is read when C{verification_uri} is absent,
    as some providers name it.

    @raise OAuthError: C{REJECTED} when a field is missing or malformed.
    """
    device_code = answer.get("device_code")
    user_code = _display_text(answer.get("user_code"))
    uri = _display_url(answer.get("verification_uri", answer.get("verification_url")))
    complete_value = answer.get("verification_uri_complete")
    complete = None if complete_value is None else _display_url(complete_value)
    expires_in = positive_number(answer.get("expires_in"))
    interval_value = answer.get("interval")
    interval = DEFAULT_INTERVAL if interval_value is None else positive_number(interval_value)
    if (
        not isinstance(device_code, str)
        or not device_code
        or user_code is None
        or uri is None
        or (complete_value is not None and complete is None)
        or expires_in is None
        or interval is None
    ):
        raise OAuthError(OAuthErrorKind.REJECTED, Detail.BAD_DEVICE_ANSWER)
    return DeviceLogin(
        device_code=Secret(device_code),
        user_code=user_code,
        verification_uri=uri,
        verification_uri_complete=complete,
        interval=interval,
        expires_in=expires_in,
    )


@implementer(IDeviceCodeProvider)
class DeviceCodeProvider:
    """
    Device-code login and refresh against any RFC 8628 provider.
    """

    flow = FlowType.DEVICE_CODE

    def __init__(
        self, config: DeviceCodeProviderConfig, reactor: IReactorTime, agent: IAgent
    ) -> None:
        self.name = config.name
        self.config = config
        self._reactor = reactor
        self._client = TokenEndpointClient(reactor, agent)

    def __repr__(self) -> str:
        return f"<DeviceCodeProvider {self.name!r}>"

    def _client_fields(self) -> dict[str, str | Secret]:
        fields: dict[str, str | Secret] = {"client_id": self.config.client_id}
        if self.config.client_secret is not None:
            fields["client_secret"] = self.config.client_secret
        return fields

    def begin(self) -> Deferred[DeviceLogin]:
        fields = self._client_fields()
        if self.config.scopes:
            fields["scope"] = " ".join(self.config.scopes)
        d = self._client.post(self.config.device_authorization_url, fields, BodyEncoding.FORM)
        return d.addCallback(device_login_from_answer)

    def poll(self, device_code: Secret) -> Deferred[Token]:
        fields: dict[str, str | Secret] = {
            "grant_type": DEVICE_CODE_GRANT,
            "device_code": device_code,
            **self._client_fields(),
        }
        d = self._client.post(self.config.token_url, fields, BodyEncoding.FORM, device_errors=True)
        return d.addCallback(self._token)

    def refresh(self, refresh_token: Secret) -> Deferred[Token]:
        fields: dict[str, str | Secret] = {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            **self._client_fields(),
        }
        d = self._client.post(self.config.token_url, fields, BodyEncoding.FORM)
        return d.addCallback(self._token)

    def _token(self, answer: dict[str, Any]) -> Token:
        return token_from_answer(answer, self._reactor.seconds())
