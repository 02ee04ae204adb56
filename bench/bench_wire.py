"""
Benchmark of the credential socket (the wire protocol). Prints a table;
asserts nothing about timings.

    .venv/bin/python -m bench.bench_wire [--quick]

The server is L{RPCFace} over memory stores (one token, no capability
token) on a Unix socket, in its own process under the epoll reactor, its
audit trail written to a file as twistd would (one row repeats a figure
with the audit trail discarded). Load comes from other processes: a lean
raw-socket client (L{bench._wire_load}: blocking sockets, one epoll loop,
16 C{get_token} requests in flight per connection, refilled as answers
arrive, every answer checked), and, for reference, the official Twisted
client. CPU is each side's share of one core over the measured window,
read from /proc. Decode rates are measured in this process over a
StringTransport (L{bench._wire_decode}).
"""

from __future__ import annotations

import argparse
import os
import sys

from twisted.logger import ILogObserver, LogEvent, globalLogBeginner, textFileLogObserver
from zope.interface import implementer

from bench._wire_decode import DecodeRate, chunks, framing_rate, request_stream, server_rate
from bench._wire_rig import LoadResult, measure, rss_kib, server, workdir
from bench._wire_server import TOKEN
from credproxy.wire._spec import MAX_FRAMES_PER_READ, MAX_IN_FLIGHT

Row = tuple[str, str, str, str, str]


@implementer(ILogObserver)
class Switch:
    """
    Passes log events on to C{observer} while C{on}.
    """

    def __init__(self, observer: ILogObserver) -> None:
        self.observer = observer
        self.on = True

    def __call__(self, event: LogEvent) -> None:
        if self.on:
            self.observer(event)


def load_row(label: str, result: LoadResult, target: str) -> Row:
    return (
        label,
        f"{result.rate:,.0f} round trips/s",
        f"{result.server_cpu * 100:.0f}%",
        f"{result.load_cpu * 100:.0f}%",
        target,
    )


def decode_row(label: str, result: DecodeRate, target: str) -> Row:
    return (
        label,
        f"{result.mb_per_s:,.1f} MB/s ({result.frames_per_s:,.0f} frames/s)",
        "",
        "",
        target,
    )


def raw(path: str, conns: int, tag: str) -> list[str]:
    return [
        "bench._wire_load",
        path,
        "--conns",
        str(conns),
        "--depth",
        str(MAX_IN_FLIGHT),
        "--tag",
        tag,
    ]


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter runs, for a smoke run")
    args = parser.parse_args()
    quick = args.quick
    warmup, seconds = (0.5, 1.5) if quick else (1.0, 4.0)
    conns = 100
    rows: list[Row] = []

    with workdir() as directory:
        # The decode measurement runs here; its audit lines go to a file too.
        audit = open(os.path.join(directory, "decode-audit.log"), "a")  # noqa: SIM115
        to_file = Switch(textFileLogObserver(audit))
        globalLogBeginner.beginLoggingTo([to_file], redirectStandardIO=False)

        with server(directory, "wire") as s:
            rss_before = rss_kib(s.pid)
            one = measure([raw(s.socket, 1, "a")], s.pid, warmup=warmup, seconds=seconds)
            rows.append(
                load_row(
                    f"get_token, 1 conn x {MAX_IN_FLIGHT} in flight (raw client)", one, "≥ 10,000"
                )
            )
            for processes in (1, 2):
                many = measure(
                    [
                        raw(s.socket, n, f"m{processes}.{i}")
                        for i, n in enumerate(split(conns, processes))
                    ],
                    s.pid,
                    warmup=warmup,
                    seconds=seconds,
                )
                rows.append(
                    load_row(
                        f"get_token, {conns} conns x {MAX_IN_FLIGHT} in flight "
                        f"({processes} raw client process{'es' if processes > 1 else ''})",
                        many,
                        "",
                    )
                )
            twisted = measure(
                [["bench._wire_twisted_client", s.socket, "--depth", str(MAX_IN_FLIGHT)]],
                s.pid,
                warmup=warmup,
                seconds=seconds,
            )
            rows.append(
                load_row(
                    f"get_token, 1 conn x {MAX_IN_FLIGHT} in flight (ProxySocketClient)",
                    twisted,
                    "reference",
                )
            )
            rss_after = rss_kib(s.pid)
        rows.append(
            (
                "server RSS before → after load (MiB)",
                f"{rss_before / 1024:.1f} → {rss_after / 1024:.1f}",
                "",
                "",
                "",
            )
        )

        with server(directory, "quiet", audit_log=False) as s:
            quiet = measure([raw(s.socket, 1, "q")], s.pid, warmup=warmup, seconds=seconds)
            rows.append(
                load_row(
                    f"get_token, 1 conn x {MAX_IN_FLIGHT} in flight, audit trail discarded",
                    quiet,
                    "",
                )
            )

        with server(directory, "json", audit_json=True) as s:
            to_json = measure([raw(s.socket, 1, "j")], s.pid, warmup=warmup, seconds=seconds)
            rows.append(
                load_row(
                    f"get_token, 1 conn x {MAX_IN_FLIGHT} in flight, audit trail to a "
                    "JSON-lines file (--audit-log)",
                    to_json,
                    "",
                )
            )

        count = 100_000 if quick else 300_000
        stream, frame_len = request_stream(count)
        chunk = MAX_FRAMES_PER_READ * frame_len
        pieces = chunks(stream, chunk)
        budget = 1.0 if quick else 3.0
        rows.append(
            decode_row(
                f"server decode+answer, {frame_len}-byte get_token frames, {chunk:,}-byte reads",
                server_rate(pieces, frame_len, budget, TOKEN),
                "",
            )
        )
        to_file.on = False
        rows.append(
            decode_row(
                "  the same, audit trail discarded",
                server_rate(pieces, frame_len, budget, TOKEN),
                "",
            )
        )
        to_file.on = True
        rows.append(
            decode_row(
                "  framing + JSON decode only (Int32StringReceiver + decode_json_object)",
                framing_rate(pieces, frame_len, budget),
                "≥ 50 (decoding)",
            )
        )
        audit.close()

    header: Row = ("metric", "result", "server CPU", "load CPU", "target")
    widths = [max(len(row[i]) for row in [*rows, header]) for i in range(len(header))]
    print(
        f"credproxy wire benchmark ({os.cpu_count()} cores, Python {sys.version.split()[0]}, "
        f"{'quick' if quick else 'full'}: {warmup:g} s warm-up + {seconds:g} s measured per load)"
    )
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    print("CPU = share of one core over the measured window (100% = one core busy).")


if __name__ == "__main__":
    main()
