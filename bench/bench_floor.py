"""
The floor under the HTTP face's cost per request: what twisted.web alone
costs to answer a small request, next to what credproxy costs to forward
one. Prints a table; asserts nothing.

    .venv/bin/python -m bench.bench_floor [--seconds S]

The face must stay twisted.web (C{Site}, C{Request}, C{Resource}: what users
embed), so a twisted.web server that answers from memory, with no upstream
hop, no credential and no audit line, is a floor no forwarding face built on
it can go below. The benchmark's upstream (L{bench._upstream}) is such a
server. Both are driven by the same asyncio client over keep-alive
connections (16 in flight), directly and through credproxy, and each
server's CPU per answered request is read from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from dataclasses import dataclass

from bench._client import Target, connect, messages_request, read_answer
from bench.bench_http import KEY, TOKEN, rig

CONCURRENCY = 16
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


@dataclass
class Load:
    answered: int
    seconds: float
    cpu: dict[str, float]  # CPU seconds of each named process over the load

    @property
    def rate(self) -> float:
        return self.answered / self.seconds

    def ms_per_request(self, name: str) -> float:
        return 1000 * self.cpu[name] / max(1, self.answered)


async def _worker(target: Target, request: bytes, until: float, counts: list[int]) -> None:
    reader, writer = await connect(target)
    try:
        while time.perf_counter() < until:
            writer.write(request)
            answer = await read_answer(reader, time.perf_counter(), keep=False)
            if answer.status != 200:
                raise RuntimeError(f"answer {answer.status}")
            counts[0] += 1
    finally:
        writer.close()


def load(target: Target, key: str, seconds: float, pids: dict[str, int]) -> Load:
    request = messages_request("/v1/messages", stream=False, key=key)

    async def run() -> Load:
        warm = [0]
        await asyncio.gather(
            *(_worker(target, request, time.perf_counter() + 0.5, warm) for _ in range(4))
        )
        counts = [0]
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        started = time.perf_counter()
        until = started + seconds
        await asyncio.gather(*(_worker(target, request, until, counts) for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - started
        after = {name: cpu_seconds(pid) for name, pid in pids.items()}
        return Load(counts[0], elapsed, {n: after[n] - before[n] for n in pids})

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="each measurement's length")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians)")
    options = parser.parse_args()
    rows: dict[str, list[tuple[float, float]]] = {"floor": [], "credproxy": [], "upstream": []}
    with rig(proxy_args=["--store", "memory"]) as r:
        pids = {"proxy": r.proxy_pid, "upstream": r.upstream_pid}
        for _ in range(options.rounds):
            direct = load(r.direct, KEY, options.seconds, pids)
            rows["floor"].append((direct.rate, direct.ms_per_request("upstream")))
            proxied = load(r.proxied, TOKEN, options.seconds, pids)
            rows["credproxy"].append((proxied.rate, proxied.ms_per_request("proxy")))
            rows["upstream"].append((proxied.rate, proxied.ms_per_request("upstream")))

    def median(values: list[float]) -> float:
        ordered = sorted(values)
        return ordered[len(ordered) // 2]

    floor = median([cpu for _, cpu in rows["floor"]])
    print(f"{'server':<58} {'req/s':>8} {'CPU ms/req':>11} {'x floor':>8}")
    for label, key in (
        ("twisted.web Site answering from memory (the floor)", "floor"),
        ("credproxy forwarding to it (twisted.web + upstream hop)", "credproxy"),
    ):
        cpu = median([c for _, c in rows[key]])
        rate = median([r for r, _ in rows[key]])
        print(f"{label:<58} {rate:>8,.0f} {cpu:>11.3f} {cpu / floor:>8.2f}")
    print(f"(medians of {options.rounds} rounds of {options.seconds:g} s, {CONCURRENCY} in flight)")


if __name__ == "__main__":
    main()
