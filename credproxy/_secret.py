"""
A wrapper for secret strings so that they cannot leak through C{repr}, C{str},
f-strings, logging or pickling by accident.

Secrets travel through credproxy as values; only the code that puts one on the
wire calls L{Secret.reveal}.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import NoReturn, final


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
        value = f.read(64 * 1024 + 1)  # a token is short; refuse to slurp a huge file
    if len(value) > 64 * 1024:
        raise ValueError(f"secret file {path!r} is larger than 64 KiB")
    value = value.strip()
    if not value:
        raise ValueError(f"secret file {path!r} is empty")
    return Secret(value)
