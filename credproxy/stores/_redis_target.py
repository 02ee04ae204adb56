"""
Where a Redis store lives (C{--store redis://HOST:PORT/DB}, C{rediss://...}
with verified TLS, or C{unix:///path?db=N}), and the client that reaches it.

A password never comes in the URL (it would show in C{ps}, shell history and
unit files): it comes from a private file (C{--redis-password-file}), and
descriptions of the target never hold it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, quote, urlsplit

from credproxy._secret import Secret
from credproxy.stores._interfaces import StoreUnavailable

if TYPE_CHECKING:
    import redis

REDIS_SCHEMES = ("redis", "rediss", "unix")
DEFAULT_PORT = 6379
MAX_DB = 15  # Redis's default number of databases is 16
# Every Redis call is a loopback or LAN round trip of well under a
# millisecond; one that takes seconds means Redis is gone, and the store
# says so instead of letting requests wait.
SOCKET_TIMEOUT = 2.0
CONNECT_TIMEOUT = 2.0
# Connections per host: the store's thread pool has a few threads, the
# invalidation subscriber one more.
MAX_CONNECTIONS = 16

_HELP = "--store redis://HOST:PORT/DB, rediss://HOST:PORT/DB or unix:///PATH?db=N"


def is_redis_url(store: str) -> bool:
    """
    Whether C{--store}'s value names a Redis store (rather than a store kind).
    """
    return store.partition("://")[0] in REDIS_SCHEMES and "://" in store


@dataclass(frozen=True)
class RedisTarget:
    """
    A parsed Redis URL: C{host} and C{port} for TCP (C{tls} for
    C{rediss://}), C{path} for a Unix socket; C{username} for an ACL user.
    """

    scheme: str
    db: int
    host: str | None = None
    port: int | None = None
    path: str | None = None
    username: str | None = None

    @property
    def tls(self) -> bool:
        return self.scheme == "rediss"

    @property
    def description(self) -> str:
        """
        The URL as status and logs show it: never a password (none is ever
        in it).
        """
        user = f"{quote(self.username, safe='')}@" if self.username else ""
        if self.path is not None:
            return f"unix://{user}{self.path}?db={self.db}"
        host = self.host or ""
        shown = f"[{host}]" if ":" in host else host
        return f"{self.scheme}://{user}{shown}:{self.port}/{self.db}"

    def client(self, password: Secret | None, ca_file: str | None) -> redis.Redis:
        """
        A client for this target that fails fast: short timeouts and no
        retries of its own (the store's outage handling backs off instead).
        TLS verifies the server's certificate and host name, against
        C{ca_file} or the system's CAs.

        (The C{redis} package is imported here, by the first client: a
        credproxy without a Redis store never loads it.)
        """
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        common = {
            "db": self.db,
            "username": self.username,
            "password": password.reveal() if password is not None else None,
            "socket_timeout": SOCKET_TIMEOUT,
            "socket_connect_timeout": CONNECT_TIMEOUT,
            "retry": Retry(NoBackoff(), 0),
            "max_connections": MAX_CONNECTIONS,
            "client_name": "credproxy",
        }
        if self.path is not None:
            return redis.Redis(unix_socket_path=self.path, **common)  # type: ignore[arg-type]
        tls = (
            {
                "ssl": True,
                "ssl_cert_reqs": "required",
                "ssl_check_hostname": True,
                "ssl_ca_certs": ca_file,
            }
            if self.tls
            else {}
        )
        return redis.Redis(host=self.host, port=self.port, **common, **tls)  # type: ignore[arg-type]


def parse_redis_url(url: str) -> RedisTarget:
    """
    C{--store}'s Redis URL as a L{RedisTarget}.

    @raise StoreUnavailable: it is not one; the one-line message says why
        and never repeats a password that was put in it.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise StoreUnavailable(f"--store: not a Redis URL; use {_HELP}") from None
    scheme = parts.scheme
    if scheme not in REDIS_SCHEMES:
        raise StoreUnavailable(f"--store: not a Redis URL; use {_HELP}")
    if parts.password is not None:
        raise StoreUnavailable(
            "--store: the Redis URL holds a password; put it in a private file and pass"
            " --redis-password-file instead"
        )
    if parts.fragment:
        raise StoreUnavailable(f"--store: a Redis URL has no #fragment; use {_HELP}")
    username = parts.username or None
    if scheme == "unix":
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        if parts.hostname or not parts.path.startswith("/") or set(query) - {"db"}:
            raise StoreUnavailable(f"--store: a Unix socket URL is unix:///PATH?db=N; use {_HELP}")
        return RedisTarget(scheme, _db(query.get("db", "0")), path=parts.path, username=username)
    if parts.query:
        raise StoreUnavailable(f"--store: a Redis URL takes no ?query; use {_HELP}")
    if not parts.hostname:
        raise StoreUnavailable(f"--store: the Redis URL names no host; use {_HELP}")
    return RedisTarget(
        scheme,
        _db(parts.path.lstrip("/") or "0"),
        host=parts.hostname,
        port=port if port is not None else DEFAULT_PORT,
        username=username,
    )


def _db(text: str) -> int:
    if not text.isdigit() or int(text) > MAX_DB:
        raise StoreUnavailable(
            f"--store: the Redis database must be a number from 0 to {MAX_DB}; use {_HELP}"
        )
    return int(text)
