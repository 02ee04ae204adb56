"""
Benchmark of the Redis store's performance targets (issue 12), against a
real redis-server on loopback that this run starts (no persistence). Prints
the table; asserts nothing.

    .venv/bin/python -m bench.bench_redis_store [--quick] [--rounds N]

 - Warm cache: C{get_token} round trips over the credential socket (one
   connection, 16 requests in flight, bench_wire's raw client) with the file
   store and with the Redis store, each read once and then served from its
   cache, the two servers alternating in each round. Target: Redis ≥ 90%
   of file.
 - The same comparison free of socket and scheduling noise: one server's
   decode+answer rate in this process over a StringTransport (bench_wire's
   decode measurement), with a cached file store and a cached Redis store.
 - Cold read: one C{get_token} after the entry's cache was cleared, as a
   host reads after another host's save: the store's own work (inline
   calls) and the whole path through the store's thread pool with the
   reactor running (a thread hop there and back). Target: median under 2 ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

from twisted.internet.task import Clock

from bench._wire_decode import chunks, request_stream, server_rate
from bench._wire_rig import measure, server, workdir
from bench._wire_server import PROVIDER, TOKEN, seed_file_store
from bench.bench_wire import raw
from credproxy.stores import FileTokenStore, RedisConnection, RedisTokenStore
from credproxy.stores._crypto import ValueCipher, read_store_key_file
from credproxy.stores._redis_target import parse_redis_url
from credproxy.testing import InlineBlockingCalls
from credproxy.wire._spec import MAX_FRAMES_PER_READ
from tests.redisserver import RedisServer, start_redis, unique_prefix, write_store_key

Row = tuple[str, str, str, str]


def redis_store(redis: RedisServer, key_file: str, prefix: str, reactor: Any) -> RedisTokenStore:
    connection = RedisConnection(
        reactor, InlineBlockingCalls(), parse_redis_url(redis.url), prefix=prefix
    )
    return RedisTokenStore(connection, ValueCipher(read_store_key_file(key_file)))


def wire_runs(
    redis: RedisServer, key_file: str, prefix: str, rounds: int, warmup: float, seconds: float
) -> dict[str, list[Any]]:
    results: dict[str, list[Any]] = {"file": [], "redis": []}
    with workdir() as directory:
        state = os.path.join(directory, "state")
        seed_file_store(state)
        redis_args = [
            "--store",
            redis.url,
            "--store-key-file",
            key_file,
            "--redis-prefix",
            prefix,
        ]
        with (
            server(directory, "file", server_args=["--store", "file", "--state-dir", state]) as f,
            server(directory, "redis", server_args=redis_args) as r,
        ):
            for i in range(rounds):
                for name, s in (("file", f), ("redis", r)):
                    load = [raw(s.socket, 1, f"{name}{i}")]
                    results[name].append(measure(load, s.pid, warmup=warmup, seconds=seconds))
    return results


def in_process_runs(
    redis: RedisServer, key_file: str, prefix: str, rounds: int, count: int, budget: float
) -> dict[str, list[float]]:
    from twisted.internet import reactor  # its clock only: the cache's age is real time

    stream, frame_len = request_stream(count)
    pieces = chunks(stream, MAX_FRAMES_PER_READ * frame_len)
    results: dict[str, list[float]] = {"file": [], "redis": []}
    with workdir() as directory:
        seed_file_store(directory)
        files = FileTokenStore(directory, InlineBlockingCalls())
        files.get_token(PROVIDER)
        cached = redis_store(redis, key_file, prefix, reactor)
        cached.get_token(PROVIDER)
        for _ in range(rounds):
            for name, store in (("file", files), ("redis", cached)):
                rate = server_rate(pieces, frame_len, budget, TOKEN, tokens=store)
                results[name].append(rate.frames_per_s)
    return results


def cold_inline(store: RedisTokenStore, count: int) -> list[float]:
    times = []
    for _ in range(count):
        store.invalidate(PROVIDER)
        started = time.perf_counter()
        got: list[Any] = []
        store.get_token(PROVIDER).addCallback(got.append)
        times.append(time.perf_counter() - started)
        assert got and got[0] is not None
    return times


def cold_threaded(redis: RedisServer, key_file: str, prefix: str, count: int) -> list[float]:
    """
    Cold reads through the store's thread pool, the reactor running: what a
    request pays after another host's save cleared the entry.
    """
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    from credproxy.stores import BlockingCalls

    calls = BlockingCalls(reactor)
    connection = RedisConnection(reactor, calls, parse_redis_url(redis.url), prefix=prefix)
    store = RedisTokenStore(connection, ValueCipher(read_store_key_file(key_file)))
    times: list[float] = []

    async def run() -> None:
        calls.startService()
        try:
            for _ in range(count):
                store.invalidate(PROVIDER)
                started = time.perf_counter()
                token = await store.get_token(PROVIDER)
                times.append(time.perf_counter() - started)
                assert token is not None
        finally:
            await calls.stopService()
            reactor.stop()

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(run()))
    reactor.run()
    return times


def ms(values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (
        f"median {statistics.median(values) * 1e3:.3f} ms, p99 {p99 * 1e3:.3f} ms"
        f" ({len(values)} reads)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one short round, for a smoke run")
    parser.add_argument("--rounds", type=int, help="rounds of every measurement (default 3)")
    args = parser.parse_args()
    quick = args.quick
    rounds = args.rounds or (1 if quick else 3)
    warmup, seconds = (0.5, 1.5) if quick else (1.0, 4.0)
    cold_count = 300 if quick else 2000
    redis = start_redis()
    try:
        with workdir() as directory:
            key_file = write_store_key(directory)
            prefix = unique_prefix()
            seeded = redis_store(redis, key_file, prefix, Clock())
            seeded.save_token(PROVIDER, TOKEN)
            wire = wire_runs(redis, key_file, prefix, rounds, warmup, seconds)
            decode = in_process_runs(
                redis,
                key_file,
                prefix,
                rounds,
                100_000 if quick else 300_000,
                1.0 if quick else 3.0,
            )
            inline = cold_inline(redis_store(redis, key_file, prefix, Clock()), cold_count)
            threaded = cold_threaded(redis, key_file, prefix, cold_count)
    finally:
        redis.remove()

    rows: list[Row] = []
    file_rate = statistics.fmean(r.rate for r in wire["file"])
    redis_rate = statistics.fmean(r.rate for r in wire["redis"])
    for name in ("file", "redis"):
        rates = [r.rate for r in wire[name]]
        cpu = " / ".join(f"{r.server_cpu * 100:.0f}%" for r in wire[name])
        rows.append(
            (
                f"socket get_token, {name} store, warm cache",
                f"{statistics.fmean(rates):,.0f} rt/s ({' / '.join(f'{v:,.0f}' for v in rates)})",
                f"server CPU {cpu}",
                "reference"
                if name == "file"
                else f"redis/file {redis_rate / file_rate:.3f} (≥ 0.90)",
            )
        )
    file_decode, redis_decode = (statistics.fmean(decode[n]) for n in ("file", "redis"))
    for name, value in (("file", file_decode), ("redis", redis_decode)):
        rows.append(
            (
                f"in process decode+answer, {name} store, warm cache",
                f"{value:,.0f} req/s ({' / '.join(f'{v:,.0f}' for v in decode[name])})",
                "",
                "reference" if name == "file" else f"redis/file {redis_decode / file_decode:.3f}",
            )
        )
    rows.append(("cold read, the store's own work (inline)", ms(inline), "", "median < 2 ms"))
    rows.append(("cold read through the store's threads", ms(threaded), "", "median < 2 ms"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    print(f"Redis store benchmark (redis-server on loopback, {sys.platform})")
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
