"""
The HTTP face's settings, with the API's own limits as defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from credproxy._limits import ConnectionLimits
from credproxy._secret import Secret

DEFAULT_UPSTREAM = "https://api.anthropic.com"
DEFAULT_MAX_BODY = 32 * 1024 * 1024  # the Messages API accepts bodies up to 32 MB
# Long extended thinking can keep a stream silent for minutes before its first
# byte or between deltas: these are minutes, not seconds.
DEFAULT_FIRST_BYTE_TIMEOUT = 600.0
DEFAULT_STREAM_IDLE_TIMEOUT = 300.0
DEFAULT_CONNECT_TIMEOUT = 30.0
# All request bodies held at once, across every connection: eight bodies at
# the API's 32 MB limit. Bodies are never spooled to disk (prompts are
# sensitive), so this is what a flood of large uploads can cost.
DEFAULT_MAX_BUFFERED_BYTES = 256 * 1024 * 1024
# A request head is a few hundred bytes from any real client; one that takes
# longer than this is being trickled to hold a connection.
DEFAULT_HEAD_TIMEOUT = 30.0
# A body upload must make progress this often, and be done within the total:
# 32 MB at a slow 1 Mbit/s takes about 270 s.
DEFAULT_BODY_IDLE_TIMEOUT = 60.0
DEFAULT_BODY_TIMEOUT = 300.0
# Upstream connections in use at once (streams are long, so this is also the
# most concurrent streams); a request waits this long for one, then gets 503.
DEFAULT_MAX_UPSTREAM_CONNECTIONS = 512
DEFAULT_UPSTREAM_WAIT_TIMEOUT = 10.0


@dataclass(frozen=True)
class HTTPProxyConfig:
    """
    How the HTTP face forwards. The capability token is a L{Secret}, so this
    object's repr shows no secret.
    """

    upstream: str = DEFAULT_UPSTREAM
    max_body: int = DEFAULT_MAX_BODY
    capability_token: Secret | None = None
    allowed_uids: frozenset[int] = field(default_factory=lambda: frozenset({os.getuid()}))
    first_byte_timeout: float = DEFAULT_FIRST_BYTE_TIMEOUT
    stream_idle_timeout: float = DEFAULT_STREAM_IDLE_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    head_timeout: float = DEFAULT_HEAD_TIMEOUT
    body_idle_timeout: float = DEFAULT_BODY_IDLE_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    max_upstream_connections: int = DEFAULT_MAX_UPSTREAM_CONNECTIONS
    upstream_wait_timeout: float = DEFAULT_UPSTREAM_WAIT_TIMEOUT

    def serves_uid(self, uid: int) -> bool:
        """
        Whether a Unix peer with this uid may use the proxy; our own uid always may.
        """
        return uid in self.allowed_uids or uid == os.getuid()
