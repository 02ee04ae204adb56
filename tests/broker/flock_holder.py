"""
A second process for the refresh lock's tests: it takes C{flock(LOCK_EX)} on
the file named by argv[1], prints C{locked}, and holds the lock until a line
(or EOF) arrives on stdin, or for at most HOLD_LIMIT seconds, so a test whose
lock wrongly blocks the parent's reactor fails instead of hanging. Only the
standard library, so it starts fast.
"""

from __future__ import annotations

import fcntl
import os
import select
import sys

HOLD_LIMIT = 5.0  # seconds


def main(path: str) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    sys.stdout.write("locked\n")
    sys.stdout.flush()
    select.select([sys.stdin], [], [], HOLD_LIMIT)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    sys.stdout.write("released\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1])
