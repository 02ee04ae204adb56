"""
credproxy: a credential broker for AI-agent sandboxes.

The public surface is what this module exports; everything in a C{_module} is
private. C{credproxy.http}, C{credproxy.wire} (the credential socket, server and
clients), C{credproxy.broker} (stores, refresh, renewal, login),
C{credproxy.stores}, C{credproxy.oauth} (token-endpoint flows),
C{credproxy.inner} (the sandbox side) and C{credproxy.testing} (doubles for
tests) export their own names.
"""

from credproxy._audit_trail import AuditLogError, FileAuditTrail, IAuditTrail, LogAuditTrail
from credproxy._limits import ConnectionLimits
from credproxy._secret import Secret, read_secret_file
from credproxy.broker import Broker, SandboxPolicy
from credproxy.broker.credentials import (
    BrokerCredentialSource,
    CredentialKind,
    EnvironmentCredentialSource,
    FirstAvailableCredentialSource,
    ICredentialSource,
    UpstreamCredential,
)
from credproxy.http import HTTPFace, HTTPProxyConfig, build_proxy_site
from credproxy.service import BrokerConfig, CredproxyConfig, CredproxyService
from credproxy.wire import RPCFace

__all__ = [
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
