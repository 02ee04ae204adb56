"""
Running credproxy's commands as a uid that is not root, for tests that run
as root (as on CI) yet need an ordinary process of credproxy's own uid:
root may read any process, so it would prove nothing.

The project's interpreter may be out of that uid's reach (a pyenv build
under C{/root}, mode 0700), while its site-packages and the source tree are
readable. Then L{find} builds a throwaway venv on the system's
C{/usr/bin/python3} (same ABI, so the compiled extensions load) in a
directory of its own under C{/tmp}, with a C{.pth} file naming the
project's import paths, and console scripts of its own for C{twistd} and
C{credproxy}.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass

# The uid (and gid) the tests drop to when they run as root.
NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"
SCRIPTS = ("twistd", "credproxy")

# A Messages request to the HTTP face's Unix socket (argv[1]), from a process
# of another uid, with the key read from standard input (so it is in no
# argv); it prints the answer's status. Only the standard library: the
# system interpreter runs it.
_PEER_CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(30)
s.connect(sys.argv[1])
body = json.dumps({"model": "m", "max_tokens": 1, "messages": []}).encode()
s.sendall(b"POST /v1/messages HTTP/1.1\\r\\nhost: x\\r\\nconnection: close\\r\\nx-api-key: "
          + sys.stdin.read().encode() + b"\\r\\ncontent-length: %d\\r\\n\\r\\n" % len(body) + body)
data = b""
while chunk := s.recv(65536):
    data += chunk
print(data.split(b" ")[1].decode())
"""


def post_as_nobody(path: str, key: str = "p") -> str:
    """
    The status the HTTP face at C{path} answers a request from uid L{NOBODY}
    presenting C{key}.
    """
    result = subprocess.run(
        [SYSTEM_PYTHON, "-c", _PEER_CLIENT, path],
        input=key,
        user=NOBODY,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return result.stdout.strip()


# What a start needs, exactly as the tests run it: the interpreter, which
# starts twistd credproxy and credproxy, both of which load the package.
PROBE = (
    "import subprocess, sys\n"
    "for script in sys.argv[1:]:\n"
    "    subprocess.run([script, '--version'] if script.endswith('credproxy')"
    " else [script, 'credproxy', '--version'], check=True, capture_output=True)\n"
)


@dataclass(frozen=True)
class Interpreter:
    """
    A Python with credproxy, and its console scripts, that C{uid} can run;
    C{uid} is L{None} when we are not root: the tests run as themselves.
    """

    uid: int | None
    python: str
    twistd: str
    credproxy: str

    def run(
        self,
        argv: list[str],
        *,
        timeout: float,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """
        C{argv} as C{uid}, its groups reduced to its own, output captured as text.
        """
        return subprocess.run(
            argv,
            user=self.uid,
            group=self.uid,
            extra_groups=None if self.uid is None else [],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def cannot_start(self) -> str | None:
        """
        Why C{uid} cannot start this interpreter's twistd credproxy and
        credproxy, or L{None} when it can.
        """
        try:
            probe = self.run(
                [self.python, "-c", PROBE, self.twistd, self.credproxy], timeout=60, cwd="/"
            )
        except OSError as e:
            return f"{self.python}: {e}"
        if probe.returncode == 0:
            return None
        return (probe.stderr.strip().splitlines() or ["no reason given"])[-1]


def own() -> Interpreter:
    """
    The interpreter running the tests, and the scripts next to it.
    """
    bin_dir = os.path.dirname(sys.executable)
    return Interpreter(
        None if os.geteuid() != 0 else NOBODY,
        sys.executable,
        os.path.join(bin_dir, "twistd"),
        os.path.join(bin_dir, "credproxy"),
    )


def import_paths() -> list[str]:
    """
    Where this interpreter finds credproxy and its dependencies: its
    C{sys.path} when isolated (no current directory, no PYTHONPATH, none of
    pytest's additions), less its own standard library.
    """
    out = subprocess.run(
        [sys.executable, "-I", "-c", "import json, sys; print(json.dumps(sys.path))"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    stdlib = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)}
    paths: list[str] = []
    for path in json.loads(out):
        real = os.path.realpath(path)
        if not os.path.isdir(real) or any(real.startswith(s + os.sep) for s in stdlib):
            continue
        if real not in paths:
            paths.append(real)
    return paths


def soabi(python: str) -> str:
    return subprocess.run(
        [python, "-I", "-c", "import sysconfig; print(sysconfig.get_config_var('SOABI'))"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()


def build_venv(directory: str) -> Interpreter | str:
    """
    A venv in C{directory} (which it makes readable to all) on the system's
    Python that uses this interpreter's import paths: the interpreter, or
    why there can be none.
    """
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"there is no {SYSTEM_PYTHON} to build a venv on"
    ours, theirs = sysconfig.get_config_var("SOABI"), soabi(SYSTEM_PYTHON)
    if ours != theirs:
        return f"{SYSTEM_PYTHON} is {theirs}, not {ours}: the compiled dependencies would not load"
    os.chmod(directory, 0o755)  # noqa: S103 - NOBODY must reach the venv
    venv = os.path.join(directory, "venv")
    made = subprocess.run(
        [SYSTEM_PYTHON, "-m", "venv", "--without-pip", venv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if made.returncode != 0:
        last = (made.stderr.strip().splitlines() or ["no reason given"])[-1]
        return f"{SYSTEM_PYTHON} -m venv failed: {last}"
    python = os.path.join(venv, "bin", "python")
    site = subprocess.run(
        [python, "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    with open(os.path.join(site, "credproxy-tests.pth"), "w", encoding="utf-8") as f:
        f.writelines(f"{path}\n" for path in import_paths())
    scripts: dict[str, str] = {}
    for name in SCRIPTS:
        with open(os.path.join(os.path.dirname(sys.executable), name), encoding="utf-8") as f:
            _, body = f.read().split("\n", 1)  # the shebang names our own interpreter
        scripts[name] = os.path.join(venv, "bin", name)
        with open(scripts[name], "w", encoding="utf-8") as f:
            f.write(f"#!{python}\n{body}")
        os.chmod(scripts[name], 0o755)  # noqa: S103 - NOBODY runs the scripts
    return Interpreter(NOBODY, python, scripts["twistd"], scripts["credproxy"])


def find(directory: str) -> Interpreter | str:
    """
    An interpreter that a process of a uid other than root can run
    credproxy with: this one when we are not root or when L{NOBODY} can
    run it, else a venv built in C{directory}; or why there is none.
    """
    interpreter = own()
    if interpreter.uid is None:
        return interpreter
    first = interpreter.cannot_start()
    if first is None:
        return interpreter
    built = build_venv(directory)
    if isinstance(built, str):
        return f"uid {NOBODY} cannot run {interpreter.twistd} ({first}), and {built}"
    second = built.cannot_start()
    if second is not None:
        return (
            f"uid {NOBODY} can run neither {interpreter.twistd} ({first}) "
            f"nor {built.twistd} ({second})"
        )
    return built


def remove(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def make_directory() -> str:
    return tempfile.mkdtemp(prefix="cp-nobody-", dir="/tmp")
