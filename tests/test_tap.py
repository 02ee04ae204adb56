"""
The twistd command line: defaults, repeatable options, refusals with clear
messages (a capability token file others can read, or too short to be
unguessable), the store options shared with the credproxy command, --version.
"""

from __future__ import annotations

import os
from importlib.metadata import version

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.python.usage import UsageError

from credproxy._listen import parse_unix_description
from credproxy.service import CredproxyService
from credproxy.stores import RedisStoreConfig
from credproxy.tap import Options, StoreOptions, credproxy_version, makeService
from tests.redisserver import write_store_key

TOKEN = "0123456789abcdef" * 4


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


@pytest.fixture
def token_file(tmp_path: object) -> str:
    path = os.path.join(str(tmp_path), "token")
    with open(path, "w") as f:
        f.write(f"\n  {TOKEN}  \n")
    os.chmod(path, 0o600)
    return path


def test_defaults_listen_on_a_private_unix_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/4242")
    config = parse().config()
    assert [parse_unix_description(e).path for e in config.http_endpoints] == [  # type: ignore[union-attr]
        "/run/user/4242/credproxy/http.sock"
    ]
    assert config.http.upstream == "https://api.anthropic.com"
    assert config.http.max_body == 32 * 1024 * 1024
    assert config.grace == 10.0
    assert config.capability_token is None
    assert config.http.allowed_uids == frozenset({os.getuid()})


def test_repeatable_options() -> None:
    config = parse(
        "--http",
        "unix:address=/tmp/a.sock",
        "--http",
        "unix:address=/tmp/b.sock",
        "--allow-uid",
        "1001",
        "--allow-uid",
        "1002",
        "--upstream",
        "http://127.0.0.1:9/",
        "--max-body",
        "1024",
        "--grace",
        "2.5",
    ).config()
    assert len(config.http_endpoints) == 2
    assert config.http.allowed_uids == frozenset({os.getuid(), 1001, 1002})
    assert (config.http.upstream, config.http.max_body, config.grace) == (
        "http://127.0.0.1:9/",
        1024,
        2.5,
    )


def test_capability_token_file_is_read_and_shared(token_file: str) -> None:
    config = parse(
        "--capability-token-file", token_file, "--http", "tcp:port=0:interface=127.0.0.1"
    ).config()
    assert config.capability_token is not None
    assert config.capability_token.reveal() == TOKEN
    assert config.http.capability_token == config.capability_token


def test_tcp_without_capability_token_is_refused() -> None:
    with pytest.raises(UsageError, match="without a capability token"):
        parse("--http", "tcp:port=8787:interface=127.0.0.1")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-body", "0"], "--max-body must be a positive"),
        (["--max-body", "lots"], "max-body"),
        (["--head-timeout", "nan"], "--head-timeout must be a positive, finite number"),
        (["--body-timeout", "inf"], "--body-timeout must be a positive, finite number"),
        (["--max-connections", "0"], "--max-connections must be a positive"),
        (["--grace", "-1"], "--grace must not be negative"),
        (["--upstream", "ftp://x"], "--upstream must be an http"),
        (["--upstream", "https://user:pw@host"], "must not carry credentials"),
        (["--allow-uid", "root"], "--allow-uid needs a number"),
        (["--allow-uid", "-3"], "non-negative"),
        (["--capability-token-file", "/nonexistent/token"], "cannot read --capability-token-file"),
        (["--http", "unix:mode=600"], "malformed unix endpoint"),
    ],
)
def test_bad_options_are_refused_clearly(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse(*argv)


def test_empty_token_file_is_refused(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "empty")
    open(path, "w").close()
    os.chmod(path, 0o600)
    with pytest.raises(UsageError, match="empty"):
        parse("--capability-token-file", path)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_a_token_file_group_or_others_can_read_is_refused(token_file: str, mode: int) -> None:
    os.chmod(token_file, mode)
    with pytest.raises(UsageError) as refused:
        parse("--capability-token-file", token_file)
    message = str(refused.value)
    assert message.startswith("--capability-token-file: ")
    assert f"readable by group or others (mode {mode:04o})" in message
    assert f"chmod 600 {token_file}" in message
    assert "\n" not in message and TOKEN not in message


def test_a_token_of_fewer_than_32_bytes_is_refused(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "short")
    short = "s" * 31
    with open(path, "w") as f:
        f.write(f"  {short}\n")  # the whitespace does not count
    os.chmod(path, 0o600)
    with pytest.raises(UsageError) as refused:
        parse("--capability-token-file", path)
    message = str(refused.value)
    assert "holds fewer than 32 bytes" in message and "credproxy new-token" in message
    assert short not in message and "\n" not in message
    with open(path, "w") as f:
        f.write("s" * 32)
    assert parse("--capability-token-file", path)["capability-token"].reveal() == "s" * 32


def test_a_token_file_that_is_not_a_regular_file_is_refused(tmp_path: object) -> None:
    fifo = os.path.join(str(tmp_path), "fifo")
    os.mkfifo(fifo, 0o600)  # opening it must not wait for a writer
    with pytest.raises(UsageError, match="not a regular file"):
        parse("--capability-token-file", fifo)


def test_token_never_in_option_errors_or_reprs(token_file: str) -> None:
    options = parse("--capability-token-file", token_file)
    assert TOKEN not in repr(options.config())
    assert TOKEN not in str(dict(options))


def test_make_service_builds_the_face_on_the_given_reactor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/4242")
    service = makeService(parse(), reactor=MemoryReactorClock())
    assert isinstance(service, CredproxyService)
    assert service.http_face is not None and service.rpc_face is not None
    assert len(service.listening_services()) == 2


def _paths(endpoints: tuple[str, ...]) -> list[str]:
    return [parse_unix_description(e).path for e in endpoints]  # type: ignore[union-attr]


def test_neither_face_named_runs_both_on_their_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/4242")
    config = parse().config()
    assert _paths(config.http_endpoints) == ["/run/user/4242/credproxy/http.sock"]
    assert _paths(config.rpc_endpoints) == ["/run/user/4242/credproxy/cred.sock"]


def test_naming_one_face_runs_only_that_one() -> None:
    only_http = parse("--http", "unix:address=/tmp/h.sock").config()
    assert (_paths(only_http.http_endpoints), only_http.rpc_endpoints) == (["/tmp/h.sock"], ())
    only_rpc = parse("--rpc", "unix:address=/tmp/c.sock", "--rpc", "unix:address=/tmp/d.sock")
    config = only_rpc.config()
    assert (config.http_endpoints, _paths(config.rpc_endpoints)) == (
        (),
        ["/tmp/c.sock", "/tmp/d.sock"],
    )
    service = makeService(only_rpc, reactor=MemoryReactorClock())
    assert isinstance(service, CredproxyService)
    assert service.http_face is None and service.rpc_face is not None


def test_credential_socket_on_tcp_needs_the_capability_token(token_file: str) -> None:
    with pytest.raises(UsageError, match="without a capability token"):
        parse("--rpc", "tcp:port=8788:interface=127.0.0.1")
    config = parse(
        "--capability-token-file", token_file, "--rpc", "tcp:port=0:interface=127.0.0.1"
    ).config()
    assert config.rpc_endpoints == ("tcp:port=0:interface=127.0.0.1",)


def test_broker_options_default_to_auto_in_the_state_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    broker = parse().config().broker
    assert broker.store == "auto"
    assert broker.state_dir == os.path.join(str(tmp_path), "credproxy")
    assert (broker.oauth_config, broker.bucket) == (None, "default")
    assert (broker.sandbox_readable, broker.allow_sandbox_login) == (None, False)


def test_broker_options_are_parsed() -> None:
    broker = (
        parse(
            "--store",
            "file",
            "--state-dir",
            "/srv/credproxy",
            "--config",
            "/etc/credproxy.toml",
            "--bucket",
            "work",
            "--sandbox-read",
            "anthropic",
            "--sandbox-read",
            "openai",
            "--allow-sandbox-login",
        )
        .config()
        .broker
    )
    assert (broker.store, broker.state_dir, broker.oauth_config, broker.bucket) == (
        "file",
        "/srv/credproxy",
        "/etc/credproxy.toml",
        "work",
    )
    assert broker.sandbox_readable == frozenset({"anthropic", "openai"})
    assert broker.allow_sandbox_login is True


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--store", "vault"), "--store must be one of auto, keyring, file, memory"),
        (("--bucket", ""), "--bucket needs a name"),
        (("--sandbox-read", ""), "--sandbox-read needs a name"),
    ],
)
def test_bad_broker_options_are_refused(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse(*argv)


def test_a_bad_provider_file_stops_the_start_with_one_line_naming_the_key(
    tmp_path: object,
) -> None:
    path = os.path.join(str(tmp_path), "oauth.toml")
    with open(path, "w") as f:
        f.write('[oauth.example]\nflow = "device_code"\ntoken_url = "http://idp.example/t"\n')
    options = parse("--store", "memory", "--config", path)
    with pytest.raises(SystemExit) as stopped:
        makeService(options, reactor=MemoryReactorClock())
    message = str(stopped.value)
    assert message.startswith("credproxy: ") and "\n" not in message
    assert "oauth.example" in message


def test_store_keyring_without_a_secret_service_refuses_to_start(tmp_path: object) -> None:
    options = parse("--store", "keyring", "--state-dir", str(tmp_path))
    with pytest.raises(SystemExit) as stopped:
        makeService(options, reactor=MemoryReactorClock())
    message = str(stopped.value)
    assert message.startswith("credproxy: --store keyring: no usable Secret Service")
    assert "\n" not in message
    assert "--store file" in message


def test_make_service_shares_one_broker_between_the_faces(tmp_path: object) -> None:
    service = makeService(
        parse("--store", "file", "--state-dir", str(tmp_path)), reactor=MemoryReactorClock()
    )
    assert isinstance(service, CredproxyService)
    assert service.rpc_face is not None
    assert service.rpc_face.factory.broker is service.broker
    assert service.broker.store_description.startswith("file (")


def test_an_unusable_state_directory_stops_the_start_with_one_line(tmp_path: object) -> None:
    not_a_dir = os.path.join(str(tmp_path), "file")
    open(not_a_dir, "w").close()
    for state_dir, reason in (
        (not_a_dir, "not a directory"),
        (f"{not_a_dir}/sub", "Not a directory"),
    ):
        options = parse("--store", "file", "--state-dir", state_dir)
        with pytest.raises(SystemExit) as stopped:
            makeService(options, reactor=MemoryReactorClock())
        message = str(stopped.value)
        assert message.startswith(f"credproxy: cannot use state directory {state_dir}")
        assert reason in message and "\n" not in message


def test_the_state_directory_is_made_private(tmp_path: object) -> None:
    state_dir = os.path.join(str(tmp_path), "state")
    os.mkdir(state_dir, 0o755)
    makeService(parse("--store", "file", "--state-dir", state_dir), reactor=MemoryReactorClock())
    assert os.stat(state_dir).st_mode & 0o777 == 0o700


def test_the_store_options_are_defined_once_for_every_command() -> None:
    # The service's options are the store options and more: one definition.
    store_names = {p[0] for p in StoreOptions.optParameters}
    assert store_names == {
        "store",
        "state-dir",
        "config",
        "store-key-file",
        "redis-password-file",
        "redis-ca-file",
        "redis-prefix",
    }
    assert not store_names & {p[0] for p in Options.optParameters}
    assert issubclass(Options, StoreOptions)
    options = StoreOptions()
    options.parseOptions(["--store", "file", "--config", "/etc/c.toml"])
    assert (
        options.broker_config(bucket="work")
        == parse("--store", "file", "--config", "/etc/c.toml", "--bucket", "work").config().broker
    )


def test_version_is_credproxys(capsys: pytest.CaptureFixture[str]) -> None:
    assert credproxy_version() == version("credproxy")
    with pytest.raises(SystemExit) as stopped:
        parse("--version")
    assert stopped.value.code == 0
    assert capsys.readouterr().out == f"credproxy {version('credproxy')}\n"


def test_a_redis_store_and_its_options(tmp_path: object) -> None:
    key_file = write_store_key(str(tmp_path))
    options = parse(
        "--store",
        "rediss://fleet@redis.example:6380/2",
        "--store-key-file",
        key_file,
        "--store-old-key-file",
        "/etc/credproxy/old-1.key",
        "--store-old-key-file",
        "/etc/credproxy/old-2.key",
        "--redis-password-file",
        "/etc/credproxy/redis.pw",
        "--redis-ca-file",
        "/etc/credproxy/ca.pem",
        "--redis-prefix",
        "team-a:",
    )
    broker = options.config().broker
    assert broker.store == "rediss://fleet@redis.example:6380/2"
    assert broker.redis == RedisStoreConfig(
        key_file=key_file,
        old_key_files=("/etc/credproxy/old-1.key", "/etc/credproxy/old-2.key"),
        password_file="/etc/credproxy/redis.pw",
        ca_file="/etc/credproxy/ca.pem",
        prefix="team-a:",
    )
    assert parse("--store", "unix:///run/redis.sock?db=1").config().broker.redis.prefix == (
        "credproxy:"
    )


def test_a_store_that_is_neither_a_kind_nor_a_redis_url_is_refused() -> None:
    with pytest.raises(UsageError) as refused:
        parse("--store", "mysql://db/0")
    assert "redis://" in str(refused.value)


def test_a_redis_store_without_a_key_file_refuses_to_start() -> None:
    options = parse("--store", "redis://127.0.0.1:6379/0")
    with pytest.raises(SystemExit) as stopped:
        makeService(options, reactor=MemoryReactorClock())
    message = str(stopped.value)
    assert "needs --store-key-file" in message and "\n" not in message


def test_a_password_in_the_redis_url_refuses_to_start() -> None:
    options = parse("--store", "redis://:s3cret-pw-81@127.0.0.1:6379/0")
    with pytest.raises(SystemExit) as stopped:
        makeService(options, reactor=MemoryReactorClock())
    message = str(stopped.value)
    assert "--redis-password-file" in message and "s3cret" not in message
