"""
The token model: immutable, JSON-only, never shows a value.
"""

from __future__ import annotations

import pickle

import pytest

from credproxy.broker.tokens import Token, merge_refreshed, merge_saved, sanitize

FIELDS = {
    "access_token": "sk-ant-oat01-access-value",
    "refresh_token": "sk-ant-ort01-refresh-value",
    "expiry": 1_900_000_000,
    "token_type": "Bearer",
    "scope": None,
    "extra": {"nested": [1, 2]},
}


def test_repr_names_fields_not_values() -> None:
    token = Token(FIELDS)
    for shown in (repr(token), str(token), f"{token}"):
        assert "access_token" in shown
        assert "sk-ant" not in shown


def test_is_a_deep_copy() -> None:
    source = {"access_token": "a", "extra": {"nested": [1]}}
    token = Token(source)
    source["extra"]["nested"].append(2)  # type: ignore[index]
    assert token["extra"] == {"nested": [1]}
    exported = token.to_json()
    exported["extra"]["nested"].append(3)
    assert token["extra"] == {"nested": [1]}


def test_refuses_non_json_values_and_pickling() -> None:
    with pytest.raises(TypeError):
        Token({"access_token": object()})
    with pytest.raises(TypeError):
        pickle.dumps(Token(FIELDS))


def test_refresh_token_property() -> None:
    assert Token(FIELDS).refresh_token == FIELDS["refresh_token"]
    assert Token({"refresh_token": ""}).refresh_token is None
    assert Token({}).refresh_token is None


def test_sanitize_drops_refresh_token_even_empty() -> None:
    assert "refresh_token" not in sanitize(Token(FIELDS))
    assert "refresh_token" not in sanitize(Token({"access_token": "a", "refresh_token": ""}))
    assert sanitize(Token(FIELDS))["extra"] == {"nested": [1, 2]}


def test_merge_saved_keeps_stored_refresh_token() -> None:
    stored = Token(FIELDS)
    merged = merge_saved(stored, {"access_token": "new", "expiry": 2})
    assert merged["access_token"] == "new"
    assert merged["expiry"] == 2
    assert merged["refresh_token"] == FIELDS["refresh_token"]
    assert merged["extra"] == FIELDS["extra"]


def test_merge_saved_never_takes_an_incoming_refresh_token() -> None:
    stored = Token(FIELDS)
    planted = merge_saved(stored, {"access_token": "new", "refresh_token": "planted"})
    assert planted["refresh_token"] == FIELDS["refresh_token"]
    blanked = merge_saved(stored, {"access_token": "new", "refresh_token": ""})
    assert blanked["refresh_token"] == FIELDS["refresh_token"]
    fresh = merge_saved(None, {"access_token": "a", "refresh_token": "planted"})
    assert "refresh_token" not in fresh


def test_merge_refreshed_rotates_refresh_token() -> None:
    stored = Token(FIELDS)
    rotated = merge_refreshed(stored, {"access_token": "n", "expiry": 3, "refresh_token": "r2"})
    assert (rotated["access_token"], rotated["refresh_token"]) == ("n", "r2")
    kept = merge_refreshed(stored, {"access_token": "n", "expiry": 3, "refresh_token": ""})
    assert kept["refresh_token"] == FIELDS["refresh_token"]
