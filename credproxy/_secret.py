"""
A wrapper for secret strings so that they cannot leak through C{repr}, C{str},
f-strings, logging or pickling by accident.

Secrets travel through credproxy as values; only the code that puts one on the
wire calls L{Secret.reveal}.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import shlex
import stat
from typing import NoReturn, final

# The largest secret file read: a token is short, and a huge file is not one.
MAX_SECRET_FILE_BYTES = 64 * 1024
# The shortest capability token the service accepts: 256 bits of randomness
# written as hex is 64 bytes (what C{credproxy new-token} writes); fewer than
# 32 bytes cannot hold even 128 bits that way, and is guessable.
MIN_CAPABILITY_TOKEN_BYTES = 32


@final
class Secret:
    """
    A secret string: a credential, capability token, refresh token, code,
    verifier or session id.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("Secret wraps a str")
        self._value = value

    def reveal(self) -> str:
        """
        The secret itself, for the one place that must send it.
        """
        return self._value

    def matches(self, presented: str | bytes | None) -> bool:
        """
        Whether C{presented} equals this secret, compared as SHA-256 digests in
        constant time so neither the length nor a prefix leaks through timing.
        """
        if presented is None:
            return False
        if isinstance(presented, str):
            presented = presented.encode("utf-8", "surrogatepass")
        if not isinstance(presented, bytes):
            return False
        mine = hashlib.sha256(self._value.encode("utf-8", "surrogatepass")).digest()
        theirs = hashlib.sha256(presented).digest()
        return hmac.compare_digest(mine, theirs)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "<Secret: hidden>"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return self.matches(other._value)

    def __hash__(self) -> int:
        return hash((Secret, hashlib.sha256(self._value.encode("utf-8", "surrogatepass")).digest()))

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Secret cannot be pickled")


def read_secret_file(path: str) -> Secret:
    """
    Read a secret (such as a capability token) from C{path}, ignoring the
    surrounding whitespace.

    @raise ValueError: if the file is empty; the message names the path only.
    @raise OSError: if the file cannot be read.
    """
    with open(path, encoding="utf-8") as f:
        value = f.read(MAX_SECRET_FILE_BYTES + 1)  # a token is short; refuse to slurp a huge file
    if len(value) > MAX_SECRET_FILE_BYTES:
        raise ValueError(f"secret file {path!r} is larger than 64 KiB")
    value = value.strip()
    if not value:
        raise ValueError(f"secret file {path!r} is empty")
    return Secret(value)


def read_capability_token_file(
    path: str,
    *,
    what: str = "capability token file",
    min_bytes: int = MIN_CAPABILITY_TOKEN_BYTES,
) -> Secret:
    """
    Read the capability token the service checks agents against, as
    L{read_secret_file} does, but refuse a file that cannot be holding a
    good one: the token is all that stands between a TCP port (or a
    sandbox's credential socket) and the host's credentials. So the file
    must be a regular file that neither group nor others may read, holding
    at least L{MIN_CAPABILITY_TOKEN_BYTES} bytes besides the surrounding
    whitespace. Every refusal is one line naming the path and what to do;
    none holds any of the file's content.

    Other private secret files (the store key, a Redis password) are read
    the same way: C{what} names the file in messages, C{min_bytes} is the
    least it must hold.

    @raise ValueError: the file is not acceptable.
    @raise OSError: it cannot be opened or read.
    """
    # O_NONBLOCK: opening a FIFO someone put there must not wait for a writer.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{what} {path!r} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o044:
            raise ValueError(
                f"{what} {path!r} is readable by group or others"
                f" (mode {mode:04o}); make it private with: chmod 600 {shlex.quote(path)}"
            )
        data = f.read(MAX_SECRET_FILE_BYTES + 1)
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise ValueError(f"{what} {path!r} is larger than 64 KiB")
    try:
        value = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        # Not the codec's message: it quotes the offending bytes.
        raise ValueError(f"{what} {path!r} is not UTF-8 text") from None
    if not value:
        raise ValueError(f"{what} {path!r} is empty")
    if len(value.encode("utf-8")) < min_bytes:
        raise ValueError(
            f"{what} {path!r} holds fewer than {min_bytes}"
            " bytes, too short to be unguessable; make a new one with: credproxy new-token"
            f" --force {shlex.quote(path)}"
        )
    return Secret(value)
