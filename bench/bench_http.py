"""
Benchmark of the HTTP face against a local upstream, through credproxy and
directly, in one run. Prints a table; asserts nothing.

    .venv/bin/python -m bench.bench_http [--quick]

Each party is its own process (upstream, credproxy under twistd, load), as in
use. Request rate is measured with wrk over loopback TCP (the proxy's TCP face
with a capability token) when wrk is installed (Debian: apt-get install wrk);
everything else with an asyncio client over the proxy's Unix socket.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from bench._client import Target, connect, messages_request, read_answer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
TWISTD = os.path.join(os.path.dirname(PY), "twistd")
KEY = "sk-ant-api03-bench-only-key"
TOKEN = "b" * 64
MiB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(field)


@dataclass
class Rig:
    upstream_port: int
    proxy_pid: int
    proxy_unix: str
    proxy_tcp_port: int
    upstream_pid: int = 0

    @property
    def direct(self) -> Target:
        return ("tcp", "127.0.0.1", self.upstream_port)

    @property
    def proxied(self) -> Target:
        return ("unix", self.proxy_unix)


# The proxy's credential variables: the rig sets only those it is given.
CREDENTIAL_VARIABLES = ("ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN")


@contextmanager
def rig(
    *,
    credential_env: Mapping[str, str] | None = None,
    proxy_args: Sequence[str] = (),
) -> Iterator[Rig]:
    """
    An upstream and credproxy under twistd in front of it. The proxy's
    environment holds C{credential_env} (default: C{ANTHROPIC_API_KEY=KEY})
    and no other credential variable; C{proxy_args} are added to its command
    line (for instance C{--store file --state-dir DIR --config FILE}).
    """
    if credential_env is None:
        credential_env = {"ANTHROPIC_API_KEY": KEY}
    proxy_env = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_VARIABLES}
    proxy_env.update(credential_env)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 16384), hard))
    workdir = tempfile.mkdtemp(prefix="cpb-", dir="/tmp")
    token_file = os.path.join(workdir, "token")
    with open(os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(TOKEN)  # private: credproxy refuses a token file others can read
    upstream = subprocess.Popen(
        [PY, "-m", "bench._upstream"], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    proxy: subprocess.Popen[bytes] | None = None
    try:
        assert upstream.stdout is not None
        upstream_port = int(upstream.stdout.readline())
        unix_path = os.path.join(workdir, "http.sock")
        tcp_port = free_port()
        with open(os.path.join(workdir, "proxy.log"), "wb") as log:
            proxy = subprocess.Popen(
                [
                    TWISTD,
                    "--pidfile=",
                    "-n",
                    "credproxy",
                    "--http",
                    f"unix:address={unix_path}:backlog=2048",
                    "--http",
                    f"tcp:port={tcp_port}:interface=127.0.0.1:backlog=2048",
                    "--capability-token-file",
                    token_file,
                    "--upstream",
                    f"http://127.0.0.1:{upstream_port}",
                    *proxy_args,
                ],
                env=proxy_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        deadline = time.monotonic() + 30
        while not os.path.exists(unix_path):
            if proxy.poll() is not None or time.monotonic() > deadline:
                with open(os.path.join(workdir, "proxy.log"), errors="replace") as said:
                    tail = said.read()[-4000:]
                raise RuntimeError("credproxy did not start; its log ends:\n" + tail)
            time.sleep(0.05)
        yield Rig(upstream_port, proxy.pid, unix_path, tcp_port, upstream.pid)
    finally:
        for process in (proxy, upstream):
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
        shutil.rmtree(workdir, ignore_errors=True)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- measurements ---------------------------------------------------------------


@dataclass
class WrkResult:
    rate: float  # requests/s
    requests: int
    errors: int  # answers that were not 2xx or 3xx
    output: str


def wrk_rate(url: str, key: str, seconds: int) -> float | None:
    """
    Small-request rate, or None without wrk; any error answer raises.
    """
    result = wrk_run(url, key, seconds)
    if result is None:
        return None
    if result.errors:
        raise RuntimeError(f"wrk saw {result.errors} error answers:\n{result.output}")
    return result.rate


def wrk_run(url: str, key: str, seconds: float) -> WrkResult | None:
    """
    wrk's small POST /v1/messages for C{seconds} over 32 connections, or None
    when wrk is not installed.
    """
    if shutil.which("wrk") is None:
        return None
    body = json.dumps(
        {
            "model": "claude-bench",
            "max_tokens": 16,
            "messages": [{"role": "user", "content": "hello"}],
        }
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\n'
            f"wrk.body = {json.dumps(body)}\n"
            'wrk.headers["content-type"] = "application/json"\n'
            f'wrk.headers["x-api-key"] = "{key}"\n'
            'wrk.headers["anthropic-version"] = "2023-06-01"\n'
        )
    try:
        out = subprocess.run(
            ["wrk", "-t1", "-c32", f"-d{seconds:g}s", "-s", script.name, url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        os.unlink(script.name)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if match is None or total is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    return WrkResult(
        float(match.group(1)), int(total.group(1)), int(errors.group(1)) if errors else 0, out
    )


async def first_byte_times(target: Target, key: str, count: int) -> list[float]:
    reader, writer = await connect(target)
    request = messages_request("/v1/messages?events=3", stream=True, key=key)
    times = []
    try:
        for _ in range(count):
            sent = time.perf_counter()
            writer.write(request)
            answer = await read_answer(reader, sent, keep=False)
            assert answer.status == 200, answer.status
            times.append(answer.first_byte)
    finally:
        writer.close()
    return times


async def one_stream_rate(target: Target, key: str, size: int) -> float:
    reader, writer = await connect(target)
    try:
        sent = time.perf_counter()
        writer.write(messages_request(f"/v1/messages?bytes={size}", stream=True, key=key))
        answer = await read_answer(reader, sent, keep=False)
        elapsed = time.perf_counter() - sent
        assert answer.status == 200 and answer.body_bytes >= size
        return answer.body_bytes / elapsed / 1e6
    finally:
        writer.close()


async def concurrent_slow_streams(
    rig: Rig, count: int, events: int, interval: float
) -> dict[str, float]:
    baseline = rss_kib(rig.proxy_pid)
    peak = baseline
    request = messages_request(
        f"/v1/messages?events={events}&interval={interval}", stream=True, key=TOKEN
    )

    async def one() -> bool:
        reader, writer = await connect(rig.proxied)
        try:
            writer.write(request)
            answer = await read_answer(reader, time.perf_counter())
            return answer.status == 200 and answer.body.endswith(b'{"type":"message_stop"}\n\n')
        finally:
            writer.close()

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_kib(rig.proxy_pid))
            await asyncio.sleep(0.05)

    sampler = asyncio.ensure_future(sample())
    started = time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    elapsed = time.perf_counter() - started
    sampler.cancel()
    completed = sum(1 for r in results if r is True)
    return {
        "completed": completed,
        "elapsed": elapsed,
        "baseline_mib": baseline / 1024,
        "peak_mib": peak / 1024,
        "per_stream_kib": (peak - baseline) / count,
    }


async def hangup_latency(rig: Rig, trials: int) -> list[float]:
    latencies = []
    for _ in range(trials):
        before = await hangups(rig)
        reader, writer = await connect(rig.proxied)
        writer.write(messages_request("/v1/messages?forever=1", stream=True, key=TOKEN))
        await read_answer(reader, time.perf_counter(), keep=False, stop_after=256 * 1024)
        closed_at = time.monotonic()
        writer.transport.abort()
        deadline = time.monotonic() + 5
        while True:
            after = await hangups(rig)
            if len(after) > len(before):
                latencies.append(after[-1] - closed_at)
                break
            if time.monotonic() > deadline:
                latencies.append(float("inf"))
                break
            await asyncio.sleep(0.002)
    return latencies


async def hangups(rig: Rig) -> list[float]:
    reader, writer = await connect(rig.direct)
    try:
        writer.write(b"GET /_hangups HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await read_answer(reader, time.perf_counter())
        result: list[float] = json.loads(answer.body)
        return result
    finally:
        writer.close()


async def stall_growth(rig: Rig, stall: float) -> dict[str, float]:
    reader, writer = await connect(rig.proxied)
    try:
        writer.write(messages_request("/v1/messages?forever=1", stream=True, key=TOKEN))
        await read_answer(reader, time.perf_counter(), keep=False, stop_after=4 * MiB)
        await asyncio.sleep(0.5)
        before = rss_kib(rig.proxy_pid)
        await asyncio.sleep(stall)  # read nothing
        after = rss_kib(rig.proxy_pid)
        return {
            "before_mib": before / 1024,
            "after_mib": after / 1024,
            "growth_mib": (after - before) / 1024,
        }
    finally:
        writer.transport.abort()


def rate(value: float | None) -> str:
    return f"{value:,.0f}" if value is not None else "wrk not installed"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller counts, for a smoke run")
    args = parser.parse_args()
    quick = args.quick
    rows: list[tuple[str, str, str, str]] = []
    with rig() as r:
        asyncio.run(first_byte_times(r.proxied, TOKEN, 50))  # warm up
        seconds = 3 if quick else 8
        direct_rate = wrk_rate(f"http://127.0.0.1:{r.upstream_port}/v1/messages", KEY, seconds)
        proxy_rate = wrk_rate(f"http://127.0.0.1:{r.proxy_tcp_port}/v1/messages", TOKEN, seconds)
        rows.append(
            ("small requests/s (wrk, 32 conns)", rate(direct_rate), rate(proxy_rate), "≥ 3,000")
        )

        count = 100 if quick else 1000
        direct_fb = asyncio.run(first_byte_times(r.direct, KEY, count))
        proxy_fb = asyncio.run(first_byte_times(r.proxied, TOKEN, count))
        rows.append(
            (
                "first byte p50 (ms)",
                f"{pct(direct_fb, 0.5) * 1e3:.2f}",
                f"{pct(proxy_fb, 0.5) * 1e3:.2f}",
                f"overhead {(pct(proxy_fb, 0.5) - pct(direct_fb, 0.5)) * 1e3:.2f} ms (≤ 2)",
            )
        )
        rows.append(
            (
                "first byte p99 (ms)",
                f"{pct(direct_fb, 0.99) * 1e3:.2f}",
                f"{pct(proxy_fb, 0.99) * 1e3:.2f}",
                "",
            )
        )

        size = (64 if quick else 1024) * MiB
        direct_mbs = asyncio.run(one_stream_rate(r.direct, KEY, size))
        proxy_mbs = asyncio.run(one_stream_rate(r.proxied, TOKEN, size))
        rows.append(
            (
                f"one stream of {size // MiB} MiB (MB/s)",
                f"{direct_mbs:,.0f}",
                f"{proxy_mbs:,.0f}",
                "≥ 300",
            )
        )

        streams = 100 if quick else 1000
        slow = asyncio.run(concurrent_slow_streams(r, streams, events=10, interval=0.5))
        rows.append(
            (
                f"{streams} concurrent slow streams (5 s each)",
                "",
                f"{slow['completed']:.0f} completed in {slow['elapsed']:.1f} s",
                "all",
            )
        )
        rows.append(
            (
                "  proxy RSS baseline → peak (MiB)",
                "",
                f"{slow['baseline_mib']:.1f} → {slow['peak_mib']:.1f}",
                "",
            )
        )
        rows.append(("  RSS per stream (KiB)", "", f"{slow['per_stream_kib']:.1f}", "≤ 50"))

        hang = asyncio.run(hangup_latency(r, 5 if quick else 20))
        rows.append(
            (
                "hang-up seen upstream p50 / max (ms)",
                "",
                f"{statistics.median(hang) * 1e3:.1f} / {max(hang) * 1e3:.1f}",
                "≤ 100",
            )
        )

        stall = asyncio.run(stall_growth(r, 2.0 if quick else 5.0))
        rows.append(
            (
                "RSS growth while agent stalls (MiB)",
                "",
                f"{stall['growth_mib']:.2f} ({stall['before_mib']:.1f} → {stall['after_mib']:.1f})",
                "≤ 16",
            )
        )

    header = ("metric", "direct", "via credproxy", "target")
    widths = [max(len(row[i]) for row in [*rows, header]) for i in range(4)]
    print(f"credproxy HTTP benchmark ({os.cpu_count()} cores, Python {sys.version.split()[0]})")
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
