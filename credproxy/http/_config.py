"""
The HTTP face's settings, with the API's own limits as defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from credproxy._secret import Secret

DEFAULT_UPSTREAM = "https://api.anthropic.com"
DEFAULT_MAX_BODY = 32 * 1024 * 1024  # the Messages API accepts bodies up to 32 MB
# Long extended thinking can keep a stream silent for minutes before its first
# byte or between deltas: these are minutes, not seconds.
DEFAULT_FIRST_BYTE_TIMEOUT = 600.0
DEFAULT_STREAM_IDLE_TIMEOUT = 300.0
DEFAULT_CONNECT_TIMEOUT = 30.0


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

    def serves_uid(self, uid: int) -> bool:
        """
        Whether a Unix peer with this uid may use the proxy; our own uid always may.
        """
        return uid == os.getuid() or uid in self.allowed_uids
