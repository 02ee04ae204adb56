"""
Benchmark of the host broker's performance targets (issue 7), in one run and
one table. Prints the table; asserts nothing.

    .venv/bin/python -m bench.bench_broker [--quick] [--rounds N]

HTTP face: the small POST /v1/messages rate that bench_http measures (its rig,
upstream and wrk load: 32 connections over the proxy's loopback TCP face),
with credproxy under C{twistd -n credproxy --store file --state-dir DIR
--config FILE}, FILE pointing the anthropic provider at a FakeOAuthServer on
loopback (L{bench._oauth}, its own process), and DIR's tokens.json seeded in
the store's own format with an anthropic login (refresh token live at that
server, expiry hours ahead). Three variants, one fresh proxy each, run in
turn in every round:

  a  ANTHROPIC_API_KEY in the proxy's environment (it wins over the store)
  b  no credential in the environment: the stored OAuth token, read through
     the broker on every request
  c  as b, but a few seconds into the load the upstream starts refusing the
     stored token (401 authentication_error, as the API answers a token it
     has expired): credproxy must refresh it once at the token endpoint and
     replay the refused requests, so agents see no error

The proxy's own clock cannot expire the token mid-load in a fresh process:
proactive renewal refreshes any token within 300-330 s (random jitter) of
its expiry as soon as the broker starts, well before the on-demand margin
(60 s) would, and a renewal due later falls at a random point of a 30 s
window. So (c) expires it where the API does, at the upstream.

For each variant the table shows what the upstream saw (credential header
and the oauth beta flag) and how many token-endpoint calls were made. Since
req/s on a shared 2-core machine is noisy, the proxy's CPU time per request
is shown too, and the credential lookup alone (what b adds to a) is timed in
this process, with environment, memory and file-store sources.

Credential socket: C{get_token} round trips through the broker on one
connection with 16 requests in flight (the raw client of bench_wire), with
the memory store and with the file store (tokens.json on disk, read once and
then from the store's cache), the two servers alternating in each round; and,
free of socket and scheduling noise, the same server's decode+answer rate in
this process over a StringTransport with either store (bench_wire's decode
measurement).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, globalLogBeginner
from zope.interface import implementer

from bench._wire_decode import DecodeRate, chunks, request_stream, server_rate
from bench._wire_rig import cpu_seconds, measure, server, workdir
from bench._wire_server import PROVIDER, seed_file_store
from bench._wire_server import TOKEN as WIRE_TOKEN
from bench.bench_http import KEY, ROOT, TOKEN, Rig, first_byte_times, rig, wrk_run
from bench.bench_wire import raw
from credproxy.broker import Broker
from credproxy.broker.credentials import BrokerCredentialSource, UpstreamCredential
from credproxy.stores import FileTokenStore, Token, open_host_stores
from credproxy.testing import InlineBlockingCalls
from credproxy.wire._spec import MAX_FRAMES_PER_READ, MAX_IN_FLIGHT

PY = sys.executable
STORED_LIFETIME = 4 * 3600.0  # the seeded token's expiry: hours ahead
TOKEN_PATH = "/v1/oauth/token"  # FakeOAuthServer.TOKEN_PATH, the anthropic provider's
Row = tuple[str, str, str, str, str, str]


# -- the token endpoint ----------------------------------------------------------------


@dataclass
class OAuth:
    port: int

    def _get(self, path: str, data: bytes | None = None) -> bytes:
        url = f"http://127.0.0.1:{self.port}{path}"
        with urllib.request.urlopen(url, data=data, timeout=10) as answer:
            body: bytes = answer.read()
            return body

    def issue(self, expires_in: float) -> Token:
        return Token(json.loads(self._get(f"/_bench/issue?expires_in={expires_in:g}", b"")))

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self._get("/_bench/stats"))
        return result

    def config(self) -> str:
        return self._get("/_bench/config").decode("utf-8")


@contextmanager
def oauth_server() -> Iterator[OAuth]:
    process = subprocess.Popen([PY, "-m", "bench._oauth"], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise RuntimeError("the fake OAuth server did not start")
        yield OAuth(int(line))
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def token_calls(oauth: OAuth) -> int:
    return int(oauth.stats()["calls"].get(TOKEN_PATH, 0))


# -- the HTTP face ----------------------------------------------------------------------


def upstream_seen(r: Rig) -> dict[str, Any]:
    url = f"http://127.0.0.1:{r.upstream_port}/_seen"
    with urllib.request.urlopen(url, timeout=10) as answer:
        result: dict[str, Any] = json.loads(answer.read())
        return result


def upstream_reject(r: Rig, bearer: str) -> None:
    url = f"http://127.0.0.1:{r.upstream_port}/_reject"
    body = json.dumps({"bearer": bearer}).encode()
    with urllib.request.urlopen(url, data=body, timeout=10) as answer:
        answer.read()


def seen_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """
    Requests per credential (and the oauth-beta and refused counts) between two
    readings of the upstream's /_seen.
    """
    delta: dict[str, int] = {}
    for name, count in after["credentials"].items():
        grown = count - before["credentials"].get(name, 0)
        if grown:
            delta[name] = grown
    for name in ("oauth_beta", "refused"):
        delta["#" + name] = after[name] - before[name]
    return delta


@dataclass
class HTTPRun:
    rate: float
    requests: int
    latency: str  # wrk's average / max
    errors: int  # non-2xx answers the agents (wrk) saw
    proxy_cpu: float  # share of one core over wrk's run
    cpu_per_request: float  # the proxy's CPU seconds per request answered
    token_calls: int  # token-endpoint calls during the run
    seen: dict[str, int]  # what the upstream saw (seen_delta)
    stored: Token  # the proxy's stored token at the start
    issued: list[str]  # access tokens the token endpoint issued during the run
    replays: int  # "replacing it and replaying once" lines in the proxy's log
    on_disk: str | None  # the access token in tokens.json after the run
    refresh_lines: list[str] = field(default_factory=list)


def http_run(
    oauth: OAuth,
    config_file: str,
    variant: str,
    seconds: int,
    reject_after: float,
) -> HTTPRun:
    state_dir = tempfile.mkdtemp(prefix=f"cpbb-{variant}-", dir="/tmp")
    stored = oauth.issue(STORED_LIFETIME)
    FileTokenStore(state_dir, InlineBlockingCalls()).save_token("anthropic", stored)
    credential_env = {"ANTHROPIC_API_KEY": KEY} if variant == "a" else {}
    proxy_args = ["--store", "file", "--state-dir", state_dir, "--config", config_file]
    try:
        with rig(credential_env=credential_env, proxy_args=proxy_args) as r:
            asyncio.run(first_byte_times(r.proxied, TOKEN, 50))  # warm up
            seen_before = upstream_seen(r)
            calls_before = token_calls(oauth)
            issued_before = len(oauth.stats()["access_tokens"])
            timer: threading.Timer | None = None
            if variant == "c":
                access = stored.access_token
                assert access is not None
                timer = threading.Timer(reject_after, upstream_reject, (r, access))
                timer.start()
            cpu_before = cpu_seconds(r.proxy_pid)
            started = time.monotonic()
            result = wrk_run(f"http://127.0.0.1:{r.proxy_tcp_port}/v1/messages", TOKEN, seconds)
            elapsed = time.monotonic() - started
            cpu_after = cpu_seconds(r.proxy_pid)
            if timer is not None:
                timer.join()
            if result is None:
                raise SystemExit("bench_broker needs wrk (Debian: apt-get install wrk)")
            stats = oauth.stats()
            with open(os.path.join(os.path.dirname(r.proxy_unix), "proxy.log")) as f:
                log = f.read()
            latency = re.search(r"Latency\s+(\S+)\s+\S+\s+(\S+)", result.output)
            return HTTPRun(
                rate=result.rate,
                requests=result.requests,
                latency=f"{latency.group(1)} / {latency.group(2)}" if latency else "?",
                errors=result.errors,
                proxy_cpu=(cpu_after - cpu_before) / elapsed,
                cpu_per_request=(cpu_after - cpu_before) / max(result.requests, 1),
                token_calls=int(stats["calls"].get(TOKEN_PATH, 0)) - calls_before,
                seen=seen_delta(seen_before, upstream_seen(r)),
                stored=stored,
                issued=stats["access_tokens"][issued_before:],
                replays=log.count("replacing it and replaying once"),
                on_disk=on_disk(state_dir),
                refresh_lines=[
                    line.split("] ", 1)[-1]
                    for line in log.splitlines()
                    if "Token refresh anthropic/" in line
                ],
            )
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def on_disk(state_dir: str) -> str | None:
    """
    The anthropic access token tokens.json holds now, read afresh.
    """
    store = FileTokenStore(state_dir, InlineBlockingCalls())
    found: list[Token | None] = []
    store.get_token("anthropic").addCallback(found.append)
    return found[0].access_token if found and found[0] is not None else None


def check(variant: str, run: HTTPRun) -> str:
    """
    What the upstream saw, in words, with any deviation from what the variant
    should produce named first.
    """
    seen = dict(run.seen)
    refused, beta = seen.pop("#refused"), seen.pop("#oauth_beta")
    total = sum(seen.values())
    problems: list[str] = []
    if run.errors:
        problems.append(f"{run.errors} error answers to agents")
    if variant == "a":
        if seen != {f"x-api-key {KEY}": total}:
            problems.append(f"credentials {sorted(k.split()[0] for k in seen)}")
        words = f"x-api-key (env key) {total:,}/{total:,}"
    else:
        old = f"bearer {run.stored.access_token}"
        new = [f"bearer {t}" for t in run.issued]
        bearer = sum(n for k, n in seen.items() if k.startswith("bearer "))
        if bearer != total or beta != total:
            problems.append(f"{total - bearer} not Bearer, {total - beta} without oauth beta")
        if variant == "b":
            if seen.get(old, 0) != total:
                problems.append("a Bearer token other than the stored one")
            words = f"Bearer stored token {seen.get(old, 0):,}/{total:,}, oauth beta {beta:,}"
        else:
            after = sum(seen.get(t, 0) for t in new)
            other = total - seen.get(old, 0) - after
            if other:
                problems.append(f"{other} with an unknown token")
            if refused != run.replays:
                problems.append(f"{refused} refused upstream but {run.replays} replays")
            if not run.issued or run.on_disk != run.issued[-1]:
                problems.append("tokens.json does not hold the refreshed token")
            words = (
                f"Bearer stored {seen.get(old, 0):,} ({refused:,} got 401, replayed), "
                f"refreshed {after:,} (now in tokens.json); oauth beta {beta:,}/{total:,}"
            )
    return ("CHECK FAILED: " + "; ".join(problems) + " | " if problems else "ok: ") + words


# -- the credential socket --------------------------------------------------------------


def wire_runs(rounds: int, warmup: float, seconds: float) -> dict[str, list[Any]]:
    results: dict[str, list[Any]] = {"memory": [], "file": []}
    with workdir() as directory:
        state = os.path.join(directory, "state")
        seed_file_store(state)
        with (
            server(directory, "memory") as memory,
            server(directory, "file", server_args=["--store", "file", "--state-dir", state]) as f,
        ):
            for i in range(rounds):
                for name, s in (("memory", memory), ("file", f)):
                    results[name].append(
                        measure(
                            [raw(s.socket, 1, f"{name}{i}")], s.pid, warmup=warmup, seconds=seconds
                        )
                    )
    return results


@implementer(ILogObserver)
class Discard:
    def __call__(self, event: LogEvent) -> None:
        pass


def in_process_runs(rounds: int, count: int, budget: float) -> dict[str, list[DecodeRate]]:
    """
    The server's decode+answer rate over a StringTransport (no sockets, no
    scheduling noise), with the memory store and with a file store whose
    tokens.json was read once into its cache, alternating.
    """
    stream, frame_len = request_stream(count)
    pieces = chunks(stream, MAX_FRAMES_PER_READ * frame_len)
    results: dict[str, list[DecodeRate]] = {"memory": [], "file": []}
    with workdir() as directory:
        seed_file_store(directory)
        cached = FileTokenStore(directory, InlineBlockingCalls())
        cached.get_token(PROVIDER)  # read tokens.json once: the cache answers from now on
        for _ in range(rounds):
            results["memory"].append(server_rate(pieces, frame_len, budget, WIRE_TOKEN))
            results["file"].append(
                server_rate(pieces, frame_len, budget, WIRE_TOKEN, tokens=cached)
            )
    return results


def credential_lookup(rounds: int, count: int) -> dict[str, list[float]]:
    """
    Seconds per request that the HTTP face spends asking for its credential
    (C{current_credential} and C{credential_used} of the broker's source), in
    this process, alternating: from the environment, from memory stores,
    and from file stores whose files were read once into their caches.
    """
    clock = Clock()
    clock.advance(time.time())
    stored = Token(
        {
            "access_token": "oat-bench-lookup-0123456789",
            "refresh_token": "ort-bench-lookup-0123456789",
            "expiry": time.time() + STORED_LIFETIME,
            "token_type": "Bearer",
        }
    )
    results: dict[str, list[float]] = {"env": [], "memory": [], "file": []}
    with workdir() as directory:
        open_host_stores("file", directory, InlineBlockingCalls()).tokens.save_token(
            "anthropic", stored
        )
        files = open_host_stores("file", directory, InlineBlockingCalls())  # read afresh
        memory = open_host_stores("memory", directory, InlineBlockingCalls())
        memory.tokens.save_token("anthropic", stored)
        sources = {
            "env": (files, {"ANTHROPIC_API_KEY": KEY}),
            "memory": (memory, {}),
            "file": (files, {}),
        }
        for _ in range(rounds):
            for name, (stores, environ) in sources.items():
                source = BrokerCredentialSource(
                    Broker(clock, stores.tokens, stores.keys), environ=environ
                )
                got: list[UpstreamCredential | None] = []
                for _ in range(1000):  # warm the caches
                    source.current_credential().addCallback(got.append)
                credential = got[-1]
                assert credential is not None
                started = time.perf_counter()
                for _ in range(count):
                    source.current_credential().addCallback(got.append)
                    source.credential_used(credential)
                results[name].append((time.perf_counter() - started) / count)
                del got[:]
    return results


# -- the table --------------------------------------------------------------------------


def spread(values: list[float], unit: str) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:,.0f} {unit}"
    return f"{mean:,.0f} {unit} ({' / '.join(f'{v:,.0f}' for v in values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one short round, for a smoke run")
    parser.add_argument("--rounds", type=int, help="rounds of every variant (default 2, quick 1)")
    parser.add_argument(
        "--seconds", type=int, help="wrk's run per HTTP variant (default 8, quick 3)"
    )
    args = parser.parse_args()
    quick = args.quick
    rounds = args.rounds or (1 if quick else 2)
    seconds = args.seconds or (3 if quick else 8)
    reject_after = 1.0 if quick else 2.0
    warmup, wire_seconds = (0.5, 1.5) if quick else (1.0, 4.0)
    variants = {
        "a": "HTTP a: ANTHROPIC_API_KEY in the environment",
        "b": "HTTP b: stored OAuth token (file store, refreshable, 4 h left)",
        "c": f"HTTP c: as b, the API expires it {reject_after:g} s into the load",
    }
    runs: dict[str, list[HTTPRun]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="cpbb-") as scratch, oauth_server() as oauth:
        config_file = os.path.join(scratch, "oauth.toml")
        with open(config_file, "w") as f:
            f.write(oauth.config())
        for _ in range(rounds):
            for variant in variants:
                runs[variant].append(http_run(oauth, config_file, variant, seconds, reject_after))
        total_calls = token_calls(oauth)
    wire = wire_runs(rounds, warmup, wire_seconds)
    globalLogBeginner.beginLoggingTo([Discard()], redirectStandardIO=False)  # the audit trail
    decode = in_process_runs(rounds, 100_000 if quick else 300_000, 1.0 if quick else 3.0)
    lookup = credential_lookup(rounds, 50_000 if quick else 200_000)

    rows: list[Row] = []
    base = statistics.fmean(run.rate for run in runs["a"])
    targets = {"a": "reference", "b": "b/a ≥ 0.90", "c": "1 token call per round"}
    for variant, label in variants.items():
        mean = statistics.fmean(run.rate for run in runs[variant])
        per_request = statistics.fmean(run.cpu_per_request for run in runs[variant])
        rows.append(
            (
                label,
                spread([run.rate for run in runs[variant]], "req/s"),
                "1.00" if variant == "a" else f"{variant}/a {mean / base:.3f}",
                " / ".join(f"{run.proxy_cpu * 100:.0f}%" for run in runs[variant])
                + f", {per_request * 1e6:.0f} µs/req",
                " / ".join(str(run.token_calls) for run in runs[variant]),
                targets[variant],
            )
        )
        for i, run in enumerate(runs[variant]):
            rows.append(
                (
                    f"  round {i + 1}: latency avg / max {run.latency}; upstream saw",
                    check(variant, run),
                    "",
                    "",
                    "",
                    "",
                )
            )
    for name, label in (
        ("env", "from the environment (as a)"),
        ("memory", "from memory stores"),
        ("file", "from file stores, cached (as b)"),
    ):
        values = [t * 1e6 for t in lookup[name]]
        per_round = f" ({' / '.join(f'{v:.1f}' for v in values)})" if len(values) > 1 else ""
        rows.append(
            (
                f"  in-process credential lookup + use per request, {label}",
                f"{statistics.fmean(values):.1f} µs{per_round}",
                "",
                "",
                "",
                "",
            )
        )
    wire_base = statistics.fmean(r.rate for r in wire["memory"])
    for name, label in (
        ("memory", "memory store"),
        ("file", "file store (cached)"),
    ):
        mean = statistics.fmean(r.rate for r in wire[name])
        rows.append(
            (
                f"wire get_token via broker, 1 conn x {MAX_IN_FLIGHT} in flight, {label}",
                spread([r.rate for r in wire[name]], "round trips/s"),
                "1.00" if name == "memory" else f"file/memory {mean / wire_base:.3f}",
                " / ".join(f"{r.server_cpu * 100:.0f}%" for r in wire[name]),
                "",
                "≥ 10,000" if name == "memory" else "≥ 10,000, ≈ memory",
            )
        )

    decode_base = statistics.fmean(r.frames_per_s for r in decode["memory"])
    for name, label in (("memory", "memory store"), ("file", "file store (cached)")):
        mean = statistics.fmean(r.frames_per_s for r in decode[name])
        rows.append(
            (
                f"  in-process server decode+answer (StringTransport), {label}",
                spread([r.frames_per_s for r in decode[name]], "frames/s"),
                "1.00" if name == "memory" else f"file/memory {mean / decode_base:.3f}",
                "",
                "",
                "" if name == "memory" else "≈ memory",
            )
        )

    header: Row = ("metric", "mean (per round)", "ratio", "server CPU", "token calls", "target")
    widths = [max(len(row[i]) for row in [*rows, header]) for i in range(len(header))]
    print(
        f"credproxy broker benchmark ({os.cpu_count()} cores, Python {sys.version.split()[0]}, "
        f"{'quick' if quick else 'full'}: {rounds} round(s); HTTP: wrk 32 conns, {seconds} s "
        f"per variant; wire: {warmup:g} s warm-up + {wire_seconds:g} s measured)"
    )
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    print(
        "server CPU = the proxy's (HTTP) or the socket server's (wire) share of one core "
        "(µs/req: the proxy's CPU time per request, mean of the rounds). "
        f"Token-endpoint calls in the whole run: {total_calls}."
    )
    refreshes = [line for run in runs["c"] for line in run.refresh_lines]
    for line in refreshes:
        print(f"  proxy log (c): {line}")


if __name__ == "__main__":
    main()
