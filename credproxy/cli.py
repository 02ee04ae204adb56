"""
The host's C{credproxy} command: run the service in the foreground, run a
program in a sandbox, make a capability token, and look after the stored
credentials (log in and out, set and delete API keys, show what is stored)
without a running service.

The commands that touch credentials open the very stores the service uses,
from the same C{--store}, C{--state-dir} and C{--config} options
(L{credproxy.tap.StoreOptions}), through a broker built in this process,
so a login here takes the same path as one over the credential socket.
Every store write bumps the state directory's change marker, so a running
service sees it at its next read, without a restart.

Only this module and L{credproxy.tap} reach for the global reactor, and
only here are signal handlers and the global log observer installed.

Exit status: 0 done, 1 the command failed (one line on standard error, or
the login's own last line), 2 the command line (or the key typed to
C{set-key}) was wrong, 130 interrupted.
"""

from __future__ import annotations

import contextlib
import getopt
import getpass
import importlib
import json
import math
import os
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import FrameType
from typing import Any, Final, TextIO, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ReactorNotRunning
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    eventAsJSON,
    formatEvent,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from credproxy import _process, tap
from credproxy._secret import Secret
from credproxy.broker import Broker
from credproxy.inner._login import ILoginBackend, LoginAdapter, StdioTerminal
from credproxy.service import CredproxyConfigError, CredproxyService, build_broker
from credproxy.stores import DEFAULT_BUCKET, BlockingCalls, RedisConnection, StoreError, Token
from credproxy.wire import _login_ops
from credproxy.wire._ops import AuditRecord, Handler, OpContext, OpFailure
from credproxy.wire._spec import Op

log = Logger(namespace="credproxy.cli")

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130  # 128 + SIGINT, as shells report it

# A capability token: 256 random bits, written as 64 lowercase hex digits.
TOKEN_BYTES: Final = 32
# The longest API key set-key accepts; real keys are around a hundred characters.
MAX_KEY_CHARS: Final = 64 * 1024
# How long an interrupted command may take to call off what it was doing
# (cancel a login, stop the stores' threads) before the process ends anyway.
INTERRUPT_GRACE: Final = 5.0
# The signals that end a foreground command the way SIGTERM does. SIGHUP
# (the terminal went away) is one: a service whose terminal closed has
# nobody reading its log and nobody to stop it, so it stops cleanly rather
# than die on the default action and leave its sockets behind.
STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

PROG: Final = "credproxy"


# -- output ----------------------------------------------------------------------


@dataclass(frozen=True)
class Console:
    """
    Where a command reads and writes: the process's standard streams, or a
    test's. Errors are one line on C{stderr}, starting C{credproxy: }.
    """

    stdin: TextIO
    stdout: TextIO
    stderr: TextIO

    def say(self, text: str) -> None:
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def error(self, text: str) -> None:
        line = " ".join(text.split())  # one line, whatever the message held
        self.stderr.write(f"{PROG}: {line}\n")
        self.stderr.flush()

    def fail(self, text: str) -> int:
        self.error(text)
        return EXIT_FAILED

    def usage_error(self, text: str) -> int:
        self.error(text)
        return EXIT_USAGE


def _described(error: BaseException) -> str:
    """
    What a failure may say on the terminal: the text of credproxy's own
    errors (written to hold no secret) and of system errors, else only the
    exception's type, since a library's text might quote what it handled.
    """
    if isinstance(error, StoreError | CredproxyConfigError | OpFailure):
        return str(error) if not isinstance(error, OpFailure) else error.message
    if isinstance(error, OSError):
        return f"{error.strerror or type(error).__name__}" + (
            f": {error.filename}" if error.filename else ""
        )
    return f"unexpected {type(error).__name__}"


# -- the reactor and its signals ----------------------------------------------------


def _the_reactor(reactor: Any) -> Any:
    if reactor is not None:
        return reactor
    from twisted.internet import reactor as global_reactor

    return global_reactor


def _stop_reactor(reactor: Any) -> None:
    with contextlib.suppress(ReactorNotRunning):
        reactor.stop()


@contextlib.contextmanager
def _signals(handler: Callable[[int], None]) -> Any:
    """
    Route L{STOP_SIGNALS} to C{handler} (on the reactor thread, by way of
    C{callFromThread} in the caller) for the duration, then put back what
    was there.
    """
    previous = {}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        handler(signum)

    for signum in STOP_SIGNALS:
        previous[signum] = signal.signal(signum, on_signal)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _drive(reactor: Any, work: Callable[[], Awaitable[int]], console: Console) -> int:
    """
    Run C{work} on the reactor until it finishes, and answer its exit
    status. A stop signal cancels it (a login calls its session off, the
    stores' threads stop), and the reactor stops at the latest
    L{INTERRUPT_GRACE} seconds later; the status is then 130.
    """
    outcome: list[int] = []
    running: list[Deferred[int]] = []

    def finished(result: int | Failure) -> None:
        if isinstance(result, Failure):
            if result.check(CancelledError):
                console.error("interrupted")
                outcome.append(EXIT_INTERRUPTED)
            else:
                error = result.value
                assert error is not None
                outcome.append(console.fail(_described(error)))
        else:
            outcome.append(result)
        _stop_reactor(reactor)

    def start() -> None:
        d = Deferred.fromCoroutine(_awaited(work))
        running.append(d)
        d.addBoth(finished)

    def interrupt() -> None:
        for d in running:
            d.cancel()
        reactor.callLater(INTERRUPT_GRACE, _stop_reactor, reactor)

    with _signals(lambda signum: reactor.callFromThread(interrupt)):
        reactor.callWhenRunning(start)
        reactor.run(installSignalHandlers=False)
    return outcome[0] if outcome else EXIT_INTERRUPTED


async def _awaited(work: Callable[[], Awaitable[int]]) -> int:
    return await work()


# -- logging --------------------------------------------------------------------------


def _json_line(event: LogEvent) -> str:
    """
    One event as one line of JSON: twisted.logger's own serialization (so
    C{eventFromJSON} reads it back), plus the rendered message as
    C{log_text}, which is what a person searching the log looks for.
    """
    fields = json.loads(eventAsJSON(event))
    fields["log_text"] = formatEvent(event)
    return json.dumps(fields, separators=(",", ":"), sort_keys=True) + "\n"


def _log_observer(stream: TextIO, log_format: str, level: LogLevel) -> ILogObserver:
    observer: ILogObserver
    if log_format == "json":
        observer = FileLogObserver(stream, _json_line)
    else:
        observer = textFileLogObserver(stream)
    return FilteringLogObserver(observer, [LogLevelFilterPredicate(defaultLogLevel=level)])


def _begin_logging(
    stream: TextIO, log_format: str = "text", level: LogLevel = LogLevel.info
) -> None:
    """
    Send credproxy's log to C{stream} (once per process: the global log
    beginner is a one-way switch). Standard output and error stay as they
    are, so one-line errors and the login's prompts are not logged.
    """
    globalLogBeginner.beginLoggingTo(
        [_log_observer(stream, log_format, level)], redirectStandardIO=False
    )


# -- options ---------------------------------------------------------------------------


class ServeOptions(tap.Options):
    """
    C{credproxy serve}: every option of C{twistd credproxy}, and where the
    log goes.
    """

    synopsis = f"Usage: {PROG} serve [options]"

    optParameters: list[list[Any]] = [
        [
            "log-format",
            None,
            "text",
            "How the log is written to standard error: text, or json (one object a line).",
        ],
    ]

    def postOptions(self) -> None:
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError("--log-format must be text or json")
        super().postOptions()


class _Interspersed(usage.Options):
    """
    Options and arguments in any order (C{credproxy set-key NAME --store
    file} as well as C{credproxy set-key --store file NAME}), as people
    type them: Twisted's parser stops at the first argument.
    """

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        argv = list(sys.argv[1:] if options is None else options)
        try:
            found, arguments = getopt.gnu_getopt(argv, self.shortOpt, self.longOpt)
        except getopt.GetoptError as e:
            raise usage.UsageError(str(e)) from None
        ordered: list[str] = []
        for option, value in found:
            if option.startswith("--"):
                takes_value = f"{option[2:]}=" in self.longOpt
                ordered.append(f"{option}={value}" if takes_value else option)
            else:
                takes_value = f"{option[1:]}:" in self.shortOpt
                ordered.extend([option, value] if takes_value else [option])
        super().parseOptions([*ordered, "--", *arguments])


class NewTokenOptions(_Interspersed, tap.VersionedOptions):
    synopsis = f"Usage: {PROG} new-token FILE [--force]"
    longdesc = (
        "Write a fresh capability token (256 random bits as 64 hex digits) to FILE, "
        "created with mode 0600, for --capability-token-file. Nothing secret is printed."
    )
    optFlags: list[list[Any]] = [["force", None, "Replace FILE if it exists."]]

    def parseArgs(self, *args: str) -> None:
        if len(args) != 1 or not args[0]:
            raise usage.UsageError("new-token needs one FILE")
        self["file"] = args[0]


class _NamedOptions(_Interspersed, tap.StoreOptions):
    """
    A command of the stores that names one thing (a provider, a key).
    """

    what = "NAME"
    command = ""

    def parseArgs(self, *args: str) -> None:
        if len(args) != 1 or not args[0]:
            raise usage.UsageError(f"{self.command} needs one {self.what}")
        self["name"] = args[0]


class _ProviderOptions(_NamedOptions):
    what = "PROVIDER"

    optParameters: list[list[Any]] = [
        ["bucket", None, None, "The bucket of the provider's token (default: default)."],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        if self["bucket"] == "":
            raise usage.UsageError("--bucket needs a name")


class LoginOptions(_ProviderOptions):
    command = "login"
    synopsis = f"Usage: {PROG} login PROVIDER [--bucket B] [options]"
    longdesc = (
        "Log in to an OAuth provider on this terminal (a code paste login, or a device code "
        "login for device providers) and store its token, refresh token included."
    )


class LogoutOptions(_ProviderOptions):
    command = "logout"
    synopsis = f"Usage: {PROG} logout PROVIDER [--bucket B] [options]"
    longdesc = "Remove a provider's stored token."


class StatusOptions(_Interspersed, tap.StoreOptions):
    synopsis = f"Usage: {PROG} status [--json] [options]"
    longdesc = (
        "Show the store in use, the stored OAuth tokens (expiry, whether a refresh token is "
        "held) and the names of the stored API keys. Never a secret value."
    )
    optFlags: list[list[Any]] = [["json", None, "Print one JSON object instead of text."]]


class SetKeyOptions(_NamedOptions):
    command = "set-key"
    synopsis = f"Usage: {PROG} set-key NAME [options]"
    longdesc = (
        "Store an API key under NAME. On a terminal the key is asked for and not shown; "
        "otherwise the first line of standard input is the key."
    )


class DeleteKeyOptions(_NamedOptions):
    command = "delete-key"
    synopsis = f"Usage: {PROG} delete-key NAME [options]"
    longdesc = "Remove the API key stored under NAME (exit status 1 if there is none)."


# -- new-token ---------------------------------------------------------------------------


def new_token(path: str, *, force: bool, console: Console) -> int:
    """
    Write a fresh capability token to C{path}: created exclusively, never
    through a symlink, mode 0600 whatever the umask. With C{force} an
    existing file is replaced by renaming a new private file over it, so
    nobody ever reads half a token or an open one.
    """
    data = (secrets.token_hex(TOKEN_BYTES) + "\n").encode("ascii")
    try:
        if force:
            directory, name = os.path.split(os.path.abspath(path))
            fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
            try:
                _write_private(fd, data)
                os.replace(temporary, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise
        else:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                fd = os.open(path, flags, 0o600)
            except FileExistsError:
                return console.fail(f"{path} exists; not overwritten (give --force to replace it)")
            _write_private(fd, data)
    except OSError as e:
        return console.fail(f"cannot write {path}: {e.strerror or type(e).__name__}")
    console.say(
        f"Wrote a new capability token to {path} (mode 0600);"
        f" give it to the service with --capability-token-file {path}"
    )
    return EXIT_OK


def _write_private(fd: int, data: bytes) -> None:
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # the umask may have taken the owner's bits too
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# -- status --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenStatus:
    """
    What status shows of one stored token: never a value.
    """

    provider: str
    bucket: str
    expiry: float | None  # Unix seconds
    has_refresh_token: bool


@dataclass(frozen=True)
class StatusReport:
    store: str
    providers: list[str]  # configured OAuth providers
    tokens: list[TokenStatus]
    keys: list[str]
    # Whether a shared store's server (Redis) answers; None for a host's own store.
    store_answers: bool | None = None


async def gather_status(broker: Broker) -> StatusReport:
    """
    Everything status shows, read through the broker. A Redis store is
    asked first whether it answers; when it does not, nothing else is read.
    """
    answers: bool | None = None
    if isinstance(broker.store_service, RedisConnection):
        answers = await broker.store_service.ping()
        if not answers:
            return StatusReport(
                broker.store_description, sorted(broker.providers), [], [], store_answers=False
            )
    tokens: list[TokenStatus] = []
    for provider in await broker.list_providers():
        for bucket in await broker.list_buckets(provider):
            token: Token | None = await broker.get_token(provider, bucket)
            if token is None:
                continue  # removed between the listing and the read
            tokens.append(
                TokenStatus(provider, bucket, token.expiry, token.refresh_token is not None)
            )
    return StatusReport(
        store=broker.store_description,
        providers=sorted(broker.providers),
        tokens=tokens,
        keys=list(await broker.list_keys()),
        store_answers=answers,
    )


def _iso(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _until(expiry: float, now: float) -> str:
    """
    C{expired}, or how long the token has left: C{in 42m}, C{in 3h 5m}, C{in 2d 4h}.
    """
    left = expiry - now
    if left <= 0:
        return "expired"
    minutes = math.floor(left / 60)
    if minutes < 1:
        return "in <1m"
    if minutes < 60:
        return f"in {minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"in {hours}h {minutes}m"
    days, hours = divmod(hours, 24)
    return f"in {days}d {hours}h"


def render_status(report: StatusReport, now: float) -> str:
    """
    Status as text for a person.
    """
    lines = [f"Store: {report.store}"]
    if report.store_answers is not None:
        lines.append(f"Redis answers: {'yes' if report.store_answers else 'no'}")
    providers = ", ".join(report.providers) if report.providers else "none"
    lines.append(f"OAuth providers configured: {providers}")
    if report.store_answers is False:
        lines.append("OAuth tokens and API keys: unknown (the store does not answer)")
        return "\n".join(lines)
    if report.tokens:
        lines.append("OAuth tokens:")
        width = max(len(f"{t.provider}/{t.bucket}") for t in report.tokens)
        for t in report.tokens:
            if t.expiry is None:
                expiry = "expiry unknown"
            else:
                expiry = f"expires {_iso(t.expiry)} ({_until(t.expiry, now)})"
            refresh = "yes" if t.has_refresh_token else "no"
            name = f"{t.provider}/{t.bucket}".ljust(width)
            lines.append(f"  {name}  {expiry}  refresh token: {refresh}")
    else:
        lines.append(f"OAuth tokens: none (log in with: {PROG} login PROVIDER)")
    if report.keys:
        lines.append("API keys:")
        lines.extend(f"  {name}" for name in report.keys)
    else:
        lines.append(f"API keys: none (store one with: {PROG} set-key NAME)")
    return "\n".join(lines)


def status_json(report: StatusReport, now: float) -> dict[str, Any]:
    """
    Status for programs: names, times and flags only.
    """
    tokens = []
    for t in report.tokens:
        tokens.append(
            {
                "provider": t.provider,
                "bucket": t.bucket,
                "expiry": t.expiry,
                "expiry_iso": None if t.expiry is None else _iso(t.expiry),
                "expired": None if t.expiry is None else t.expiry <= now,
                "expires_in_seconds": None if t.expiry is None else max(0, round(t.expiry - now)),
                "has_refresh_token": t.has_refresh_token,
            }
        )
    return {
        "store": report.store,
        "store_answers": report.store_answers,
        "providers_configured": report.providers,
        "tokens": tokens,
        "keys": report.keys,
    }


async def status(
    broker: Broker, console: Console, *, as_json: bool, clock: Callable[[], float] = time.time
) -> int:
    report = await gather_status(broker)
    now = clock()
    if as_json:
        console.say(json.dumps(status_json(report, now), indent=2, sort_keys=True))
    else:
        console.say(render_status(report, now))
    return EXIT_FAILED if report.store_answers is False else EXIT_OK


# -- keys ----------------------------------------------------------------------------------


class KeyInputError(ValueError):
    """
    What was typed or piped to set-key is not a key; the message says why
    and never holds any of it.
    """


def read_key(name: str, console: Console) -> Secret:
    """
    The key for set-key: asked for without echo when standard input is a
    terminal (getpass, which talks to the terminal itself), else the first
    line of standard input, surrounding whitespace removed.

    @raise KeyInputError: nothing was given, or far too much.
    """
    if console.stdin.isatty():
        try:
            value = getpass.getpass(f"API key for {name} (input is not shown): ")
        except EOFError:
            value = ""
    else:
        value = console.stdin.readline(MAX_KEY_CHARS + 2)
    if len(value.rstrip("\r\n")) > MAX_KEY_CHARS:
        raise KeyInputError(f"the key is longer than {MAX_KEY_CHARS} characters; not stored")
    value = value.strip()
    if not value:
        raise KeyInputError("no key given (the input was empty); nothing stored")
    return Secret(value)


async def set_key(broker: Broker, console: Console, name: str, key: Secret) -> int:
    await broker.save_key(name, key)
    console.say(f"Stored the API key {name} in {broker.store_description}.")
    return EXIT_OK


async def delete_key(broker: Broker, console: Console, name: str) -> int:
    if not await broker.delete_key(name):
        return console.fail(f"no API key named {name} is stored in {broker.store_description}")
    console.say(f"Deleted the API key {name}.")
    return EXIT_OK


# -- tokens ---------------------------------------------------------------------------------


def _entry(provider: str, bucket: str | None) -> str:
    return f"{provider} (bucket {bucket or DEFAULT_BUCKET})"


async def logout(broker: Broker, console: Console, provider: str, bucket: str | None) -> int:
    if await broker.get_token(provider, bucket) is None:
        return console.fail(f"no token of {_entry(provider, bucket)} is stored")
    await broker.remove_token(provider, bucket)
    console.say(f"Logged out of {_entry(provider, bucket)}: its token is removed.")
    return EXIT_OK


class LoginStepFailed(Exception):
    """
    A login step failed in a store (or another credproxy part whose text is
    safe to show); L{LoginAdapter} shows C{message}.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@implementer(ILoginBackend)
class BrokerLoginBackend:
    """
    The login steps of L{LoginAdapter} on the host itself: the credential
    socket's own op handlers (C{credproxy.wire._login_ops}), called in this
    process with a host (not sandbox) context whose connection is this
    backend, so a terminal login takes exactly the path of one over the
    socket, minus the socket.

    A refused step fails with the handler's L{OpFailure} (its C{message} is
    the fixed text the socket would send); a store failure with
    L{LoginStepFailed} carrying the store's own value-free message.
    """

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.context = OpContext(broker, sandbox=False, connection=self)

    def __repr__(self) -> str:
        return f"<BrokerLoginBackend {self.broker!r}>"

    def _step(self, op: str, handler: Handler, payload: dict[str, Any]) -> Deferred[dict[str, Any]]:
        async def step() -> dict[str, Any]:
            try:
                return await handler(self.context, payload, AuditRecord(op))
            except StoreError as e:
                raise LoginStepFailed(str(e)) from None

        return Deferred.fromCoroutine(step())

    def initiate(self, provider: str, bucket: str | None) -> Deferred[dict[str, Any]]:
        payload: dict[str, Any] = {"provider": provider}
        if bucket is not None:
            payload["bucket"] = bucket
        return self._step(Op.OAUTH_INITIATE, _login_ops.oauth_initiate, payload)

    def exchange(self, session_id: Secret, code: Secret) -> Deferred[dict[str, Any]]:
        payload = {"session_id": session_id.reveal(), "code": code.reveal()}
        return self._step(Op.OAUTH_EXCHANGE, _login_ops.oauth_exchange, payload)

    def poll(self, session_id: Secret) -> Deferred[dict[str, Any]]:
        payload = {"session_id": session_id.reveal()}
        return self._step(Op.OAUTH_POLL, _login_ops.oauth_poll, payload)

    def cancel(self, session_id: Secret) -> Deferred[None]:
        payload = {"session_id": session_id.reveal()}
        d = self._step(Op.OAUTH_CANCEL, _login_ops.oauth_cancel, payload)
        return d.addCallback(lambda _: None)


async def login(
    broker: Broker,
    console: Console,
    reactor: Any,
    provider: str,
    bucket: str | None,
) -> int:
    """
    Log in on the terminal; the token is stored by the broker. The
    adapter's last line says how the login ended.
    """
    if provider not in broker.providers:
        configured = ", ".join(sorted(broker.providers)) or "none"
        return console.usage_error(
            f"no OAuth provider named {provider} is configured (configured: {configured});"
            " add an [oauth.NAME] table to the --config file"
        )
    terminal = StdioTerminal(reactor, console.stdin, console.stdout)
    adapter = LoginAdapter(BrokerLoginBackend(broker), terminal, reactor)
    try:
        await adapter.login(provider, bucket)
    except CancelledError:
        raise
    except Exception:
        return EXIT_FAILED  # the adapter has said why
    console.say(f"The token is stored in {broker.store_description}.")
    return EXIT_OK


# -- running commands over the host's stores ----------------------------------------------


def _host_command(
    options: tap.StoreOptions,
    console: Console,
    reactor: Any,
    action: Callable[[Broker], Awaitable[int]],
) -> int:
    """
    Build the broker the options describe, with its own store thread pool,
    run C{action} with it on the reactor, and stop both.

    The broker renews nothing: a command that lives for seconds must not
    start refreshing tokens behind the person's back (the service does
    that). Warnings (a store's, a provider's) go to standard error.
    """
    reactor = _the_reactor(reactor)
    _begin_logging(console.stderr, level=LogLevel.warn)
    calls = BlockingCalls(reactor)
    try:
        broker = build_broker(reactor, options.broker_config(), calls, renew=False)
    except CredproxyConfigError as e:
        return console.fail(str(e))

    async def work() -> int:
        calls.startService()
        broker.startService()
        try:
            return await action(broker)
        except StoreError as e:
            return console.fail(str(e))
        finally:
            broker.stopService()
            await calls.stopService()

    return _drive(reactor, work, console)


def _refuse_memory(options: tap.StoreOptions, command: str, console: Console) -> int | None:
    if options["store"] == "memory":
        return console.usage_error(
            f"{command} --store memory would be forgotten when this command exits;"
            " use the store the service uses (--store file or keyring)"
        )
    return None


# -- serve ------------------------------------------------------------------------------------


def serve(options: ServeOptions, console: Console, reactor: Any) -> int:
    """
    The service in the foreground, logging to standard error, stopping
    gracefully (its faces drain for up to --grace seconds and remove their
    sockets) on SIGTERM, SIGINT or SIGHUP; the status is then 0.
    """
    reactor = _the_reactor(reactor)
    _begin_logging(console.stderr, options["log-format"])
    _process.harden()
    try:
        service = tap.makeService(options, reactor)
    except SystemExit as e:
        return console.fail(_exit_text(e))
    # The service has read its credential: nothing spawned from here inherits it.
    _process.forget_credential_variables()
    try:
        service.startService()
    except SystemExit as e:
        return console.fail(_exit_text(e))
    except Exception as e:
        _remove_sockets(service)
        return console.fail(f"cannot start: {_described(e)}")
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)

    def stop(signum: int) -> None:
        log.info("Received {signal}, shutting down.", signal=signal.Signals(signum).name)
        _stop_reactor(reactor)

    # Twisted's own handlers would cover SIGINT and SIGTERM, but not SIGHUP.
    with _signals(lambda signum: reactor.callFromThread(stop, signum)):
        reactor.run(installSignalHandlers=False)
    return EXIT_OK


def _exit_text(stop: SystemExit) -> str:
    text = str(stop.code) if stop.code is not None else "the service did not start"
    prefix = f"{PROG}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def _remove_sockets(service: object) -> None:
    """
    A start that failed half way never runs the reactor, so the sockets
    already bound would stay: remove them.
    """
    if isinstance(service, CredproxyService):
        for listener in service.listening_services():
            if listener.bound_path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(listener.bound_path)


# -- run ------------------------------------------------------------------------------------------


def run_in_sandbox(argv: list[str], reactor: Any) -> int:
    """
    C{credproxy run ...}: everything after C{run} goes to
    C{credproxy._run.main} as it is, imported only now so the other
    commands work without it.
    """
    try:
        module = importlib.import_module("credproxy._run")
    except ModuleNotFoundError as e:
        if e.name != "credproxy._run":
            raise
        sys.stderr.write(f"{PROG}: run is not available in this installation\n")
        return EXIT_FAILED
    run_main = cast(Callable[..., int], module.main)
    if reactor is None:
        return run_main(argv)
    return run_main(argv, reactor=reactor)


# -- the command line ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    options: type[usage.Options]
    summary: str


COMMANDS: Final[dict[str, Command]] = {
    "serve": Command(ServeOptions, "run the service in the foreground (the twistd options)"),
    "run": Command(usage.Options, "run a program in a sandbox that reaches credproxy"),
    "login": Command(LoginOptions, "log in to an OAuth provider and store its token"),
    "logout": Command(LogoutOptions, "remove a provider's stored token"),
    "status": Command(StatusOptions, "show the store, stored tokens and key names"),
    "set-key": Command(SetKeyOptions, "store an API key (asked for, not shown)"),
    "delete-key": Command(DeleteKeyOptions, "remove a stored API key"),
    "new-token": Command(NewTokenOptions, "write a fresh capability token file (mode 0600)"),
}


def _help() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        f"Usage: {PROG} COMMAND [options]",
        "",
        "The host's credential broker for AI-agent sandboxes.",
        "",
        "Commands:",
        *(f"  {name.ljust(width)}  {c.summary}" for name, c in COMMANDS.items()),
        "",
        f"Run {PROG} COMMAND --help for a command's options, {PROG} --version for the version.",
    ]
    return "\n".join(lines)


def main(
    argv: Sequence[str] | None = None,
    *,
    reactor: Any = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """
    The C{credproxy} command; answers the exit status.

    @param argv: the arguments after the program name (default C{sys.argv[1:]}).
    @param reactor: the reactor (default the global one, imported only when
        a command needs it).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    console = Console(stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr)
    if not args:
        return console.usage_error(
            f"no command given; choose one of {', '.join(COMMANDS)} (see {PROG} --help)"
        )
    name, rest = args[0], args[1:]
    if name in ("-h", "--help", "help"):
        console.say(_help())
        return EXIT_OK
    if name == "--version":
        console.say(f"{PROG} {tap.credproxy_version()}")
        return EXIT_OK
    if name == "run":
        return run_in_sandbox(rest, reactor)
    command = COMMANDS.get(name)
    if command is None:
        kind = "option" if name.startswith("-") else "command"
        return console.usage_error(f"unknown {kind} {name!r} (see {PROG} --help)")
    options = command.options()
    try:
        options.parseOptions(rest)
    except usage.UsageError as e:
        return console.usage_error(f"{name}: {e} (see {PROG} {name} --help)")
    except SystemExit as e:  # --help and --version print, then exit
        return e.code if isinstance(e.code, int) else EXIT_OK
    return _dispatch(name, options, console, reactor)


def _dispatch(name: str, options: usage.Options, console: Console, reactor: Any) -> int:
    if name == "serve":
        return serve(cast(ServeOptions, options), console, reactor)
    if name == "new-token":
        return new_token(options["file"], force=bool(options["force"]), console=console)
    stores = cast(tap.StoreOptions, options)
    if name == "status":
        return _host_command(
            stores, console, reactor, lambda b: status(b, console, as_json=bool(options["json"]))
        )
    refused = _refuse_memory(stores, name, console)
    if refused is not None:
        return refused
    subject: str = options["name"]
    if name == "set-key":
        try:
            key = read_key(subject, console)
        except KeyInputError as e:
            return console.usage_error(f"set-key: {e}")
        except KeyboardInterrupt:
            console.stderr.write("\n")
            return EXIT_INTERRUPTED
        return _host_command(stores, console, reactor, lambda b: set_key(b, console, subject, key))
    if name == "delete-key":
        return _host_command(stores, console, reactor, lambda b: delete_key(b, console, subject))
    bucket: str | None = options["bucket"]
    if name == "logout":
        return _host_command(
            stores, console, reactor, lambda b: logout(b, console, subject, bucket)
        )
    assert name == "login"
    the_reactor = _the_reactor(reactor)
    return _host_command(
        stores, console, the_reactor, lambda b: login(b, console, the_reactor, subject, bucket)
    )


if __name__ == "__main__":
    sys.exit(main())
