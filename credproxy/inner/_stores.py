"""
The token and key stores of the sandbox side: the same interfaces as the
host's stores (so a factory can hand out either), every call a round trip over
the credential socket through a L{ProxySocketClient}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure
from zope.interface import implementer

from credproxy._secret import Secret
from credproxy.inner import _answers
from credproxy.stores._interfaces import BucketStats, IProviderKeyStore, ITokenStore
from credproxy.stores._token import Token
from credproxy.wire._client import ProxySocketClient
from credproxy.wire._client_errors import ProxyRequestError
from credproxy.wire._spec import ErrorCode, Op


def _none_if_not_found(failure: Failure) -> None:
    """
    NOT_FOUND means "no such entry" (llxprt returns null); every other
    failure, including a sandbox's FORBIDDEN, stays a failure.
    """
    error = failure.value
    if isinstance(error, ProxyRequestError) and error.code == ErrorCode.NOT_FOUND:
        return
    failure.raiseException()


def _nothing(data: dict[str, Any]) -> None:
    return None


@implementer(ITokenStore)
class ProxyTokenStore:
    """
    L{ITokenStore} over the credential socket. Tokens arrive without their
    refresh token; a sandbox connection may read named tokens only.
    """

    def __init__(self, client: ProxySocketClient) -> None:
        self.client = client

    def __repr__(self) -> str:
        return f"<ProxyTokenStore {self.client!r}>"

    def get_token(self, provider: str, bucket: str | None = None) -> Deferred[Token | None]:
        d = self.client.request(Op.GET_TOKEN, _answers.provider_payload(provider, bucket))
        found: Deferred[Token | None] = d.addCallback(_answers.to_token)
        return found.addErrback(_none_if_not_found)

    def save_token(self, provider: str, token: Token, bucket: str | None = None) -> Deferred[None]:
        d = self.client.request(Op.SAVE_TOKEN, _answers.save_payload(provider, token, bucket))
        return d.addCallback(_nothing)

    def remove_token(self, provider: str, bucket: str | None = None) -> Deferred[None]:
        d = self.client.request(Op.REMOVE_TOKEN, _answers.provider_payload(provider, bucket))
        return d.addCallback(_nothing)

    def list_providers(self) -> Deferred[list[str]]:
        d = self.client.request(Op.LIST_PROVIDERS)
        return d.addCallback(_answers.to_names, "providers")

    def list_buckets(self, provider: str) -> Deferred[list[str]]:
        d = self.client.request(Op.LIST_BUCKETS, {"provider": provider})
        return d.addCallback(_answers.to_names, "buckets")

    def get_bucket_stats(
        self, provider: str, bucket: str | None = None
    ) -> Deferred[BucketStats | None]:
        d = self.client.request(Op.GET_BUCKET_STATS, _answers.provider_payload(provider, bucket))
        stats: Deferred[BucketStats | None] = d.addCallback(_answers.to_bucket_stats, bucket)
        return stats.addErrback(_none_if_not_found)


@implementer(IProviderKeyStore)
class ProxyProviderKeyStorage:
    """
    L{IProviderKeyStore} over the credential socket, read-only: keys are
    managed on the host, so saving or deleting fails with
    L{SandboxKeyManagementError} without asking the server.
    """

    def __init__(self, client: ProxySocketClient) -> None:
        self.client = client

    def __repr__(self) -> str:
        return f"<ProxyProviderKeyStorage {self.client!r}>"

    def get_key(self, name: str) -> Deferred[Secret | None]:
        d = self.client.request(Op.GET_API_KEY, {"name": name})
        key: Deferred[Secret | None] = d.addCallback(_answers.to_key)
        return key.addErrback(_none_if_not_found)

    def save_key(self, name: str, key: Secret) -> Deferred[None]:
        return fail(_answers.SandboxKeyManagementError())

    def delete_key(self, name: str) -> Deferred[bool]:
        return fail(_answers.SandboxKeyManagementError())

    def list_keys(self) -> Deferred[list[str]]:
        return self.client.request(Op.LIST_API_KEYS).addCallback(_answers.to_names, "keys")

    def has_key(self, name: str) -> Deferred[bool]:
        return self.client.request(Op.HAS_API_KEY, {"name": name}).addCallback(_answers.to_exists)
