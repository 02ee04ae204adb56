"""
The host's credential logic: the broker both faces share (stores, refresh,
renewal, login sessions) and the credential view of the HTTP face. Faces
depend on this package; it never imports a face.
"""

from credproxy.broker._broker import Broker, SandboxPolicy
from credproxy.broker._errors import LoginError, LoginFailure, RefreshError, RefreshFailure

__all__ = [
    "Broker",
    "LoginError",
    "LoginFailure",
    "RefreshError",
    "RefreshFailure",
    "SandboxPolicy",
]
