"""
The one place a program gets its token and key stores: proxy-backed stores
when the environment names a credential socket (the process is in a
sandbox), the host's own stores otherwise, so the same code runs on either
side (llxprt-code's credential-store-factory).

One set per process and flavour: the stores are shared, so every caller
shares one connection to the host (and the capability token, which can be
read only once, is read once). The set is rebuilt when what the environment
names changes: another socket path, another capability token (a new
descriptor or file was named), another store kind or state directory, or,
for the Twisted flavour, another reactor. A rebuilt set's client is closed.
L{reset_store_factories} forgets everything, for tests.

Renewal: the host renews tokens before they expire (docs/broker.md); a
sandbox must not try, since it never holds a refresh token. Nothing here
schedules anything, and L{renewal_enabled} says whether this process may.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from credproxy._secret import Secret
from credproxy.inner._blocking_stores import (
    BlockingProxyProviderKeyStorage,
    BlockingProxyTokenStore,
)
from credproxy.inner._environment import (
    CAPABILITY_TOKEN_FD_ENV,
    CAPABILITY_TOKEN_FILE_ENV,
    socket_path_from_environment,
    take_capability_token,
)
from credproxy.inner._login import LOGIN_SESSION_LIFETIME, SocketLoginBackend
from credproxy.inner._stores import ProxyProviderKeyStorage, ProxyTokenStore
from credproxy.stores._interfaces import (
    BucketStats,
    IHostProviderKeyStore,
    IHostTokenStore,
    IProviderKeyStore,
    ITokenStore,
    StoreError,
    StoreTimeout,
)
from credproxy.stores._select import default_state_dir, open_host_stores
from credproxy.stores._threads import CALL_TIMEOUT, BlockingCalls, IBlockingCalls
from credproxy.stores._token import Token
from credproxy.wire._blocking_client import BlockingProxySocketClient
from credproxy.wire._client import ProxySocketClient

STORE_ENV: Final = "CREDPROXY_STORE"
# What the service's --store defaults to: a usable Secret Service, else files.
DEFAULT_STORE_KIND: Final = "auto"

_T = TypeVar("_T")


class BlockingTokenStore(Protocol):
    """
    L{ITokenStore}'s methods returning values, as
    L{create_blocking_token_store} hands out in either mode.
    """

    def get_token(self, provider: str, bucket: str | None = None) -> Token | None: ...

    def save_token(self, provider: str, token: Token, bucket: str | None = None) -> None: ...

    def remove_token(self, provider: str, bucket: str | None = None) -> None: ...

    def list_providers(self) -> list[str]: ...

    def list_buckets(self, provider: str) -> list[str]: ...

    def get_bucket_stats(self, provider: str, bucket: str | None = None) -> BucketStats | None: ...


class BlockingProviderKeyStore(Protocol):
    """
    L{IProviderKeyStore}'s methods returning values, as
    L{create_blocking_provider_key_storage} hands out in either mode.
    """

    def get_key(self, name: str) -> Secret | None: ...

    def save_key(self, name: str, key: Secret) -> None: ...

    def delete_key(self, name: str) -> bool: ...

    def list_keys(self) -> list[str]: ...

    def has_key(self, name: str) -> bool: ...


# -- the blocking twins of the host's stores -----------------------------------


@implementer(IBlockingCalls)
class CallerThreadCalls:
    """
    L{IBlockingCalls} for code without a reactor: the caller waits, on its
    own thread, for the call to finish on a short-lived daemon thread, at
    most C{timeout} seconds (the limit L{BlockingCalls} keeps too).

    The extra thread is what bounds the wait: a Secret Service waiting on an
    unlock prompt nobody answers cannot be interrupted, so the caller stops
    waiting (L{StoreTimeout}) and the thread, being a daemon, cannot keep
    the process alive. The Deferred has fired when C{run} returns.
    """

    def __init__(self, timeout: float = CALL_TIMEOUT) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"<CallerThreadCalls timeout={self.timeout:g}>"

    def run(self, f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        name = getattr(f, "__qualname__", type(f).__name__)
        outcome: list[tuple[bool, Any]] = []

        def call() -> None:
            try:
                outcome.append((True, f(*args)))
            except BaseException:
                outcome.append((False, Failure()))

        thread = threading.Thread(target=call, name="credproxy-store-call", daemon=True)
        thread.start()
        thread.join(self.timeout)
        if not outcome:
            return fail(StoreTimeout(f"{name} did not finish within {self.timeout:g} s"))
        done, value = outcome[0]
        return succeed(value) if done else fail(value)


def _result_of(d: Deferred[_T]) -> _T:
    """
    The result of a Deferred that has already fired: the host's stores over
    L{CallerThreadCalls} answer before returning.
    """
    box: list[Any] = []
    d.addBoth(box.append)
    if not box:
        raise StoreError("a host store did not answer on the caller's thread")
    result = box[0]
    if isinstance(result, Failure):
        result.raiseException()
    value: _T = result
    return value


class _Blocking:
    """
    A host store's calls, one at a time (the store expects one caller at a
    time, as on a reactor), each waited for on the calling thread.
    """

    def __init__(self, store: Any) -> None:
        self.store = store
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<blocking {self.store!r}>"

    def _now(self, call: Callable[[], Deferred[_T]]) -> _T:
        with self._lock:
            return _result_of(call())


class _BlockingHostTokenStore(_Blocking):
    """
    A host token store's methods, blocking. A read of an entry always asks
    the backend, so a long-lived program sees what the host's service or
    another process wrote since.
    """

    store: IHostTokenStore

    def get_token(self, provider: str, bucket: str | None = None) -> Token | None:
        def read() -> Deferred[Token | None]:
            self.store.invalidate(provider, bucket)
            return self.store.get_token(provider, bucket)

        return self._now(read)

    def save_token(self, provider: str, token: Token, bucket: str | None = None) -> None:
        self._now(lambda: self.store.save_token(provider, token, bucket))

    def remove_token(self, provider: str, bucket: str | None = None) -> None:
        self._now(lambda: self.store.remove_token(provider, bucket))

    def list_providers(self) -> list[str]:
        return self._now(self.store.list_providers)

    def list_buckets(self, provider: str) -> list[str]:
        return self._now(lambda: self.store.list_buckets(provider))

    def get_bucket_stats(self, provider: str, bucket: str | None = None) -> BucketStats | None:
        def read() -> Deferred[BucketStats | None]:
            self.store.invalidate(provider, bucket)
            return self.store.get_bucket_stats(provider, bucket)

        return self._now(read)


class _BlockingHostProviderKeyStore(_Blocking):
    """
    A host key store's methods, blocking, with the same rules as
    L{_BlockingHostTokenStore}.
    """

    store: IHostProviderKeyStore

    def get_key(self, name: str) -> Secret | None:
        def read() -> Deferred[Secret | None]:
            self.store.invalidate(name)
            return self.store.get_key(name)

        return self._now(read)

    def save_key(self, name: str, key: Secret) -> None:
        self._now(lambda: self.store.save_key(name, key))

    def delete_key(self, name: str) -> bool:
        return self._now(lambda: self.store.delete_key(name))

    def list_keys(self) -> list[str]:
        return self._now(self.store.list_keys)

    def has_key(self, name: str) -> bool:
        def read() -> Deferred[bool]:
            self.store.invalidate(name)
            return self.store.has_key(name)

        return self._now(read)


# -- the per-process sets ------------------------------------------------------


@dataclass(eq=False)
class _TwistedSet:
    key: tuple[object, ...]
    tokens: ITokenStore
    keys: IProviderKeyStore
    client: ProxySocketClient | None = None  # proxy mode
    calls: BlockingCalls | None = None  # host mode

    def close(self) -> Deferred[None]:
        if self.client is not None:
            return self.client.close()
        if self.calls is not None:
            return maybeDeferred(self.calls.stopService).addCallback(lambda _: None)
        return succeed(None)


@dataclass(eq=False)
class _BlockingSet:
    key: tuple[object, ...]
    tokens: BlockingTokenStore
    keys: BlockingProviderKeyStore
    client: BlockingProxySocketClient | None = None  # proxy mode

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


_lock = threading.RLock()
_capability: Secret | None = None
_twisted: _TwistedSet | None = None
_blocking: _BlockingSet | None = None


def _token_pointer_given() -> bool:
    return bool(
        os.environ.get(CAPABILITY_TOKEN_FD_ENV) or os.environ.get(CAPABILITY_TOKEN_FILE_ENV)
    )


def _capability_token() -> Secret | None:
    """
    The capability token: read (and its pointer removed) when the
    environment names one now, else the one read before. Call with C{_lock}.
    """
    global _capability
    if _token_pointer_given():
        _capability = take_capability_token()
    else:
        take_capability_token()  # drops an empty pointer variable, reads nothing
    return _capability


def _mode() -> tuple[str, str | None]:
    """
    C{("proxy", path)} or C{("host", None)}. A capability token without a
    socket is a broken sandbox set-up, not a host: the pointer is removed
    (and a descriptor closed) so no child inherits it, and it is refused.
    """
    path = socket_path_from_environment()
    if path is not None:
        return "proxy", path
    if _token_pointer_given():
        # The pointer is gone either way; the refusal below says what is wrong.
        with contextlib.suppress(OSError, ValueError):
            take_capability_token()
        raise ValueError(
            f"{CAPABILITY_TOKEN_FD_ENV} or {CAPABILITY_TOKEN_FILE_ENV} is set, but no"
            " credential socket is (CREDPROXY_SOCKET or LLXPRT_CREDENTIAL_SOCKET)"
        )
    return "host", None


def _host_choice() -> tuple[str, str]:
    return os.environ.get(STORE_ENV) or DEFAULT_STORE_KIND, default_state_dir()


def _resolve(reactor: Any) -> Any:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        return default_reactor
    return reactor


def _twisted_set(reactor: Any) -> _TwistedSet:
    global _twisted
    reactor = _resolve(reactor)
    with _lock:
        mode, path = _mode()
        if mode == "proxy":
            assert path is not None
            token = _capability_token()
            key: tuple[object, ...] = ("proxy", path, token, reactor)
        else:
            kind, state_dir = _host_choice()
            key = ("host", kind, state_dir, reactor)
        current = _twisted
        if current is not None and current.key == key:
            return current
        if mode == "proxy":
            assert path is not None
            client = ProxySocketClient(reactor, path, capability_token=token)
            built = _TwistedSet(
                key, ProxyTokenStore(client), ProxyProviderKeyStorage(client), client=client
            )
        else:
            calls = BlockingCalls(reactor)
            calls.startService()
            try:
                host = open_host_stores(kind, state_dir, calls)
            except BaseException:
                calls.stopService()
                raise
            built = _TwistedSet(key, host.tokens, host.keys, calls=calls)
        _twisted = built
    if current is not None:
        current.close()
    return built


def _blocking_set() -> _BlockingSet:
    global _blocking
    with _lock:
        mode, path = _mode()
        if mode == "proxy":
            assert path is not None
            token = _capability_token()
            key: tuple[object, ...] = ("proxy", path, token)
        else:
            kind, state_dir = _host_choice()
            key = ("host", kind, state_dir)
        current = _blocking
        if current is not None and current.key == key:
            return current
        if mode == "proxy":
            assert path is not None
            client = BlockingProxySocketClient(path, capability_token=token)
            built = _BlockingSet(
                key,
                BlockingProxyTokenStore(client),
                BlockingProxyProviderKeyStorage(client),
                client=client,
            )
        else:
            host = open_host_stores(kind, state_dir, CallerThreadCalls())
            built = _BlockingSet(
                key, _BlockingHostTokenStore(host.tokens), _BlockingHostProviderKeyStore(host.keys)
            )
        _blocking = built
    if current is not None:
        current.close()
    return built


# -- the factories -------------------------------------------------------------


# A login session on the host lives LOGIN_SESSION_LIFETIME and dies with the
# connection that opened it; the login client must outlive the session, so
# its idle close (300 s by default, shorter than a session) is pushed past it.
LOGIN_CLIENT_IDLE_TIMEOUT = LOGIN_SESSION_LIFETIME + 60.0


def create_login_backend(reactor: Any = None) -> SocketLoginBackend:
    """
    A login backend over the credential socket for this sandbox (the socket
    and capability token the factories use), on a connection of its own
    that stays open as long as a login session can last. The caller closes
    it with C{backend.client.close()} when the login is over.

    @param reactor: None for the global reactor.
    @raise ValueError: no credential socket is named (logins on the host go
        through the broker, not through this backend).
    """
    reactor = _resolve(reactor)
    with _lock:
        mode, path = _mode()
        if mode != "proxy" or path is None:
            raise ValueError(
                "no credential socket is named (CREDPROXY_SOCKET or LLXPRT_CREDENTIAL_SOCKET)"
            )
        token = _capability_token()
    client = ProxySocketClient(
        reactor, path, capability_token=token, idle_timeout=LOGIN_CLIENT_IDLE_TIMEOUT
    )
    return SocketLoginBackend(client)


def create_token_store(reactor: Any = None) -> ITokenStore:
    """
    This process's L{ITokenStore}: a L{ProxyTokenStore} when
    C{LLXPRT_CREDENTIAL_SOCKET} or C{CREDPROXY_SOCKET} is set, else the
    host's store that C{--store $CREDPROXY_STORE} (default C{auto}) would
    choose in the default state directory, its blocking calls on a thread
    pool of its own. A second call returns the same object unless the
    environment changed (see the module docstring). Choosing C{auto} asks
    the Secret Service first, blocking for at most 5 s, as the service does
    at its start.

    @param reactor: None for the global reactor.
    @raise ValueError: a capability token is named without a socket, or
        C{CREDPROXY_STORE} names no store kind.
    @raise credproxy.stores.StoreUnavailable: C{CREDPROXY_STORE=keyring}
        and no usable Secret Service.
    """
    return _twisted_set(reactor).tokens


def create_provider_key_storage(reactor: Any = None) -> IProviderKeyStore:
    """
    This process's L{IProviderKeyStore}, chosen as L{create_token_store}
    chooses and sharing its client: read-only
    (L{ProxyProviderKeyStorage}) in a sandbox.
    """
    return _twisted_set(reactor).keys


def create_blocking_token_store() -> BlockingTokenStore:
    """
    The blocking twin of L{create_token_store}: a
    L{BlockingProxyTokenStore} in a sandbox, else the host's store with
    each backend call made while the caller waits (at most 30 s per call,
    see L{CallerThreadCalls}); reads of an entry always go to the backend.
    Callable from any thread. Its own singleton, sharing only the
    capability token with the Twisted flavour.
    """
    return _blocking_set().tokens


def create_blocking_provider_key_storage() -> BlockingProviderKeyStore:
    """
    The blocking twin of L{create_provider_key_storage}, sharing
    L{create_blocking_token_store}'s client.
    """
    return _blocking_set().keys


def renewal_enabled() -> bool:
    """
    Whether this process may schedule proactive token renewal: never in a
    sandbox (a credential socket is named), where the host renews and the
    tokens come without refresh tokens; on the host, its owner decides.
    """
    return socket_path_from_environment() is None


def reset_store_factories() -> Deferred[None]:
    """
    Forget every store set and the remembered capability token, closing
    their clients (and stopping the host stores' thread pool); for tests.
    The Deferred fires once the Twisted flavour's connection is gone.
    """
    global _capability, _twisted, _blocking
    with _lock:
        twisted, blocking = _twisted, _blocking
        _twisted = _blocking = None
        _capability = None
    if blocking is not None:
        blocking.close()
    return succeed(None) if twisted is None else twisted.close()
