"""
What the sandbox side learns from its environment: where the credential
socket is, and where to read the capability token once.

The token itself is never an environment variable (every child process would
inherit it). The host names a file or an inherited descriptor instead; taking
the token removes that pointer from the environment and closes the descriptor,
so a child process inherits neither.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from typing import Final

from credproxy._secret import Secret, read_secret_file
from credproxy.wire._spec import SOCKET_ENV_VARIABLES

CAPABILITY_TOKEN_FILE_ENV: Final = "CREDPROXY_CAPABILITY_TOKEN_FILE"
CAPABILITY_TOKEN_FD_ENV: Final = "CREDPROXY_CAPABILITY_TOKEN_FD"
_MAX_TOKEN_BYTES: Final = 64 * 1024


def socket_path_from_environment(environ: Mapping[str, str] | None = None) -> str | None:
    """
    The credential socket path from C{LLXPRT_CREDENTIAL_SOCKET} or
    C{CREDPROXY_SOCKET} (first non-empty wins); None means "not in a sandbox:
    use the host's own stores".
    """
    env = os.environ if environ is None else environ
    for name in SOCKET_ENV_VARIABLES:
        value = env.get(name)
        if value:
            return value
    return None


def read_capability_token(source: str | int) -> Secret:
    """
    Read the capability token from a file path or from an inherited
    descriptor, which is closed afterwards (it is read once).

    @raise ValueError: empty or oversized; the message never holds the token.
    @raise OSError: unreadable.
    """
    if isinstance(source, str):
        return read_secret_file(source)
    with os.fdopen(source, "r", encoding="utf-8", closefd=True) as f:
        value = f.read(_MAX_TOKEN_BYTES + 1)
    if len(value) > _MAX_TOKEN_BYTES:
        raise ValueError(f"capability token descriptor {source} holds more than 64 KiB")
    value = value.strip()
    if not value:
        raise ValueError(f"capability token descriptor {source} is empty")
    return Secret(value)


def take_capability_token(environ: MutableMapping[str, str] | None = None) -> Secret | None:
    """
    Read the token named by C{CREDPROXY_CAPABILITY_TOKEN_FD} (preferred) or
    C{CREDPROXY_CAPABILITY_TOKEN_FILE}, removing both variables from the
    environment first (C{os.environ} by default, so children inherit
    neither); None when the host gave no token.

    @raise ValueError: the descriptor variable is not a number, or the token is empty.
    @raise OSError: the token cannot be read.
    """
    env = os.environ if environ is None else environ
    descriptor = env.pop(CAPABILITY_TOKEN_FD_ENV, None)
    path = env.pop(CAPABILITY_TOKEN_FILE_ENV, None)
    if descriptor:
        try:
            fd = int(descriptor)
        except ValueError:
            raise ValueError(f"{CAPABILITY_TOKEN_FD_ENV} is not a descriptor number") from None
        return read_capability_token(fd)
    if path:
        return read_capability_token(path)
    return None
