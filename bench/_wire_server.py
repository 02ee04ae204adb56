"""
The credential socket for the wire benchmark, run as its own process so it
has a core to itself: L{RPCFace} over a L{MemoryTokenStore} holding one
token (provider C{anthropic}) and an empty L{MemoryProviderKeyStore}, no
capability token, on a Unix socket, under the epoll reactor.

    python -m bench._wire_server SOCKET_PATH [--log FILE | --no-log] [--audit-json FILE]
                                 [--store file --state-dir DIR]
                                 [--store redis://... --store-key-file F --redis-prefix P]

With C{--store file} the tokens are the file store's (C{DIR/tokens.json},
read through the store's thread pool once and then from its cache) instead
of memory; the file must already hold the token (L{seed_file_store}). With a
Redis URL they are the Redis store's (read through the thread pool when the
cache is cold, announcements subscribed to); Redis must already hold it.

The audit trail goes to FILE as text lines, as under C{twistd --logfile}
(the cost of an audit line per op is part of what is measured), or nowhere
with C{--no-log}, or with C{--audit-json} to a JSON-lines file as
credproxy's C{--audit-log} writes it; warnings and errors also go to stderr. Prints C{ready}
once listening; SIGTERM stops it cleanly.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import IO

from twisted.logger import (
    ILogObserver,
    LogEvent,
    LogLevel,
    globalLogBeginner,
    textFileLogObserver,
)
from zope.interface import implementer

from credproxy import FileAuditTrail
from credproxy._listen import unix_description
from credproxy.broker import Broker
from credproxy.stores import (
    BlockingCalls,
    IHostTokenStore,
    IProviderKeyStore,
    MemoryProviderKeyStore,
    MemoryTokenStore,
    RedisStoreConfig,
    Token,
    is_redis_url,
    open_host_stores,
)
from credproxy.testing import InlineBlockingCalls
from credproxy.wire import RPCFace

PROVIDER = "anthropic"
TOKEN = Token(
    {
        "access_token": "bench-access-token-0123456789abcdef",
        "refresh_token": "sk-ant-ort01-bench-refresh-token-0123456789abcdef",
        "expiry": int(time.time()) + 3600,
        "token_type": "Bearer",
        "scope": "user:inference",
    }
)


@implementer(ILogObserver)
class ErrorsOnly:
    """
    Passes on warnings and worse, as cheaply as a filter can (the audit
    trail is info, so nearly every event is dropped here).
    """

    SHOWN = frozenset({LogLevel.warn, LogLevel.error, LogLevel.critical})

    def __init__(self, observer: ILogObserver) -> None:
        self.observer = observer

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_level") in self.SHOWN:
            self.observer(event)


def seed_file_store(state_dir: str) -> None:
    """
    Write L{TOKEN} to C{state_dir}/tokens.json in the file store's own format.
    """
    stores = open_host_stores("file", state_dir, InlineBlockingCalls())
    stores.tokens.save_token(PROVIDER, TOKEN)


def main() -> None:
    from twisted.internet import epollreactor

    epollreactor.install()  # what the default reactor is on Linux, made certain
    from twisted.internet import reactor

    parser = argparse.ArgumentParser()
    parser.add_argument("socket")
    parser.add_argument("--log", help="audit log file (text lines, as twistd writes)")
    parser.add_argument("--no-log", action="store_true", help="discard the audit trail")
    parser.add_argument("--audit-json", help="audit records to this file as JSON lines instead")
    parser.add_argument("--store", default="memory", help="memory, file or a Redis URL")
    parser.add_argument("--state-dir", help="the file store's directory (with --store file)")
    parser.add_argument("--store-key-file", help="with a Redis store")
    parser.add_argument("--redis-prefix", default="credproxy:", help="with a Redis store")
    args = parser.parse_args()
    # Warnings and errors also go to stderr, so the benchmark can show a failure.
    observers: list[ILogObserver] = [ErrorsOnly(textFileLogObserver(sys.stderr))]
    if not args.no_log:
        log_file: IO[str] = open(args.log or "/dev/null", "a")  # noqa: SIM115 - lives as long as we do
        observers.append(textFileLogObserver(log_file))
    globalLogBeginner.beginLoggingTo(observers, redirectStandardIO=False)

    tokens: IHostTokenStore
    keys: IProviderKeyStore
    if args.store == "file":
        if not args.state_dir:
            parser.error("--store file needs --state-dir")
        calls = BlockingCalls(reactor)
        calls.startService()
        reactor.addSystemEventTrigger("after", "shutdown", calls.stopService)
        stores = open_host_stores("file", args.state_dir, calls)
        tokens, keys = stores.tokens, stores.keys
    elif is_redis_url(args.store):
        calls = BlockingCalls(reactor)
        calls.startService()
        reactor.addSystemEventTrigger("after", "shutdown", calls.stopService)
        config = RedisStoreConfig(key_file=args.store_key_file, prefix=args.redis_prefix)
        stores = open_host_stores(args.store, "/nonexistent", calls, reactor=reactor, redis=config)
        assert stores.redis is not None
        stores.redis.startService()
        tokens, keys = stores.tokens, stores.keys
    elif args.store != "memory":
        parser.error("--store is memory, file or a Redis URL")
    else:
        tokens, keys = MemoryTokenStore(), MemoryProviderKeyStore()
        tokens.save_token(PROVIDER, TOKEN)
    trail = FileAuditTrail(reactor, args.audit_json) if args.audit_json else None
    face = RPCFace(
        reactor,
        [unix_description(args.socket) + ":backlog=1024"],
        Broker(reactor, tokens, keys),
        audit_trail=trail,
    )
    if trail is not None:
        reactor.addSystemEventTrigger("after", "shutdown", trail.stopService)
    face.startService()
    reactor.addSystemEventTrigger("before", "shutdown", face.stopService)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    main()
