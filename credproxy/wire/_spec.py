"""
The facts of the credential socket protocol (docs/wire.md), defined
once and imported by the server, the clients and the tests.
"""

from __future__ import annotations

import enum
from typing import Final

# -- versions and frame limits -------------------------------------------------
PROTOCOL_VERSION_MIN: Final = 1
PROTOCOL_VERSION_MAX: Final = 2
HEADER_SIZE: Final = 4  # unsigned 32-bit big-endian body length
MAX_FRAME_V1: Final = 64 * 1024  # body bytes before and without a v2 handshake
MAX_FRAME_V2: Final = 4 * 1024 * 1024
MAX_FRAMES_PER_READ: Final = 100  # more in one read is a flood: close

# -- server timers and limits (seconds) ----------------------------------------
PARTIAL_FRAME_TIMEOUT: Final = 5.0
REJECTED_HANDSHAKE_CLOSE_DELAY: Final = 3.0
SHUTDOWN_HARD_CLOSE_DELAY: Final = 3.0
MAX_IN_FLIGHT: Final = 16  # per connection, cancel exempt
# A client sends its handshake as soon as it connects; one that has not within
# this long is not a credential client.
HANDSHAKE_TIMEOUT: Final = 10.0
# Twice the client's own idle close (CLIENT_IDLE_TIMEOUT), so a well-behaved
# client always closes first and the server only reaps the abandoned ones.
CONNECTION_IDLE_TIMEOUT: Final = 600.0
# An op is a few store reads and writes (a keyring may wait on D-Bus, a
# refresh on one provider call); one still running after this is stuck, and
# gives its in-flight slot back with an error rather than holding it.
REQUEST_HANDLING_TIMEOUT: Final = 120.0
# Connection slots come from credproxy._limits.ConnectionLimits (1024 per
# face, 256 per peer by default), and only a connection whose handshake
# succeeded holds one. Connections still handshaking draw from a pool of
# their own, so unauthenticated ones never take an authenticated one's slot.
# A client sends its handshake the moment it connects, so 32 at once covers a
# crowd of sandboxes starting together; when the pool is full the oldest
# pending connection of the peer holding most of them is refused to make
# room, so a silent flood cannot lock out a client that handshakes at once.
#
# The memory that partial frames can pin is now bounded by: pending
# connections x MAX_FRAME_V1 (32 x 64 KiB = 2 MiB, for at most
# HANDSHAKE_TIMEOUT) plus handshaken connections x MAX_FRAME_V2 (at most
# max_per_peer x 4 MiB = 1 GiB for one peer, max_connections x 4 MiB = 4 GiB
# for the whole face, each for at most PARTIAL_FRAME_TIMEOUT). Refused
# connections buffer nothing: their input is dropped.
MAX_PENDING_HANDSHAKES: Final = 32
# Refused connections that may wait at once for their peer to read the
# refusal (half-closed, then hard-closed after REJECTED_HANDSHAKE_CLOSE_DELAY).
# They hold no slot, but each holds a descriptor, so their number is bounded
# here; beyond it a refusal is written and the connection closed as soon as
# the frame (about 100 bytes, which a new socket's buffer always takes) is out.
MAX_LINGERING_REFUSALS: Final = 64

# -- client timers (seconds) ---------------------------------------------------
CLIENT_REQUEST_TIMEOUT: Final = 30.0
CLIENT_MAX_REQUEST_TIMEOUT: Final = 3600.0
CLIENT_IDLE_TIMEOUT: Final = 300.0
# Requests a Twisted client keeps queued while MAX_IN_FLIGHT are on the wire;
# beyond this a caller is told at once rather than growing memory without end.
CLIENT_MAX_WAITING: Final = 1024

HANDSHAKE_OP: Final = "handshake"
CANCEL_OP: Final = "cancel"


class Op(enum.StrEnum):
    """
    Every registered operation name; anything else is an unknown op.
    """

    GET_TOKEN = "get_token"
    SAVE_TOKEN = "save_token"
    REMOVE_TOKEN = "remove_token"
    LIST_PROVIDERS = "list_providers"
    LIST_BUCKETS = "list_buckets"
    GET_BUCKET_STATS = "get_bucket_stats"
    GET_API_KEY = "get_api_key"
    LIST_API_KEYS = "list_api_keys"
    HAS_API_KEY = "has_api_key"
    CANCEL = "cancel"
    REFRESH_TOKEN = "refresh_token"
    OAUTH_INITIATE = "oauth_initiate"
    OAUTH_EXCHANGE = "oauth_exchange"
    OAUTH_POLL = "oauth_poll"
    OAUTH_CANCEL = "oauth_cancel"


class ErrorCode(enum.StrEnum):
    """
    The C{code} of a failed answer.
    """

    UNKNOWN_VERSION = "UNKNOWN_VERSION"
    UNAUTHORIZED = "UNAUTHORIZED"
    INVALID_REQUEST = "INVALID_REQUEST"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    NOT_FOUND = "NOT_FOUND"
    FORBIDDEN = "FORBIDDEN"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    CANCELLED = "CANCELLED"
    RESPONSE_TOO_LARGE = "RESPONSE_TOO_LARGE"
    PROVIDER_NOT_FOUND = "PROVIDER_NOT_FOUND"
    REFRESH_NOT_AVAILABLE = "REFRESH_NOT_AVAILABLE"
    RATE_LIMITED = "RATE_LIMITED"
    REAUTH_REQUIRED = "REAUTH_REQUIRED"
    REFRESH_FAILED = "REFRESH_FAILED"
    PROVIDER_NOT_CONFIGURED = "PROVIDER_NOT_CONFIGURED"
    FLOW_INITIATION_FAILED = "FLOW_INITIATION_FAILED"
    SESSION_NOT_FOUND = "SESSION_NOT_FOUND"
    SESSION_ALREADY_USED = "SESSION_ALREADY_USED"
    SESSION_EXPIRED = "SESSION_EXPIRED"
    EXCHANGE_FAILED = "EXCHANGE_FAILED"
    ACCESS_DENIED = "ACCESS_DENIED"
    POLL_FAILED = "POLL_FAILED"


class Message:
    """
    Fixed error texts that clients match on.
    """

    UNSUPPORTED_VERSION: Final = "Unsupported protocol version"
    BAD_CAPABILITY_TOKEN: Final = "Invalid or missing capability token"
    MISSING_ID_OR_OP: Final = "Missing request id or op"
    DUPLICATE_ID: Final = "Duplicate request id"
    TOO_MANY_IN_FLIGHT: Final = "Too many concurrent requests"
    # handshake refusals for want of a connection slot (RESOURCE_EXHAUSTED)
    TOO_MANY_CONNECTIONS: Final = "Too many connections"
    TOO_MANY_PEER_CONNECTIONS: Final = "Too many connections from this peer"
    TOO_MANY_PENDING_HANDSHAKES: Final = "Too many connections waiting for a handshake"
    UNKNOWN_OP_PREFIX: Final = "Unknown operation: "
    ACCESS_DENIED: Final = "Access denied"
    CANCELLED: Final = "Operation cancelled"
    FRAME_TOO_LARGE: Final = "Frame exceeds maximum size"
    RESPONSE_TOO_LARGE_V1: Final = "Response exceeds maximum frame size for protocol version 1"
    INTERNAL: Final = "Internal error"
    # INTERNAL_ERROR when the host's credential store fails (Redis down, a keyring that
    # does not answer): the agent can tell it from a bug and retry later.
    STORE_UNAVAILABLE: Final = "Credential store unavailable"
    TIMED_OUT: Final = "Operation timed out"
    MISSING_PROVIDER: Final = "Missing provider"
    MISSING_PROVIDER_OR_TOKEN: Final = "Missing provider or token"
    MISSING_NAME: Final = "Missing name"
    MISSING_TARGET_ID: Final = "Missing targetId"
    MISSING_SESSION_ID: Final = "Missing session_id"
    MISSING_CODE: Final = "Missing code"
    SESSION_NOT_FOUND: Final = "OAuth session not found"
    # sandbox refusals of ops a sandbox may never use (llxprt's texts)
    SANDBOX_CANNOT_MODIFY_TOKENS: Final = "Sandbox connections cannot modify tokens"
    SANDBOX_CANNOT_REMOVE_TOKENS: Final = "Sandbox connections cannot remove tokens"
    SANDBOX_CANNOT_CHECK_KEYS: Final = "Sandbox connections cannot check key existence"
    SANDBOX_CANNOT_REFRESH: Final = "Sandbox connections cannot refresh tokens"
    SANDBOX_CANNOT_INITIATE_OAUTH: Final = "Sandbox connections cannot initiate OAuth"
    SANDBOX_CANNOT_EXCHANGE_OAUTH: Final = "Sandbox connections cannot exchange OAuth tokens"
    SANDBOX_CANNOT_POLL_OAUTH: Final = "Sandbox connections cannot poll OAuth tokens"
    SANDBOX_CANNOT_CANCEL_OAUTH: Final = "Sandbox connections cannot cancel OAuth sessions"
    # client side
    CONNECTION_LOST: Final = "Credential proxy connection lost. Restart the session."
    SANDBOX_KEY_MANAGEMENT: Final = (
        "API key management is not available in sandbox mode. Manage keys on the host."
    )


# -- inner-side environment ----------------------------------------------------
SOCKET_ENV_VARIABLES: Final = ("LLXPRT_CREDENTIAL_SOCKET", "CREDPROXY_SOCKET")
