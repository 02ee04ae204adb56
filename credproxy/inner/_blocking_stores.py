"""
The sandbox-side stores for code without a reactor: the methods of
L{ITokenStore} and L{IProviderKeyStore}, returning values instead of
Deferreds, over a L{BlockingProxySocketClient}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from credproxy._secret import Secret
from credproxy.inner import _answers
from credproxy.stores._interfaces import BucketStats
from credproxy.stores._token import Token
from credproxy.wire._blocking_client import BlockingProxySocketClient
from credproxy.wire._client_errors import ProxyRequestError
from credproxy.wire._spec import ErrorCode, Op

_T = TypeVar("_T")


def _unless_not_found(
    client: BlockingProxySocketClient,
    op: Op,
    payload: dict[str, Any],
    convert: Callable[[dict[str, Any]], _T],
) -> _T | None:
    """
    The converted answer, or None on NOT_FOUND (any other failure raises).
    """
    try:
        data = client.request(op, payload)
    except ProxyRequestError as error:
        if error.code == ErrorCode.NOT_FOUND:
            return None
        raise
    return convert(data)


class BlockingProxyTokenStore:
    """
    L{ITokenStore}'s methods, blocking, over the credential socket.
    """

    def __init__(self, client: BlockingProxySocketClient) -> None:
        self.client = client

    def __repr__(self) -> str:
        return f"<BlockingProxyTokenStore {self.client!r}>"

    def get_token(self, provider: str, bucket: str | None = None) -> Token | None:
        payload = _answers.provider_payload(provider, bucket)
        return _unless_not_found(self.client, Op.GET_TOKEN, payload, _answers.to_token)

    def save_token(self, provider: str, token: Token, bucket: str | None = None) -> None:
        self.client.request(Op.SAVE_TOKEN, _answers.save_payload(provider, token, bucket))

    def remove_token(self, provider: str, bucket: str | None = None) -> None:
        self.client.request(Op.REMOVE_TOKEN, _answers.provider_payload(provider, bucket))

    def list_providers(self) -> list[str]:
        return _answers.to_names(self.client.request(Op.LIST_PROVIDERS), "providers")

    def list_buckets(self, provider: str) -> list[str]:
        data = self.client.request(Op.LIST_BUCKETS, {"provider": provider})
        return _answers.to_names(data, "buckets")

    def get_bucket_stats(self, provider: str, bucket: str | None = None) -> BucketStats | None:
        payload = _answers.provider_payload(provider, bucket)
        return _unless_not_found(
            self.client,
            Op.GET_BUCKET_STATS,
            payload,
            lambda data: _answers.to_bucket_stats(data, bucket),
        )


class BlockingProxyProviderKeyStorage:
    """
    L{IProviderKeyStore}'s methods, blocking and read-only, over the credential socket.
    """

    def __init__(self, client: BlockingProxySocketClient) -> None:
        self.client = client

    def __repr__(self) -> str:
        return f"<BlockingProxyProviderKeyStorage {self.client!r}>"

    def get_key(self, name: str) -> Secret | None:
        return _unless_not_found(self.client, Op.GET_API_KEY, {"name": name}, _answers.to_key)

    def save_key(self, name: str, key: Secret) -> None:
        raise _answers.SandboxKeyManagementError()

    def delete_key(self, name: str) -> bool:
        raise _answers.SandboxKeyManagementError()

    def list_keys(self) -> list[str]:
        return _answers.to_names(self.client.request(Op.LIST_API_KEYS), "keys")

    def has_key(self, name: str) -> bool:
        return _answers.to_exists(self.client.request(Op.HAS_API_KEY, {"name": name}))
