"""
The public surface is pinned: a change to it is a deliberate edit here.
"""

from __future__ import annotations

import credproxy
import credproxy.http
import credproxy.inner
import credproxy.stores
import credproxy.wire


def test_top_level_exports() -> None:
    assert sorted(credproxy.__all__) == [
        "CredentialKind",
        "CredproxyConfig",
        "CredproxyService",
        "EnvironmentCredentialSource",
        "FirstAvailableCredentialSource",
        "HTTPFace",
        "HTTPProxyConfig",
        "ICredentialSource",
        "RPCFace",
        "Secret",
        "UpstreamCredential",
        "build_proxy_site",
        "read_secret_file",
    ]
    for name in credproxy.__all__:
        assert getattr(credproxy, name) is not None


def test_http_exports() -> None:
    assert sorted(credproxy.http.__all__) == [
        "ErrorKind",
        "FORWARDED_PATHS",
        "HTTPFace",
        "HTTPFaceConfigError",
        "HTTPProxyConfig",
        "ProxySite",
        "build_proxy_site",
    ]


def test_wire_exports() -> None:
    assert sorted(credproxy.wire.__all__) == [
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
    for name in credproxy.wire.__all__:
        assert getattr(credproxy.wire, name) is not None


def test_stores_exports() -> None:
    assert sorted(credproxy.stores.__all__) == [
        "BucketStats",
        "DEFAULT_BUCKET",
        "IProviderKeyStore",
        "ITokenStore",
        "MemoryProviderKeyStore",
        "MemoryTokenStore",
    ]


def test_inner_exports() -> None:
    assert sorted(credproxy.inner.__all__) == sorted(
        [
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
    )
