"""
Processes for the wire benchmark: the credential-socket server
(L{bench._wire_server}) and load generators that speak the stdio
conversation of L{bench._wire_load}, with their CPU use read from /proc.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import IO, Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """
    User plus system CPU time of process C{pid} so far.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise LookupError("VmRSS")


def read_line(stream: IO[str], timeout: float, what: str) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        raise RuntimeError(f"{what} said nothing for {timeout:.0f} s")
    line = stream.readline()
    if not line:
        raise RuntimeError(f"{what} exited early")
    return line.strip()


def stop(process: subprocess.Popen[str] | None, grace: float = 0.0) -> None:
    """
    Wait up to C{grace} seconds for C{process} to exit, then terminate it
    (and kill it if that does not work within 10 s).
    """
    if process is None:
        return
    with suppress(subprocess.TimeoutExpired):
        process.wait(grace)
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class Server:
    pid: int
    socket: str
    workdir: str


@contextmanager
def workdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="cpw-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def server(
    directory: str,
    name: str,
    *,
    audit_log: bool = True,
    audit_json: bool = False,
    server_args: Sequence[str] = (),
) -> Iterator[Server]:
    """
    The credential socket in its own process, at C{directory}/C{name}.sock;
    always stopped on the way out. C{server_args} go to L{bench._wire_server}
    (for instance C{--store file --state-dir DIR}).
    """
    path = os.path.join(directory, f"{name}.sock")
    log_args = (
        ["--log", os.path.join(directory, f"{name}-audit.log")] if audit_log else ["--no-log"]
    )
    if audit_json:
        log_args += ["--audit-json", os.path.join(directory, f"{name}-audit.jsonl")]
    errors = os.path.join(directory, f"{name}.err")
    with open(errors, "w") as sink:
        process = subprocess.Popen(
            [PY, "-m", "bench._wire_server", path, *log_args, *server_args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=sink,
            text=True,
        )
    try:
        assert process.stdout is not None
        if read_line(process.stdout, 30, "the server") != "ready":
            raise RuntimeError("the server did not start")
        yield Server(process.pid, path, directory)
    except RuntimeError as e:
        with open(errors) as f:
            said = f.read()[-4000:]
        raise RuntimeError(f"{e}\nthe server's stderr:\n{said}") from e
    finally:
        stop(process)


@dataclass
class LoadResult:
    answers: int
    seconds: float
    server_cpu: float  # share of one core, over the measured window
    load_cpu: float  # all load processes together, share of one core

    @property
    def rate(self) -> float:
        return self.answers / self.seconds


def measure(
    commands: list[list[str]], server_pid: int, *, warmup: float, seconds: float
) -> LoadResult:
    """
    Start the load processes in C{commands}, wait until each is connected,
    let them run C{warmup} seconds, then count the answers of the next
    C{seconds} and the CPU the server and the load used meanwhile.
    """
    processes: list[subprocess.Popen[str]] = []
    try:
        for command in commands:
            processes.append(
                subprocess.Popen(
                    [PY, "-m", *command],
                    cwd=ROOT,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        for process in processes:
            assert process.stdout is not None
            line = read_line(process.stdout, 60, "a load process")
            if line != "ready":
                raise RuntimeError(f"load process failed to start: {line}")
        start = time.monotonic() + 0.05
        measure_from, until = start + warmup, start + warmup + seconds
        for process in processes:
            assert process.stdin is not None
            process.stdin.write(f"{measure_from} {until}\n")
            process.stdin.flush()
        time.sleep(max(0.0, measure_from - time.monotonic()))
        pids = [p.pid for p in processes]
        server_before, load_before = cpu_seconds(server_pid), sum(map(cpu_seconds, pids))
        time.sleep(max(0.0, until - time.monotonic()))
        server_after, load_after = cpu_seconds(server_pid), sum(map(cpu_seconds, pids))
        answers = 0
        for process in processes:
            assert process.stdout is not None
            line = read_line(process.stdout, 30, "a load process")
            result: dict[str, Any] = json.loads(line)
            if "error" in result:
                raise RuntimeError(f"load process failed: {result['error']}")
            if result.get("checked") is False:
                raise RuntimeError("a connection's answers were never checked in full")
            answers += int(result["answers"])
        return LoadResult(
            answers,
            seconds,
            (server_after - server_before) / seconds,
            (load_after - load_before) / seconds,
        )
    finally:
        for process in processes:
            with suppress(OSError):
                if process.stdin is not None:
                    process.stdin.close()
            stop(process, grace=5.0)
