"""
The suite-wide secret check: every log event of the whole run is rendered
as an observer would write it, every secret the run minted is remembered,
and at the end no secret may appear in any event.

Secrets are learnt from two places: every L{Secret} constructed in this
process (capability tokens, keys, refresh tokens, PKCE verifiers and state,
device codes, session ids all travel as one), and everything every
L{FakeOAuthServer} of the run minted (access and refresh tokens, codes,
device codes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

from twisted.logger import ILogObserver, LogEvent, LogPublisher, formatEvent, globalLogPublisher

from credproxy._secret import Secret
from credproxy.testing import FakeOAuthServer

# Shorter values are not distinctive enough to search for: a test's "x" or
# "s" is no minted secret, and would match innocent text.
MIN_SECRET_LENGTH = 16
# One event's rendering is cut here, so a flood of large events stays bounded.
MAX_EVENT_TEXT = 64 * 1024


class LeakCheck:
    """
    Collects rendered log events and secrets between L{install} and L{uninstall}.
    """

    def __init__(self, publisher: LogPublisher = globalLogPublisher) -> None:
        self._publisher = publisher
        self.events: list[str] = []
        self.secrets: set[str] = set()
        self.sources: list[Callable[[], Iterable[str]]] = []
        self._original_init: Any = None
        self._original_server_init: Any = None

    def _observe(self, event: LogEvent) -> None:
        try:
            text = f"{formatEvent(event)} {event!r}"
        except Exception:  # a test's odd event must not break the run
            text = repr(event)
        self.events.append(text[:MAX_EVENT_TEXT])

    def install(self) -> None:
        self._publisher.addObserver(cast(ILogObserver, self._observe))
        original = Secret.__init__
        self._original_init = original
        secrets = self.secrets

        def remembering_init(secret: Secret, value: str) -> None:
            original(secret, value)
            if len(value) >= MIN_SECRET_LENGTH:
                secrets.add(value)

        Secret.__init__ = remembering_init  # type: ignore[method-assign,assignment]

        server_init = FakeOAuthServer.__init__
        self._original_server_init = server_init
        add_source = self.add_source

        def registering_init(server: FakeOAuthServer, *args: Any, **kwargs: Any) -> None:
            server_init(server, *args, **kwargs)
            add_source(lambda: set(server.minted))

        FakeOAuthServer.__init__ = registering_init  # type: ignore[method-assign,assignment]

    def uninstall(self) -> None:
        self._publisher.removeObserver(cast(ILogObserver, self._observe))
        if self._original_init is not None:
            Secret.__init__ = self._original_init  # type: ignore[method-assign]
        if self._original_server_init is not None:
            FakeOAuthServer.__init__ = self._original_server_init  # type: ignore[method-assign]

    def add_source(self, source: Callable[[], Iterable[str]]) -> None:
        """
        Another place secrets were minted (read at the end of the run).
        """
        self.sources.append(source)

    def leaks(self) -> list[tuple[str, str]]:
        """
        (secret, the event it appeared in) for every secret found in a log event.
        """
        secrets = set(self.secrets)
        for source in self.sources:
            secrets.update(s for s in source() if len(s) >= MIN_SECRET_LENGTH)
        found: list[tuple[str, str]] = []
        for text in self.events:
            for secret in secrets:
                if secret in text:
                    found.append((secret, text))
        return found


LEAK_CHECK = LeakCheck()
