"""
What a burst of new upstream connections costs before its first byte: N
connections opened at once through the upstream hop's endpoints, to an
address, to a hostname with credproxy's shared lookups, and to a hostname
through Twisted's own L{HostnameEndpoint} (one lookup per connection, as
the hop had before). Prints a table; asserts nothing.

    .venv/bin/python -m bench.bench_upstream_connects [--connections N] [--lookup-ms MS ...]

The listener is on this machine's loopback and C{localhost} is the
hostname. C{--lookup-ms} adds that long to every C{getaddrinfo}, in the
resolver's threads, as an uncached DNS answer would: the default pair
(0 and 20) shows a resolver with a warm local cache and one without.
"""

from __future__ import annotations

import argparse
import gc
import socket
import time
from collections.abc import Callable
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet._resolver import GAIResolver
from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IReactorThreads, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.web.client import URI, BrowserLikePolicyForHTTPS

from credproxy._process import raise_open_file_limit
from credproxy._transports import lean_reactor
from credproxy.http._face import UpstreamEndpoints


class _Quiet(Factory):
    noisy = False
    protocol = Protocol


def _slow_getaddrinfo(delay: float, lookups: list[str]) -> Callable[..., Any]:
    def getaddrinfo(host: str, *args: Any, **kwargs: Any) -> Any:
        lookups.append(host)
        if delay:
            time.sleep(delay)
        return socket.getaddrinfo(host, *args, **kwargs)

    return getaddrinfo


async def _burst(endpoint: IStreamClientEndpoint, count: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    connected = await gatherResults([endpoint.connect(_Quiet()) for _ in range(count)])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    for protocol in connected:
        protocol.transport.abortConnection()  # type: ignore[attr-defined]
    return wall, cpu


async def _measure(count: int, delays: list[float]) -> list[tuple[str, float, int, float, float]]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(count * 2)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    held: list[socket.socket] = []

    accepting: list[Any] = []

    def accept() -> None:
        try:
            while True:
                held.append(listener.accept()[0])
        except BlockingIOError:
            pass
        accepting[:] = [reactor.callLater(0.001, accept)]

    accept()
    rows = []
    previous = reactor.nameResolver  # type: ignore[attr-defined]
    try:
        for delay in delays:
            for name, build in (
                ("address (127.0.0.1)", "address"),
                ("hostname, shared lookups", "shared"),
                ("hostname, a lookup each", "each"),
            ):
                lookups: list[str] = []
                reactor.installNameResolver(  # type: ignore[attr-defined]
                    GAIResolver(
                        cast(IReactorThreads, reactor),
                        getaddrinfo=_slow_getaddrinfo(delay, lookups),
                    )
                )
                host = "127.0.0.1" if build == "address" else "localhost"
                endpoint: IStreamClientEndpoint
                if build == "each":
                    endpoint = HostnameEndpoint(lean_reactor(reactor), host, port, timeout=10)
                else:
                    endpoints = UpstreamEndpoints(reactor, BrowserLikePolicyForHTTPS(), 10.0)
                    endpoint = endpoints.endpointForURI(
                        URI.fromBytes(f"http://{host}:{port}/".encode())
                    )
                await deferLater(reactor, 0.2)  # the last burst's closes are done
                gc.collect()  # and its garbage is not this burst's cost
                wall, cpu = await _burst(endpoint, count)
                rows.append((name, delay * 1000, len(lookups), wall * 1000, cpu * 1000))
                for sock in held:
                    sock.close()
                held.clear()
    finally:
        reactor.installNameResolver(previous)  # type: ignore[attr-defined]
        listener.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--lookup-ms", type=float, nargs="+", default=[0.0, 20.0])
    args = parser.parse_args()
    rows: list[tuple[str, float, int, float, float]] = []
    problem = raise_open_file_limit(args.connections * 3 + 256)  # both ends of each, and room
    if problem is not None:
        raise SystemExit(f"bench_upstream_connects: {problem}")

    async def run() -> None:
        try:
            rows.extend(await _measure(args.connections, [ms / 1000 for ms in args.lookup_ms]))
        finally:
            reactor.stop()

    reactor.callWhenRunning(lambda: ensureDeferred(run()))
    reactor.run()
    print(f"{args.connections} upstream connections opened at once")
    print(f"| {'endpoint':<26} | lookup ms | lookups | all connected, ms | CPU ms |")
    print(f"|{'-' * 28}|-----------|---------|-------------------|--------|")
    for name, delay, lookups, wall, cpu in rows:
        print(f"| {name:<26} | {delay:9.0f} | {lookups:7d} | {wall:17.0f} | {cpu:6.0f} |")


if __name__ == "__main__":
    main()
