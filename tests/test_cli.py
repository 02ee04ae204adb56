"""
The host's C{credproxy} command: argument errors are one line and status 2,
never the whole help; new-token writes a private, exclusive, well-formed
token the service accepts; status shows expiry and refresh-token flags and
never a secret; set-key reads a pipe's first line, or a terminal without
echo; the login backend is the credential socket's own handlers; --version
for both entry points.
"""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib.metadata import version
from typing import Any, TypeVar

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from credproxy import cli
from credproxy._secret import Secret
from credproxy.broker import Broker
from credproxy.stores import (
    FileProviderKeyStore,
    MemoryProviderKeyStore,
    MemoryTokenStore,
    StoreError,
    Token,
)
from credproxy.tap import Options
from credproxy.testing import InlineBlockingCalls
from credproxy.wire._ops import OpFailure
from tests.broker.test_sessions import AUTH_URL, FakePKCEProvider, login_token

_T = TypeVar("_T")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CREDPROXY = os.path.join(os.path.dirname(sys.executable), "credproxy")
ACCESS = "sk-ant-oat01-status-access-token-0123456789"
REFRESH = "sk-ant-ort01-status-refresh-token-0123456789"
KEY = "sk-ant-api03-status-api-key-0123456789abcdef"
NOW = 1_900_000_000.0


def run_main(*argv: str, stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def now(d: Deferred[_T]) -> _T:
    """
    The result of a Deferred that has already fired (memory stores answer at once).
    """
    results: list[_T] = []
    failures: list[Failure] = []
    d.addCallbacks(results.append, failures.append)
    if failures:
        failures[0].raiseException()
    assert results, "the Deferred has not fired"
    return results[0]


def console(stdin: str = "") -> tuple[cli.Console, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    return cli.Console(io.StringIO(stdin), out, err), out, err


def memory_broker(**kwargs: Any) -> Broker:
    return Broker(
        MemoryReactorClock(), MemoryTokenStore(), MemoryProviderKeyStore(), renew=False, **kwargs
    )


# -- the command line --------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "no command given"),
        (["bogus"], "unknown command 'bogus'"),
        (["--bogus"], "unknown option '--bogus'"),
        (["status", "--bogus"], "status: option --bogus not recognized"),
        (["status", "extra"], "status: "),
        (["status", "--store", "vault"], "--store must be one of auto, keyring, file, memory"),
        (["set-key"], "set-key needs one NAME"),
        (["set-key", "a", "b"], "set-key needs one NAME"),
        (["set-key", ""], "set-key needs one NAME"),
        (["delete-key"], "delete-key needs one NAME"),
        (["login"], "login needs one PROVIDER"),
        (["login", "anthropic", "--bucket", ""], "--bucket needs a name"),
        (["logout", "anthropic", "extra"], "logout needs one PROVIDER"),
        (["new-token"], "new-token needs one FILE"),
        (["serve", "--log-format", "xml"], "--log-format must be text or json"),
        (["serve", "--max-body", "0"], "--max-body must be a positive"),
        (["serve", "--http", "tcp:port=1:interface=127.0.0.1"], "without a capability token"),
        (["set-key", "k", "--store", "memory"], "would be forgotten"),
        (["login", "anthropic", "--store", "memory"], "would be forgotten"),
    ],
)
def test_argument_errors_are_one_line_and_status_2(argv: list[str], message: str) -> None:
    code, out, err = run_main(*argv)
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("credproxy: ") and message in lines[0]
    assert "Options:" not in err and "Usage:" not in err  # never the whole help


def test_options_and_arguments_in_any_order() -> None:
    options: usage.Options = cli.SetKeyOptions()
    options.parseOptions(["anthropic", "--store", "file", "--state-dir=/srv/s"])
    assert (options["name"], options["store"], options["state-dir"]) == (
        "anthropic",
        "file",
        "/srv/s",
    )
    options = cli.LoginOptions()
    options.parseOptions(["--bucket", "work", "anthropic", "--config", "/etc/c.toml"])
    assert (options["name"], options["bucket"], options["config"]) == (
        "anthropic",
        "work",
        "/etc/c.toml",
    )
    options = cli.DeleteKeyOptions()
    options.parseOptions(["--", "--odd-name"])  # after --, a name may start with a dash
    assert options["name"] == "--odd-name"


def test_the_commands_share_the_services_store_options() -> None:
    for command in (cli.StatusOptions, cli.SetKeyOptions, cli.LoginOptions, cli.LogoutOptions):
        options = command()
        for name in ("store", "state-dir", "config"):
            assert name in options.docs, (command, name)  # the same definition, inherited
    serve = cli.ServeOptions()
    assert isinstance(serve, Options)


def test_help_lists_every_command() -> None:
    code, out, err = run_main("--help")
    assert (code, err) == (0, "")
    for name in cli.COMMANDS:
        assert f"  {name} " in out


def test_version() -> None:
    assert run_main("--version") == (0, f"credproxy {version('credproxy')}\n", "")


def test_a_commands_version_and_help_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main("status", "--version")[0] == 0
    assert capsys.readouterr().out == f"credproxy {version('credproxy')}\n"
    assert run_main("set-key", "--help")[0] == 0
    assert "Usage: credproxy set-key NAME" in capsys.readouterr().out


def test_a_json_log_line_is_one_object_with_the_rendered_text() -> None:
    event = {
        "log_format": "stored {what} with {secret}",
        "what": "a\nb",
        "secret": Secret(KEY),
        "log_level": LogLevel.warn,
        "log_namespace": "credproxy.test",
        "log_time": NOW,
    }
    line = cli._json_line(event)
    assert line.endswith("\n") and line.count("\n") == 1  # newlines in fields are escaped
    fields = json.loads(line)
    assert fields["log_text"] == "stored a\nb with <Secret: hidden>"
    assert fields["log_level"]["name"] == "warn" and fields["log_time"] == NOW
    assert KEY not in line


# -- new-token ------------------------------------------------------------------------


@pytest.fixture
def token_dir(tmp_path: Any) -> str:
    return str(tmp_path)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o277, 0o000])
def test_new_token_is_private_and_well_formed(token_dir: str, umask: int) -> None:
    path = os.path.join(token_dir, "token")
    old = os.umask(umask)
    try:
        code, out, err = run_main("new-token", path)
    finally:
        os.umask(old)
    assert (code, err) == (0, "")
    content = _read(path)
    assert re.fullmatch(r"[0-9a-f]{64}\n", content)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert content.strip() not in out
    assert path in out
    # The service takes it as it is.
    config = Options()
    config.parseOptions(["--capability-token-file", path])
    assert config["capability-token"].reveal() == content.strip()


def test_new_tokens_differ(token_dir: str) -> None:
    tokens = set()
    for i in range(5):
        path = os.path.join(token_dir, f"t{i}")
        assert run_main("new-token", path)[0] == 0
        tokens.add(_read(path))
    assert len(tokens) == 5


def test_new_token_never_overwrites_without_force(token_dir: str) -> None:
    path = os.path.join(token_dir, "token")
    with open(path, "w") as f:
        f.write("precious")
    code, out, err = run_main("new-token", path)
    assert (code, out) == (1, "")
    assert err.startswith("credproxy: ") and "--force" in err and len(err.splitlines()) == 1
    assert _read(path) == "precious"

    code, _, _ = run_main("new-token", "--force", path)
    assert code == 0
    assert re.fullmatch(r"[0-9a-f]{64}\n", _read(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [n for n in os.listdir(token_dir) if n.endswith(".tmp")] == []


def test_new_token_never_follows_a_symlink(token_dir: str) -> None:
    target = os.path.join(token_dir, "elsewhere")
    link = os.path.join(token_dir, "token")
    os.symlink(target, link)  # dangling: creating through it would make the target
    code, _, err = run_main("new-token", link)
    assert code == 1 and "exists" in err
    assert not os.path.exists(target)


def test_new_token_into_a_missing_directory_is_one_line(token_dir: str) -> None:
    code, _, err = run_main("new-token", os.path.join(token_dir, "no", "such", "token"))
    assert code == 1
    assert err.startswith("credproxy: cannot write ") and len(err.splitlines()) == 1


# -- status -----------------------------------------------------------------------------


class StatusTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.broker = memory_broker(providers={"anthropic": FakePKCEProvider()})
        tokens: dict[tuple[str, str], dict[str, Any]] = {
            ("anthropic", "default"): {
                "access_token": ACCESS,
                "refresh_token": REFRESH,
                "expiry": NOW + 42 * 60 + 5,
            },
            ("anthropic", "work"): {"access_token": ACCESS + "-work", "expiry": NOW - 10},
            ("openai", "default"): {"access_token": ACCESS + "-openai", "refresh_token": REFRESH},
        }
        for (provider, bucket), fields in tokens.items():
            now(Deferred.fromCoroutine(self.broker.store_login(provider, Token(fields), bucket)))
        now(self.broker.save_key("anthropic", Secret(KEY)))
        now(self.broker.save_key("openai-work", Secret(KEY + "-2")))

    def status(self, *, as_json: bool) -> str:
        terminal, out, err = console()
        code = now(
            Deferred.fromCoroutine(
                cli.status(self.broker, terminal, as_json=as_json, clock=lambda: NOW)
            )
        )
        self.assertEqual((code, err.getvalue()), (0, ""))
        return out.getvalue()

    def assert_no_secret(self, shown: str) -> None:
        for secret in (ACCESS, REFRESH, KEY):
            self.assertNotIn(secret, shown)

    def test_text(self) -> None:
        shown = self.status(as_json=False)
        self.assert_no_secret(shown)
        lines = shown.splitlines()
        self.assertEqual(lines[0], "Store: memory (forgotten at exit)")
        self.assertEqual(lines[1], "OAuth providers configured: anthropic")
        self.assertIn(
            "  anthropic/default  expires 2030-03-17T18:28:45Z (in 42m)  refresh token: yes",
            lines,
        )
        self.assertIn(
            "  anthropic/work     expires 2030-03-17T17:46:30Z (expired)  refresh token: no",
            lines,
        )
        self.assertIn("  openai/default     expiry unknown  refresh token: yes", lines)
        self.assertEqual(lines[-3:], ["API keys:", "  anthropic", "  openai-work"])

    def test_json(self) -> None:
        shown = self.status(as_json=True)
        self.assert_no_secret(shown)
        report = json.loads(shown)
        self.assertEqual(report["store"], "memory (forgotten at exit)")
        self.assertEqual(report["keys"], ["anthropic", "openai-work"])
        self.assertEqual(report["providers_configured"], ["anthropic"])
        by_entry = {(t["provider"], t["bucket"]): t for t in report["tokens"]}
        self.assertEqual(
            by_entry["anthropic", "default"],
            {
                "provider": "anthropic",
                "bucket": "default",
                "expiry": NOW + 42 * 60 + 5,
                "expiry_iso": "2030-03-17T18:28:45Z",
                "expired": False,
                "expires_in_seconds": 42 * 60 + 5,
                "has_refresh_token": True,
            },
        )
        self.assertEqual(
            (
                by_entry["anthropic", "work"]["expired"],
                by_entry["anthropic", "work"]["expires_in_seconds"],
            ),
            (True, 0),
        )
        self.assertFalse(by_entry["anthropic", "work"]["has_refresh_token"])
        self.assertIsNone(by_entry["openai", "default"]["expired"])

    def test_nothing_stored(self) -> None:
        self.broker = memory_broker()
        shown = self.status(as_json=False)
        self.assertIn("OAuth providers configured: none", shown)
        self.assertIn("OAuth tokens: none (log in with: credproxy login PROVIDER)", shown)
        self.assertIn("API keys: none (store one with: credproxy set-key NAME)", shown)

    def test_time_left(self) -> None:
        for left, shown in [
            (-5, "expired"),
            (0, "expired"),
            (30, "in <1m"),
            (59 * 60 + 59, "in 59m"),
            (3 * 3600 + 5 * 60, "in 3h 5m"),
            (47 * 3600, "in 47h 0m"),
            (52 * 3600, "in 2d 4h"),
        ]:
            self.assertEqual(cli._until(NOW + left, NOW), shown, left)


# -- keys and tokens ------------------------------------------------------------------------


def test_read_key_takes_the_first_line_stripped() -> None:
    terminal, _, _ = console(f"  {KEY}  \nsecond line\n")
    assert cli.read_key("anthropic", terminal).reveal() == KEY
    terminal, _, _ = console(KEY)  # no newline at the end of the input
    assert cli.read_key("anthropic", terminal).reveal() == KEY


@pytest.mark.parametrize(
    ("given", "message"),
    [("", "no key given"), ("   \n", "no key given"), ("\nkey-on-line-2\n", "no key given")],
)
def test_read_key_refuses_empty_input(given: str, message: str) -> None:
    terminal, _, _ = console(given)
    with pytest.raises(cli.KeyInputError, match=message):
        cli.read_key("anthropic", terminal)


def test_read_key_refuses_a_huge_line_without_quoting_it() -> None:
    terminal, _, _ = console("k" * (cli.MAX_KEY_CHARS + 1) + "\n")
    with pytest.raises(cli.KeyInputError) as refused:
        cli.read_key("anthropic", terminal)
    assert "kkkk" not in str(refused.value)
    terminal, _, _ = console("k" * cli.MAX_KEY_CHARS + "\n")
    assert len(cli.read_key("anthropic", terminal).reveal()) == cli.MAX_KEY_CHARS


def test_set_and_delete_key() -> None:
    broker = memory_broker()
    terminal, out, err = console()
    assert now(Deferred.fromCoroutine(cli.set_key(broker, terminal, "anthropic", Secret(KEY)))) == 0
    assert now(broker.get_key("anthropic")) == Secret(KEY)
    assert now(Deferred.fromCoroutine(cli.delete_key(broker, terminal, "anthropic"))) == 0
    assert now(broker.get_key("anthropic")) is None
    assert now(Deferred.fromCoroutine(cli.delete_key(broker, terminal, "anthropic"))) == 1
    assert err.getvalue() == (
        "credproxy: no API key named anthropic is stored in memory (forgotten at exit)\n"
    )
    assert KEY not in out.getvalue() + err.getvalue()


def test_logout() -> None:
    broker = memory_broker()
    now(Deferred.fromCoroutine(broker.store_login("anthropic", login_token(), "work")))
    terminal, out, err = console()
    assert now(Deferred.fromCoroutine(cli.logout(broker, terminal, "anthropic", None))) == 1
    assert "no token of anthropic (bucket default) is stored" in err.getvalue()
    assert now(Deferred.fromCoroutine(cli.logout(broker, terminal, "anthropic", "work"))) == 0
    assert now(broker.get_token("anthropic", "work")) is None
    assert "Logged out of anthropic (bucket work)" in out.getvalue()


# -- the login backend ----------------------------------------------------------------------


class BrokerLoginBackendTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.provider = FakePKCEProvider()
        self.broker = memory_broker(providers={"anthropic": self.provider})
        self.broker.startService()
        self.addCleanup(self.broker.stopService)
        self.backend = cli.BrokerLoginBackend(self.broker)

    def test_a_code_paste_login_through_the_socket_handlers(self) -> None:
        started = self.successResultOf(self.backend.initiate("anthropic", "work"))
        self.assertEqual((started["flow_type"], started["auth_url"]), ("pkce_redirect", AUTH_URL))
        session_id = Secret(started["session_id"])
        answer = self.backend.exchange(session_id, Secret("pasted-code#state"))
        (_, code, exchanged) = self.provider.exchanges[0]
        self.assertEqual(code, Secret("pasted-code#state"))
        exchanged.callback(login_token())
        token = self.successResultOf(answer)
        self.assertNotIn("refresh_token", token)  # the answer is sanitized, as on the socket
        stored = self.successResultOf(self.broker.get_token("anthropic", "work"))
        self.assertEqual(stored, login_token())  # the refresh token is stored

    def test_sessions_are_bound_to_their_backend(self) -> None:
        started = self.successResultOf(self.backend.initiate("anthropic", None))
        other = cli.BrokerLoginBackend(self.broker)
        failure = self.failureResultOf(
            other.exchange(Secret(started["session_id"]), Secret("code")), OpFailure
        )
        self.assertEqual(failure.value.message, "OAuth session not found")
        self.successResultOf(self.backend.cancel(Secret(started["session_id"])))
        self.assertEqual(len(self.broker.sessions), 0)

    def test_refusals_carry_the_sockets_text(self) -> None:
        failure = self.failureResultOf(self.backend.initiate("nobody", None), OpFailure)
        self.assertEqual(failure.value.message, "No OAuth flow configured for provider: nobody")

    def test_a_store_failure_is_shown_by_its_own_message(self) -> None:
        def refuse(*args: object) -> Deferred[None]:
            raise StoreError("keyring: cannot write the token: the keyring is locked")

        self.broker.tokens.save_token = refuse  # type: ignore[method-assign,assignment]
        started = self.successResultOf(self.backend.initiate("anthropic", None))
        answer = self.backend.exchange(Secret(started["session_id"]), Secret("code"))
        self.provider.exchanges[0][2].callback(login_token())
        failure = self.failureResultOf(answer, cli.LoginStepFailed)
        self.assertIn("the keyring is locked", failure.value.message)


# -- as a process ------------------------------------------------------------------------------


def _environment(state_home: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": state_home,
        "XDG_STATE_HOME": state_home,
        "LANG": "C.UTF-8",
    }


@pytest.fixture
def state_home(tmp_path: Any) -> Iterator[str]:
    yield str(tmp_path)


def _stored_key(state_dir: str, name: str) -> Secret | None:
    return now(FileProviderKeyStore(state_dir, InlineBlockingCalls()).get_key(name))


@pytest.mark.slow
def test_set_key_from_a_pipe(state_home: str) -> None:
    state_dir = os.path.join(state_home, "s")
    command = [sys.executable, "-m", "credproxy.cli", "set-key", "anthropic", "--store", "file"]
    result = subprocess.run(
        [*command, "--state-dir", state_dir],
        input=f"{KEY}\n",
        capture_output=True,
        text=True,
        env=_environment(state_home),
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert KEY not in result.stdout + result.stderr
    assert "Stored the API key anthropic" in result.stdout
    assert _stored_key(state_dir, "anthropic") == Secret(KEY)

    empty = subprocess.run(
        [CREDPROXY, "set-key", "other", "--store", "file", "--state-dir", state_dir],
        input="\n",
        capture_output=True,
        text=True,
        env=_environment(state_home),
        timeout=60,
        check=False,
    )
    assert empty.returncode == 2 and "no key given" in empty.stderr
    assert _stored_key(state_dir, "other") is None


def _read_pty(fd: int, until: bytes, seen: bytearray, timeout: float = 30.0) -> None:
    """
    Read what the pty shows into C{seen} until C{until} appears (or it closes).
    """
    deadline = time.monotonic() + timeout
    while until not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out waiting for {until!r}; the pty showed {bytes(seen)!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child closed its side
            return
        if not chunk:
            return
        seen.extend(chunk)


@pytest.mark.slow
def test_set_key_on_a_terminal_does_not_echo(state_home: str) -> None:
    state_dir = os.path.join(state_home, "s")
    argv = [CREDPROXY, "set-key", "anthropic", "--store", "file", "--state-dir", state_dir]
    pid, fd = pty.fork()  # the child's controlling terminal is the pty, as a person's would be
    if pid == 0:  # pragma: no cover - the child
        try:
            os.execve(CREDPROXY, argv, _environment(state_home))  # noqa: S606
        finally:
            os._exit(127)
    seen = bytearray()
    try:
        _read_pty(fd, b"(input is not shown): ", seen)
        os.write(fd, KEY.encode() + b"\n")
        _read_pty(fd, b"\x00never", seen)  # everything until the child closes the pty
    finally:
        deadline = time.monotonic() + 30
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                raise AssertionError("set-key did not exit")
            time.sleep(0.05)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, bytes(seen)
    assert b"API key for anthropic" in seen
    assert b"Stored the API key anthropic" in seen
    assert KEY.encode() not in seen  # typed, but never shown
    assert _stored_key(state_dir, "anthropic") == Secret(KEY)


@pytest.mark.slow
def test_version_of_both_entry_points() -> None:
    expected = f"credproxy {version('credproxy')}\n"
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    for argv in (
        [CREDPROXY, "--version"],
        [sys.executable, "-m", "credproxy.cli", "--version"],
        [twistd, "credproxy", "--version"],
    ):
        result = subprocess.run(
            argv, capture_output=True, text=True, cwd=ROOT, timeout=60, check=False
        )
        assert (result.returncode, result.stdout, result.stderr) == (0, expected, ""), argv
