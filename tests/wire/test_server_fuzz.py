"""
Property tests: whatever bytes or frames a client sends, the server never
raises; it only answers with whole, well-formed frames or disconnects.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from credproxy.wire._spec import Op
from tests.wire.server_harness import CAPABILITY, Connection, frame, handshake, seed

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
ops = st.sampled_from([*Op, "handshake", "__class__", "", "nope"]) | st.text(max_size=12)
fields = st.sampled_from(["provider", "bucket", "name", "token", "targetId", "session_id", "code"])
requests = st.fixed_dictionaries(
    {},
    optional={
        "v": json_values,
        "id": st.text(max_size=8) | st.integers() | json_values,
        "op": ops,
        "payload": st.dictionaries(
            fields, json_values | st.sampled_from(["anthropic", "work"]), max_size=4
        )
        | json_values,
    },
)


def _check_output(connection: Connection) -> list[dict[str, Any]]:
    data = connection.transport.value()
    answers = []
    while data:
        (length,) = struct.unpack(">I", data[:4])
        body = data[4 : 4 + length]
        assert len(body) == length
        message = json.loads(body)
        assert isinstance(message, dict)
        if "id" in message:
            assert isinstance(message["id"], str)
            assert isinstance(message["ok"], bool)
            if message["ok"]:
                assert isinstance(message["data"], dict)
            else:
                assert isinstance(message["code"], str) and isinstance(message["error"], str)
        answers.append(message)
        data = data[4 + length :]
    return answers


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    chunks=st.lists(st.binary(max_size=300), max_size=8),
    opened=st.booleans(),
    sandboxed=st.booleans(),
)
def test_arbitrary_bytes_never_raise(chunks: list[bytes], opened: bool, sandboxed: bool) -> None:
    connection = Connection(CAPABILITY if sandboxed else None)
    if opened:
        connection.send(handshake(token=CAPABILITY if sandboxed else None))
    for chunk in chunks:
        connection.protocol.dataReceived(chunk)
        connection.clock.advance(1)
    connection.clock.advance(1000)
    _check_output(connection)
    connection.lose()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    messages=st.lists(requests, min_size=1, max_size=10),
    sandboxed=st.booleans(),
    split=st.integers(min_value=1, max_value=64),
)
def test_arbitrary_requests_are_answered_or_refused(
    messages: list[dict[str, Any]], sandboxed: bool, split: int
) -> None:
    connection = Connection(CAPABILITY if sandboxed else None)
    seed(connection.tokens, connection.keys)
    connection.send(handshake(token=CAPABILITY if sandboxed else None))
    stream = b"".join(frame(m) for m in messages)
    for start in range(0, len(stream), split):
        connection.protocol.dataReceived(stream[start : start + split])
    answers = _check_output(connection)
    assert answers[0]["ok"] is True
    # Every frame gets exactly one answer (ops on the memory store finish at
    # once, and cancel answers for itself), unless the connection was cut.
    if not connection.aborted:
        cancels = sum(1 for a in answers[1:] if a.get("code") == "CANCELLED")
        assert len(answers) - 1 - cancels == len(messages)
    text = repr(answers)
    assert "refresh-" not in text
    connection.lose()
