"""
Listening hygiene: endpoint parsing, the private runtime directory, stale and
live sockets, bind failures raised at start, peer credentials.
"""

from __future__ import annotations

import os
import socket
import stat
import tempfile

import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from credproxy._listen import (
    ListenError,
    ListeningService,
    clear_stale_socket,
    default_runtime_dir,
    ensure_private_dir,
    is_unix_description,
    parse_unix_description,
    peer_credentials,
    unix_description,
)


class ParseTests(SynchronousTestCase):
    def test_round_trip_with_escapes(self) -> None:
        path = "/tmp/a:b\\c/http.sock"
        spec = parse_unix_description(unix_description(path))
        assert spec is not None
        self.assertEqual(spec.path, path)
        self.assertEqual(spec.mode, 0o600)
        self.assertTrue(spec.lockfile)

    def test_mode_defaults_to_0600_not_twisteds_0666(self) -> None:
        spec = parse_unix_description("unix:address=/tmp/x.sock")
        assert spec is not None
        self.assertEqual(spec.mode, 0o600)

    def test_positional_address_and_options(self) -> None:
        spec = parse_unix_description("unix:/tmp/x.sock:mode=660:backlog=7:lockfile=0")
        assert spec is not None
        self.assertEqual(
            (spec.path, spec.mode, spec.backlog, spec.lockfile), ("/tmp/x.sock", 0o660, 7, False)
        )

    def test_other_kinds_are_not_unix(self) -> None:
        self.assertIsNone(parse_unix_description("tcp:port=0:interface=127.0.0.1"))
        self.assertFalse(is_unix_description("tcp:8787"))
        self.assertTrue(is_unix_description("UNIX:address=/x"))

    def test_malformed_unix_descriptions(self) -> None:
        for bad in ("unix:", "unix:mode=600", "unix:address=/x:mode=9z", "unix:address=/x:path=/y"):
            with self.assertRaises(ListenError):
                parse_unix_description(bad)


class RuntimeDirTests(SynchronousTestCase):
    def test_xdg_runtime_dir(self) -> None:
        self.assertEqual(
            default_runtime_dir({"XDG_RUNTIME_DIR": "/run/user/7"}), "/run/user/7/credproxy"
        )

    def test_fallback_is_per_user_under_tmp(self) -> None:
        for environ in ({}, {"XDG_RUNTIME_DIR": "relative"}):
            path = default_runtime_dir(environ)
            self.assertTrue(path.startswith(tempfile.gettempdir()))
            self.assertTrue(path.endswith(f"credproxy-{os.getuid()}"))

    def test_ensure_private_dir_creates_0700_and_tightens(self) -> None:
        base = tempfile.mkdtemp()
        self.addCleanup(os.rmdir, base)
        path = os.path.join(base, "cp")
        ensure_private_dir(path)
        self.addCleanup(os.rmdir, path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o700)
        os.chmod(path, 0o755)  # noqa: S103 - the test loosens it to see it tightened
        ensure_private_dir(path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o700)

    def test_ensure_private_dir_refuses_a_file(self) -> None:
        fd, path = tempfile.mkstemp()
        os.close(fd)
        self.addCleanup(os.unlink, path)
        with self.assertRaises(ListenError):
            ensure_private_dir(path)


def _bound_socket(path: str, listen: bool) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    if listen:
        s.listen(1)
    return s


def test_stale_socket_is_replaced(socket_dir: str) -> None:
    path = os.path.join(socket_dir, "s.sock")
    _bound_socket(path, listen=False).close()  # the file stays, nobody listens
    assert os.path.exists(path)
    clear_stale_socket(path)
    assert not os.path.exists(path)


def test_live_socket_is_never_replaced(socket_dir: str) -> None:
    path = os.path.join(socket_dir, "s.sock")
    live = _bound_socket(path, listen=True)
    try:
        with pytest.raises(ListenError, match="another process is serving"):
            clear_stale_socket(path)
        assert os.path.exists(path)
    finally:
        live.close()


def test_non_socket_is_never_replaced(socket_dir: str) -> None:
    path = os.path.join(socket_dir, "s.sock")
    with open(path, "w") as f:
        f.write("precious")
    with pytest.raises(ListenError, match="not a socket"):
        clear_stale_socket(path)
    with open(path) as f:
        assert f.read() == "precious"


@pytest_twisted.ensureDeferred
async def test_listening_service_binds_0600_replaces_stale_and_unlinks(socket_dir: str) -> None:
    path = os.path.join(socket_dir, "s.sock")
    _bound_socket(path, listen=False).close()
    factory = Factory.forProtocol(Protocol)
    service = ListeningService(global_reactor, unix_description(path), factory)
    service.startService()
    try:
        assert service.port is not None
        assert service.bound_path == path
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        await service.stopService()
    assert service.port is None
    assert not os.path.exists(path)


def test_listening_service_bind_failure_is_clear(socket_dir: str) -> None:
    path = os.path.join(socket_dir, "s.sock")
    live = _bound_socket(path, listen=True)
    try:
        service = ListeningService(
            global_reactor, unix_description(path), Factory.forProtocol(Protocol)
        )
        with pytest.raises(ListenError, match="another process is serving"):
            service.startService()
        assert not service.running
        missing = ListeningService(
            global_reactor,
            unix_description(os.path.join(socket_dir, "no", "such", "dir.sock")),
            Factory.forProtocol(Protocol),
        )
        with pytest.raises(ListenError, match="cannot listen on unix"):
            missing.startService()
    finally:
        live.close()


def test_tcp_bind_failure_is_clear() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        service = ListeningService(
            global_reactor, f"tcp:port={port}:interface=127.0.0.1", Factory.forProtocol(Protocol)
        )
        with pytest.raises(ListenError, match=f"cannot listen on tcp:port={port}"):
            service.startService()
    finally:
        taken.close()


def test_malformed_endpoint_is_a_listen_error() -> None:
    service = ListeningService(global_reactor, "nonsense:foo=bar", Factory.forProtocol(Protocol))
    with pytest.raises(ListenError, match="malformed endpoint"):
        service.startService()


def test_peer_credentials_of_a_unix_socket_pair() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:

        class Transport:
            def getHandle(self) -> socket.socket:
                return a

        creds = peer_credentials(Transport())
        assert creds is not None
        assert (creds.pid, creds.uid, creds.gid) == (os.getpid(), os.getuid(), os.getgid())
    finally:
        a.close()
        b.close()


def test_peer_credentials_of_other_transports_is_none() -> None:
    assert peer_credentials(StringTransport()) is None
    tcp = socket.socket()
    try:

        class Transport:
            def getHandle(self) -> socket.socket:
                return tcp

        assert peer_credentials(Transport()) is None
    finally:
        tcp.close()
