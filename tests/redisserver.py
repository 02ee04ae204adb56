"""
Real redis-server processes for the Redis store tests: each on a free
loopback port and a Unix socket in its own private directory, without
persistence, started and stopped by the tests themselves (Debian's
redis-server; the tests skip when it is not installed).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field

import pytest
import redis

REDIS_SERVER = shutil.which("redis-server")
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def unique_prefix() -> str:
    """
    A key prefix of its own for one test, so tests share one server.
    """
    return f"t{uuid.uuid4().hex[:12]}:"


@dataclass
class TLSFiles:
    ca: str
    cert_and_key: str


@dataclass
class RedisServer:
    directory: str
    port: int
    tls_port: int | None = None
    tls: TLSFiles | None = None
    extra: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def unix_path(self) -> str:
        return os.path.join(self.directory, "redis.sock")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.unix_path}?db=0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> None:
        assert REDIS_SERVER is not None
        argv = [
            REDIS_SERVER,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--unixsocket",
            self.unix_path,
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.directory,
            "--logfile",
            os.path.join(self.directory, "redis.log"),
            *self.extra,
        ]
        if self.tls is not None and self.tls_port is not None:
            argv += [
                "--tls-port",
                str(self.tls_port),
                "--tls-cert-file",
                self.tls.cert_and_key,
                "--tls-key-file",
                self.tls.cert_and_key,
                "--tls-ca-cert-file",
                self.tls.ca,
                "--tls-auth-clients",
                "no",
            ]
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                if self.client().ping():
                    return
            except redis.ConnectionError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start; see {self.directory}/redis.log")
            time.sleep(0.02)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def start_redis(*, tls: TLSFiles | None = None, extra: tuple[str, ...] = ()) -> RedisServer:
    """
    A fresh redis-server in a private directory of its own; the calling
    test is skipped when redis-server is not installed.
    """
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    directory = tempfile.mkdtemp(prefix="cp-redis-", dir="/tmp")  # short: a Unix socket path
    os.chmod(directory, 0o700)
    server = RedisServer(
        directory,
        free_port(),
        tls_port=free_port() if tls is not None else None,
        tls=tls,
        extra=extra,
    )
    try:
        server.start()
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(directory)
        raise
    return server


def write_store_key(directory: str, name: str = "store.key") -> str:
    """
    A store key file as `credproxy new-token` writes it (64 hex digits, 0600).
    """
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(32).hex() + "\n")
    return path
