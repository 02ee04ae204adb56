"""
OAuth providers from a TOML file.

The built-in C{anthropic} provider needs no file: C{[oauth.anthropic]} only
overrides its public defaults. Any other C{[oauth.<name>]} table names its
C{flow} (C{device_code}, or C{pkce} for another code-paste provider) and all
of its settings. A bad file fails with one line naming the key at fault and
never repeating a value, since a value may be a client secret.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IAgent

from credproxy._secret import Secret
from credproxy.oauth._anthropic import ANTHROPIC, AnthropicPKCEProvider, PKCEProviderConfig
from credproxy.oauth._device import DeviceCodeProvider, DeviceCodeProviderConfig
from credproxy.oauth._http import endpoint_url_problem
from credproxy.oauth._interfaces import IOAuthProvider

# A provider list is a few hundred bytes; refuse to parse a huge file.
MAX_CONFIG_BYTES = 1024 * 1024

FLOW_PKCE = "pkce"
FLOW_DEVICE_CODE = "device_code"

ProviderConfig = PKCEProviderConfig | DeviceCodeProviderConfig

_PROVIDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")
_TOML_POSITION = re.compile(r"\((at line \d+, column \d+|at end of document)\)\s*\Z")

_PKCE_KEYS = ("flow", "authorize_url", "token_url", "client_id", "redirect_uri", "scopes")
_DEVICE_REQUIRED = ("device_authorization_url", "token_url", "client_id")
_DEVICE_KEYS = ("flow", *_DEVICE_REQUIRED, "scopes", "client_secret")


class OAuthConfigError(ValueError):
    """
    The OAuth configuration is unusable. The message is one line naming the
    file or key at fault, never a value.
    """


@dataclass(frozen=True)
class OAuthConfig:
    """
    The configured providers by name; C{anthropic} is always among them.
    """

    providers: Mapping[str, ProviderConfig] = field(
        default_factory=lambda: MappingProxyType({ANTHROPIC.name: ANTHROPIC})
    )


def default_oauth_config() -> OAuthConfig:
    """
    The configuration without a file: the built-in C{anthropic} provider.
    """
    return OAuthConfig()


def _show(part: str) -> str:
    return part if _BARE_KEY.match(part) else json.dumps(part)


def _key(*parts: str) -> str:
    return ".".join(_show(p) for p in parts)


def _fail(path: tuple[str, ...], message: str) -> OAuthConfigError:
    return OAuthConfigError(f"{_key(*path)}: {message}")


def _string(table: Mapping[str, Any], path: tuple[str, ...]) -> str:
    value = table[path[-1]]
    if not isinstance(value, str):
        raise _fail(path, "must be a string")
    if not value or not value.isprintable() or value != value.strip():
        raise _fail(path, "must be a non-empty string without spaces around it")
    return value


def _url(table: Mapping[str, Any], path: tuple[str, ...]) -> str:
    if not isinstance(table[path[-1]], str):
        raise _fail(path, "must be a string")
    problem = endpoint_url_problem(table[path[-1]])
    if problem is not None:
        raise _fail(path, problem)
    return str(table[path[-1]])


def _scopes(table: Mapping[str, Any], path: tuple[str, ...]) -> tuple[str, ...]:
    value = table[path[-1]]
    if not isinstance(value, list) or not all(
        isinstance(s, str) and s and s.isprintable() and not any(c.isspace() for c in s)
        for s in value
    ):
        raise _fail(path, "must be a list of scope names (strings without spaces)")
    return tuple(value)


_PKCE_READERS: dict[str, Callable[[Mapping[str, Any], tuple[str, ...]], Any]] = {
    "client_id": _string,
    "scopes": _scopes,
}


def _check_keys(
    table: Mapping[str, Any],
    path: tuple[str, ...],
    allowed: tuple[str, ...],
    required: tuple[str, ...],
) -> None:
    for key in table:
        if key not in allowed:
            raise _fail((*path, key), "unknown key")
    for key in required:
        if key not in table:
            raise _fail((*path, key), "missing (required)")


def _pkce(name: str, table: Mapping[str, Any], base: PKCEProviderConfig | None) -> ProviderConfig:
    path = ("oauth", name)
    _check_keys(table, path, _PKCE_KEYS, () if base is not None else _PKCE_KEYS[1:])
    settings: dict[str, Any] = {}
    for key in _PKCE_KEYS[1:]:
        if key in table:
            settings[key] = _PKCE_READERS.get(key, _url)(table, (*path, key))
    if base is not None:
        return replace(base, **settings)
    return PKCEProviderConfig(name=name, **settings)


def _device(name: str, table: Mapping[str, Any]) -> ProviderConfig:
    path = ("oauth", name)
    _check_keys(table, path, _DEVICE_KEYS, _DEVICE_REQUIRED)
    secret = None
    if "client_secret" in table:
        if not isinstance(table["client_secret"], str) or not table["client_secret"]:
            raise _fail((*path, "client_secret"), "must be a non-empty string")
        secret = Secret(table["client_secret"])
    return DeviceCodeProviderConfig(
        name=name,
        device_authorization_url=_url(table, (*path, "device_authorization_url")),
        token_url=_url(table, (*path, "token_url")),
        client_id=_string(table, (*path, "client_id")),
        scopes=_scopes(table, (*path, "scopes")) if "scopes" in table else (),
        client_secret=secret,
    )


def _provider(name: str, table: object) -> ProviderConfig:
    path = ("oauth", name)
    if not _PROVIDER_NAME.match(name):
        raise _fail(path, "invalid provider name (letters, digits, '.', '_', '-'; at most 64)")
    if not isinstance(table, dict):
        raise _fail(path, "must be a table")
    builtin = name == ANTHROPIC.name
    flow = table.get("flow", FLOW_PKCE if builtin else None)
    if flow is None:
        raise _fail((*path, "flow"), f'missing (required: "{FLOW_DEVICE_CODE}" or "{FLOW_PKCE}")')
    if not isinstance(flow, str):
        raise _fail((*path, "flow"), "must be a string")
    if builtin and flow != FLOW_PKCE:
        raise _fail((*path, "flow"), f'the built-in provider\'s flow is "{FLOW_PKCE}"')
    if flow == FLOW_PKCE:
        return _pkce(name, table, ANTHROPIC if builtin else None)
    if flow == FLOW_DEVICE_CODE:
        return _device(name, table)
    raise _fail((*path, "flow"), f'unknown flow (expected "{FLOW_DEVICE_CODE}" or "{FLOW_PKCE}")')


def oauth_config_from_document(document: Mapping[str, Any]) -> OAuthConfig:
    """
    The configuration in a parsed TOML document whose only top-level key is
    C{oauth} (for callers that read the TOML themselves).

    @raise OAuthConfigError: naming the first key at fault.
    """
    for key in document:
        if key != "oauth":
            raise _fail((key,), "unknown key")
    tables = document.get("oauth", {})
    if not isinstance(tables, dict):
        raise _fail(("oauth",), "must be a table")
    providers: dict[str, ProviderConfig] = {ANTHROPIC.name: ANTHROPIC}
    for name, table in tables.items():
        providers[name] = _provider(name, table)
    return OAuthConfig(MappingProxyType(providers))


def _source(path: str) -> str:
    return path if path.isprintable() else json.dumps(path)


def parse_oauth_config(text: str, source: str = "<oauth config>") -> OAuthConfig:
    """
    The configuration in TOML C{text}; C{source} names it in a syntax error,
    which gives the line and column but none of the text.

    @raise OAuthConfigError: for invalid TOML or any key at fault.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        position = _TOML_POSITION.search(str(e))
        where = f" ({position.group(1)})" if position else ""
        raise OAuthConfigError(f"{_source(source)}: invalid TOML{where}") from None
    return oauth_config_from_document(document)


def load_oauth_config(path: str | None) -> OAuthConfig:
    """
    The configuration in the TOML file at C{path}, or the defaults when
    C{path} is None.

    @raise OAuthConfigError: when the file cannot be read, is larger than
        L{MAX_CONFIG_BYTES}, is not UTF-8 TOML, or has a key at fault.
    """
    if path is None:
        return default_oauth_config()
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise OAuthConfigError(f"{_source(path)}: {e.strerror or 'cannot be read'}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise OAuthConfigError(f"{_source(path)}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise OAuthConfigError(f"{_source(path)}: not UTF-8") from None
    return parse_oauth_config(text, path)


def build_providers(
    config: OAuthConfig, reactor: IReactorTime, agent: IAgent
) -> dict[str, IOAuthProvider]:
    """
    One provider per configured entry, all calling out through C{agent}
    (see L{default_oauth_agent}) with deadlines on C{reactor}.
    """
    providers: dict[str, IOAuthProvider] = {}
    for name, settings in config.providers.items():
        if isinstance(settings, PKCEProviderConfig):
            providers[name] = AnthropicPKCEProvider(settings, reactor, agent)
        else:
            providers[name] = DeviceCodeProvider(settings, reactor, agent)
    return providers
