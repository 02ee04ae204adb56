"""
The sandbox of C{credproxy run --sandbox}, as bubblewrap is told to build
it: what the agent sees of the host, which environment it starts with, and
the checks that refuse to start it rather than start it weaker.

The sandbox has its own network namespace (only its own loopback), PID,
IPC and UTS namespaces, no capabilities, and a session of its own (so it
cannot push input into the terminal with C{TIOCSTI}); it dies with
credproxy. The host's filesystem is read-only in it, with a private
C{/tmp}, C{/run}, C{/proc} and C{/dev}; the current directory and any
C{--sandbox-rw} path are writable, C{--sandbox-ro} paths readable. Over all
of that, the L{hidden paths<hidden_paths>} are empty: credproxy's state,
configuration and runtime directories, the user's credential files, the
keyring, session bus and SSH agent sockets. Last come credproxy's two
sockets, at L{SANDBOX_CREDENTIAL_SOCKET} and L{SANDBOX_HTTP_SOCKET}.

Every path is resolved (symlinks followed) before it is compared or
mounted, so a link cannot carry a hidden path out from under its cover.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import credproxy
from credproxy._command import API_KEY_ENV, BASE_URL_ENV, HTTP_SOCKET_ENV, TOKEN_FD
from credproxy._process import CREDENTIAL_VARIABLES
from credproxy._sandbox_init import SANDBOX_CREDENTIAL_SOCKET, SANDBOX_HTTP_SOCKET
from credproxy._secret import Secret
from credproxy.inner._environment import CAPABILITY_TOKEN_FD_ENV, CAPABILITY_TOKEN_FILE_ENV
from credproxy.wire._spec import SOCKET_ENV_VARIABLES

SANDBOX_HOSTNAME: Final = "credproxy-sandbox"
# What the host's environment gives the sandbox: where programs are, who and
# where the user is, how to show text. Everything else stays out unless
# named with --sandbox-env.
ENV_ALLOWLIST: Final = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "LANG",
        "LANGUAGE",
        "TERM",
        "COLORTERM",
        "TZ",
        "NO_COLOR",
        "COLUMNS",
        "LINES",
    }
)
ENV_ALLOWED_PREFIXES: Final = ("LC_",)
# The variables credproxy itself sets in the sandbox; --sandbox-env cannot
# name them, nor a variable that may hold a real credential.
RUN_VARIABLES: Final = frozenset(
    {
        *SOCKET_ENV_VARIABLES,
        HTTP_SOCKET_ENV,
        CAPABILITY_TOKEN_FD_ENV,
        CAPABILITY_TOKEN_FILE_ENV,
        BASE_URL_ENV,
        API_KEY_ENV,
    }
)
# Under $HOME, hidden whenever they exist: credentials of the agent's own
# kind and of the usual tools, each a file an agent could read and put in a
# prompt. A list can never be complete: --sandbox-hide adds to it.
HOME_HIDDEN: Final = (
    ".claude",
    ".claude.json",
    ".config/credproxy",
    ".ssh",
    ".gnupg",
    ".aws",
    ".azure",
    ".config/gcloud",
    ".kube",
    ".docker",
    ".netrc",
    ".git-credentials",
    ".config/gh",
    ".password-store",
    ".local/share/keyrings",
    ".pypirc",
    ".npmrc",
    ".cargo/credentials",
    ".cargo/credentials.toml",
)
# Trees the sandbox gets fresh, empty copies of: nothing of the host's is
# in them unless bound in. /run and /tmp hold the host's service and
# session sockets (a read-only mount does not stop a connect).
PRIVATE_TREES: Final = ("/tmp", "/run", "/dev", "/proc")  # noqa: S108 - the sandbox's own
NAMESPACE_ARGS: Final = (
    "--unshare-pid",
    "--unshare-net",
    "--unshare-ipc",
    "--unshare-uts",
    "--die-with-parent",
    "--cap-drop",
    "ALL",
)
# The start of a sandbox's new session, as a Python one-liner: bubblewrap's
# outer process must not be in the terminal's process group, or a Ctrl-C
# would kill it (it passes no signal on) instead of reaching credproxy,
# which passes it on to the command.
NEW_SESSION_EXEC: Final = "import os,sys;os.setsid();os.execv(sys.argv[1],sys.argv[1:])"


class SandboxRefused(Exception):
    """
    The sandbox cannot be built as asked; the message is one line saying why.
    """


@dataclass(frozen=True)
class SandboxSettings:
    """
    What the user asked of the sandbox: C{read_write} and C{read_only} paths
    besides the current directory (C{share_cwd}), more paths to hide, and
    more host variables to pass in.
    """

    read_write: tuple[str, ...] = ()
    read_only: tuple[str, ...] = ()
    hidden: tuple[str, ...] = ()
    env_names: tuple[str, ...] = ()
    share_cwd: bool = True


@dataclass(frozen=True)
class SandboxLayout:
    """
    The sandbox as planned: bubblewrap's arguments (everything before the
    command), and, for messages and tests, what is writable, readable and hidden.
    """

    bwrap_args: tuple[str, ...]
    read_write: tuple[str, ...]
    read_only: tuple[str, ...]
    hidden: tuple[str, ...]
    chdir: str


def _real(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))


def _within(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def _config_home(environ: Mapping[str, str], home: str) -> str:
    base = environ.get("XDG_CONFIG_HOME")
    return base if base and os.path.isabs(base) else os.path.join(home, ".config")


def _bus_paths(address: str | None) -> list[str]:
    """
    The socket paths of a D-Bus address (C{unix:path=...;...}); abstract
    sockets need none, the network namespace cuts them off.
    """
    found: list[str] = []
    for part in (address or "").split(";"):
        kind, _, options = part.partition(":")
        if kind != "unix":
            continue
        for option in options.split(","):
            key, _, value = option.partition("=")
            if key == "path" and value:
                found.append(value)
    return found


def hidden_paths(
    environ: Mapping[str, str],
    *,
    state_dir: str,
    runtime_dir: str,
    config_file: str | None = None,
    extra: Iterable[str] = (),
) -> list[str]:
    """
    Every path the sandbox must not see, resolved, whether it exists or not:
    credproxy's state, configuration and runtime directories (and its
    C{--config} file), C{$XDG_RUNTIME_DIR} (the keyring's, the session
    bus's, the SSH agent's sockets usually live there), the session bus and
    SSH agent sockets wherever they are, the L{HOME_HIDDEN} entries and
    C{extra}.
    """
    home = environ.get("HOME") or os.path.expanduser("~")
    paths = [state_dir, runtime_dir, os.path.join(_config_home(environ, home), "credproxy")]
    if config_file:
        paths.append(config_file)
    xdg_runtime = environ.get("XDG_RUNTIME_DIR")
    if xdg_runtime and os.path.isabs(xdg_runtime):
        paths.append(xdg_runtime)
    paths += _bus_paths(environ.get("DBUS_SESSION_BUS_ADDRESS"))
    ssh_agent = environ.get("SSH_AUTH_SOCK")
    if ssh_agent and os.path.isabs(ssh_agent):
        paths.append(ssh_agent)
    paths += [os.path.join(home, name) for name in HOME_HIDDEN]
    paths += list(extra)
    resolved: list[str] = []
    for path in paths:
        real = _real(path)
        if real not in resolved:
            resolved.append(real)
    return resolved


def _covering(path: str, hidden: Sequence[str]) -> str | None:
    for cover in hidden:
        if _within(path, cover):
            return cover
    return None


def own_tree_binds() -> list[str]:
    """
    Read-only binds of where this interpreter and credproxy itself live,
    when that is under one of the L{PRIVATE_TREES}: the init must run in
    the sandbox all the same.
    """
    trees = {_real(sys.prefix), _real(sys.base_prefix)}
    trees.add(os.path.dirname(os.path.dirname(_real(credproxy.__file__))))
    args: list[str] = []
    for tree in sorted(trees):
        if any(_within(tree, private) for private in PRIVATE_TREES):
            args += ["--ro-bind", tree, tree]
    return args


def plan_sandbox(
    settings: SandboxSettings,
    *,
    environ: Mapping[str, str],
    cwd: str,
    state_dir: str,
    runtime_dir: str,
    config_file: str | None,
) -> SandboxLayout:
    """
    bubblewrap's arguments for this sandbox, but for its sockets (which
    L{sandboxed_argv} adds, once the proxy has made them).

    @raise SandboxRefused: a path to share does not exist, is C{/} and
        writable, or is (or is inside) a hidden path; the current directory
        is C{/}, hidden, or holds the home directory, unless it is not
        shared; C{--sandbox-env} names a credential or one of the run's own
        variables.
    """
    for name in settings.env_names:
        if name in CREDENTIAL_VARIABLES or name in RUN_VARIABLES:
            raise SandboxRefused(f"--sandbox-env {name}: credproxy sets or withholds it itself")
    hidden = hidden_paths(
        environ,
        state_dir=state_dir,
        runtime_dir=runtime_dir,
        config_file=config_file,
        extra=settings.hidden,
    )
    read_write: list[str] = []
    chdir = "/"
    if settings.share_cwd:
        here = _real(cwd)
        if here == "/":
            raise SandboxRefused(
                "the current directory is /, which the sandbox would make writable: run from "
                "another directory, or give --sandbox-no-cwd"
            )
        cover = _covering(here, hidden)
        if cover is not None:
            raise SandboxRefused(
                f"the current directory {here} is inside {cover}, which the sandbox hides: "
                "run from another directory, or give --sandbox-no-cwd"
            )
        home = _real(environ.get("HOME") or os.path.expanduser("~"))
        if _within(home, here):
            # Your shell's startup files, ~/.local/bin ...: writable only when asked.
            raise SandboxRefused(
                f"the current directory {here} holds your home directory, which the sandbox "
                "would make writable: run from a project directory, give --sandbox-no-cwd, or "
                "--sandbox-rw it if you mean it"
            )
        read_write.append(here)
        chdir = here
    read_only: list[str] = []
    for option, given, into in (
        ("--sandbox-rw", settings.read_write, read_write),
        ("--sandbox-ro", settings.read_only, read_only),
    ):
        for path in given:
            real = _real(path)
            if not os.path.exists(real):
                raise SandboxRefused(f"{option} {path}: no such file or directory")
            if real == "/" and into is read_write:
                raise SandboxRefused(f"{option} /: the host's whole filesystem stays read-only")
            cover = _covering(real, hidden)
            if cover is not None:
                raise SandboxRefused(f"{option} {path}: inside {cover}, which the sandbox hides")
            if real not in into:
                into.append(real)

    args: list[str] = [*NAMESPACE_ARGS, "--new-session", "--hostname", SANDBOX_HOSTNAME]
    args += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    args += ["--tmpfs", "/tmp", "--tmpfs", "/run"]  # noqa: S108 - fresh, the sandbox's own
    own = own_tree_binds()
    args += own
    bound = [*read_write, *read_only, *own[2::3]]
    for path in read_write:
        args += ["--bind", path, path]
    for path in read_only:
        args += ["--ro-bind", path, path]

    def visible(path: str) -> bool:
        if any(_within(path, tree) for tree in bound):
            return True
        return not any(_within(path, private) for private in PRIVATE_TREES)

    shown_hidden: list[str] = []
    for path in hidden:
        if not os.path.lexists(path) or not visible(path):
            continue
        if os.path.isdir(path):
            args += ["--tmpfs", path, "--remount-ro", path]
        else:
            args += ["--ro-bind", "/dev/null", path]
        shown_hidden.append(path)
    args += ["--chdir", chdir]
    return SandboxLayout(
        bwrap_args=tuple(args),
        read_write=tuple(read_write),
        read_only=tuple(read_only),
        hidden=tuple(shown_hidden),
        chdir=chdir,
    )


def sandbox_environment(
    environ: Mapping[str, str],
    *,
    extra_names: Iterable[str],
    http_token: Secret,
) -> dict[str, str]:
    """
    The sandbox's environment: the L{ENV_ALLOWLIST} (and C{LC_*}) and the
    C{extra_names} from C{environ}, then the run's own variables: the
    sockets at their places inside, the token's descriptor and the
    placeholder key. (The init adds C{ANTHROPIC_BASE_URL} once its relay
    listens.)
    """
    extra = frozenset(extra_names)
    env = {
        name: value
        for name, value in environ.items()
        if (name in ENV_ALLOWLIST or name.startswith(ENV_ALLOWED_PREFIXES) or name in extra)
        and name not in CREDENTIAL_VARIABLES
        and name not in RUN_VARIABLES
    }
    for name in SOCKET_ENV_VARIABLES:
        env[name] = SANDBOX_CREDENTIAL_SOCKET
    env[HTTP_SOCKET_ENV] = SANDBOX_HTTP_SOCKET
    env[CAPABILITY_TOKEN_FD_ENV] = str(TOKEN_FD)
    env[API_KEY_ENV] = http_token.reveal()
    return env


def sandboxed_argv(
    bwrap: str,
    layout: SandboxLayout,
    init_args: Sequence[str],
    *,
    credential_socket: str,
    http_socket: str,
) -> list[str]:
    """
    The whole command line credproxy spawns: a new session, then bubblewrap
    with the layout and the proxy's two sockets bound at their places
    inside, last of all (over the private C{/run}), then the init with its
    arguments (which end with the command).
    """
    python = sys.executable
    return [
        python,
        "-I",
        "-S",
        "-c",
        NEW_SESSION_EXEC,
        bwrap,
        *layout.bwrap_args,
        "--ro-bind",
        credential_socket,
        SANDBOX_CREDENTIAL_SOCKET,
        "--ro-bind",
        http_socket,
        SANDBOX_HTTP_SOCKET,
        "--",
        python,
        "-I",
        "-m",
        "credproxy._sandbox_init",
        *init_args,
    ]
