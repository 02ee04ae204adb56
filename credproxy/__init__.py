"""
credproxy: a credential broker for AI-agent sandboxes.

The public surface is what this module exports; everything in a C{_module} is
private. C{credproxy.http}, C{credproxy.wire} (the credential socket, server and
clients), C{credproxy.stores} and C{credproxy.inner} (the sandbox side)
export their own names.
"""

from credproxy._secret import Secret, read_secret_file
from credproxy.broker.credentials import (
    CredentialKind,
    EnvironmentCredentialSource,
    FirstAvailableCredentialSource,
    ICredentialSource,
    UpstreamCredential,
)
from credproxy.http import HTTPFace, HTTPProxyConfig, build_proxy_site
from credproxy.service import CredproxyConfig, CredproxyService
from credproxy.wire import RPCFace

__all__ = [
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
