"""
Credential stores: the interfaces the broker and faces use, and their
implementations (in memory now; keyring-backed next).
"""

from credproxy.stores._interfaces import (
    DEFAULT_BUCKET,
    BucketStats,
    IProviderKeyStore,
    ITokenStore,
)
from credproxy.stores._memory import MemoryProviderKeyStore, MemoryTokenStore

__all__ = [
    "DEFAULT_BUCKET",
    "BucketStats",
    "IProviderKeyStore",
    "ITokenStore",
    "MemoryProviderKeyStore",
    "MemoryTokenStore",
]
