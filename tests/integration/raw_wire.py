"""
The credential socket at the byte level, for tests that play a client the
real ones would never be: a blocking Unix connection, and the frames found
in what it read.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(path)
    return sock


def frames(data: bytes) -> list[dict[str, Any]]:
    """
    The complete frames at the start of C{data}, decoded; a trailing partial
    frame is left out.
    """
    found = []
    while len(data) >= 4:
        (length,) = struct.unpack(">I", data[:4])
        if len(data) < 4 + length:
            break
        found.append(json.loads(data[4 : 4 + length]))
        data = data[4 + length :]
    return found
