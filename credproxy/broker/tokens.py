"""
The OAuth token model and the two merge rules of the credential protocol
(wire-protocol.md section 6): sanitizing for the sandbox, merging a saved token
and merging a refreshed one, so a refresh token is never lost or exposed.
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


def merge_saved(stored: Token | None, incoming: Mapping[str, Any]) -> Token:
    """
    The token to store after C{save_token} over the credential socket: the
    stored fields overwritten by the incoming ones, except the refresh token,
    which only the host's own login and refresh may set. An incoming one is
    dropped (a sandbox must not be able to plant or blank it); the stored one
    is kept. llxprt's server behaves the same way.
    """
    merged: dict[str, Any] = dict(stored.items()) if stored is not None else {}
    merged.pop(REFRESH_TOKEN_FIELD, None)
    merged.update({k: v for k, v in incoming.items() if k != REFRESH_TOKEN_FIELD})
    kept_refresh = stored.refresh_token if stored is not None else None
    if kept_refresh is not None:
        merged[REFRESH_TOKEN_FIELD] = kept_refresh
    return Token(merged)


def merge_refreshed(stored: Token, refreshed: Mapping[str, Any]) -> Token:
    """
    The token to store after a refresh: everything from the new token, the
    refresh token from the new one if non-empty, else the stored one.
    """
    merged: dict[str, Any] = dict(stored.items())
    merged.update({k: v for k, v in refreshed.items() if k != REFRESH_TOKEN_FIELD})
    new_refresh = refreshed.get(REFRESH_TOKEN_FIELD)
    if isinstance(new_refresh, str) and new_refresh:
        merged[REFRESH_TOKEN_FIELD] = new_refresh
    return Token(merged)
