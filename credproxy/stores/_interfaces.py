"""
What a credential store does, whichever backs it (memory, keyring, or the
credential socket from inside a sandbox). Every method returns a Deferred:
keyring backends block on D-Bus, so they run off the reactor thread.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.defer import Deferred
from zope.interface import Interface

from credproxy._secret import Secret
from credproxy.broker.tokens import Token

DEFAULT_BUCKET = "default"


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
