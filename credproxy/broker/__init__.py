"""
The host's credential logic: the broker both faces share (stores, refresh,
renewal, login sessions) and the credential view of the HTTP face. Faces
depend on this package; it never imports a face.

The refresh lock is an interface (L{IRefreshLock}): L{FileRefreshLock}
serves the processes of one host, L{RedisRefreshLock} a fleet on one Redis.
"""

from credproxy.broker._broker import Broker, SandboxPolicy
from credproxy.broker._errors import LoginError, LoginFailure, RefreshError, RefreshFailure
from credproxy.broker._lock_file import (
    FileRefreshLock,
    IHeldLock,
    InProcessRefreshLock,
    IRefreshLock,
    RefreshLockError,
    RefreshLockTimeout,
)
from credproxy.broker._lock_redis import RedisRefreshLock
from credproxy.broker._refresh import RefreshCoordinator
from credproxy.broker._renewal import RenewalScheduler
from credproxy.broker._sessions import InitiatedLogin, LoginSessions, PollResult
from credproxy.broker.credentials import (
    BrokerCredentialSource,
    CredentialKind,
    CredentialUnavailable,
    EnvironmentCredentialSource,
    FirstAvailableCredentialSource,
    ICredentialSource,
    UpstreamCredential,
)

__all__ = [
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
