"""
What credproxy does to its own process when it runs as a command (C{twistd
credproxy}, C{credproxy serve}, C{credproxy run}), and never when it is
embedded: nothing here acts on import, and only the command-line entry
points call it.

The process holds every credential in use, and its initial environment
block holds C{ANTHROPIC_API_KEY} for as long as it runs. Linux lets any
process of the same uid read C{/proc/PID/environ} and C{/proc/PID/mem} and
ptrace it, unless the process is not dumpable. So credproxy makes itself
non-dumpable, as ssh-agent does, and gives itself no core file to dump.
It also removes the credential variables from C{os.environ} once the
credential source has read them, so that nothing it spawns inherits them.
Removing them cannot scrub the initial environment block (the kernel
serves C{/proc/PID/environ} from it, whatever C{unsetenv} does): that is
what the non-dumpable flag is for.

The rest is about starting under twistd, which sees a start that ends
with C{SystemExit} (credproxy's one clear line) only when it does not
daemonize: see L{TwistdStart}.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
import time
from collections.abc import Mapping, MutableMapping
from typing import Any, Final

from twisted.logger import Logger

log = Logger(namespace="credproxy.process")

# Every variable that may hold a real credential an SDK or CLI would use:
# credproxy reads the first two; the SDKs also read the third.
CREDENTIAL_VARIABLES: Final = (
    "ANTHROPIC_API_KEY",
    "CLAUDE_CODE_OAUTH_TOKEN",
    "ANTHROPIC_AUTH_TOKEN",
)

# <linux/prctl.h>
PR_GET_DUMPABLE: Final = 3
PR_SET_DUMPABLE: Final = 4

# How long the parent twistd leaves a daemon that ended without a word to
# twistd's own report before it says so itself (see _StartRelay).
SILENT_END_GRACE: Final = 0.5


def _libc() -> Any:
    """
    The C library, for prctl(2). C{CDLL(None)} is the running program with
    the libraries it links, libc among them, without the subprocesses
    C{ctypes.util.find_library} would start.
    """
    return ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, argument: int = 0) -> int:
    """
    prctl(2); raises L{OSError} when it fails.
    """
    prctl = _libc().prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    result = int(prctl(option, argument, 0, 0, 0))
    if result < 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return result


def is_dumpable() -> bool | None:
    """
    Whether this process is dumpable (C{PR_GET_DUMPABLE}), or L{None} where
    that cannot be asked (not Linux).
    """
    if not sys.platform.startswith("linux"):
        return None
    return _prctl(PR_GET_DUMPABLE) != 0


def make_non_dumpable() -> str | None:
    """
    C{prctl(PR_SET_DUMPABLE, 0)}: from now on a process of our uid that is
    not root can neither read C{/proc/PID/environ} or C{/proc/PID/mem} nor
    ptrace us, and the kernel writes no core dump of us.

    @return: L{None} when done, else why not, as one line for a warning:
        credproxy still runs, only without this protection.
    """
    if not sys.platform.startswith("linux"):
        return f"not on Linux ({sys.platform}), so there is no PR_SET_DUMPABLE"
    try:
        _prctl(PR_SET_DUMPABLE, 0)
    except (OSError, AttributeError) as e:  # AttributeError: a libc without prctl
        return f"prctl(PR_SET_DUMPABLE) failed: {getattr(e, 'strerror', None) or e}"
    return None


def disable_core_dumps() -> str | None:
    """
    Set the soft C{RLIMIT_CORE} to 0, so no core file carrying secrets is
    written even where the non-dumpable flag is missing (another platform,
    or a core handler that dumps anyway).

    Only the soft limit: the hard one is left, so that the command of a
    C{credproxy run}, which inherits the limit, may raise its own again.
    Another process of our uid could raise ours too (prlimit(2)), but the
    kernel never dumps a non-dumpable process, whatever its limit.

    @return: L{None} when done, else why not, as one line for a warning.
    """
    try:
        import resource
    except ImportError:
        return f"no resource limits on {sys.platform}"
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_CORE)
        resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    except (OSError, ValueError) as e:
        return f"setrlimit(RLIMIT_CORE) failed: {e}"
    return None


def harden() -> list[str]:
    """
    Make this process non-dumpable and core-less, first thing in every
    credproxy command. Never fatal: each failure is one warning line in the
    log (and is returned).
    """
    problems: list[str] = []
    problem = make_non_dumpable()
    if problem is not None:
        problems.append(problem)
        log.warn(
            "credproxy stays dumpable ({reason}): a process of its uid may read its "
            "environment and memory; run agents under another uid or in a sandbox",
            reason=problem,
        )
    problem = disable_core_dumps()
    if problem is not None:
        problems.append(problem)
        log.warn("Core dumps of credproxy are not disabled ({reason})", reason=problem)
    return problems


# Descriptors a running credproxy uses besides its connections: listening
# sockets, log and store files, the thread pool's wake-up pipe, the
# reactor's own, lingering refusals.
DESCRIPTOR_RESERVE: Final = 128


def raise_open_file_limit(needed: int) -> str | None:
    """
    Raise the soft C{RLIMIT_NOFILE} to C{needed} (never past the hard limit,
    never lowering it), so that the connection caps, which answer 503, are
    what stops a flood, and not a full descriptor table, which makes every
    accept fail on both faces. Debian's and systemd's default soft limit is
    1024, below the HTTP face's cap alone.

    @return: L{None} when the limit now covers C{needed}, else why not, as
        one line for a warning.
    """
    try:
        import resource
    except ImportError:
        return f"no resource limits on {sys.platform}"
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < needed:
            target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    except (OSError, ValueError) as e:
        return f"setrlimit(RLIMIT_NOFILE) failed: {e}"
    if soft != resource.RLIM_INFINITY and soft < needed:
        return (
            f"the open-file limit ({soft}) is below the {needed} descriptors the connection "
            "caps allow; past it connections fail without an answer: raise the hard limit "
            "(ulimit -Hn, or LimitNOFILE= in a systemd unit) or lower --max-connections"
        )
    return None


def forget_credential_variables(environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """
    Remove the L{CREDENTIAL_VARIABLES} from C{environ}, credproxy's own
    environment by default; call it once the credential source has read
    them. Nothing spawned afterwards inherits them. (The initial environment
    block in memory keeps them: see the module's docstring.)

    @return: the names removed.
    """
    removed = [name for name in CREDENTIAL_VARIABLES if name in environ]
    for name in removed:
        del environ[name]
    return removed


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


class _StartRelay:
    """
    Brings the daemon's one start-up line to the terminal twistd was started
    from, and ends that first process with status 1.

    Without -n, twistd forks twice; the first process waits on a status pipe
    for the daemon's word, and prints it (as a repr, after "An error has
    occurred") only for an exception that is not C{SystemExit}. A daemon
    that ends with C{SystemExit}, as credproxy's failed start does, writes
    nothing there, and since the first process holds the pipe's write end
    itself, it waits forever.

    So the first process (made before twistd forks, in makeService) also
    waits on a pipe of ours, in a thread. The daemon writes one record to it
    from startService and closes it: nothing (started, or twistd reports
    the failure itself), or credproxy's line, which the first process
    writes to its stderr before it exits with status 1. Each child closes
    the read end when it is forked, and the first process its write end
    once it has forked, so a daemon that ends without a word is noticed
    too; it is reported after L{SILENT_END_GRACE}, in which twistd's own
    report of a failure, if it has one, ends the first process first.
    """

    _NOTHING_TO_SAY: Final = b"\n"

    def __init__(self, stderr_fd: int = 2, grace: float = SILENT_END_GRACE) -> None:
        self._first_pid = os.getpid()
        self._stderr_fd = stderr_fd
        self._grace = grace
        read_end, write_end = os.pipe()
        self._read: int | None = read_end
        self._write: int | None = write_end
        # Inherited by every later fork too, hence the pid check and the Nones.
        os.register_at_fork(
            after_in_parent=self._forked_in_parent, after_in_child=self._forked_in_child
        )
        waiting = threading.Thread(
            target=self._wait, args=(read_end,), name="credproxy-start", daemon=True
        )
        waiting.start()

    def _forked_in_parent(self) -> None:
        if os.getpid() == self._first_pid and self._write is not None:
            os.close(self._write)
            self._write = None

    def _forked_in_child(self) -> None:
        if self._read is not None:
            os.close(self._read)
            self._read = None

    def _wait(self, read_end: int) -> None:
        """
        The first process's thread: everything the daemon says, then the verdict.
        """
        said = bytearray()
        while chunk := os.read(read_end, 4096):
            said += chunk
        if said == self._NOTHING_TO_SAY:
            return  # twistd's own status pipe decides
        if not said:
            time.sleep(self._grace)
            said += b"credproxy: the daemon ended while it started; see the twistd log\n"
        with contextlib.suppress(OSError):
            _write_all(self._stderr_fd, bytes(said))
        os._exit(1)

    def report(self, line: str | None) -> None:
        """
        In the daemon, once: C{line} for the first process to print before it
        fails, or L{None} when there is nothing to say.
        """
        fd, self._write = self._write, None
        if fd is None:
            return
        data = (line.rstrip("\n") + "\n").encode(errors="backslashreplace") if line else b""
        try:
            _write_all(fd, data or self._NOTHING_TO_SAY)
        except OSError:
            pass
        finally:
            os.close(fd)


class TwistdStart:
    """
    credproxy's start under twistd (or twist), for what twistd does not do
    when startService ends the start with C{SystemExit}: bring the line to
    the terminal from a daemon (L{_StartRelay}) and remove the pidfile. It
    also makes the process non-dumpable again at startService: twistd's
    C{--uid} switch, just before, sets the flag to C{fs.suid_dumpable}.

    @param twistd: twistd's own options, as it parsed them (the credproxy
        options' C{parent}).
    """

    def __init__(self, twistd: Mapping[str, Any]) -> None:
        self._pidfile: str | None = twistd.get("pidfile") or None
        # twistd has merged --debug into nodaemon by the time it makes the service.
        daemon = not twistd.get("nodaemon", True)
        self._relay = _StartRelay() if daemon else None

    def starting(self) -> None:
        """
        startService begins: after twistd daemonized and switched uid.
        """
        make_non_dumpable()  # a failure was reported at makeService

    def started(self) -> None:
        """
        Every face listens: twistd reports the success.
        """
        if self._relay is not None:
            self._relay.report(None)

    def twistd_reports(self) -> None:
        """
        The start failed with an exception that twistd reports itself.
        """
        self.started()

    def failed(self, line: str) -> None:
        """
        The start failed with C{line}, credproxy's one line, which ends it as
        C{SystemExit}. The pidfile goes first: twistd's first process ends
        as soon as it has the line.
        """
        if self._pidfile:
            with contextlib.suppress(OSError, ValueError):
                with open(self._pidfile, encoding="ascii") as f:
                    written = int(f.read().strip())
                if written == os.getpid():
                    os.unlink(self._pidfile)
        if self._relay is not None:
            self._relay.report(line)
