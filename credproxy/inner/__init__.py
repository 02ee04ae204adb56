"""
The sandbox side of the credential socket: token and key stores that ask the
host over the socket (Twisted and blocking flavours), reading the socket
path and capability token from the environment, the factories that hand out
this process's stores (proxy-backed in a sandbox, the host's own otherwise),
and logging in from a terminal. See docs/inner.md.
"""

from credproxy.inner._answers import SandboxKeyManagementError
from credproxy.inner._blocking_stores import (
    BlockingProxyProviderKeyStorage,
    BlockingProxyTokenStore,
)
from credproxy.inner._environment import (
    CAPABILITY_TOKEN_FD_ENV,
    CAPABILITY_TOKEN_FILE_ENV,
    read_capability_token,
    socket_path_from_environment,
    take_capability_token,
)
from credproxy.inner._factories import (
    STORE_ENV,
    BlockingProviderKeyStore,
    BlockingTokenStore,
    create_blocking_provider_key_storage,
    create_blocking_token_store,
    create_login_backend,
    create_provider_key_storage,
    create_token_store,
    renewal_enabled,
    reset_store_factories,
)
from credproxy.inner._login import (
    LOGIN_SESSION_LIFETIME,
    ILoginBackend,
    ILoginTerminal,
    LineTooLong,
    LoginAdapter,
    LoginExpired,
    NoCodePasted,
    SocketLoginBackend,
    StdioTerminal,
    TerminalClosed,
    UnexpectedLoginAnswer,
)
from credproxy.inner._stores import ProxyProviderKeyStorage, ProxyTokenStore

__all__ = [
    "CAPABILITY_TOKEN_FD_ENV",
    "CAPABILITY_TOKEN_FILE_ENV",
    "LOGIN_SESSION_LIFETIME",
    "STORE_ENV",
    "BlockingProviderKeyStore",
    "BlockingProxyProviderKeyStorage",
    "BlockingProxyTokenStore",
    "BlockingTokenStore",
    "ILoginBackend",
    "ILoginTerminal",
    "LineTooLong",
    "LoginAdapter",
    "LoginExpired",
    "NoCodePasted",
    "ProxyProviderKeyStorage",
    "ProxyTokenStore",
    "SandboxKeyManagementError",
    "SocketLoginBackend",
    "StdioTerminal",
    "TerminalClosed",
    "UnexpectedLoginAnswer",
    "create_blocking_provider_key_storage",
    "create_blocking_token_store",
    "create_login_backend",
    "create_provider_key_storage",
    "create_token_store",
    "read_capability_token",
    "renewal_enabled",
    "reset_store_factories",
    "socket_path_from_environment",
    "take_capability_token",
]
