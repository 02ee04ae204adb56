"""
The broker: the host's one place where credentials are stored, refreshed,
renewed and obtained. Both faces go through it; it never knows which face
asked, only whether the asker is a sandbox.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from credproxy._secret import Secret
from credproxy.broker._lock_file import InProcessRefreshLock, IRefreshLock
from credproxy.broker._locks import EntryLocks, merge_into_store
from credproxy.broker._refresh import RefreshCoordinator
from credproxy.broker._renewal import RenewalScheduler
from credproxy.broker._sessions import LoginSessions
from credproxy.broker.tokens import merge_saved
from credproxy.oauth._interfaces import IOAuthProvider
from credproxy.stores._interfaces import (
    DEFAULT_BUCKET,
    BucketStats,
    IHostTokenStore,
    IProviderKeyStore,
)
from credproxy.stores._token import Token

log = Logger(namespace="credproxy.broker")


@dataclass(frozen=True)
class SandboxPolicy:
    """
    What sandbox connections may do beyond the reference's defaults.
    C{readable} narrows the entries a sandbox may read (key names and token
    providers); None means every named entry, as in llxprt.
    """

    readable: frozenset[str] | None = None
    allow_login: bool = False

    def may_read(self, name: str) -> bool:
        return self.readable is None or name in self.readable


class Broker(Service):
    """
    Owns the token and key stores, the per-entry locks, the refresh
    coordinator, the renewal timers and the login sessions.

    Every write goes through the broker so that it is serialized per entry
    and the renewal timers follow it. As a service, starting schedules
    renewal of what is stored and the sweep of login sessions; stopping
    cancels every timer and forgets every login session. A parent service
    starts the broker after the thread pool its stores use, and before the
    faces.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        tokens: IHostTokenStore,
        keys: IProviderKeyStore,
        *,
        providers: Mapping[str, IOAuthProvider] | None = None,
        refresh_lock: IRefreshLock | None = None,
        sandbox: SandboxPolicy | None = None,
        renew: bool = True,
        store_description: str | None = None,
        store_service: IService | None = None,
    ) -> None:
        self.reactor = reactor
        # What the stores need running (the Redis connection's subscriber):
        # started before anything reads, stopped after everything else.
        self.store_service = store_service
        self.tokens = tokens
        self.keys = keys
        # What backs the stores and where, for the start-up line and status.
        self.store_description: str = (
            store_description if store_description is not None else tokens.description
        )
        self.providers: Mapping[str, IOAuthProvider] = dict(providers or {})
        self.sandbox = sandbox if sandbox is not None else SandboxPolicy()
        self.locks = EntryLocks()
        self.refresher = RefreshCoordinator(
            reactor,
            tokens,
            self.providers,
            refresh_lock if refresh_lock is not None else InProcessRefreshLock(),
            self.locks,
            on_saved=self._token_changed,
        )
        self.sessions = LoginSessions(reactor, self.providers, self.store_login)
        self.renewal: RenewalScheduler | None = (
            RenewalScheduler(reactor, tokens, self.refresher) if renew else None
        )

    def __repr__(self) -> str:
        providers = sorted(self.providers)
        return f"<Broker tokens={self.tokens!r} keys={self.keys!r} providers={providers}>"

    # -- lifecycle --------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self.store_service is not None:
            self.store_service.startService()
        self.sessions.start()
        if self.renewal is not None:
            self.renewal.start().addErrback(
                lambda failure: log.error(
                    "Could not schedule token renewal: {kind}",
                    kind=failure.type.__qualname__ if failure.type else "unknown",
                )
            )

    def stopService(self) -> None:
        super().stopService()
        self.sessions.stop()
        self.refresher.stop()
        if self.renewal is not None:
            self.renewal.stop()
        if self.store_service is not None and self.store_service.running:
            self.store_service.stopService()

    # -- tokens -----------------------------------------------------------------

    def get_token(self, provider: str, bucket: str | None = None) -> Deferred[Token | None]:
        """
        The stored token, refresh token included: for the host's own use. What
        crosses the socket is sanitized by the face.
        """
        return self.tokens.get_token(provider, bucket)

    def sandbox_may_read(self, name: str) -> bool:
        return self.sandbox.may_read(name)

    async def save_token(
        self, provider: str, incoming: Mapping[str, Any], bucket: str | None = None
    ) -> None:
        """
        C{save_token} from the credential socket: merged over the stored token,
        and never setting the refresh token (the protocol's save merge).
        """
        entry = (provider, bucket or DEFAULT_BUCKET)

        async def merge_and_store() -> Token | None:
            return await merge_into_store(
                self.tokens,
                provider,
                entry[1],
                lambda stored: merge_saved(stored, incoming),
                clock=self.reactor,
            )

        merged = await self.locks.run(entry, merge_and_store)
        assert merged is not None  # merge_saved always answers a token
        self._token_changed(provider, entry[1], merged)

    async def store_login(self, provider: str, token: Token, bucket: str | None = None) -> None:
        """
        The token a completed login obtained, refresh token and all, replacing
        whatever was stored.
        """
        entry = (provider, bucket or DEFAULT_BUCKET)

        async def store() -> None:
            await self.tokens.save_token(provider, token, bucket)

        await self.locks.run(entry, store)
        self._token_changed(provider, entry[1], token)

    async def remove_token(self, provider: str, bucket: str | None = None) -> None:
        entry = (provider, bucket or DEFAULT_BUCKET)

        async def remove() -> None:
            await self.tokens.remove_token(provider, bucket)

        await self.locks.run(entry, remove)
        self._token_changed(provider, entry[1], None)

    def list_providers(self) -> Deferred[list[str]]:
        return self.tokens.list_providers()

    def list_buckets(self, provider: str) -> Deferred[list[str]]:
        return self.tokens.list_buckets(provider)

    def get_bucket_stats(
        self, provider: str, bucket: str | None = None
    ) -> Deferred[BucketStats | None]:
        return self.tokens.get_bucket_stats(provider, bucket)

    def record_request(self, provider: str, bucket: str | None) -> None:
        """
        Count one upstream request made with this bucket's token.
        """
        self.tokens.record_request(provider, bucket, self.reactor.seconds())

    async def refresh_token(self, provider: str, bucket: str | None = None) -> Token:
        """
        Refresh now (the C{refresh_token} op). Raises L{RefreshError}.
        """
        return await self.refresher.refresh(provider, bucket or DEFAULT_BUCKET)

    async def fresh_token(
        self, provider: str, bucket: str | None, min_validity: float
    ) -> Token | None:
        """
        The stored token, refreshed first when it expires within
        C{min_validity} seconds; None when nothing is stored. Raises
        L{RefreshError} when the token is expired and cannot be refreshed.
        """
        return await self.refresher.fresh_token(provider, bucket or DEFAULT_BUCKET, min_validity)

    async def replace_rejected(
        self, provider: str, bucket: str | None, rejected_access_token: str
    ) -> Token:
        """
        The upstream refused C{rejected_access_token}: a token that differs
        from it (stored by someone else meanwhile, or refreshed now). Raises
        L{RefreshError}.
        """
        return await self.refresher.refresh(
            provider, bucket or DEFAULT_BUCKET, rejected=rejected_access_token
        )

    def _token_changed(self, provider: str, bucket: str, token: Token | None) -> None:
        if self.renewal is not None and self.running:
            self.renewal.changed(provider, bucket, token)

    # -- keys -------------------------------------------------------------------

    def get_key(self, name: str) -> Deferred[Secret | None]:
        return self.keys.get_key(name)

    def has_key(self, name: str) -> Deferred[bool]:
        return self.keys.has_key(name)

    def list_keys(self) -> Deferred[list[str]]:
        return self.keys.list_keys()

    def save_key(self, name: str, key: Secret) -> Deferred[None]:
        return self.keys.save_key(name, key)

    def delete_key(self, name: str) -> Deferred[bool]:
        return self.keys.delete_key(name)
