"""
The two merge rules of the credential protocol (docs/wire.md, tokens):
merging a saved token and merging a refreshed one, so a refresh token is never
lost or planted. The token type and sanitizing live with the stores.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from credproxy.stores._token import REFRESH_TOKEN_FIELD, Token, sanitize, sanitized_fields

__all__ = ["Token", "merge_refreshed", "merge_saved", "sanitize", "sanitized_fields"]


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
