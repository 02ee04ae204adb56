"""
The C{twistd credproxy} command line: the only module (with C{credproxy.cli},
which reuses its options) that knows the options and reaches for the global
reactor.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as distribution_version
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

from twisted.application.service import IService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python import usage

from credproxy import _process
from credproxy._limits import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_PEER,
    ConnectionLimits,
)
from credproxy._listen import ListenError, is_unix_description, parse_unix_description
from credproxy._secret import Secret, read_capability_token_file
from credproxy.http import HTTPProxyConfig
from credproxy.service import (
    DEFAULT_GRACE,
    BrokerConfig,
    CredproxyConfig,
    CredproxyConfigError,
    CredproxyService,
    default_http_endpoint,
    default_rpc_endpoint,
)
from credproxy.stores import (
    DEFAULT_BUCKET,
    STORE_KINDS,
    RedisStoreConfig,
    default_state_dir,
    is_redis_url,
)
from credproxy.stores._redis_connection import DEFAULT_PREFIX as DEFAULT_REDIS_PREFIX
from credproxy.wire._spec import MAX_PENDING_HANDSHAKES

_T = TypeVar("_T")

_DEFAULTS = HTTPProxyConfig()


def _whole_number(option: str) -> Callable[[str], int]:
    """
    A parser for C{--option}'s value whose error names the option.
    """

    def parse(value: str) -> int:
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"--{option} needs a whole number, not {value!r}") from None

    return parse


# The limits an operator may need to change: (option, default, help, parser).
# Each is checked to be positive in postOptions.
_LIMIT_OPTIONS: list[list[Any]] = [
    [
        "max-body",
        None,
        _DEFAULTS.max_body,
        "Largest request body accepted, in bytes (the API's own limit by default).",
        _whole_number("max-body"),
    ],
    [
        "max-buffered-bytes",
        None,
        _DEFAULTS.max_buffered_bytes,
        "Bytes of request bodies held in memory at once, over all connections; past it a "
        "request gets 503 overloaded_error.",
        _whole_number("max-buffered-bytes"),
    ],
    [
        "max-connections",
        None,
        DEFAULT_MAX_CONNECTIONS,
        "Connections each face (HTTP, credential socket) keeps at once.",
        _whole_number("max-connections"),
    ],
    [
        "max-connections-per-peer",
        None,
        DEFAULT_MAX_CONNECTIONS_PER_PEER,
        "Connections one peer (a uid on a Unix socket, an address on TCP) keeps on each face.",
        _whole_number("max-connections-per-peer"),
    ],
    [
        "max-pending-handshakes",
        None,
        MAX_PENDING_HANDSHAKES,
        "Credential socket connections still handshaking at once (they never take the slots "
        "of handshaken ones).",
        _whole_number("max-pending-handshakes"),
    ],
    [
        "max-upstream-connections",
        None,
        _DEFAULTS.max_upstream_connections,
        "Upstream requests in flight at once; a request waits for one up to "
        f"{_DEFAULTS.upstream_wait_timeout:g} s, then gets 503.",
        _whole_number("max-upstream-connections"),
    ],
    [
        "head-timeout",
        None,
        _DEFAULTS.head_timeout,
        "Seconds a request head may take from its first byte (then 408).",
        float,
    ],
    [
        "body-idle-timeout",
        None,
        _DEFAULTS.body_idle_timeout,
        "Seconds a request body may go without progress (then 408).",
        float,
    ],
    [
        "body-timeout",
        None,
        _DEFAULTS.body_timeout,
        "Seconds a whole request body may take (then 408).",
        float,
    ],
]


def credproxy_version() -> str:
    """
    The installed credproxy's version, from its distribution's metadata (the
    one place it is written is pyproject.toml).
    """
    try:
        return distribution_version("credproxy")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


class VersionedOptions(usage.Options):
    """
    Options whose C{--version} is credproxy's own (Twisted's default prints
    Twisted's), for C{twistd credproxy} and every C{credproxy} command.
    """

    def opt_version(self) -> NoReturn:
        """
        Display credproxy's version and exit.
        """
        print(f"credproxy {credproxy_version()}")
        sys.exit(0)


class StoreOptions(VersionedOptions):
    """
    The options saying where credentials are kept and which OAuth providers
    exist: the service's, and every C{credproxy} command that opens the same
    stores (login, status, set-key ...) takes them from here, so each is
    defined once and means the same everywhere.
    """

    optParameters: list[list[Any]] = [
        [
            "store",
            None,
            "auto",
            "Where credentials are kept: auto (keyring when a Secret Service answers, else file), "
            "keyring, file, memory, or a Redis shared by a fleet: redis://HOST:PORT/DB, "
            "rediss://HOST:PORT/DB (TLS) or unix:///PATH?db=N.",
        ],
        [
            "store-key-file",
            None,
            None,
            "With a Redis store: the file holding the key that encrypts what Redis holds "
            "(64 hex digits, as credproxy new-token writes; the same file on every host).",
        ],
        [
            "redis-password-file",
            None,
            None,
            "With a Redis store: a private file holding the Redis password (never in the URL).",
        ],
        [
            "redis-ca-file",
            None,
            None,
            "With a rediss:// store: the CA certificates (PEM) that verify the server "
            "(default: the system's).",
        ],
        [
            "redis-prefix",
            None,
            DEFAULT_REDIS_PREFIX,
            "With a Redis store: the prefix of every Redis key and channel credproxy uses.",
        ],
        [
            "state-dir",
            None,
            None,
            "Directory of the file store, the change marker and the refresh lock files "
            "(default $XDG_STATE_HOME/credproxy, else ~/.local/state/credproxy).",
        ],
        ["config", None, None, "TOML file configuring OAuth providers ([oauth.NAME] tables)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["store-old-key-files"] = []

    def opt_store_old_key_file(self, path: str) -> None:
        """
        With a Redis store: a retired store key file, still read (repeatable).
        """
        self["store-old-key-files"].append(path)

    def postOptions(self) -> None:
        if self["store"] not in STORE_KINDS and not is_redis_url(self["store"]):
            raise usage.UsageError(
                f"--store must be one of {', '.join(STORE_KINDS)}, or a redis://, rediss://"
                " or unix:// URL"
            )
        if self["state-dir"] is None:
            self["state-dir"] = default_state_dir()

    def broker_config(self, **policy: Any) -> BrokerConfig:
        """
        The store options as the broker's configuration; C{policy} gives the
        service's other broker settings (bucket, sandbox policy).
        """
        return BrokerConfig(
            store=self["store"],
            state_dir=self["state-dir"],
            oauth_config=self["config"],
            redis=RedisStoreConfig(
                key_file=self["store-key-file"],
                old_key_files=tuple(self["store-old-key-files"]),
                password_file=self["redis-password-file"],
                ca_file=self["redis-ca-file"],
                prefix=self["redis-prefix"],
            ),
            **policy,
        )


class Options(StoreOptions):
    """
    C{twistd credproxy [--http ENDPOINT]... [--rpc ENDPOINT]... [--upstream URL]
    [--max-body BYTES] [--capability-token-file PATH] [--allow-uid UID]... [--grace SECONDS]
    [--store KIND] [--state-dir PATH] [--config PATH] [--bucket NAME] [--sandbox-read NAME]...
    [--allow-sandbox-login]}
    """

    synopsis = "[options]"
    longdesc = (
        "Serve the Anthropic Messages API with the real credential injected (--http), and the "
        "credential socket sandboxes ask for tokens and keys (--rpc). With neither option both "
        "run, on the Unix sockets http.sock and cred.sock in $XDG_RUNTIME_DIR/credproxy; naming "
        "either runs only the faces named. The HTTP face's credential is ANTHROPIC_API_KEY, "
        "else CLAUDE_CODE_OAUTH_TOKEN, else the stored key named anthropic, else the stored "
        "anthropic OAuth token (refreshed as needed)."
    )

    optFlags: list[list[Any]] = [
        [
            "allow-sandbox-login",
            None,
            "Let sandbox connections refresh tokens and log in over the credential socket.",
        ],
    ]

    # The store options (--store, --state-dir, --config) come from StoreOptions.
    optParameters: list[list[Any]] = [
        ["upstream", None, _DEFAULTS.upstream, "Base URL of the Anthropic API (TLS verified)."],
        [
            "bucket",
            None,
            DEFAULT_BUCKET,
            "Bucket of the stored anthropic OAuth token the HTTP face uses.",
        ],
        *_LIMIT_OPTIONS,
        [
            "capability-token-file",
            None,
            None,
            "File holding the capability token agents must present (whitespace ignored; mode "
            "0600, at least 32 bytes: make one with credproxy new-token). The credential "
            "socket then serves only sandbox connections that present it.",
        ],
        ["grace", None, DEFAULT_GRACE, "Seconds in-flight streams may finish at stop.", float],
        [
            "audit-log",
            None,
            None,
            "Append the audit records to this file as JSON lines (made with mode 0600) "
            "instead of the log.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["http"] = []
        self["rpc"] = []
        self["allow-uid"] = []
        self["sandbox-read"] = []

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """
        Under twistd (which is then C{parent}), a bad option ends the start
        with one line on stderr, before twistd daemonizes: twistd's own
        answer to a L{usage.UsageError} is the whole usage on stdout.
        """
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if self.parent is None:
                raise
            raise SystemExit(f"credproxy: {e} (see --help)") from None

    def opt_sandbox_read(self, name: str) -> None:
        """
        Let sandbox connections read only the named entries (a key name or a
        token provider; repeatable). Without it every named entry is readable.
        """
        if not name:
            raise usage.UsageError("--sandbox-read needs a name")
        self["sandbox-read"].append(name)

    def opt_http(self, endpoint: str) -> None:
        """
        Serve the HTTP face on a Twisted server endpoint string (repeatable),
        e.g. unix:address=/run/user/1000/credproxy/http.sock or tcp:port=8787:interface=127.0.0.1
        """
        self["http"].append(endpoint)

    def opt_rpc(self, endpoint: str) -> None:
        """
        Serve the credential socket on a Twisted server endpoint string (repeatable),
        e.g. unix:address=/run/user/1000/credproxy/cred.sock
        """
        self["rpc"].append(endpoint)

    def opt_allow_uid(self, uid: str) -> None:
        """
        Also serve Unix peers with this uid (repeatable); our own uid always is.
        """
        try:
            value = int(uid)
        except ValueError:
            raise usage.UsageError(f"--allow-uid needs a number, not {uid!r}") from None
        if value < 0:
            raise usage.UsageError("--allow-uid needs a non-negative number")
        self["allow-uid"].append(value)

    def postOptions(self) -> None:
        super().postOptions()
        for option in _LIMIT_OPTIONS:
            if not (0 < self[option[0]] < math.inf):  # also refuses nan
                raise usage.UsageError(f"--{option[0]} must be a positive, finite number")
        if self["grace"] < 0:
            raise usage.UsageError("--grace must not be negative")
        if self["audit-log"] is not None:
            if not self["audit-log"]:
                raise usage.UsageError("--audit-log needs a path")
            # Absolute: a daemon's working directory may change.
            self["audit-log"] = os.path.abspath(self["audit-log"])
        if not self["bucket"]:
            raise usage.UsageError("--bucket needs a name")
        upstream = urlsplit(self["upstream"])
        if upstream.scheme not in ("http", "https") or not upstream.hostname:
            raise usage.UsageError("--upstream must be an http:// or https:// URL")
        if upstream.username or upstream.password:
            raise usage.UsageError("--upstream must not carry credentials")
        token: Secret | None = None
        if self["capability-token-file"]:
            try:
                token = read_capability_token_file(self["capability-token-file"])
            except OSError as e:
                detail = e.strerror or type(e).__name__
                raise usage.UsageError(f"cannot read --capability-token-file: {detail}") from None
            except ValueError as e:
                raise usage.UsageError(f"--capability-token-file: {e}") from None
        self["capability-token"] = token
        if not self["http"] and not self["rpc"]:
            self["http"] = [default_http_endpoint()]
            self["rpc"] = [default_rpc_endpoint()]
        for endpoint in (*self["http"], *self["rpc"]):
            try:
                parse_unix_description(endpoint)
            except ListenError as e:
                raise usage.UsageError(str(e)) from None
            if token is None and not is_unix_description(endpoint):
                raise usage.UsageError(
                    f"refusing to listen on {endpoint!r} without a capability token: only a Unix "
                    "socket identifies its peers; give --capability-token-file to use TCP"
                )

    def config(self) -> CredproxyConfig:
        """
        The parsed options as the service's configuration.
        """
        token: Secret | None = self["capability-token"]
        limits = ConnectionLimits(
            max_connections=self["max-connections"],
            max_per_peer=self["max-connections-per-peer"],
        )
        return CredproxyConfig(
            http_endpoints=tuple(self["http"]),
            rpc_endpoints=tuple(self["rpc"]),
            http=HTTPProxyConfig(
                upstream=self["upstream"],
                max_body=self["max-body"],
                capability_token=token,
                allowed_uids=frozenset({os.getuid(), *self["allow-uid"]}),
                max_buffered_bytes=self["max-buffered-bytes"],
                limits=limits,
                head_timeout=self["head-timeout"],
                body_idle_timeout=self["body-idle-timeout"],
                body_timeout=self["body-timeout"],
                max_upstream_connections=self["max-upstream-connections"],
            ),
            rpc_limits=limits,
            max_pending_handshakes=self["max-pending-handshakes"],
            capability_token=token,
            grace=self["grace"],
            audit_log=self["audit-log"],
            broker=self.broker_config(
                bucket=self["bucket"],
                sandbox_readable=frozenset(self["sandbox-read"]) if self["sandbox-read"] else None,
                allow_sandbox_login=bool(self["allow-sandbox-login"]),
            ),
        )


class _CommandLineService(CredproxyService):
    """
    Under twistd a face that cannot listen must end the process with one clear
    line, not a traceback and not a process running with a face missing.

    SIGHUP (the terminal went away) stops the service as SIGTERM does:
    twistd leaves it at the default action, which would end the process on
    the spot with its socket files left behind.

    Under twistd, SIGINT and SIGTERM stop it from the start of
    C{startService} on. twistd starts the service before the reactor runs,
    and the reactor installs its own handlers only then: a Ctrl-C in
    between raised KeyboardInterrupt wherever the start happened to be,
    where Twisted's startup code caught and logged it, and the process went
    on running, deaf to it. From here on the reactor's own handling (its log
    line, its stop, twistd's exit status) is asked for at once; the reactor
    keeps ours for SIGINT and replaces ours for SIGTERM with its equal.

    C{twistd}, twistd's own options when twistd runs it, brings that line
    to the terminal from a daemon too (L{_process.TwistdStart}).
    """

    def __init__(
        self,
        reactor: Any,
        config: CredproxyConfig,
        *,
        twistd: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(reactor, config, **kwargs)
        self._reactor = reactor
        self._previous_handlers: dict[int, Any] = {}
        # Last, so that a service that cannot be built leaves nothing running.
        self._twistd = _process.TwistdStart(twistd) if twistd is not None else None

    def startService(self) -> None:
        twistd = self._twistd
        if twistd is not None:
            if threading.current_thread() is threading.main_thread():
                # credproxy serve has its own handlers in place before it runs the reactor.
                self._handle(signal.SIGINT, self._stop_signal)
                self._handle(signal.SIGTERM, self._stop_signal)
            twistd.starting()
        try:
            super().startService()
        except ListenError as e:
            # The reactor never runs after this, so Twisted would not get to
            # remove the sockets already bound: do it here.
            for listener in self.listening_services():
                if listener.bound_path is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(listener.bound_path)
            line = f"credproxy: {e}"
            self._restore_handlers(None)
            if twistd is not None:
                twistd.failed(line)
            raise SystemExit(line) from None
        except BaseException:
            self._restore_handlers(None)
            if twistd is not None:
                twistd.twistd_reports()
            raise
        if twistd is not None:
            twistd.started()
        if threading.current_thread() is threading.main_thread():
            self._handle(signal.SIGHUP, self._hangup)

    def _handle(self, signum: int, handler: Callable[[int, Any], None]) -> None:
        previous = signal.signal(signum, handler)
        self._previous_handlers.setdefault(signum, previous)

    def _hangup(self, signum: int, frame: object) -> None:
        reactor = self._reactor
        reactor.callFromThread(lambda: reactor.stop() if reactor.running else None)

    def _stop_signal(self, signum: int, frame: Any) -> None:
        # ReactorBase's sigInt or sigTerm; another reactor may lack them.
        name = "sigInt" if signum == signal.SIGINT else "sigTerm"
        handler = getattr(self._reactor, name, None)
        if handler is not None:
            handler(signum, frame)
        else:
            self._hangup(signum, frame)

    def stopService(self) -> Deferred[None]:
        # The handlers stay until the stop is done: a second signal during
        # the grace period must not meet Python's default (a traceback, or
        # for SIGHUP the end of the process with its sockets left behind).
        return maybeDeferred(super().stopService).addBoth(self._restore_handlers)

    def _restore_handlers(self, result: _T) -> _T:
        ours = (self._hangup, self._stop_signal)
        for signum, previous in self._previous_handlers.items():
            # A handler the reactor put in place of ours since is the reactor's to keep.
            if signal.getsignal(signum) in ours:
                signal.signal(signum, previous)
        self._previous_handlers.clear()
        return result


def makeService(options: Options, reactor: Any = None) -> IService:
    """
    Build the service twistd runs.

    When twistd (or twist) parsed C{options}, its own options are their
    C{parent}, and this is credproxy's command line: the process is made
    non-dumpable first, and the credential variables leave C{os.environ}
    once the service has read them (L{credproxy._process}). Called by
    anything else, it leaves the process alone.
    """
    twistd: Mapping[str, Any] | None = options.parent
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    if twistd is not None:
        _process.harden()
    try:
        service = _CommandLineService(reactor, options.config(), twistd=twistd, environ=os.environ)
    except CredproxyConfigError as e:
        raise SystemExit(f"credproxy: {e}") from None
    if twistd is not None:
        _process.forget_credential_variables()
    return service
