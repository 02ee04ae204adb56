"""
systemd integration without systemd: the sd_notify datagram on real sockets,
which endpoint strings count as Unix sockets (and so may run without a
capability token), listening on an inherited Unix socket without touching
its file, mode or listening state, and the shipped units' command line.
"""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import socket
import stat
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import _SystemdParser
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.logger import LogEvent, LogLevel
from twisted.python import usage
from twisted.python.systemd import ListenFDs
from twisted.trial.unittest import SynchronousTestCase

from credproxy._listen import (
    ListenError,
    ListeningService,
    PeerCredentials,
    is_inherited_unix_description,
    is_unix_description,
    peer_credentials,
    unix_description,
)
from credproxy._systemd import (
    InheritedUNIXServerEndpoint,
    notify_address,
    notify_ready,
)
from credproxy.broker import Broker
from credproxy.broker.credentials import EnvironmentCredentialSource
from credproxy.http import HTTPFace, HTTPFaceConfigError, HTTPProxyConfig
from credproxy.service import (
    HTTP_SOCKET_NAME,
    RPC_SOCKET_NAME,
    BrokerConfig,
    CredproxyConfig,
    CredproxyService,
)
from credproxy.stores import MemoryProviderKeyStore, MemoryTokenStore
from credproxy.tap import Options
from credproxy.testing import InlineBlockingCalls
from credproxy.wire import RPCFace, RPCFaceConfigError
from tests.logcapture import captured_log

UNITS = Path(__file__).resolve().parent.parent / "docs" / "systemd"


def _receiver(address: str) -> socket.socket:
    """
    A datagram socket bound where the service manager would listen.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(address)
    s.setblocking(False)
    return s


def _datagrams(s: socket.socket) -> list[bytes]:
    found = []
    while True:
        try:
            found.append(s.recv(4096))
        except BlockingIOError:
            return found


def _warnings(events: list[LogEvent]) -> list[LogEvent]:
    return [e for e in events if e.get("log_level") == LogLevel.warn]


class NotifyTests(SynchronousTestCase):
    def setUp(self) -> None:
        # Short, like the socket_dir fixture: Unix socket paths are limited to 107 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="cp-", dir="/tmp"))
        self.addCleanup(shutil.rmtree, self.dir, True)

    def test_ready_is_one_datagram_of_exactly_ready_1(self) -> None:
        path = str(self.dir / "notify")
        receiver = _receiver(path)
        self.addCleanup(receiver.close)
        with captured_log() as events:
            self.assertTrue(notify_ready({"NOTIFY_SOCKET": path}))
        self.assertEqual(_datagrams(receiver), [b"READY=1"])
        self.assertEqual(_warnings(events), [])

    def test_a_leading_at_names_the_abstract_namespace(self) -> None:
        name = f"credproxy-test-{uuid.uuid4().hex}"
        receiver = _receiver("\0" + name)
        self.addCleanup(receiver.close)
        self.assertEqual(notify_address({"NOTIFY_SOCKET": "@" + name}), "\0" + name)
        self.assertTrue(notify_ready({"NOTIFY_SOCKET": "@" + name}))
        self.assertEqual(_datagrams(receiver), [b"READY=1"])

    def test_without_notify_socket_nothing_is_opened(self) -> None:
        opened: list[tuple[int, int]] = []

        def factory(family: int, kind: int) -> socket.socket:
            opened.append((family, kind))
            return socket.socket(family, kind)

        with captured_log() as events:
            for environ in ({}, {"NOTIFY_SOCKET": ""}):
                self.assertFalse(notify_ready(environ, socket_factory=factory))
        self.assertEqual(opened, [])
        self.assertEqual(_warnings(events), [])

    def test_a_failed_send_is_one_warning_never_an_exception(self) -> None:
        missing = str(self.dir / "nobody-listens")
        with captured_log() as events:
            self.assertFalse(notify_ready({"NOTIFY_SOCKET": missing}))
        [warning] = _warnings(events)
        self.assertIn("Cannot notify the service manager", warning["log_format"])
        self.assertEqual(warning["address"], missing)

    def test_an_unsupported_address_is_one_warning(self) -> None:
        opened: list[int] = []

        def factory(family: int, kind: int) -> socket.socket:
            opened.append(family)
            return socket.socket(family, kind)

        with captured_log() as events:
            self.assertFalse(notify_ready({"NOTIFY_SOCKET": "vsock:2:999"}, factory))
        self.assertEqual(len(_warnings(events)), 1)
        self.assertEqual(opened, [])

    def test_the_socket_is_closed_after_sending(self) -> None:
        path = str(self.dir / "notify")
        receiver = _receiver(path)
        self.addCleanup(receiver.close)
        made: list[socket.socket] = []

        def factory(family: int, kind: int) -> socket.socket:
            s = socket.socket(family, kind)
            made.append(s)
            return s

        notify_ready({"NOTIFY_SOCKET": path}, factory)
        self.assertEqual(len(made), 1)
        self.assertEqual(made[0].fileno(), -1)


class ClassificationTests(SynchronousTestCase):
    UNIX = (
        "systemd:domain=UNIX:index=0",
        "systemd:UNIX:0",
        "systemd:domain=UNIX:name=http",
        "SYSTEMD:index=1:domain=UNIX",
        "unix:address=/run/x.sock",
    )
    NOT_UNIX = (
        "systemd:domain=INET:index=0",
        "systemd:domain=INET6:index=0",
        "systemd:INET:0",
        "systemd:index=0",
        "tcp:port=8787:interface=127.0.0.1",
        "unixish:address=/x",
    )

    def test_activated_unix_sockets_are_unix_sockets(self) -> None:
        for description in self.UNIX:
            self.assertTrue(is_unix_description(description), description)
        for description in self.NOT_UNIX:
            self.assertFalse(is_unix_description(description), description)
        self.assertTrue(is_inherited_unix_description("systemd:domain=UNIX:index=0"))
        self.assertFalse(is_inherited_unix_description("unix:address=/run/x.sock"))

    def test_the_command_line_needs_a_token_only_for_non_unix(self) -> None:
        options = Options()
        options.parseOptions(["--http", "systemd:domain=UNIX:index=0", "--store", "memory"])
        self.assertEqual(options.config().http_endpoints, ("systemd:domain=UNIX:index=0",))
        for description in ("systemd:domain=INET:index=0", "systemd:domain=INET6:index=0"):
            with self.assertRaisesRegex(usage.UsageError, "without a capability token"):
                Options().parseOptions(["--rpc", description, "--store", "memory"])

    def test_both_faces_need_a_token_only_for_non_unix(self) -> None:
        reactor = MemoryReactorClock()
        broker = Broker(reactor, MemoryTokenStore(), MemoryProviderKeyStore())
        credentials = EnvironmentCredentialSource({})
        HTTPFace(reactor, ["systemd:domain=UNIX:index=0"], HTTPProxyConfig(), credentials)
        RPCFace(reactor, ["systemd:domain=UNIX:index=1"], broker)
        with self.assertRaisesRegex(HTTPFaceConfigError, "without a capability token"):
            HTTPFace(reactor, ["systemd:domain=INET:index=0"], HTTPProxyConfig(), credentials)
        with self.assertRaisesRegex(RPCFaceConfigError, "without a capability token"):
            RPCFace(reactor, ["systemd:domain=INET:index=0"], broker)


def _listening_unix(path: str, mode: int) -> socket.socket:
    """
    What a socket unit makes: a bound, listening socket with the unit's mode.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    os.chmod(path, mode)
    s.listen(8)
    return s


class _PeerRecorder(Protocol):
    def connectionMade(self) -> None:
        factory = self.factory
        assert isinstance(factory, _PeerFactory)
        factory.peers.append(peer_credentials(self.transport))
        factory.connected.callback(None)
        assert self.transport is not None
        self.transport.loseConnection()


class _PeerFactory(Factory):
    protocol = _PeerRecorder

    def __init__(self) -> None:
        self.peers: list[PeerCredentials | None] = []
        self.connected: Deferred[None] = Deferred()


def _same_socket(fd: int, sock: socket.socket) -> bool:
    """
    Whether C{fd} is still open on C{sock} (a closed number may be reused at once).
    """
    try:
        return os.fstat(fd).st_ino == os.fstat(sock.fileno()).st_ino
    except OSError:
        return False


def _connect(path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(path)
        client.recv(1)  # until the server closes


def _still_listening(original: socket.socket, path: str) -> bool:
    """
    Whether the socket unit's own copy still takes connections: the kernel
    queues them in its backlog, and accept() on that copy finds one.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        try:
            client.connect(path)
        except OSError:
            return False
        original.settimeout(5)
        accepted, _ = original.accept()
        accepted.close()
        return True


@pytest_twisted.ensureDeferred
async def test_an_inherited_socket_keeps_its_mode_file_and_listening_copy(
    socket_dir: str,
) -> None:
    path = os.path.join(socket_dir, "http.sock")
    original = _listening_unix(path, 0o640)  # neither our 0600 nor Twisted's 0666
    try:
        fd = os.dup(original.fileno())  # the descriptor the service inherits
        factory = _PeerFactory()
        port = await InheritedUNIXServerEndpoint(global_reactor, fd).listen(factory)
        assert not _same_socket(fd, original)  # taken over: the inherited descriptor is closed
        try:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
            await deferToThread(_connect, path)
            await factory.connected
            assert factory.peers == [PeerCredentials(os.getpid(), os.getuid(), os.getgid())]
        finally:
            await maybeDeferred(port.stopListening)
        assert stat.S_ISSOCK(os.stat(path).st_mode)  # not unlinked
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        assert await deferToThread(_still_listening, original, path)  # not shut down
    finally:
        original.close()


@pytest.mark.parametrize(
    "make",
    [
        lambda path: socket.create_server(("127.0.0.1", 0)),
        lambda path: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM),  # not listening
        lambda path: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM),
    ],
    ids=["tcp", "unix-not-listening", "unix-datagram"],
)
def test_only_a_listening_unix_stream_socket_is_adopted(make: Any, socket_dir: str) -> None:
    wrong: socket.socket = make(os.path.join(socket_dir, "x.sock"))
    try:
        fd = os.dup(wrong.fileno())
        d = InheritedUNIXServerEndpoint(global_reactor, fd).listen(Factory.forProtocol(Protocol))
        failures: list[Any] = []
        d.addErrback(failures.append)
        [failure] = failures
        assert failure.check(CannotListenError)
        assert "not a listening Unix stream socket" in str(failure.value)
        os.close(fd)  # refused, so still ours to close
    finally:
        wrong.close()


@pytest.fixture
def inherited(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """
    The descriptors Twisted's C{systemd:} endpoint believes it inherited.
    Twisted reads LISTEN_FDS once, at import, into this class attribute; a
    test process has none, so the test puts its own there.
    """
    descriptors: list[int] = []
    fds = ListenFDs(descriptors, ())
    monkeypatch.setattr(_SystemdParser, "_sddaemon", fds)
    yield descriptors


@pytest_twisted.ensureDeferred
async def test_listening_service_adopts_a_systemd_unix_socket_once(
    socket_dir: str, inherited: list[int]
) -> None:
    path = os.path.join(socket_dir, "http.sock")
    original = _listening_unix(path, 0o640)
    try:
        inherited.append(os.dup(original.fileno()))
        factory = _PeerFactory()
        service = ListeningService(global_reactor, "systemd:domain=UNIX:index=0", factory)
        service.startService()
        try:
            assert service.port is not None
            assert service.bound_path is None  # nothing for a failed start to remove
            await deferToThread(_connect, path)
            await factory.connected
            assert factory.peers[0] is not None and factory.peers[0].uid == os.getuid()
        finally:
            await service.stopService()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        with pytest.raises(ListenError, match="only a new process can adopt it again"):
            service.startService()
    finally:
        original.close()


def test_a_missing_inherited_socket_is_a_clear_listen_error(inherited: list[int]) -> None:
    for description in ("systemd:domain=UNIX:index=0", "systemd:domain=INET:index=3"):
        service = ListeningService(global_reactor, description, Factory.forProtocol(Protocol))
        with pytest.raises(ListenError, match="passed no socket by that index or name"):
            service.startService()
    service = ListeningService(
        global_reactor, "systemd:domain=UNIX:name=nope", Factory.forProtocol(Protocol)
    )
    with pytest.raises(ListenError, match="--fdname"):
        service.startService()


def _service(reactor: MemoryReactorClock, http: str, rpc: str) -> CredproxyService:
    config = CredproxyConfig(
        http_endpoints=(http,), rpc_endpoints=(rpc,), broker=BrokerConfig(store="memory")
    )
    return CredproxyService(reactor, config, calls=InlineBlockingCalls(), environ={})


def test_the_service_sends_ready_once_after_both_faces_listen(
    socket_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    notify = os.path.join(socket_dir, "notify")
    receiver = _receiver(notify)
    monkeypatch.setenv("NOTIFY_SOCKET", notify)
    reactor = MemoryReactorClock()
    listening_when_notified: list[list[str]] = []
    import credproxy._systemd

    real = credproxy._systemd.notify_ready

    def noting() -> bool:
        listening_when_notified.append([str(port[0]) for port in reactor.unixServers])
        return real()

    monkeypatch.setattr(credproxy._systemd, "notify_ready", noting)
    http = os.path.join(socket_dir, "h.sock")
    rpc = os.path.join(socket_dir, "c.sock")
    try:
        _service(reactor, unix_description(http), unix_description(rpc)).startService()
        assert listening_when_notified == [[http, rpc]]
        assert _datagrams(receiver) == [b"READY=1"]
    finally:
        receiver.close()


def test_a_failed_start_sends_nothing(socket_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    notify = os.path.join(socket_dir, "notify")
    receiver = _receiver(notify)
    monkeypatch.setenv("NOTIFY_SOCKET", notify)
    live_path = os.path.join(socket_dir, "c.sock")
    live = _listening_unix(live_path, 0o600)  # another process serves the credential socket
    try:
        service = _service(
            MemoryReactorClock(),
            unix_description(os.path.join(socket_dir, "h.sock")),
            unix_description(live_path),
        )
        with pytest.raises(ListenError, match="another process is serving"):
            service.startService()
        assert _datagrams(receiver) == []
    finally:
        live.close()
        receiver.close()


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((UNITS / name).read_text().replace("\\\n", " "))
    return parser


def _listen_streams() -> list[str]:
    # ListenStream= repeats, and configparser keeps only the last: read the lines.
    return [
        line.partition("=")[2].strip()
        for line in (UNITS / "credproxy.socket").read_text().splitlines()
        if line.startswith("ListenStream=")
    ]


def test_the_units_command_line_is_one_credproxy_accepts() -> None:
    service = _unit("credproxy.service")["Service"]
    assert service["Type"] == "notify"
    argv = shlex.split(service["ExecStart"].replace("${STATE_DIRECTORY}", "/var/lib/credproxy"))
    assert os.path.basename(argv[0]) == "twistd"
    assert "-n" in argv[: argv.index("credproxy")]  # LISTEN_PID must name this very process
    options = Options()
    options.parseOptions(argv[argv.index("credproxy") + 1 :])
    config = options.config()
    assert config.http_endpoints == ("systemd:domain=UNIX:index=0",)
    assert config.rpc_endpoints == ("systemd:domain=UNIX:index=1",)
    assert config.capability_token is None  # Unix sockets: the peer uid is the guard


def test_the_socket_unit_passes_the_default_sockets_in_index_order() -> None:
    socket_section = _unit("credproxy.socket")["Socket"]
    assert socket_section["SocketMode"] == "0600"
    assert socket_section["DirectoryMode"] == "0700"
    assert _listen_streams() == [
        f"%t/credproxy/{HTTP_SOCKET_NAME}",  # index 0, --http
        f"%t/credproxy/{RPC_SOCKET_NAME}",  # index 1, --rpc
    ]
