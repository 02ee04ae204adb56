"""
The sandbox side of the credential socket: token and key stores that ask the
host over the socket (Twisted and blocking flavours), and reading the socket
path and capability token from the environment. See docs/inner.md.
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
from credproxy.inner._stores import ProxyProviderKeyStorage, ProxyTokenStore

__all__ = [
    "CAPABILITY_TOKEN_FD_ENV",
    "CAPABILITY_TOKEN_FILE_ENV",
    "BlockingProxyProviderKeyStorage",
    "BlockingProxyTokenStore",
    "ProxyProviderKeyStorage",
    "ProxyTokenStore",
    "SandboxKeyManagementError",
    "read_capability_token",
    "socket_path_from_environment",
    "take_capability_token",
]
