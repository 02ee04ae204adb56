"""
The public surface is pinned: a change to it is a deliberate edit here.
"""

from __future__ import annotations

import credproxy
import credproxy.broker
import credproxy.http
import credproxy.inner
import credproxy.oauth
import credproxy.stores
import credproxy.testing
import credproxy.wire


def test_top_level_exports() -> None:
    assert sorted(credproxy.__all__) == [
        "AuditLogError",
        "Broker",
        "BrokerConfig",
        "BrokerCredentialSource",
        "ConnectionLimits",
        "CredentialKind",
        "CredproxyConfig",
        "CredproxyService",
        "EnvironmentCredentialSource",
        "FileAuditTrail",
        "FirstAvailableCredentialSource",
        "HTTPFace",
        "HTTPProxyConfig",
        "IAuditTrail",
        "ICredentialSource",
        "LogAuditTrail",
        "RPCFace",
        "SandboxPolicy",
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
        "BlockingCalls",
        "BucketStats",
        "DEFAULT_BUCKET",
        "FileProviderKeyStore",
        "FileTokenStore",
        "HostStores",
        "IBlockingCalls",
        "ICompareAndSetTokenStore",
        "IHostProviderKeyStore",
        "IHostTokenStore",
        "IProviderKeyStore",
        "ITokenStore",
        "KeyringProviderKeyStore",
        "KeyringTokenStore",
        "MemoryProviderKeyStore",
        "MemoryTokenStore",
        "RedisConnection",
        "RedisProviderKeyStore",
        "RedisStoreConfig",
        "RedisTokenStore",
        "RequestCounters",
        "STORE_KINDS",
        "StoreCorrupt",
        "StoreDown",
        "StoreError",
        "StoreNotRunning",
        "StoreTimeout",
        "StoreUnavailable",
        "Token",
        "default_state_dir",
        "is_redis_url",
        "open_host_stores",
        "usable_keyring",
    ]
    for name in credproxy.stores.__all__:
        assert getattr(credproxy.stores, name) is not None


def test_broker_exports() -> None:
    assert sorted(credproxy.broker.__all__) == [
        "Broker",
        "BrokerCredentialSource",
        "CredentialKind",
        "CredentialUnavailable",
        "EnvironmentCredentialSource",
        "FileRefreshLock",
        "FirstAvailableCredentialSource",
        "ICredentialSource",
        "IHeldLock",
        "IRefreshLock",
        "InProcessRefreshLock",
        "InitiatedLogin",
        "LoginError",
        "LoginFailure",
        "LoginSessions",
        "PollResult",
        "RedisRefreshLock",
        "RefreshCoordinator",
        "RefreshError",
        "RefreshFailure",
        "RefreshLockError",
        "RefreshLockTimeout",
        "RenewalScheduler",
        "SandboxPolicy",
        "UpstreamCredential",
    ]
    for name in credproxy.broker.__all__:
        assert getattr(credproxy.broker, name) is not None


def test_oauth_exports() -> None:
    assert sorted(credproxy.oauth.__all__) == [
        "ANTHROPIC",
        "AnthropicPKCEProvider",
        "CONNECT_TIMEOUT",
        "DEFAULT_EXPIRES_IN",
        "DEFAULT_INTERVAL",
        "DEVICE_CODE_GRANT",
        "Detail",
        "DeviceCodeProvider",
        "DeviceCodeProviderConfig",
        "DeviceLogin",
        "FlowType",
        "IDeviceCodeProvider",
        "IOAuthProvider",
        "IPKCEProvider",
        "MAX_ANSWER_BYTES",
        "MAX_CONFIG_BYTES",
        "OAuthConfig",
        "OAuthConfigError",
        "OAuthError",
        "OAuthErrorKind",
        "PKCELogin",
        "PKCEProviderConfig",
        "ProviderConfig",
        "TOKEN_CALL_DEADLINE",
        "build_providers",
        "default_oauth_agent",
        "default_oauth_config",
        "load_oauth_config",
        "oauth_config_from_document",
        "parse_oauth_config",
        "s256_challenge",
    ]
    for name in credproxy.oauth.__all__:
        assert getattr(credproxy.oauth, name) is not None


def test_testing_exports() -> None:
    assert sorted(credproxy.testing.__all__) == [
        "AgentConnection",
        "AgentTransport",
        "FaceHarness",
        "FakeOAuthServer",
        "InlineBlockingCalls",
        "RawResponse",
        "ReceivedRequest",
        "ScriptedResponse",
        "ScriptedUpstream",
        "UpstreamRequest",
        "parse_responses",
    ]
    for name in credproxy.testing.__all__:
        assert getattr(credproxy.testing, name) is not None


def test_inner_exports() -> None:
    assert sorted(credproxy.inner.__all__) == sorted(
        [
            "BlockingProviderKeyStore",
            "BlockingProxyProviderKeyStorage",
            "BlockingProxyTokenStore",
            "BlockingTokenStore",
            "CAPABILITY_TOKEN_FD_ENV",
            "CAPABILITY_TOKEN_FILE_ENV",
            "ILoginBackend",
            "ILoginTerminal",
            "LOGIN_SESSION_LIFETIME",
            "LineTooLong",
            "LoginAdapter",
            "LoginExpired",
            "NoCodePasted",
            "ProxyProviderKeyStorage",
            "ProxyTokenStore",
            "STORE_ENV",
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
    )
