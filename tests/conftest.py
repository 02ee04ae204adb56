"""
Fixtures shared by the whole suite.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import pytest


@pytest.fixture
def socket_dir() -> Iterator[str]:
    """
    A fresh private directory with a short path: Unix socket paths are limited
    to 107 bytes, which pytest's own tmp_path can exceed.
    """
    path = tempfile.mkdtemp(prefix="cp-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
