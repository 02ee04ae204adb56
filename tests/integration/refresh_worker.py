"""
A credproxy process for tests/integration/test_refresh_processes.py: a
RefreshCoordinator with a FileRefreshLock and a FileTokenStore on a shared
state directory, refreshing through the real Anthropic provider against the
test's FakeOAuthServer.

    python refresh_worker.py STATE_DIR LOCK_DIR PROVIDER_CONFIG_JSON

Commands, one per line on stdin; one JSON answer per line on stdout:

    prime        read the store (so its cache holds what is stored now)
    refresh N    N concurrent refreshes; answers each one's access-token
                 digest or failure reason (never a token)
    quit         stop

Its log goes to stderr, so the test can check that no token reaches it. It
exits when stdin closes, so it never outlives the test.
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any

from twisted.internet import reactor, stdio
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from credproxy.broker._errors import RefreshError
from credproxy.broker._lock_file import FileRefreshLock
from credproxy.broker._locks import EntryLocks
from credproxy.broker._refresh import RefreshCoordinator
from credproxy.oauth import AnthropicPKCEProvider, PKCEProviderConfig, default_oauth_agent
from credproxy.stores import BlockingCalls, FileTokenStore

BUCKET = "default"


def digest(value: str | None) -> str | None:
    return None if value is None else hashlib.sha256(value.encode()).hexdigest()[:16]


class Commands(LineReceiver):
    delimiter = b"\n"

    def __init__(
        self, coordinator: RefreshCoordinator, calls: BlockingCalls, provider: str
    ) -> None:
        self.coordinator = coordinator
        self.calls = calls
        self.provider = provider

    def answer(self, message: dict[str, Any]) -> None:
        self.sendLine(json.dumps(message).encode())

    def lineReceived(self, line: bytes) -> None:
        command, _, argument = line.decode().strip().partition(" ")
        if command == "prime":
            read = self.coordinator.store.get_token(self.provider, BUCKET)
            read.addCallback(lambda token: self.answer({"stored": token is not None}))
        elif command == "refresh":
            self.refresh(int(argument))
        elif command == "quit":
            self.stop()

    def refresh(self, n: int) -> None:
        async def one() -> tuple[str | None, str | None]:
            try:
                token = await self.coordinator.refresh(self.provider, BUCKET)
            except RefreshError as e:
                return None, e.reason.value
            return digest(token.access_token), None

        def report(results: list[tuple[str | None, str | None]]) -> None:
            self.answer(
                {
                    "tokens": [token for token, _ in results if token is not None],
                    "errors": [error for _, error in results if error is not None],
                }
            )

        gatherResults([Deferred.fromCoroutine(one()) for _ in range(n)]).addCallback(report)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.stop()

    def stop(self) -> None:
        self.coordinator.stop()
        self.calls.stopService()
        if reactor.running:
            reactor.stop()


def main(state_dir: str, lock_dir: str, provider_config: str) -> None:
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    fields = json.loads(provider_config)
    config = PKCEProviderConfig(**{**fields, "scopes": tuple(fields["scopes"])})
    calls = BlockingCalls(reactor)
    calls.startService()
    store = FileTokenStore(state_dir, calls)
    provider = AnthropicPKCEProvider(config, reactor, default_oauth_agent(reactor))
    coordinator = RefreshCoordinator(
        reactor,
        store,
        {config.name: provider},
        FileRefreshLock(reactor, lock_dir),
        EntryLocks(),
        lambda provider, bucket, token: None,
    )
    stdio.StandardIO(Commands(coordinator, calls, config.name))
    reactor.run()


if __name__ == "__main__":
    main(*sys.argv[1:4])
