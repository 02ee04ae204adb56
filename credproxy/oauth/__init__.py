"""
OAuth for the broker: the provider interfaces, the Anthropic code-paste
(PKCE) provider, RFC 8628 device-code providers, and their TOML config.
"""

from credproxy.oauth._anthropic import (
    ANTHROPIC,
    AnthropicPKCEProvider,
    PKCEProviderConfig,
    s256_challenge,
)
from credproxy.oauth._config import (
    MAX_CONFIG_BYTES,
    OAuthConfig,
    OAuthConfigError,
    ProviderConfig,
    build_providers,
    default_oauth_config,
    load_oauth_config,
    oauth_config_from_document,
    parse_oauth_config,
)
from credproxy.oauth._device import (
    DEFAULT_INTERVAL,
    DEVICE_CODE_GRANT,
    DeviceCodeProvider,
    DeviceCodeProviderConfig,
)
from credproxy.oauth._http import (
    CONNECT_TIMEOUT,
    DEFAULT_EXPIRES_IN,
    MAX_ANSWER_BYTES,
    TOKEN_CALL_DEADLINE,
    Detail,
    default_oauth_agent,
)
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

__all__ = [
    "ANTHROPIC",
    "CONNECT_TIMEOUT",
    "DEFAULT_EXPIRES_IN",
    "DEFAULT_INTERVAL",
    "DEVICE_CODE_GRANT",
    "MAX_ANSWER_BYTES",
    "MAX_CONFIG_BYTES",
    "TOKEN_CALL_DEADLINE",
    "AnthropicPKCEProvider",
    "Detail",
    "DeviceCodeProvider",
    "DeviceCodeProviderConfig",
    "DeviceLogin",
    "FlowType",
    "IDeviceCodeProvider",
    "IOAuthProvider",
    "IPKCEProvider",
    "OAuthConfig",
    "OAuthConfigError",
    "OAuthError",
    "OAuthErrorKind",
    "PKCELogin",
    "PKCEProviderConfig",
    "ProviderConfig",
    "build_providers",
    "default_oauth_agent",
    "default_oauth_config",
    "load_oauth_config",
    "oauth_config_from_document",
    "parse_oauth_config",
    "s256_challenge",
]
