"""
The OAuth token as stored: a JSON object's fields, provider extras kept.
It lives beside the store interfaces so that stores and the sandbox side need
nothing from the broker.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any, final

REFRESH_TOKEN_FIELD = "refresh_token"
ACCESS_TOKEN_FIELD = "access_token"
EXPIRY_FIELD = "expiry"  # Unix seconds


@final
class Token(Mapping[str, Any]):
    """
    An OAuth token as stored: the JSON object's fields, provider extras kept.
    Immutable; its C{repr} names the fields but never shows a value.
    """

    __slots__ = ("_fields",)

    def __init__(self, fields: Mapping[str, Any]) -> None:
        self._fields: dict[str, Any] = json.loads(json.dumps(dict(fields)))  # deep, JSON-only copy

    def __getitem__(self, key: str) -> Any:
        return self._fields[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def to_json(self) -> dict[str, Any]:
        """
        A fresh plain dict of the fields, for the wire or the keyring.
        """
        copied: dict[str, Any] = json.loads(json.dumps(self._fields))
        return copied

    @property
    def refresh_token(self) -> str | None:
        value = self._fields.get(REFRESH_TOKEN_FIELD)
        return value if isinstance(value, str) and value else None

    @property
    def access_token(self) -> str | None:
        value = self._fields.get(ACCESS_TOKEN_FIELD)
        return value if isinstance(value, str) and value else None

    @property
    def expiry(self) -> float | None:
        """
        When the access token expires (Unix seconds), or None when unknown.
        """
        value = self._fields.get(EXPIRY_FIELD)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return float(value)

    def __repr__(self) -> str:
        return f"<Token fields={sorted(self._fields)}>"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("a Token cannot be pickled")


def sanitize(token: Token) -> Token:
    """
    The token without its refresh token (also when that is empty): what may
    cross the credential socket.
    """
    return Token({k: v for k, v in token.items() if k != REFRESH_TOKEN_FIELD})


def sanitized_fields(token: Token) -> dict[str, Any]:
    """
    The fields L{sanitize} keeps, as a shallow dict to be encoded at once
    (for answers: no deep copy, since nothing holds on to it).
    """
    return {k: v for k, v in token._fields.items() if k != REFRESH_TOKEN_FIELD}
