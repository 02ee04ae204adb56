"""
Credential stores: the interfaces the broker and faces use, and the host's
implementations (memory, a Secret Service keyring, private JSON files, Redis
shared by a fleet), with
the choice among them (C{--store}).
"""

from credproxy.stores._counters import RequestCounters
from credproxy.stores._file import FileProviderKeyStore, FileTokenStore
from credproxy.stores._interfaces import (
    DEFAULT_BUCKET,
    BucketStats,
    ICompareAndSetTokenStore,
    IHostProviderKeyStore,
    IHostTokenStore,
    IProviderKeyStore,
    ITokenStore,
    StoreCorrupt,
    StoreDown,
    StoreError,
    StoreNotRunning,
    StoreTimeout,
    StoreUnavailable,
)
from credproxy.stores._keyring import KeyringProviderKeyStore, KeyringTokenStore
from credproxy.stores._memory import MemoryProviderKeyStore, MemoryTokenStore
from credproxy.stores._redis import RedisProviderKeyStore, RedisTokenStore
from credproxy.stores._redis_connection import RedisConnection
from credproxy.stores._redis_target import is_redis_url
from credproxy.stores._select import (
    STORE_KINDS,
    HostStores,
    RedisStoreConfig,
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
    "ICompareAndSetTokenStore",
    "IHostProviderKeyStore",
    "IHostTokenStore",
    "IProviderKeyStore",
    "ITokenStore",
    "KeyringProviderKeyStore",
    "KeyringTokenStore",
    "MemoryProviderKeyStore",
    "MemoryTokenStore",
    "RedisConnection",
    "RedisProviderKeyStore",
    "RedisStoreConfig",
    "RedisTokenStore",
    "RequestCounters",
    "StoreCorrupt",
    "StoreDown",
    "StoreError",
    "StoreNotRunning",
    "StoreTimeout",
    "StoreUnavailable",
    "Token",
    "default_state_dir",
    "is_redis_url",
    "open_host_stores",
    "usable_keyring",
]
