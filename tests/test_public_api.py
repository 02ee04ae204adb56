"""
The public surface is pinned: a change to it is a deliberate edit here.
"""

from __future__ import annotations

import credproxy
import credproxy.http


def test_top_level_exports() -> None:
    assert sorted(credproxy.__all__) == [
        "CredentialKind", "CredproxyConfig", "CredproxyService", "EnvironmentCredentialSource",
        "FirstAvailableCredentialSource", "HTTPFace", "HTTPProxyConfig", "ICredentialSource",
        "Secret", "UpstreamCredential", "build_proxy_site", "read_secret_file",
    ]
    for name in credproxy.__all__:
        assert getattr(credproxy, name) is not None


def test_http_exports() -> None:
    assert sorted(credproxy.http.__all__) == [
        "ErrorKind", "FORWARDED_PATHS", "HTTPFace", "HTTPFaceConfigError", "HTTPProxyConfig",
        "ProxySite", "build_proxy_site",
    ]
