"""
Credential stores: the interfaces the broker and faces use, and the host's
implementations (memory, a Secret Service keyring, private JSON files), with
the choice among them (C{--store}).
"""

from credproxy.stores._counters import RequestCounters
from credproxy.stores._file import FileProviderKeyStore, FileTokenStore
from credproxy.stores._interfaces import (
    DEFAULT_BUCKET,
    BucketStats,
    IHostProviderKeyStore,
    IHostTokenStore,
    IProviderKeyStore,
    ITokenStore,
    StoreCorrupt,
    StoreError,
    StoreNotRunning,
    StoreTimeout,
    StoreUnavailable,
)
from credproxy.stores._keyring import KeyringProviderKeyStore, KeyringTokenStore
from credproxy.stores._memory import MemoryProviderKeyStore, MemoryTokenStore
from credproxy.stores._select import (
    STORE_KINDS,
    HostStores,
    default_state_dir,
    open_host_stores,
    usable_keyring,
)
from credproxy.stores._threads import BlockingCalls, IBlockingCalls
from credproxy.stores._token import Token

__all__ = [
    "DEFAULT_BUCKET",
    "STORE_KINDS",
    "BlockingCalls",
    "BucketStats",
    "FileProviderKeyStore",
    "FileTokenStore",
    "HostStores",
    "IBlockingCalls",
    "IHostProviderKeyStore",
    "IHostTokenStore",
    "IProviderKeyStore",
    "ITokenStore",
    "KeyringProviderKeyStore",
    "KeyringTokenStore",
    "MemoryProviderKeyStore",
    "MemoryTokenStore",
    "RequestCounters",
    "StoreCorrupt",
    "StoreError",
    "StoreNotRunning",
    "StoreTimeout",
    "StoreUnavailable",
    "Token",
    "default_state_dir",
    "open_host_stores",
    "usable_keyring",
]
