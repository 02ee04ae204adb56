"""
bubblewrap itself, for C{credproxy run --sandbox}: finding it, and finding
out once, with an empty sandbox, whether it can build one here, so that a
machine where it cannot says why in one line before anything starts.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from typing import Any, Final

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from credproxy._sandbox import NAMESPACE_ARGS, SandboxRefused, own_tree_binds

BWRAP: Final = "bwrap"
INSTALL_HINT: Final = (
    "install bubblewrap (Debian and Ubuntu: apt install bubblewrap; Fedora: dnf install "
    "bubblewrap; Arch: pacman -S bubblewrap)"
)
PROBE_TIMEOUT: Final = 10.0
MAX_PROBE_OUTPUT: Final = 4096
# A detail of bubblewrap's own shown in a refusal, at most this long.
MAX_SHOWN_DETAIL: Final = 300


def find_bwrap(search_path: str | None) -> str:
    """
    bubblewrap's executable on C{search_path}.

    @raise SandboxRefused: it is not there, with how to install it.
    """
    found = shutil.which(BWRAP, path=search_path if search_path is not None else os.defpath)
    if found is None:
        raise SandboxRefused(
            f"--sandbox needs bubblewrap (bwrap), which is not on PATH: {INSTALL_HINT}"
        )
    return found


def _shown(detail: bytes) -> str:
    line = detail.decode("utf-8", "replace").strip().splitlines()
    first = line[0] if line else ""
    first = "".join(c if c.isprintable() else "?" for c in first)
    return first[:MAX_SHOWN_DETAIL]


def probe_refusal(status: int, stderr: bytes) -> SandboxRefused:
    """
    What a failed probe means, in one line: user namespaces are what an
    ordinary user's bubblewrap needs and most often lacks (bubblewrap says
    so, or fails to write the new namespace's uid map, as under AppArmor's
    restriction of them).
    """
    detail = _shown(stderr) or f"bwrap exited with status {status}"
    lowered = detail.lower()
    if "user namespace" in lowered or "uid map" in lowered:
        return SandboxRefused(
            f"--sandbox needs unprivileged user namespaces, which are not available here "
            f"({detail}); run credproxy as root, or enable them (sysctl "
            "kernel.unprivileged_userns_clone=1, user.max_user_namespaces > 0, or an AppArmor "
            "profile for bwrap)"
        )
    return SandboxRefused(f"bubblewrap cannot build the sandbox here ({detail})")


class _Probe(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[int] = Deferred()
        self.stderr = b""

    def errReceived(self, data: bytes) -> None:
        room = MAX_PROBE_OUTPUT - len(self.stderr)
        if room > 0:
            self.stderr += data[:room]

    def processEnded(self, reason: Failure) -> None:
        value: Any = reason.value
        code = getattr(value, "exitCode", None)
        self.ended.callback(int(code) if code is not None else 1)


async def probe_bwrap(reactor: Any, bwrap: str, *, timeout: float = PROBE_TIMEOUT) -> None:
    """
    Build an empty sandbox with the same namespaces, and run this
    interpreter in it, once, before anything else starts: so a machine
    where bubblewrap cannot work says why in one line instead of failing
    halfway.

    @raise SandboxRefused: it failed, or took longer than C{timeout}.
    """
    args = [
        bwrap,
        *NAMESPACE_ARGS,
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        *own_tree_binds(),
        "--",
        sys.executable,
        "-I",
        "-S",
        "-c",
        "",
    ]
    probe = _Probe()
    process = reactor.spawnProcess(probe, bwrap, args, env={}, childFDs={0: "w", 1: "r", 2: "r"})
    timed_out: list[bool] = []

    def kill() -> None:
        timed_out.append(True)
        try:
            process.signalProcess(signal.SIGKILL)
        except ProcessExitedAlready:
            return

    timer: IDelayedCall = reactor.callLater(timeout, kill)
    try:
        status = await probe.ended
    finally:
        if timer.active():
            timer.cancel()
    if timed_out:
        raise SandboxRefused(f"bubblewrap did not build an empty sandbox within {timeout:g} s")
    if status != 0:
        raise probe_refusal(status, probe.stderr)
