"""
credproxy: a credential broker for AI-agent sandboxes.

The public surface is what this module exports; everything in a C{_module} is
private. C{credproxy.http} exports the HTTP face's own names.
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

__all__ = [
    "CredentialKind",
    "CredproxyConfig",
    "CredproxyService",
    "EnvironmentCredentialSource",
    "FirstAvailableCredentialSource",
    "HTTPFace",
    "HTTPProxyConfig",
    "ICredentialSource",
    "Secret",
    "UpstreamCredential",
    "build_proxy_site",
    "read_secret_file",
]
