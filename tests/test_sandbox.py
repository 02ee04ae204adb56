"""
The sandbox as planned for bubblewrap, its environment, its refusals, the
control channel's lines, and the options of C{credproxy run --sandbox}.
What bubblewrap makes of the plan is tests/integration/test_sandbox.py.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from twisted.internet.testing import StringTransport

from credproxy._bwrap import find_bwrap, probe_refusal
from credproxy._run import RunOptions
from credproxy._sandbox import (
    ENV_ALLOWLIST,
    SandboxLayout,
    SandboxRefused,
    SandboxSettings,
    hidden_paths,
    plan_sandbox,
    sandbox_environment,
    sandboxed_argv,
)
from credproxy._sandbox_control import (
    MAX_CONTROL_LINE,
    MAX_INIT_LINES,
    HostControl,
    InitControl,
    parse_signal,
    parse_started,
)
from credproxy._secret import Secret

PLACEHOLDER = "4f1c9e2b7d3a8650c1e4b9f2a7d3c8e1b5f0a9d4c7e2b1f6a3d8c5e0b7f2a9d4"


@pytest.fixture
def host(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    for name in ("work", "state", "run/credproxy", "home/.claude", "home/.ssh", "extra"):
        (tmp_path / name).mkdir(parents=True)
    (home / ".claude.json").write_text("{}")
    return {
        "HOME": str(home),
        "XDG_RUNTIME_DIR": str(tmp_path / "run"),
        "SSH_AUTH_SOCK": str(home / ".ssh" / "agent.sock"),
        "DBUS_SESSION_BUS_ADDRESS": f"unix:path={tmp_path}/bus,guid=1;unix:abstract=/x",
        "BASE": str(tmp_path),
    }


def plan(host: dict[str, str], settings: SandboxSettings | None = None, **kw: str) -> SandboxLayout:
    base = host["BASE"]
    return plan_sandbox(
        settings or SandboxSettings(),
        environ=host,
        cwd=kw.get("cwd", os.path.join(base, "work")),
        state_dir=os.path.join(base, "state"),
        runtime_dir=os.path.join(base, "run", "credproxy"),
        config_file=None,
    )


def pairs(args: tuple[str, ...], option: str) -> list[tuple[str, str]]:
    return [(args[i + 1], args[i + 2]) for i, a in enumerate(args) if a == option]


class TestHiddenPaths:
    def test_credproxys_own_the_sessions_sockets_and_the_users_credentials(
        self, host: dict[str, str]
    ) -> None:
        base, home = host["BASE"], host["HOME"]
        hidden = hidden_paths(
            host,
            state_dir=os.path.join(base, "state"),
            runtime_dir=os.path.join(base, "run", "credproxy"),
            config_file=os.path.join(base, "providers.toml"),
            extra=[os.path.join(base, "extra")],
        )
        for path in (
            os.path.join(base, "state"),
            os.path.join(base, "run", "credproxy"),
            os.path.join(base, "run"),
            os.path.join(base, "bus"),
            os.path.join(home, ".ssh", "agent.sock"),
            os.path.join(home, ".claude"),
            os.path.join(home, ".claude.json"),
            os.path.join(home, ".config", "credproxy"),
            os.path.join(base, "providers.toml"),
            os.path.join(base, "extra"),
        ):
            assert os.path.realpath(path) in hidden

    def test_a_link_is_hidden_where_it_leads(self, host: dict[str, str], tmp_path: Path) -> None:
        target = tmp_path / "elsewhere"
        target.mkdir()
        (tmp_path / "link").symlink_to(target)
        hidden = hidden_paths(host, state_dir=str(tmp_path / "link"), runtime_dir="/nonexistent")
        assert str(target.resolve()) in hidden


class TestPlan:
    def test_namespaces_no_capabilities_and_a_session_of_its_own(
        self, host: dict[str, str]
    ) -> None:
        args = plan(host).bwrap_args
        for flag in (
            "--unshare-pid",
            "--unshare-net",
            "--unshare-ipc",
            "--unshare-uts",
            "--die-with-parent",
            "--new-session",
        ):
            assert flag in args
        assert args[args.index("--cap-drop") + 1] == "ALL"

    def test_the_host_read_only_with_private_tmp_run_proc_and_dev(
        self, host: dict[str, str]
    ) -> None:
        args = plan(host).bwrap_args
        assert ("/", "/") in pairs(args, "--ro-bind")
        tmpfs = [args[i + 1] for i, a in enumerate(args) if a == "--tmpfs"]
        assert "/tmp" in tmpfs and "/run" in tmpfs
        assert args[args.index("--proc") + 1] == "/proc"
        assert args[args.index("--dev") + 1] == "/dev"

    def test_the_current_directory_is_writable_and_where_the_command_starts(
        self, host: dict[str, str]
    ) -> None:
        layout = plan(host)
        work = os.path.realpath(os.path.join(host["BASE"], "work"))
        assert (work, work) in pairs(layout.bwrap_args, "--bind")
        assert layout.chdir == work

    def test_without_the_current_directory_nothing_is_writable(self, host: dict[str, str]) -> None:
        layout = plan(host, SandboxSettings(share_cwd=False))
        assert pairs(layout.bwrap_args, "--bind") == []
        assert layout.chdir == "/"

    def test_hidden_paths_are_covered_after_every_bind(self, host: dict[str, str]) -> None:
        home = os.path.realpath(host["HOME"])
        layout = plan(host, SandboxSettings(read_only=(home,)))
        args = layout.bwrap_args
        claude = os.path.join(home, ".claude")
        cover = args.index(claude)
        assert args[cover - 1] == "--tmpfs" and args[cover + 1 : cover + 3] == (
            "--remount-ro",
            claude,
        )
        assert cover > args.index(home)  # the cover comes after the home's bind
        assert ("/dev/null", os.path.join(home, ".claude.json")) in pairs(args, "--ro-bind")

    def test_a_hidden_path_out_of_sight_anyway_needs_no_cover(self, host: dict[str, str]) -> None:
        # tmp_path is under /tmp, which is private: without a bind, nothing there shows.
        layout = plan(host, SandboxSettings(share_cwd=False))
        assert layout.hidden == ()

    def test_the_sockets_come_last_at_their_fixed_places(self, host: dict[str, str]) -> None:
        argv = sandboxed_argv(
            "/usr/bin/bwrap",
            plan(host),
            ["--", "agent"],
            credential_socket="/r/c.sock",
            http_socket="/r/h.sock",
        )
        binds = pairs(tuple(argv), "--ro-bind")
        assert binds[-2:] == [
            ("/r/c.sock", "/run/credproxy/cred.sock"),
            ("/r/h.sock", "/run/credproxy/http.sock"),
        ]
        init = argv.index("credproxy._sandbox_init")
        assert argv[init - 2 : init] == ["-I", "-m"] and argv[init + 1 :] == ["--", "agent"]

    @pytest.mark.parametrize(
        ("settings", "message"),
        [
            (SandboxSettings(read_write=("/no/such/path",)), "--sandbox-rw /no/such/path: no such"),
            (SandboxSettings(read_only=("/no/such/path",)), "--sandbox-ro /no/such/path: no such"),
            (SandboxSettings(read_write=("/",)), "--sandbox-rw /: the host's whole filesystem"),
            (SandboxSettings(env_names=("ANTHROPIC_API_KEY",)), "--sandbox-env ANTHROPIC_API_KEY"),
            (SandboxSettings(env_names=("CREDPROXY_SOCKET",)), "--sandbox-env CREDPROXY_SOCKET"),
        ],
    )
    def test_refusals(self, host: dict[str, str], settings: SandboxSettings, message: str) -> None:
        with pytest.raises(SandboxRefused, match="^" + message.replace("(", r"\(")):
            plan(host, settings)

    def test_a_path_inside_a_hidden_one_is_refused(self, host: dict[str, str]) -> None:
        inside = os.path.join(host["HOME"], ".ssh")
        with pytest.raises(SandboxRefused, match="which the sandbox hides"):
            plan(host, SandboxSettings(read_only=(inside,)))
        with pytest.raises(SandboxRefused, match="which the sandbox hides"):
            plan(host, SandboxSettings(read_write=(os.path.join(host["BASE"], "state"),)))

    def test_a_current_directory_that_is_root_or_hidden_is_refused(
        self, host: dict[str, str]
    ) -> None:
        with pytest.raises(SandboxRefused, match="the current directory is /"):
            plan(host, cwd="/")
        with pytest.raises(SandboxRefused, match="--sandbox-no-cwd"):
            plan(host, cwd=os.path.join(host["HOME"], ".claude"))
        assert plan(host, SandboxSettings(share_cwd=False), cwd="/").chdir == "/"

    def test_a_current_directory_that_holds_the_home_is_refused_unless_asked_for(
        self, host: dict[str, str]
    ) -> None:
        home = os.path.realpath(host["HOME"])
        for cwd in (home, os.path.dirname(home)):
            with pytest.raises(SandboxRefused, match="holds your home directory"):
                plan(host, cwd=cwd)
        asked = plan(host, SandboxSettings(share_cwd=False, read_write=(home,)), cwd=home)
        assert (home, home) in pairs(asked.bwrap_args, "--bind")


class TestEnvironment:
    def test_only_the_allowlist_the_extras_and_the_runs_variables(self) -> None:
        host = {
            "PATH": "/usr/bin",
            "HOME": "/home/u",
            "LC_ALL": "C.UTF-8",
            "SECRET_OF_THE_HOST": "x",
            "XDG_RUNTIME_DIR": "/run/user/1000",
            "ANTHROPIC_API_KEY": "sk-real",
            "CLAUDE_CODE_OAUTH_TOKEN": "sk-real-oauth",
            "WANTED": "yes",
        }
        env = sandbox_environment(host, extra_names=("WANTED",), http_token=Secret(PLACEHOLDER))
        assert env == {
            "PATH": "/usr/bin",
            "HOME": "/home/u",
            "LC_ALL": "C.UTF-8",
            "WANTED": "yes",
            "CREDPROXY_SOCKET": "/run/credproxy/cred.sock",
            "LLXPRT_CREDENTIAL_SOCKET": "/run/credproxy/cred.sock",
            "CREDPROXY_HTTP_SOCKET": "/run/credproxy/http.sock",
            "CREDPROXY_CAPABILITY_TOKEN_FD": "3",
            "ANTHROPIC_API_KEY": PLACEHOLDER,
        }
        assert {"PATH", "HOME", "LANG", "TERM"} <= ENV_ALLOWLIST


class TestBubblewrap:
    def test_missing_says_how_to_install_it(self, tmp_path: Path) -> None:
        with pytest.raises(SandboxRefused) as caught:
            find_bwrap(str(tmp_path))
        message = str(caught.value)
        assert "\n" not in message and "apt install bubblewrap" in message

    def test_found_on_the_path(self, tmp_path: Path) -> None:
        fake = tmp_path / "bwrap"
        fake.write_text("#!/bin/sh\n")
        fake.chmod(0o700)
        assert find_bwrap(str(tmp_path)) == str(fake)

    @pytest.mark.parametrize(
        "said",
        [
            b"bwrap: No permissions to creating new namespace, likely because the kernel does "
            b"not allow non-privileged user namespaces.\n",
            b"bwrap: setting up uid map: Permission denied\n",
        ],
    )
    def test_no_user_namespaces_is_one_line_saying_so(self, said: bytes) -> None:
        message = str(probe_refusal(1, said))
        assert message.startswith("--sandbox needs unprivileged user namespaces")
        assert "run credproxy as root, or enable them" in message and "\n" not in message

    def test_another_failure_quotes_bubblewraps_first_line_cut_and_printable(self) -> None:
        message = str(probe_refusal(1, b"bwrap: \x1b[31mweird\n" + b"x" * 5000))
        assert message == "bubblewrap cannot build the sandbox here (bwrap: ?[31mweird)"
        assert str(probe_refusal(3, b"")) == (
            "bubblewrap cannot build the sandbox here (bwrap exited with status 3)"
        )


class TestControl:
    def test_started_lines(self) -> None:
        assert parse_started(b"started 40123") == 40123
        for bad in (b"started 0", b"started 65536", b"started -1", b"started x", b"begun 1"):
            assert parse_started(bad) is None

    def test_only_forwarded_signals_pass(self) -> None:
        assert parse_signal(b"signal %d" % signal.SIGTERM) == signal.SIGTERM
        assert parse_signal(b"signal %d" % signal.SIGWINCH) == signal.SIGWINCH
        for bad in (b"signal %d" % signal.SIGKILL, b"signal 9999", b"signal", b"kill 15"):
            assert parse_signal(bad) is None

    def test_the_host_end_fires_once_with_the_port_or_none(self) -> None:
        control = HostControl()
        control.makeConnection(StringTransport())
        control.dataReceived(b"started 40123\nstarted 1\n")
        assert control.started.result == 40123
        lost = HostControl()
        lost.makeConnection(StringTransport())
        lost.connectionLost()
        assert lost.started.result is None

    def test_the_host_end_reads_short_lines_and_a_few_of_them(self) -> None:
        long_line = HostControl()
        transport = StringTransport()
        long_line.makeConnection(transport)
        long_line.dataReceived(b"x" * (MAX_CONTROL_LINE + 1))
        assert transport.disconnecting
        chatty = HostControl()
        transport = StringTransport()
        chatty.makeConnection(transport)
        chatty.dataReceived(b"noise\n" * (MAX_INIT_LINES + 1))
        assert transport.disconnecting

    def test_signals_go_from_the_host_to_the_init(self) -> None:
        received: list[int] = []
        init = InitControl(received.append)
        host = HostControl()
        host_transport = StringTransport()
        host.makeConnection(host_transport)
        init.makeConnection(StringTransport())
        host.send_signal(signal.SIGINT)
        init.dataReceived(host_transport.value() + b"signal 9\n")
        assert received == [signal.SIGINT]


class TestOptions:
    def test_sandbox_options_need_sandbox(self) -> None:
        for args in (
            ["--sandbox-rw", "/tmp"],
            ["--sandbox-ro", "/tmp"],
            ["--sandbox-hide", "/tmp"],
            ["--sandbox-env", "X"],
            ["--sandbox-no-cwd"],
        ):
            options = RunOptions()
            with pytest.raises(Exception, match="needs --sandbox"):
                options.parseOptions([*args, "--", "agent"])

    def test_a_sandboxed_run_has_no_tcp_port_and_wants_the_placeholder_on_its_socket(
        self,
    ) -> None:
        options = RunOptions()
        options.parseOptions(["--sandbox", "--sandbox-ro", "/etc", "--", "agent"])
        config = options.launch_config()
        assert config.tcp_http_endpoint is None and config.placeholder_on_socket
        assert options.sandbox_settings() == SandboxSettings(read_only=("/etc",))
        plain = RunOptions()
        plain.parseOptions(["--", "agent"])
        assert plain.sandbox_settings() is None
        assert not plain.launch_config().placeholder_on_socket
