"""
Why the broker could not refresh a token or carry a login through. Each
reason's value is the error code the credential socket answers with (the
reference's codes), so the face maps a reason to its code without a table;
the message is the broker's own fixed text, never a provider's.
"""

from __future__ import annotations

import enum


class RefreshFailure(enum.Enum):
    PROVIDER_NOT_FOUND = "PROVIDER_NOT_FOUND"  # no OAuth provider of that name is configured
    NOT_FOUND = "NOT_FOUND"  # nothing stored for that provider and bucket
    REFRESH_NOT_AVAILABLE = "REFRESH_NOT_AVAILABLE"  # the stored token has no refresh token
    RATE_LIMITED = "RATE_LIMITED"  # refreshed moments ago and still expired: wait
    REAUTH_REQUIRED = "REAUTH_REQUIRED"  # the provider refused the refresh token: log in again
    REFRESH_FAILED = "REFRESH_FAILED"  # the provider could not be reached or answered badly


class LoginFailure(enum.Enum):
    PROVIDER_NOT_CONFIGURED = "PROVIDER_NOT_CONFIGURED"
    FLOW_INITIATION_FAILED = "FLOW_INITIATION_FAILED"
    SESSION_NOT_FOUND = "SESSION_NOT_FOUND"
    SESSION_ALREADY_USED = "SESSION_ALREADY_USED"
    SESSION_EXPIRED = "SESSION_EXPIRED"
    EXCHANGE_FAILED = "EXCHANGE_FAILED"
    ACCESS_DENIED = "ACCESS_DENIED"
    POLL_FAILED = "POLL_FAILED"


class RefreshError(Exception):
    """
    A refresh that gave no usable token. C{retry_after} (seconds) is set for
    L{RefreshFailure.RATE_LIMITED}.
    """

    def __init__(
        self, reason: RefreshFailure, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(reason.value, message)
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


class LoginError(Exception):
    """
    A login step that failed; C{message} is fixed text safe for the client.
    """

    def __init__(self, reason: LoginFailure, message: str) -> None:
        super().__init__(reason.value, message)
        self.reason = reason
        self.message = message
