"""
The official Twisted client (L{ProxySocketClient}) as a load generator, for
reference: one connection, C{depth} C{get_token} calls outstanding, a new
call issued as each one's Deferred fires. Same stdio conversation with the
parent as L{bench._wire_load}.

    python -m bench._wire_twisted_client SOCKET_PATH [--depth 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import reactor  # noqa: E402
from twisted.internet.defer import Deferred, ensureDeferred  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402

from credproxy.wire import ProxySocketClient  # noqa: E402

PAYLOAD = {"provider": "anthropic"}


class Load:
    def __init__(self, client: ProxySocketClient, measure_from: float, until: float) -> None:
        self.client = client
        self.measure_from = measure_from
        self.until = until
        self.outstanding = 0
        self.in_window = 0
        self.before = 0
        self.error: str | None = None
        self.done: Deferred[None] = Deferred()

    def issue(self) -> None:
        self.outstanding += 1
        self.client.request("get_token", PAYLOAD).addCallbacks(self.answered, self.failed)

    def answered(self, data: dict[str, Any]) -> None:
        self.outstanding -= 1
        now = time.monotonic()
        if now >= self.measure_from:
            self.in_window += 1
        else:
            self.before += 1
        if now < self.until and self.error is None:
            self.issue()
        elif not self.outstanding and not self.done.called:
            self.done.callback(None)

    def failed(self, reason: Failure) -> None:
        self.outstanding -= 1
        self.error = self.error or repr(reason.value)
        if not self.outstanding and not self.done.called:
            self.done.callback(None)


async def run(path: str, depth: int) -> None:
    client = ProxySocketClient(reactor, path)
    try:
        data = await client.request("get_token", PAYLOAD)  # connect and handshake
        if not isinstance(data.get("access_token"), str) or "refresh_token" in data:
            raise RuntimeError(f"unexpected token fields {sorted(data)}")
        print("ready", flush=True)
        # Blocking read: nothing else is happening on this reactor yet.
        measure_from, until = (float(x) for x in sys.stdin.readline().split())
        load = Load(client, measure_from, until)
        for _ in range(depth):
            load.issue()
        await load.done
        result: dict[str, Any] = {
            "answers": load.in_window,
            "warmup_answers": load.before,
            "seconds": until - measure_from,
        }
        if load.error is not None:
            result["error"] = load.error
        print(json.dumps(result), flush=True)
    finally:
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("socket")
    parser.add_argument("--depth", type=int, default=16)
    args = parser.parse_args()
    outcome: list[object] = []

    def finished(result: object) -> None:
        outcome.append(result)
        if reactor.running:
            reactor.stop()

    reactor.callWhenRunning(lambda: ensureDeferred(run(args.socket, args.depth)).addBoth(finished))
    reactor.run()
    if outcome and isinstance(outcome[0], Failure):
        print(json.dumps({"error": outcome[0].getErrorMessage()}), flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
