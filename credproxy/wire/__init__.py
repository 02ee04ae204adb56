"""
The credential socket: the length-prefixed JSON protocol of llxprt-code's
sandbox credential proxy (docs/wire.md). The server side is L{RPCFace} (or
L{CredentialServerFactory} on endpoints of your own); the sandbox side is
L{ProxySocketClient} under a reactor and L{BlockingProxySocketClient}
without one.
"""

from credproxy.wire._blocking_client import BlockingProxySocketClient
from credproxy.wire._client import ProxySocketClient
from credproxy.wire._client_errors import (
    FrameTooLargeError,
    ProtocolViolation,
    ProxyClientClosed,
    ProxyClientError,
    ProxyConnectionLost,
    ProxyRequestError,
    ProxyTimeoutError,
)
from credproxy.wire._face import RPCFace, RPCFaceConfigError
from credproxy.wire._server import CredentialServerFactory, CredentialServerProtocol
from credproxy.wire._spec import ErrorCode, Op

__all__ = [
    "BlockingProxySocketClient",
    "CredentialServerFactory",
    "CredentialServerProtocol",
    "ErrorCode",
    "FrameTooLargeError",
    "Op",
    "ProtocolViolation",
    "ProxyClientClosed",
    "ProxyClientError",
    "ProxyConnectionLost",
    "ProxyRequestError",
    "ProxySocketClient",
    "ProxyTimeoutError",
    "RPCFace",
    "RPCFaceConfigError",
]
