"""
Choosing the host's stores (C{--store auto|keyring|file|memory}).

A keyring counts only when it is a Secret Service that answers: the
C{keyring} library otherwise falls back to backends that keep secrets in a
plaintext file (C{keyrings.alt}) or that fail on every call, and credproxy
should rather say so, and use its own private files, than hand tokens to one
of those.
"""

from __future__ import annotations

import os
import pwd
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import keyring
from keyring.backend import KeyringBackend
from keyring.backends.chainer import ChainerBackend
from keyring.backends.SecretService import Keyring as SecretServiceKeyring

from credproxy._secret import read_capability_token_file
from credproxy.stores._crypto import StoreKeyError, ValueCipher, read_store_key_file
from credproxy.stores._file import KEYS_FILE, TOKENS_FILE, FileProviderKeyStore, FileTokenStore
from credproxy.stores._interfaces import IHostProviderKeyStore, IHostTokenStore, StoreUnavailable
from credproxy.stores._keyring import (
    SERVICE,
    TOKEN_INDEX_ITEM,
    KeyringProviderKeyStore,
    KeyringTokenStore,
)
from credproxy.stores._memory import MemoryProviderKeyStore, MemoryTokenStore
from credproxy.stores._redis import RedisProviderKeyStore, RedisTokenStore
from credproxy.stores._redis_connection import DEFAULT_PREFIX, RedisConnection
from credproxy.stores._redis_target import is_redis_url, parse_redis_url
from credproxy.stores._threads import IBlockingCalls

STORE_KINDS = ("auto", "keyring", "file", "memory")
# How long choosing a store waits for the Secret Service: at start a locked
# keyring may show an unlock prompt that nobody answers.
PROBE_TIMEOUT = 5.0

KEYRING_HELP = (
    "install and run a Secret Service (on Debian: apt-get install gnome-keyring,"
    " and run gnome-keyring-daemon unlocked in your session, or use KeePassXC's"
    " Secret Service), or use --store file"
)


@dataclass(frozen=True)
class HostStores:
    """
    The token and key store the host's broker uses, and what backs them
    (for the start-up log line; never a secret).
    """

    tokens: IHostTokenStore
    keys: IHostProviderKeyStore
    description: str
    # The Redis connection the stores share (a service to start, and what the
    # fleet's refresh lock uses); None for the stores of one host.
    redis: RedisConnection | None = None


@dataclass(frozen=True)
class RedisStoreConfig:
    """
    How to reach and read a Redis store: the store key (required), keys
    being retired (read only), the password file, the CA file for
    C{rediss://} (else the system's CAs) and the key prefix.
    """

    key_file: str | None = None
    old_key_files: tuple[str, ...] = ()
    password_file: str | None = None
    ca_file: str | None = None
    prefix: str = DEFAULT_PREFIX


def default_state_dir(environ: Mapping[str, str] = os.environ) -> str:
    """
    Where the file stores live: C{$XDG_STATE_HOME/credproxy}, else
    C{~/.local/state/credproxy} (the XDG default; a relative
    C{XDG_STATE_HOME} is invalid and ignored, as the spec says).
    """
    base = environ.get("XDG_STATE_HOME")
    if base and os.path.isabs(base):
        return os.path.join(base, "credproxy")
    home = environ.get("HOME") or pwd.getpwuid(os.getuid()).pw_dir
    return os.path.join(home, ".local", "state", "credproxy")


def _qualified(backend: KeyringBackend) -> str:
    cls = type(backend)
    return f"{cls.__module__}.{cls.__qualname__}"


def _secret_service_in(backend: KeyringBackend) -> SecretServiceKeyring | None:
    """
    The Secret Service backend itself, or the one a chainer would use. The
    stores then talk to it alone: a chainer would quietly write to its next
    backend (perhaps a plaintext file) when the Secret Service fails.
    """
    if isinstance(backend, SecretServiceKeyring):
        return backend
    if isinstance(backend, ChainerBackend):
        for member in backend.backends:
            if isinstance(member, SecretServiceKeyring):
                return member
    return None


def _find_secret_service(
    backend: KeyringBackend | None,
) -> tuple[SecretServiceKeyring | None, str]:
    """
    Blocking: the usable Secret Service backend, or None and why not.
    """
    try:
        chosen = backend if backend is not None else keyring.get_keyring()
        service = _secret_service_in(chosen)
    except Exception as e:
        return None, f"the keyring library failed to choose a backend ({type(e).__name__})"
    if service is None:
        return None, f"the keyring backend is {_qualified(chosen)}, not a Secret Service"
    try:
        service.get_password(SERVICE, TOKEN_INDEX_ITEM)  # a real call; its value is dropped
    except Exception as e:
        return None, f"the Secret Service did not answer ({type(e).__name__})"
    return service, "usable"


def _probe(
    backend: KeyringBackend | None, timeout: float
) -> tuple[SecretServiceKeyring | None, str]:
    """
    L{_find_secret_service} on a short-lived daemon thread, so that a D-Bus
    peer that never answers (or an unlock prompt nobody sees) costs at most
    C{timeout} seconds and cannot keep the process from exiting.
    """
    outcome: list[tuple[SecretServiceKeyring | None, str]] = []
    thread = threading.Thread(
        target=lambda: outcome.append(_find_secret_service(backend)),
        name="credproxy-keyring-probe",
        daemon=True,
    )
    thread.start()
    thread.join(timeout)
    if not outcome:
        return None, f"the Secret Service did not answer within {timeout:g} s"
    return outcome[0]


def usable_keyring(backend: KeyringBackend | None, *, timeout: float = PROBE_TIMEOUT) -> bool:
    """
    Whether C{backend} (None: the keyring library's choice) is, or chains to,
    a Secret Service that answers a call within C{timeout} seconds. Plaintext
    (C{keyrings.alt}), C{fail} and C{null} backends never count.
    """
    return _probe(backend, timeout)[0] is not None


def _file_stores(state_dir: str, calls: IBlockingCalls, note: str = "") -> HostStores:
    tokens = FileTokenStore(state_dir, calls)
    keys = FileProviderKeyStore(state_dir, calls)
    paths = f"{os.path.join(state_dir, TOKENS_FILE)}, {os.path.join(state_dir, KEYS_FILE)}"
    return HostStores(tokens, keys, f"file ({paths}){note}")


def _redis_stores(
    url: str, calls: IBlockingCalls, reactor: Any, config: RedisStoreConfig
) -> HostStores:
    target = parse_redis_url(url)
    where = f"--store {target.description}"
    if config.key_file is None:
        raise StoreUnavailable(
            f"{where} needs --store-key-file FILE, the key that encrypts what Redis holds"
            " (make one with: credproxy new-token FILE, and give every host the same file)"
        )
    try:
        cipher = ValueCipher(
            read_store_key_file(config.key_file),
            [read_store_key_file(path) for path in config.old_key_files],
        )
    except StoreKeyError as e:
        raise StoreUnavailable(f"{where}: {e}") from None
    password = None
    if config.password_file is not None:
        try:
            password = read_capability_token_file(
                config.password_file, what="Redis password file", min_bytes=1
            )
        except ValueError as e:
            raise StoreUnavailable(f"{where}: {e}") from None
        except OSError as e:
            raise StoreUnavailable(
                f"{where}: cannot read Redis password file {config.password_file!r}: {e.strerror}"
            ) from None
    if config.ca_file is not None and not target.tls:
        raise StoreUnavailable(f"{where}: --redis-ca-file is for rediss:// URLs only")
    try:
        connection = RedisConnection(
            reactor, calls, target, password=password, ca_file=config.ca_file, prefix=config.prefix
        )
    except ValueError as e:
        raise StoreUnavailable(f"{where}: {e}") from None
    tokens = RedisTokenStore(connection, cipher)
    keys = RedisProviderKeyStore(connection, cipher)
    return HostStores(tokens, keys, tokens.description, connection)


def open_host_stores(
    kind: str,
    state_dir: str,
    calls: IBlockingCalls,
    *,
    backend: KeyringBackend | None = None,
    probe_timeout: float = PROBE_TIMEOUT,
    reactor: Any = None,
    redis: RedisStoreConfig | None = None,
) -> HostStores:
    """
    The host's stores for C{--store KIND}: C{keyring} (a usable Secret
    Service, else L{StoreUnavailable}), C{file} (C{tokens.json} and
    C{keys.json} in C{state_dir}), C{memory}, or C{auto} (keyring when
    usable, else file, saying why in the description).

    A Redis URL (C{redis://}, C{rediss://}, C{unix://}) gives the stores on
    Redis, with C{redis} saying how to reach and read it; that opens no
    connection yet (the first call or the started connection does).

    Called once at start: it blocks for at most C{probe_timeout} seconds
    while it asks the Secret Service.

    @param backend: the keyring backend to consider; None means the keyring
        library's own choice (C{keyring.get_keyring()}).
    @param reactor: for a Redis store: its timers and threads report to it.
    @param redis: for a Redis store: how to reach and read it.
    @raise ValueError: for an unknown C{kind}.
    @raise StoreUnavailable: the store cannot be used; one line says why.
    """
    if is_redis_url(kind):
        if reactor is None:
            raise ValueError(
                "a Redis store is opened by the credproxy service and its commands only"
                " (it needs their reactor and --store-key-file)"
            )
        return _redis_stores(kind, calls, reactor, redis or RedisStoreConfig())
    if kind == "memory":
        return HostStores(
            MemoryTokenStore(), MemoryProviderKeyStore(), MemoryTokenStore.description
        )
    if kind == "file":
        return _file_stores(state_dir, calls)
    if kind not in ("keyring", "auto"):
        raise ValueError(f"unknown store {kind!r}: choose one of {', '.join(STORE_KINDS)}")
    service, reason = _probe(backend, probe_timeout)
    if service is not None:
        # The state directory holds the change marker the keyring stores
        # bump and watch, so other processes' writes are seen at once.
        tokens = KeyringTokenStore(calls, service, state_dir=state_dir)
        keys = KeyringProviderKeyStore(calls, service, state_dir=state_dir)
        return HostStores(tokens, keys, tokens.description)
    if kind == "keyring":
        raise StoreUnavailable(
            f"--store keyring: no usable Secret Service: {reason}; {KEYRING_HELP}"
        )
    return _file_stores(state_dir, calls, f" (no usable Secret Service: {reason})")
