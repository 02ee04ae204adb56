"""
Secret must never show its value, and must compare in constant time by digest.
"""

from __future__ import annotations

import logging
import os
import pickle

import pytest

from credproxy._secret import Secret, read_capability_token_file, read_secret_file

VALUE = "sk-ant-api03-very-secret-value"


def test_repr_str_format_hide_the_value() -> None:
    secret = Secret(VALUE)
    percent = "%s" % (secret,)  # noqa: UP031 - %-formatting is its own code path
    for shown in (repr(secret), str(secret), f"{secret}", f"{secret!r}", percent):
        assert VALUE not in shown
        assert "hidden" in shown


def test_containers_and_logging_hide_the_value(caplog: pytest.LogCaptureFixture) -> None:
    secret = Secret(VALUE)
    assert VALUE not in repr({"key": secret, "list": [secret]})
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("t").debug("credential %s %r", secret, secret)
    assert VALUE not in caplog.text


def test_reveal_returns_the_value() -> None:
    assert Secret(VALUE).reveal() == VALUE


def test_matches() -> None:
    secret = Secret("abc")
    assert secret.matches("abc")
    assert secret.matches(b"abc")
    assert not secret.matches("abd")
    assert not secret.matches("ab")
    assert not secret.matches("")
    assert not secret.matches(None)
    assert not secret.matches(123)  # type: ignore[arg-type]


def test_equality_and_hash() -> None:
    assert Secret("a") == Secret("a")
    assert Secret("a") != Secret("b")
    assert hash(Secret("a")) == hash(Secret("a"))
    assert Secret("a") != "a"


def test_cannot_be_pickled() -> None:
    with pytest.raises(TypeError):
        pickle.dumps(Secret(VALUE))


def test_only_wraps_str() -> None:
    with pytest.raises(TypeError):
        Secret(b"bytes")  # type: ignore[arg-type]


def test_read_secret_file_strips_whitespace(tmp_path: pytest.TempPathFactory) -> None:
    path = f"{tmp_path}/token"
    with open(path, "w") as f:
        f.write("  \n" + "a" * 64 + "\n\n")
    assert read_secret_file(path).reveal() == "a" * 64


def test_read_secret_file_refuses_empty_and_huge(tmp_path: pytest.TempPathFactory) -> None:
    empty = f"{tmp_path}/empty"
    with open(empty, "w") as f:
        f.write(" \n")
    with pytest.raises(ValueError, match="empty"):
        read_secret_file(empty)
    huge = f"{tmp_path}/huge"
    with open(huge, "w") as f:
        f.write("x" * (64 * 1024 + 1))
    with pytest.raises(ValueError, match="larger than 64 KiB") as info:
        read_secret_file(huge)
    assert "xxxx" not in str(info.value)


def _private(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)
    return path


def test_read_capability_token_file_reads_a_private_token(tmp_path: pytest.TempPathFactory) -> None:
    path = _private(f"{tmp_path}/token", b"\n" + b"c" * 64 + b"\n")
    assert read_capability_token_file(path).reveal() == "c" * 64


def test_read_capability_token_file_refusals_never_quote_the_file(
    tmp_path: pytest.TempPathFactory,
) -> None:
    for name, data, expected in [
        ("binary", b"\xff\xfe" + b"z" * 40, "is not UTF-8 text"),
        ("huge", b"z" * (64 * 1024 + 1), "larger than 64 KiB"),
        ("short", b"zzzz", "fewer than 32 bytes"),
        ("blank", b" \n\t", "is empty"),
    ]:
        path = _private(f"{tmp_path}/{name}", data)
        with pytest.raises(ValueError, match=expected) as refused:
            read_capability_token_file(path)
        assert "zzzz" not in str(refused.value) and "\\xff" not in str(refused.value)
    readable = _private(f"{tmp_path}/open", b"z" * 64)
    os.chmod(readable, 0o640)
    with pytest.raises(ValueError, match="readable by group or others"):
        read_capability_token_file(readable)
    with pytest.raises(FileNotFoundError):
        read_capability_token_file(f"{tmp_path}/missing")


def test_read_secret_file_keeps_accepting_what_it_always_did(
    tmp_path: pytest.TempPathFactory,
) -> None:
    # The sandbox side reads its token with read_secret_file; only the
    # service's own reader is strict.
    path = f"{tmp_path}/short"
    with open(path, "w") as f:
        f.write("abc")
    os.chmod(path, 0o644)
    assert read_secret_file(path).reveal() == "abc"
