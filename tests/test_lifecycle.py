"""
A proxy launched for one command (credproxy._lifecycle) and the run around
it (credproxy._run): fresh paths and tokens, the socket path limit, start
and stop on a memory reactor, then the same on real sockets (private modes,
each face taking only its own token, stale sockets, failed starts leaving
nothing), and the command's side (environment, descriptor, exit statuses,
signals, options) with a recording reactor.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import maybeDeferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from credproxy._command import (
    EXIT_CANNOT_RUN,
    EXIT_CREDPROXY_FAILED,
    EXIT_NOT_FOUND,
    TOKEN_FD,
    CommandNotRunnable,
    exit_status,
    resolve_command,
)
from credproxy._lifecycle import (
    LOOPBACK_HTTP_ENDPOINT,
    MAX_SOCKET_PATH_BYTES,
    ProxyHandle,
    ProxyLaunchConfig,
    ProxyStartError,
    check_socket_path,
    create_and_start_proxy,
    new_capability_token,
    new_socket_paths,
    remove_stale_run_sockets,
    socket_paths,
)
from credproxy._run import (
    RunOptions,
    RunSession,
    child_environment,
    main,
)
from credproxy._secret import Secret
from credproxy.broker.credentials import EnvironmentCredentialSource
from credproxy.http import HTTPProxyConfig
from credproxy.service import BrokerConfig, CredproxyConfig
from credproxy.testing import InlineBlockingCalls
from tests.integration.unprivileged import post_as_nobody
from tests.integration.upstream import Upstream

REAL_KEY = "sk-ant-api03-lifecycle-REAL-key-0123456789abcdef"


def private_tmp() -> str:
    """
    A short directory (Unix socket paths are limited) for one test.
    """
    return tempfile.mkdtemp(prefix="cpl-", dir="/tmp")


def memory_config(runtime_dir: str, **http: Any) -> ProxyLaunchConfig:
    return ProxyLaunchConfig(
        http=HTTPProxyConfig(**http),
        broker=BrokerConfig(store="memory"),
        grace=1.0,
        tcp_http_endpoint=LOOPBACK_HTTP_ENDPOINT,
        runtime_dir=runtime_dir,
    )


# -- paths and tokens ------------------------------------------------------------


class PathAndTokenTests(SynchronousTestCase):
    def test_paths_are_pid_and_nonce_with_an_http_sibling(self) -> None:
        paths = socket_paths("/run/user/1000/credproxy", 4242, "ab" * 16)
        self.assertEqual(paths.credential, f"/run/user/1000/credproxy/4242-{'ab' * 16}.sock")
        self.assertEqual(paths.http, f"/run/user/1000/credproxy/4242-{'ab' * 16}-http.sock")

    def test_new_paths_carry_our_pid_and_a_fresh_128_bit_nonce(self) -> None:
        first, second = new_socket_paths("/tmp/d"), new_socket_paths("/tmp/d")
        pattern = re.compile(rf"\A/tmp/d/{os.getpid()}-([0-9a-f]{{32}})\.sock\Z")
        one, two = pattern.match(first.credential), pattern.match(second.credential)
        assert one is not None and two is not None
        self.assertNotEqual(one.group(1), two.group(1))
        self.assertEqual(first.http, first.credential.removesuffix(".sock") + "-http.sock")

    def test_tokens_are_fresh_256_bit_secrets(self) -> None:
        tokens = [new_capability_token() for _ in range(3)]
        values = {t.reveal() for t in tokens}
        self.assertEqual(len(values), 3)
        for value in values:
            self.assertRegex(value, r"\A[0-9a-f]{64}\Z")  # 32 random bytes
        self.assertNotIn(tokens[0].reveal(), repr(tokens[0]))

    def test_the_longest_path_a_socket_may_have_is_accepted(self) -> None:
        path = "/" + "d" * (MAX_SOCKET_PATH_BYTES - 1)
        check_socket_path(path)  # 107 bytes: sun_path's 108 with the NUL

    def test_one_byte_more_is_refused_naming_the_length(self) -> None:
        path = "/" + "d" * MAX_SOCKET_PATH_BYTES
        with self.assertRaises(ProxyStartError) as caught:
            check_socket_path(path)
        self.assertIn("108 bytes", str(caught.exception))
        self.assertIn("at most 107", str(caught.exception))

    def test_the_limit_counts_bytes_not_characters(self) -> None:
        path = "/" + "é" * 60  # 121 bytes in 61 characters
        with self.assertRaises(ProxyStartError) as caught:
            check_socket_path(path)
        self.assertIn("121 bytes", str(caught.exception))

    def test_the_http_sibling_is_what_hits_the_limit(self) -> None:
        # The sibling is 5 bytes longer; a directory that fits only the
        # credential socket is refused as a whole.
        fixed = len(f"/{os.getpid()}-{'0' * 32}-http.sock")
        fits = "/" + "d" * (MAX_SOCKET_PATH_BYTES - fixed - 1)
        socket_paths(fits, os.getpid(), "0" * 32)
        with self.assertRaises(ProxyStartError):
            socket_paths(fits + "d", os.getpid(), "0" * 32)


# -- start and stop on a memory reactor ------------------------------------------


class MemoryLifecycleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = private_tmp()
        self.addCleanup(shutil.rmtree, self.base, True)
        self.runtime = os.path.join(self.base, "credproxy")
        self.reactor = MemoryReactorClock()

    def start(self, config: ProxyLaunchConfig | None = None) -> ProxyHandle:
        d = create_and_start_proxy(
            self.reactor,
            config or memory_config(self.runtime),
            environ={"ANTHROPIC_API_KEY": REAL_KEY},
            calls=InlineBlockingCalls(),
        )
        return self.successResultOf(d)

    def test_listens_on_both_fresh_sockets_and_loopback(self) -> None:
        handle = self.start()
        unix = {
            address: (mode, want_pid) for address, _, _, mode, want_pid in self.reactor.unixServers
        }
        self.assertEqual(
            unix, {handle.http_socket: (0o600, False), handle.credential_socket: (0o600, False)}
        )
        self.assertEqual([(p, i) for p, _, _, i in self.reactor.tcpServers], [(0, "127.0.0.1")])
        self.assertEqual(os.path.dirname(handle.credential_socket), self.runtime)
        self.assertEqual(stat.S_IMODE(os.stat(self.runtime).st_mode), 0o700)
        assert handle.http_token is not None
        self.assertNotEqual(handle.http_token, handle.capability_token)
        self.assertNotIn(handle.capability_token.reveal(), repr(handle))
        self.assertNotIn(handle.http_token.reveal(), repr(handle))

    def test_without_a_tcp_endpoint_there_is_no_url_and_no_second_token(self) -> None:
        handle = self.start(
            ProxyLaunchConfig(broker=BrokerConfig(store="memory"), runtime_dir=self.runtime)
        )
        self.assertIsNone(handle.http_url)
        self.assertIsNone(handle.http_token)
        self.assertEqual(self.reactor.tcpServers, [])

    def test_stop_cancels_every_timer_and_a_second_stop_is_harmless(self) -> None:
        handle = self.start()
        self.assertTrue(self.reactor.getDelayedCalls())  # the broker's session sweep
        self.successResultOf(handle.stop())
        self.assertFalse(handle.service.running)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.successResultOf(handle.stop())
        self.assertFalse(handle.service.running)

    def test_a_too_long_runtime_dir_fails_before_making_anything(self) -> None:
        runtime = os.path.join(self.base, "x" * 80)
        d = create_and_start_proxy(
            self.reactor, memory_config(runtime), environ={}, calls=InlineBlockingCalls()
        )
        failure = self.failureResultOf(d, ProxyStartError)
        self.assertIn("bytes long", str(failure.value))
        self.assertFalse(os.path.exists(runtime))
        self.assertEqual(self.reactor.unixServers, [])

    def test_a_unix_extra_endpoint_is_refused(self) -> None:
        config = ProxyLaunchConfig(
            broker=BrokerConfig(store="memory"),
            tcp_http_endpoint="unix:address=/tmp/x.sock",
            runtime_dir=self.runtime,
        )
        d = create_and_start_proxy(self.reactor, config, environ={}, calls=InlineBlockingCalls())
        self.failureResultOf(d, ProxyStartError)
        self.assertEqual(self.reactor.unixServers, [])

    def test_a_bad_store_fails_with_one_clear_line(self) -> None:
        config = ProxyLaunchConfig(
            broker=BrokerConfig(store="keyring", state_dir=self.base), runtime_dir=self.runtime
        )
        d = create_and_start_proxy(self.reactor, config, environ={}, calls=InlineBlockingCalls())
        failure = self.failureResultOf(d, ProxyStartError)
        self.assertIn("keyring", str(failure.value))
        self.assertEqual(self.reactor.unixServers, [])

    def test_the_launch_config_of_the_service_options_drops_their_token(self) -> None:
        token = Secret("t" * 32)
        service = CredproxyConfig(
            http_endpoints=("unix:address=/x",),
            http=HTTPProxyConfig(upstream="http://127.0.0.1:1", capability_token=token),
            capability_token=token,
            grace=2.5,
            broker=BrokerConfig(store="memory", bucket="b"),
        )
        launch = ProxyLaunchConfig.from_service_config(
            service, tcp_http_endpoint=LOOPBACK_HTTP_ENDPOINT
        )
        self.assertIsNone(launch.http.capability_token)
        self.assertEqual(launch.http.upstream, "http://127.0.0.1:1")
        self.assertEqual((launch.grace, launch.broker.bucket), (2.5, "b"))
        self.assertEqual(launch.tcp_http_endpoint, LOOPBACK_HTTP_ENDPOINT)


# -- stale sockets of earlier runs -----------------------------------------------


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def stale_socket(path: str) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # the file stays, nobody listens


class StaleRunSocketTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = private_tmp()
        self.addCleanup(shutil.rmtree, self.dir, True)

    def test_only_dead_runs_sockets_are_removed(self) -> None:
        gone = dead_pid()
        stale = socket_paths(self.dir, gone, "1" * 32)
        stale_socket(stale.credential)
        stale_socket(stale.http)
        # A dead pid whose socket still answers (another pid namespace): kept.
        answering = socket_paths(self.dir, gone, "2" * 32).credential
        live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(live.close)
        live.bind(answering)
        live.listen(1)
        # A live pid (ours, and init's) and names that are not ours: kept.
        ours = socket_paths(self.dir, os.getpid(), "3" * 32).credential
        stale_socket(ours)
        other = os.path.join(self.dir, "cred.sock")
        stale_socket(other)
        not_a_socket = socket_paths(self.dir, gone, "4" * 32).credential
        with open(not_a_socket, "w"):
            pass

        removed = remove_stale_run_sockets(self.dir)

        self.assertEqual(sorted(removed), sorted([stale.credential, stale.http]))
        self.assertEqual(
            sorted(os.listdir(self.dir)),
            sorted(os.path.basename(p) for p in (answering, ours, other, not_a_socket)),
        )

    def test_a_missing_directory_is_nothing_to_sweep(self) -> None:
        self.assertEqual(remove_stale_run_sockets(os.path.join(self.dir, "none")), [])


# -- on real sockets ----------------------------------------------------------------


@pytest.fixture
def runtime() -> Iterator[str]:
    base = private_tmp()
    try:
        yield os.path.join(base, "credproxy")
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest_twisted.async_yield_fixture
async def upstream() -> AsyncIterator[Upstream]:
    fake = Upstream()
    fake.port = global_reactor.listenTCP(0, fake.site(), interface="127.0.0.1")  # type: ignore[arg-type]
    try:
        yield fake
    finally:
        await maybeDeferred(fake.port.stopListening)


async def start_real(
    runtime: str, upstream_url: str = "http://127.0.0.1:9", **kw: Any
) -> ProxyHandle:
    config = kw.pop("config", None) or memory_config(runtime, upstream=upstream_url)
    return await create_and_start_proxy(
        global_reactor,
        config,
        environ={},
        credentials=EnvironmentCredentialSource({"ANTHROPIC_API_KEY": REAL_KEY}),
        **kw,
    )


def post(connection: http.client.HTTPConnection, key: str) -> tuple[int, dict[str, Any]]:
    body = json.dumps(
        {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    )
    try:
        connection.request(
            "POST",
            "/v1/messages",
            body=body,
            headers={"x-api-key": key, "content-type": "application/json"},
        )
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(self.socket_path)


def tcp_connection(url: str) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=10)


@pytest_twisted.ensureDeferred
async def test_private_sockets_that_a_double_stop_removes(runtime: str) -> None:
    handle = await start_real(runtime)
    assert stat.S_IMODE(os.stat(runtime).st_mode) == 0o700
    for path in (handle.credential_socket, handle.http_socket):
        info = os.lstat(path)
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    assert handle.http_url is not None and re.fullmatch(r"http://127\.0\.0\.1:\d+", handle.http_url)
    first, second = handle.stop(), handle.stop()  # the second while the first runs
    assert not first.called and not second.called
    await first
    await second
    await handle.stop()
    assert os.listdir(runtime) == []
    assert not handle.service.running


@pytest_twisted.ensureDeferred
async def test_each_http_endpoint_takes_only_what_it_should(
    runtime: str, upstream: Upstream
) -> None:
    handle = await start_real(runtime, upstream.url)
    try:
        assert handle.http_url is not None and handle.http_token is not None
        # The TCP endpoint: its own token only.
        status, _ = await deferToThread(
            post, tcp_connection(handle.http_url), handle.http_token.reveal()
        )
        assert status == 200
        assert upstream.received[-1].header("x-api-key") == REAL_KEY
        for wrong in (handle.capability_token.reveal(), "placeholder"):
            status, body = await deferToThread(post, tcp_connection(handle.http_url), wrong)
            assert status == 401
            assert "capability token" in body["error"]["message"]
        assert len(upstream.received) == 1
        # The Unix socket: our uid with any placeholder.
        status, _ = await deferToThread(post, UnixHTTPConnection(handle.http_socket), "placeholder")
        assert status == 200
        assert upstream.received[-1].header("x-api-key") == REAL_KEY
    finally:
        await handle.stop()


# A request to the HTTP socket (argv[1]) with the key on stdin, from uid 65534;
# prints the answer's status. The standard library only: the system
# interpreter runs it.
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")
@pytest_twisted.ensureDeferred
async def test_a_sandboxs_http_socket_wants_the_placeholder_and_an_allowed_uid(
    runtime: str, upstream: Upstream
) -> None:
    config = replace(
        memory_config(runtime, upstream=upstream.url),
        tcp_http_endpoint=None,
        placeholder_on_socket=True,
    )
    handle = await start_real(runtime, config=config)
    try:
        assert handle.http_url is None and handle.http_token is not None
        placeholder = handle.http_token.reveal()
        status, _ = await deferToThread(post, UnixHTTPConnection(handle.http_socket), placeholder)
        assert status == 200
        assert upstream.received[-1].header("x-api-key") == REAL_KEY
        for wrong in (handle.capability_token.reveal(), "placeholder"):
            status, _ = await deferToThread(post, UnixHTTPConnection(handle.http_socket), wrong)
            assert status == 401
        # The uid check still comes first: another uid with the right
        # placeholder is refused (the directory opened so that only the
        # face, not the kernel, decides).
        os.chmod(os.path.dirname(runtime), 0o755)  # noqa: S103 - the test's own throwaway directory
        os.chmod(runtime, 0o755)  # noqa: S103 - as above
        os.chmod(handle.http_socket, 0o666)  # noqa: S103 - as above
        assert await deferToThread(post_as_nobody, handle.http_socket, placeholder) == "403"
        assert len(upstream.received) == 1
    finally:
        await handle.stop()


def credential_outcomes(path: str, token: Secret | None) -> list[object]:
    from credproxy.wire import BlockingProxySocketClient, ProxyRequestError

    outcomes: list[object] = []
    with BlockingProxySocketClient(path, capability_token=token, request_timeout=10) as client:
        for op, payload in (
            (
                "save_token",
                {"provider": "anthropic", "token": {"access_token": "acc-lc-0123456789"}},
            ),
            ("list_providers", {}),
        ):
            try:
                outcomes.append(client.request(op, payload))
            except ProxyRequestError as e:
                outcomes.append(e.code)
    return outcomes


@pytest_twisted.ensureDeferred
async def test_the_credential_socket_serves_sandboxes_with_its_token_only(runtime: str) -> None:
    handle = await start_real(runtime)
    try:
        sandbox = await deferToThread(
            credential_outcomes, handle.credential_socket, handle.capability_token
        )
        assert sandbox == ["FORBIDDEN", {"providers": []}]  # read-only, no enumeration
        for wrong in (handle.http_token, None):
            refused = await deferToThread(credential_outcomes, handle.credential_socket, wrong)
            assert refused == ["UNAUTHORIZED", "UNAUTHORIZED"]
    finally:
        await handle.stop()
    assert os.listdir(runtime) == []


@pytest_twisted.ensureDeferred
async def test_a_stale_socket_at_the_path_is_replaced(runtime: str) -> None:
    os.makedirs(runtime, mode=0o700)
    paths = socket_paths(runtime, os.getpid(), "5" * 32)  # our pid: no sweep, the bind replaces
    stale_socket(paths.http)
    stale_socket(paths.credential)
    handle = await start_real(runtime, paths=paths)
    try:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(paths.credential)  # now something listens
        probe.close()
    finally:
        await handle.stop()
    assert os.listdir(runtime) == []


@pytest_twisted.ensureDeferred
async def test_a_failed_tcp_bind_removes_both_sockets(runtime: str) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    config = ProxyLaunchConfig(
        broker=BrokerConfig(store="memory"),
        tcp_http_endpoint=f"tcp:port={port}:interface=127.0.0.1",
        runtime_dir=runtime,
    )
    try:
        with pytest.raises(ProxyStartError) as caught:
            await start_real(runtime, config=config)
    finally:
        taken.close()
    assert f"cannot listen on tcp:port={port}" in str(caught.value)
    assert os.listdir(runtime) == []


@pytest_twisted.ensureDeferred
async def test_a_failed_credential_socket_removes_the_http_socket(runtime: str) -> None:
    os.makedirs(runtime, mode=0o700)
    paths = socket_paths(runtime, os.getpid(), "6" * 32)
    with open(paths.credential, "w") as f:
        f.write("not a socket")
    with pytest.raises(ProxyStartError) as caught:
        await start_real(runtime, paths=paths)
    assert "is not a socket" in str(caught.value)
    assert os.listdir(runtime) == [os.path.basename(paths.credential)]  # untouched, and only it


@pytest_twisted.ensureDeferred
async def test_a_runtime_dir_that_is_a_file_is_refused(runtime: str) -> None:
    with open(os.path.dirname(runtime) + "/credproxy", "w"):
        pass  # a file where the directory should be
    with pytest.raises(ProxyStartError) as caught:
        await start_real(runtime)
    assert "cannot create runtime directory" in str(caught.value)


# -- the command's side ----------------------------------------------------------


class EnvironmentTests(SynchronousTestCase):
    def build(self, parent: dict[str, str], *, tcp: bool = True) -> dict[str, str]:
        return child_environment(
            parent,
            credential_socket="/run/c.sock",
            http_socket="/run/c-http.sock",
            http_url="http://127.0.0.1:4000" if tcp else None,
            http_token=Secret("h" * 64) if tcp else None,
            token_fd=3,
        )

    def test_no_real_credential_and_every_address(self) -> None:
        env = self.build(
            {
                "PATH": "/bin",
                "HOME": "/home/me",
                "ANTHROPIC_API_KEY": REAL_KEY,
                "CLAUDE_CODE_OAUTH_TOKEN": "sk-ant-oat01-real",
                "ANTHROPIC_AUTH_TOKEN": "real-bearer",
                "CREDPROXY_CAPABILITY_TOKEN_FILE": "/some/file",
                "CREDPROXY_CAPABILITY_TOKEN_FD": "9",
                "ANTHROPIC_BASE_URL": "https://api.anthropic.com",
            }
        )
        self.assertEqual(
            env,
            {
                "PATH": "/bin",
                "HOME": "/home/me",
                "CREDPROXY_SOCKET": "/run/c.sock",
                "LLXPRT_CREDENTIAL_SOCKET": "/run/c.sock",
                "CREDPROXY_HTTP_SOCKET": "/run/c-http.sock",
                "CREDPROXY_CAPABILITY_TOKEN_FD": "3",
                "ANTHROPIC_BASE_URL": "http://127.0.0.1:4000",
                "ANTHROPIC_API_KEY": "h" * 64,
            },
        )

    def test_without_tcp_there_is_no_key_at_all(self) -> None:
        env = self.build({"ANTHROPIC_API_KEY": REAL_KEY}, tcp=False)
        self.assertNotIn("ANTHROPIC_API_KEY", env)
        self.assertNotIn("ANTHROPIC_BASE_URL", env)
        self.assertEqual(env["CREDPROXY_CAPABILITY_TOKEN_FD"], "3")

    def test_the_parent_environment_is_not_changed(self) -> None:
        parent = {"ANTHROPIC_API_KEY": REAL_KEY}
        self.build(parent)
        self.assertEqual(parent, {"ANTHROPIC_API_KEY": REAL_KEY})


class ResolveTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = private_tmp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.tool = os.path.join(self.dir, "tool")
        with open(self.tool, "w") as f:
            f.write("#!/bin/sh\n")
        os.chmod(self.tool, 0o700)
        self.plain = os.path.join(self.dir, "plain")
        with open(self.plain, "w"):
            pass

    def status(self, name: str) -> int:
        with self.assertRaises(CommandNotRunnable) as caught:
            resolve_command(name, self.dir)
        status: int = caught.exception.status
        return status

    def test_found_on_the_path(self) -> None:
        self.assertEqual(resolve_command("tool", self.dir), self.tool)
        self.assertEqual(resolve_command(self.tool, "/nonexistent"), self.tool)

    def test_not_found_is_127_and_not_executable_126(self) -> None:
        self.assertEqual(self.status("no-such-tool"), EXIT_NOT_FOUND)
        self.assertEqual(self.status(os.path.join(self.dir, "missing")), EXIT_NOT_FOUND)
        self.assertEqual(self.status("plain"), EXIT_NOT_FOUND)  # not executable: not a command
        self.assertEqual(self.status(self.plain), EXIT_CANNOT_RUN)
        self.assertEqual(self.status(self.dir), EXIT_CANNOT_RUN)
        self.assertEqual(self.status(""), EXIT_NOT_FOUND)


class ExitStatusTests(SynchronousTestCase):
    def test_statuses_as_a_shell_reports_them(self) -> None:
        self.assertEqual(exit_status(Failure(ProcessDone(0))), 0)
        self.assertEqual(exit_status(Failure(ProcessTerminated(exitCode=3))), 3)
        self.assertEqual(exit_status(Failure(ProcessTerminated(signal=9))), 137)
        self.assertEqual(exit_status(Failure(ProcessTerminated(signal=15))), 143)


class OptionsTests(SynchronousTestCase):
    def parse(self, *argv: str) -> RunOptions:
        options = RunOptions()
        options.parseOptions(list(argv))
        return options

    def test_service_options_then_the_command(self) -> None:
        options = self.parse(
            "--store", "memory", "--upstream", "http://127.0.0.1:1", "--verbose",
            "--", "agent", "--store", "x",
        )  # fmt: skip
        self.assertEqual(options["command"], ["agent", "--store", "x"])
        self.assertTrue(options["verbose"])
        config = options.launch_config()
        self.assertEqual(config.broker.store, "memory")
        self.assertEqual(config.http.upstream, "http://127.0.0.1:1")
        self.assertEqual(config.tcp_http_endpoint, LOOPBACK_HTTP_ENDPOINT)
        self.assertIsNone(config.http.capability_token)

    def test_the_command_may_follow_without_a_double_dash(self) -> None:
        self.assertEqual(self.parse("python", "-c", "1")["command"], ["python", "-c", "1"])
        self.assertFalse(self.parse("true")["verbose"])

    def test_what_run_makes_itself_cannot_be_given(self) -> None:
        for argv in (
            ["--http", "unix:address=/x", "--", "true"],
            ["--rpc", "unix:address=/x", "--", "true"],
            ["--capability-token-file", "/x", "--", "true"],
            ["--store", "memory"],  # no command
            ["--store", "bogus", "--", "true"],
        ):
            with self.assertRaises(usage.UsageError):
                self.parse(*argv)


def test_main_refuses_bad_options_with_a_hint(capsys: pytest.CaptureFixture[str]) -> None:
    reactor = MemoryReactorClock()
    assert main(["--http", "tcp:1", "--", "true"], reactor=reactor) == EXIT_CREDPROXY_FAILED
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "credproxy run: --http is not an option of run: it makes its own sockets"
    assert len(err) == 2 and "--help" in err[1]
    assert not reactor.running and not reactor.hasRun


# -- the session with a recording reactor ---------------------------------------


class _FakeProcess:
    pid = 31337

    def __init__(self) -> None:
        self.signals: list[int] = []
        self.exited = False

    def signalProcess(self, signum: int) -> None:
        if self.exited:
            raise ProcessExitedAlready()
        self.signals.append(signum)


class SpawningReactor(MemoryReactorClock):
    """
    Records spawnProcess and reads the token descriptor as the child would,
    while the parent still holds it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[dict[str, Any]] = []
        self.protocol: ProcessProtocol | None = None
        self.process = _FakeProcess()

    def spawnProcess(
        self,
        protocol: ProcessProtocol,
        executable: str,
        args: list[str],
        env: dict[str, str],
        path: str | None,
        childFDs: dict[int, int],
    ) -> _FakeProcess:
        token_fd = childFDs[int(env["CREDPROXY_CAPABILITY_TOKEN_FD"])]
        with os.fdopen(os.dup(token_fd), "rb") as f:
            token = f.read()  # the write end is closed already, so this ends
        self.spawned.append(
            {
                "executable": executable,
                "args": args,
                "env": env,
                "path": path,
                "fds": dict(childFDs),
                "token": token,
                "listening": [a for a, *_ in self.unixServers],
            }
        )
        self.protocol = protocol
        return self.process


class SessionTests(SynchronousTestCase):
    def setUp(self) -> None:
        base = private_tmp()
        self.addCleanup(shutil.rmtree, base, True)
        self.runtime = os.path.join(base, "credproxy")
        self.reactor = SpawningReactor()

    def session(self, *command: str) -> RunSession:
        return RunSession(
            self.reactor,
            ProxyLaunchConfig(
                broker=BrokerConfig(store="memory"),
                tcp_http_endpoint=LOOPBACK_HTTP_ENDPOINT,
                runtime_dir=self.runtime,
            ),
            list(command or ("true", "arg")),
            environ={"PATH": os.defpath, "ANTHROPIC_API_KEY": REAL_KEY, "KEEP": "1"},
        )

    def test_the_command_starts_on_a_listening_proxy_and_its_status_is_ours(self) -> None:
        session = self.session()
        result = session.run()
        self.assertNoResult(result)
        [spawned] = self.reactor.spawned
        handle = session.handle
        assert handle is not None and handle.http_token is not None
        self.assertEqual(
            sorted(spawned["listening"]), sorted([handle.credential_socket, handle.http_socket])
        )
        self.assertEqual(spawned["executable"], shutil.which("true", path=os.defpath))
        self.assertEqual(spawned["args"], ["true", "arg"])
        self.assertIsNone(spawned["path"])
        self.assertEqual(spawned["token"], handle.capability_token.reveal().encode() + b"\n")
        fds = spawned["fds"]
        self.assertEqual({fd: fds[fd] for fd in (0, 1, 2)}, {0: 0, 1: 1, 2: 2})
        self.assertEqual(set(fds), {0, 1, 2, TOKEN_FD})
        env = spawned["env"]
        self.assertEqual(env["ANTHROPIC_API_KEY"], handle.http_token.reveal())
        self.assertEqual(env["CREDPROXY_SOCKET"], handle.credential_socket)
        self.assertEqual(env["KEEP"], "1")
        self.assertNotIn(handle.capability_token.reveal(), "".join(env.values()))
        self.assertNotIn(REAL_KEY, "".join(env.values()))
        with self.assertRaises(OSError):  # our copy of the read end is closed
            os.fstat(fds[TOKEN_FD])

        assert self.reactor.protocol is not None
        self.reactor.protocol.processEnded(Failure(ProcessTerminated(exitCode=3)))
        self.assertEqual(self.successResultOf(result), 3)
        self.assertFalse(handle.service.running)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_signals_go_to_the_command_until_it_ended(self) -> None:
        session = self.session()
        result = session.run()
        session.forward_signal(signal.SIGHUP)
        session.forward_signal(signal.SIGINT)
        self.assertEqual(self.reactor.process.signals, [signal.SIGHUP, signal.SIGINT])
        self.assertNoResult(result)  # a signal does not end the run; the command does
        self.reactor.process.exited = True
        session.forward_signal(signal.SIGTERM)  # already gone: nothing to do
        assert self.reactor.protocol is not None
        self.reactor.protocol.processEnded(Failure(ProcessTerminated(signal=signal.SIGINT)))
        self.assertEqual(self.successResultOf(result), 128 + signal.SIGINT)
        session.forward_signal(signal.SIGTERM)
        self.assertEqual(self.reactor.process.signals, [signal.SIGHUP, signal.SIGINT])

    def test_a_reactor_stop_asks_the_command_to_end_and_waits_for_cleanup(self) -> None:
        session = self.session()
        result = session.run()
        stopped = session.shutdown()
        self.assertEqual(self.reactor.process.signals, [signal.SIGTERM])
        self.assertNoResult(stopped)
        assert self.reactor.protocol is not None
        self.reactor.protocol.processEnded(Failure(ProcessDone(0)))
        self.assertEqual(self.successResultOf(result), 0)
        self.successResultOf(stopped)
        self.successResultOf(session.shutdown())

    def test_a_signal_before_the_command_started_means_it_never_starts(self) -> None:
        session = self.session()
        session.forward_signal(signal.SIGTERM)
        self.assertEqual(self.successResultOf(session.run()), 128 + signal.SIGTERM)
        self.assertEqual(self.reactor.spawned, [])
        assert session.handle is not None
        self.assertFalse(session.handle.service.running)

    def test_a_command_not_found_is_127_and_the_proxy_stops(self) -> None:
        session = self.session("no-such-command-credproxy")
        self.assertEqual(self.successResultOf(session.run()), EXIT_NOT_FOUND)
        self.assertEqual(self.reactor.spawned, [])
        assert session.handle is not None
        self.assertFalse(session.handle.service.running)

    def test_a_proxy_that_cannot_start_is_125_and_runs_nothing(self) -> None:
        session = RunSession(
            self.reactor,
            ProxyLaunchConfig(broker=BrokerConfig(store="memory"), runtime_dir="/" + "d" * 100),
            ["true"],
            environ={},
        )
        self.assertEqual(self.successResultOf(session.run()), EXIT_CREDPROXY_FAILED)
        self.assertEqual(self.reactor.spawned, [])

    def test_a_standard_stream_is_no_token_descriptor(self) -> None:
        with self.assertRaises(ValueError):
            RunSession(self.reactor, ProxyLaunchConfig(), ["true"], token_fd=2)


@pytest.mark.slow
def test_the_module_runs_as_a_script() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "credproxy._run", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: credproxy run [options] [--] CMD [ARGS...]")
