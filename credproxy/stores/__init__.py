"""
Credential stores: the interfaces the broker and faces use, and their
implementations (in memory now; keyring-backed next).
"""

from credproxy.stores._interfaces import BucketStats, IProviderKeyStore, ITokenStore

__all__ = ["BucketStats", "IProviderKeyStore", "ITokenStore"]
