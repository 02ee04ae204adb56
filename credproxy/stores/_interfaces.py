"""
What a credential store does, whichever backs it (memory, keyring, or the
credential socket from inside a sandbox). Every method returns a Deferred:
keyring backends block on D-Bus, so they run off the reactor thread.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from credproxy._secret import Secret
from credproxy.stores._token import Token

DEFAULT_BUCKET = "default"


class StoreError(Exception):
    """
    A store's backend failed (keyring, file). The message says which store,
    which entry and what went wrong, but never a value: callers log it.
    """


class StoreCorrupt(StoreError):
    """
    What a backend holds cannot be read as credproxy's data. Never repaired
    by overwriting: the operator decides, since the old content may be the
    only copy of a refresh token.
    """


class StoreTimeout(StoreError):
    """
    A blocking backend call did not finish in time; its thread may still be
    running, so the entry's state in the backend is unknown.
    """


class StoreNotRunning(StoreError):
    """
    A store call was made while the thread pool that runs blocking backend
    calls was not started, or after it stopped.
    """


class StoreDown(StoreError):
    """
    A shared store's server (Redis) does not answer now. The store logs one
    line when an outage starts and one when it ends, so whoever catches
    this need not log it for every request.
    """


class StoreUnavailable(StoreError):
    """
    The store the operator asked for cannot be used on this host; the
    message says how to get one or what to choose instead.
    """


@dataclass(frozen=True)
class BucketStats:
    """
    Usage counters of one provider bucket (C{get_bucket_stats}).
    """

    bucket: str
    request_count: int
    percentage: float
    last_used: float | None = None  # Unix seconds


class ITokenStore(Interface):
    """
    OAuth tokens by provider and bucket (None means the default bucket).
    """

    def get_token(provider: str, bucket: str | None = None) -> Deferred[Token | None]:
        """
        The stored token, or None.
        """

    def save_token(provider: str, token: Token, bucket: str | None = None) -> Deferred[None]:
        """
        Store C{token} as given (callers apply the merge rules first).
        """

    def remove_token(provider: str, bucket: str | None = None) -> Deferred[None]:
        """
        Forget the token; removing an absent one is not an error.
        """

    def list_providers() -> Deferred[list[str]]:
        """
        Providers with at least one stored token, sorted.
        """

    def list_buckets(provider: str) -> Deferred[list[str]]:
        """
        Buckets of C{provider} holding a token, sorted.
        """

    def get_bucket_stats(provider: str, bucket: str | None = None) -> Deferred[BucketStats | None]:
        """
        Usage counters of a bucket that holds a token, else None.
        """


class IHostTokenStore(ITokenStore):
    """
    A token store on the host (memory, file, keyring), which the broker uses.
    It also counts the requests made with each bucket's token, and can be
    told that another process may have changed an entry.
    """

    description = Attribute("What backs the store and where, for logs and status; no secret.")

    def record_request(provider: str, bucket: str | None, when: float) -> None:
        """
        Count one upstream request made with this bucket's token at Unix time C{when}.
        """

    def invalidate(provider: str, bucket: str | None = None) -> None:
        """
        Forget any cached read of this entry, so the next read goes to the backend.
        """


class IProviderKeyStore(Interface):
    """
    Named API keys (e.g. "anthropic", "openai-work").
    """

    def get_key(name: str) -> Deferred[Secret | None]:
        """
        The key, or None.
        """

    def save_key(name: str, key: Secret) -> Deferred[None]:
        """
        Store or replace a key.
        """

    def delete_key(name: str) -> Deferred[bool]:
        """
        Remove a key; whether one was there.
        """

    def list_keys() -> Deferred[list[str]]:
        """
        Names of stored keys, sorted.
        """

    def has_key(name: str) -> Deferred[bool]:
        """
        Whether a key of that name is stored.
        """


class IHostProviderKeyStore(IProviderKeyStore):
    """
    A key store on the host (memory, file, keyring). Like
    L{IHostTokenStore}, it describes itself and can be told that another
    process may have changed a key.
    """

    description = Attribute("What backs the store and where, for logs and status; no secret.")

    def invalidate(name: str) -> None:
        """
        Forget any cached read of this key, so the next read goes to the backend.
        """


class ICompareAndSetTokenStore(Interface):
    """
    A token store several hosts write at once (Redis): a read-merge-write
    on it is a read of the entry's version, then a save that succeeds only
    if the version is still the one read. A save that lost the race is not
    an error; the caller reads and merges again.
    """

    def read_token_version(
        provider: str, bucket: str | None = None
    ) -> Deferred[tuple[Token | None, int]]:
        """
        The stored token (None: absent) and its version, read from the
        backend itself, never from a cache.
        """

    def save_token_if(
        provider: str, token: Token, bucket: str | None, version: int
    ) -> Deferred[bool]:
        """
        Store C{token} if the entry's version is still C{version} (0: still
        absent): whether it was stored.
        """
