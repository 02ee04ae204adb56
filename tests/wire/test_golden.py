"""
Replays tests/wire/golden_frames.json: each client frame, byte for byte,
must draw exactly the server frames recorded after it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from credproxy._secret import Secret
from credproxy.broker.tokens import Token
from tests.wire.server_harness import CAPABILITY, Connection

GOLDEN = json.loads((Path(__file__).parent / "golden_frames.json").read_text("utf-8"))


def _connection(session: dict[str, Any]) -> Connection:
    connection = Connection(CAPABILITY if session["capabilityToken"] else None)
    state = GOLDEN["state"]
    for entry in state["tokens"]:
        connection.tokens.save_token(entry["provider"], Token(entry["token"]), entry["bucket"])
    for use in state["requests"]:
        connection.tokens.record_request(use["provider"], use["bucket"], use["at"])
    for name, value in state["keys"].items():
        key = value if isinstance(value, str) else value["repeat"] * value["times"]
        connection.keys.save_key(name, Secret(key))
    return connection


def _wire(frame: dict[str, str]) -> bytes:
    body = frame["body"].encode("utf-8")
    prefix = bytes.fromhex(frame["prefix"])
    assert prefix == struct.pack(">I", len(body)), "the recorded prefix is the body's length"
    return prefix + body


@pytest.mark.parametrize("session", GOLDEN["sessions"], ids=lambda s: s["title"])
def test_golden_session(session: dict[str, Any]) -> None:
    connection = _connection(session)
    frames = session["frames"]
    assert frames[0]["from"] == "client"
    i = 0
    while i < len(frames):
        sent = frames[i]
        assert sent["from"] == "client"
        connection.protocol.dataReceived(_wire(sent))
        i += 1
        expected = b""
        while i < len(frames) and frames[i]["from"] == "server":
            expected += _wire(frames[i])
            i += 1
        assert connection.raw_replies() == expected, sent["body"]


def test_every_op_of_this_issue_has_a_golden_frame() -> None:
    sent_ops = {
        json.loads(f["body"]).get("op")
        for s in GOLDEN["sessions"]
        for f in s["frames"]
        if f["from"] == "client"
    }
    for op in (
        "get_token",
        "save_token",
        "remove_token",
        "list_providers",
        "list_buckets",
        "get_bucket_stats",
        "get_api_key",
        "list_api_keys",
        "has_api_key",
        "cancel",
        "handshake",
    ):
        assert op in sent_ops
