"""
Where and how credproxy's faces listen: the private runtime directory, Unix
socket hygiene (mode 0600, stale sockets replaced, live ones never), Unix
sockets passed by systemd (left as their socket unit made them), bind
failures raised at start, and peer credentials of Unix clients.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    UNIXServerEndpoint,
    serverFromString,
)
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from credproxy._systemd import InheritedUNIXServerEndpoint
from credproxy._transports import lean_reactor

log = Logger()

DEFAULT_SOCKET_MODE = 0o600


class ListenError(Exception):
    """
    A face could not start listening; the message says where and why.
    """


def default_runtime_dir(environ: Mapping[str, str] = os.environ) -> str:
    """
    The directory holding credproxy's default sockets: C{$XDG_RUNTIME_DIR/credproxy},
    or a per-user directory under the temporary directory.
    """
    base = environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isabs(base):
        return os.path.join(base, "credproxy")
    return os.path.join(tempfile.gettempdir(), f"credproxy-{os.getuid()}")


def ensure_private_dir(path: str) -> None:
    """
    Create C{path} with mode 0700, or check that an existing one is ours and
    private. Twisted binds a socket before it chmods it, so only a private
    directory keeps other users from connecting in between.

    @raise ListenError: if the directory belongs to someone else or is not a directory.
    """
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        raise ListenError(f"cannot create runtime directory {path}: {e.strerror}") from None
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise ListenError(f"runtime directory {path} is not a directory")
    if info.st_uid != os.getuid():
        raise ListenError(f"runtime directory {path} belongs to uid {info.st_uid}, not to us")
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(path, 0o700)


def unix_description(path: str, mode: int = DEFAULT_SOCKET_MODE) -> str:
    """
    A server endpoint string for a Unix socket at C{path}.
    """
    quoted = path.replace("\\", "\\\\").replace(":", "\\:")
    return f"unix:address={quoted}:mode={mode:o}:lockfile=1"


def _split_description(description: str) -> list[str]:
    """
    Split an endpoint string on unescaped colons, undoing backslash escapes.
    """
    parts: list[str] = []
    current: list[str] = []
    chars = iter(description)
    for c in chars:
        if c == "\\":
            current.append(next(chars, ""))
        elif c == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
    parts.append("".join(current))
    return parts


@dataclass(frozen=True)
class UnixListenSpec:
    """
    A parsed C{unix:} server endpoint string.
    """

    path: str
    mode: int
    backlog: int
    lockfile: bool


def parse_unix_description(description: str) -> UnixListenSpec | None:
    """
    Parse a C{unix:} server endpoint string, or return L{None} for other kinds.
    Unlike Twisted's own parser it defaults the mode to 0600, not 0666.

    @raise ListenError: for a malformed Unix endpoint string.
    """
    parts = _split_description(description)
    if parts[0].strip().lower() != "unix":
        return None
    path: str | None = None
    options: dict[str, str] = {}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if not sep:
            path = part if path is None else path
        elif key == "address":
            path = value
        else:
            options[key] = value
    unknown = set(options) - {"mode", "backlog", "lockfile"}
    if not path or unknown:
        raise ListenError(f"malformed unix endpoint {description!r}: need address=PATH")
    try:
        return UnixListenSpec(
            path=path,
            mode=int(options.get("mode", f"{DEFAULT_SOCKET_MODE:o}"), 8),
            backlog=int(options.get("backlog", "50")),
            lockfile=options.get("lockfile", "1") not in ("0", ""),
        )
    except ValueError:
        raise ListenError(f"malformed unix endpoint {description!r}") from None


def is_inherited_unix_description(description: str) -> bool:
    """
    Whether C{description} is a C{systemd:} endpoint of domain C{UNIX}: a
    Unix socket that socket activation passed to us (C{systemd:domain=UNIX:index=0},
    or C{systemd:UNIX:0}, or by C{name=}).
    """
    parts = _split_description(description)
    if parts[0].strip().lower() != "systemd":
        return False
    positional = [part for part in parts[1:] if "=" not in part]
    keywords = dict(part.partition("=")[::2] for part in parts[1:] if "=" in part)
    domain = keywords.get("domain", positional[0] if positional else "")
    return domain.strip().upper() == "UNIX"


def is_unix_description(description: str) -> bool:
    """
    Whether C{description} is a Unix socket, whose peers the kernel identifies
    (so it may be served without a capability token): one we bind (C{unix:})
    or one systemd passed (C{systemd:domain=UNIX:...}). Listening checks that
    an inherited descriptor really is a Unix socket, so claiming the domain
    cannot turn a TCP socket into one served without a token.
    """
    return _split_description(description)[0].strip().lower() == "unix" or (
        is_inherited_unix_description(description)
    )


def clear_stale_socket(path: str) -> None:
    """
    Remove a socket file at C{path} left by a dead process; refuse to touch a
    live one or anything that is not a socket.

    @raise ListenError: if something is serving at C{path}, or it is not a socket.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ListenError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            log.info("Replacing stale socket {path}", path=path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        if e.errno == errno.EAGAIN:  # a full backlog: alive, just busy
            raise ListenError(f"another process is serving {path}") from None
        raise ListenError(f"cannot probe existing socket {path}: {e.strerror}") from None
    finally:
        probe.close()
    raise ListenError(f"another process is serving {path}")


class ListeningService(Service):
    """
    Listens on one server endpoint string while running. Bind failures are
    raised from C{startService}, so twistd refuses to start with a clear message
    rather than logging and running with a face missing.

    A Unix socket systemd passed (C{systemd:domain=UNIX:...}) belongs to its
    socket unit: it keeps the unit's mode and is neither replaced at start nor
    removed at stop (so C{bound_path} stays L{None}), and since stopping
    closes our copy, it can be adopted once per process.

    @ivar port: the listening port while started (tests read the bound address from it).
    @ivar bound_path: the Unix socket path this service bound, kept after it stops.
    """

    port: IListeningPort | None = None
    bound_path: str | None = None

    def __init__(self, reactor: object, description: str, factory: IProtocolFactory) -> None:
        # The connections it accepts are lean (credproxy._transports).
        self._reactor = lean_reactor(reactor)
        self.description = description
        self._factory = factory
        self._unix = parse_unix_description(description)
        self._inherited = is_inherited_unix_description(description)
        self._adopted = False
        self.name = description

    def _endpoint(self) -> IStreamServerEndpoint:
        if self._unix is not None:
            return UNIXServerEndpoint(
                self._reactor,
                self._unix.path,
                backlog=self._unix.backlog,
                mode=self._unix.mode,
                wantPID=self._unix.lockfile,
            )
        if self._adopted:
            raise ListenError(
                f"cannot listen on {self.description}: the socket systemd passed was closed "
                "when this listener stopped; only a new process can adopt it again"
            )
        try:
            endpoint: IStreamServerEndpoint = serverFromString(self._reactor, self.description)
        except LookupError as e:
            if _split_description(self.description)[0].strip().lower() == "systemd":
                raise ListenError(
                    f"cannot listen on {self.description}: the service manager passed no "
                    "socket by that index or name (it must set LISTEN_PID, LISTEN_FDS and "
                    "LISTEN_FDNAMES; give systemd-socket-activate --fdname=NAME)"
                ) from None
            raise ListenError(f"malformed endpoint {self.description!r}: {e}") from None
        except (ValueError, TypeError, AttributeError) as e:
            raise ListenError(f"malformed endpoint {self.description!r}: {e}") from None
        if self._inherited and isinstance(endpoint, AdoptedStreamServerEndpoint):
            # Twisted's own adoption would chmod the file to 0666 and unlink it at stop.
            return InheritedUNIXServerEndpoint(self._reactor, endpoint.fileno)
        return endpoint

    def startService(self) -> None:
        endpoint = self._endpoint()
        if self._unix is not None:
            clear_stale_socket(self._unix.path)
        outcome: list[IListeningPort | Failure] = []
        endpoint.listen(self._factory).addBoth(outcome.append)
        if not outcome:
            raise ListenError(f"listening on {self.description} did not complete synchronously")
        result = outcome[0]
        if isinstance(result, Failure):
            reason = result.value
            detail = getattr(reason, "socketError", None) or reason
            raise ListenError(f"cannot listen on {self.description}: {detail}")
        self.port = result
        if self._unix is not None:
            self.bound_path = self._unix.path
        self._adopted = self._inherited
        super().startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        d = port.stopListening()
        return d if d is not None else succeed(None)


_PEERCRED = struct.Struct("3i")


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(transport: object) -> PeerCredentials | None:
    """
    The kernel-verified identity of the process at the other end of a Unix
    socket transport (SO_PEERCRED), or L{None} for other transports.
    """
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return None
    handle = get_handle()
    if getattr(handle, "family", None) != socket.AF_UNIX:
        return None
    try:
        raw = handle.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except OSError:
        return None
    pid, uid, gid = _PEERCRED.unpack(raw)
    return PeerCredentials(pid=pid, uid=uid, gid=gid)
