"""
The suite-wide secret check finds a minted secret in a log event, and only then.
"""

from __future__ import annotations

from typing import cast

from twisted.logger import ILogObserver, Logger, LogPublisher

from credproxy._secret import Secret
from tests.leakcheck import LeakCheck

# A publisher of the tests' own, so the deliberate leaks below never reach
# the suite-wide check.
publisher = LogPublisher()
log = Logger(observer=cast(ILogObserver, publisher))


def test_a_logged_secret_value_is_found() -> None:
    check = LeakCheck(publisher)
    check.install()
    try:
        secret = Secret("minted-secret-0123456789abcdef")
        log.info("harmless {thing}", thing=secret)  # the Secret hides itself
        assert check.leaks() == []
        log.info("careless {thing}", thing=secret.reveal())
    finally:
        check.uninstall()
    leaks = check.leaks()
    assert [found for found, _ in leaks] == ["minted-secret-0123456789abcdef"]


def test_secrets_from_other_sources_and_short_values() -> None:
    check = LeakCheck(publisher)
    check.add_source(lambda: ["server-minted-token-abcdef012345", "short"])
    check.install()
    try:
        log.info("{a} {b}", a="server-minted-token-abcdef012345", b="short")
    finally:
        check.uninstall()
    assert [found for found, _ in check.leaks()] == ["server-minted-token-abcdef012345"]


def test_what_a_fake_oauth_server_mints_is_searched_for() -> None:
    from twisted.internet.task import Clock

    from credproxy.testing import FakeOAuthServer

    check = LeakCheck(publisher)
    check.install()
    try:
        server = FakeOAuthServer(Clock())
        token = server.issue_token()
        log.info("careless {value}", value=token["access_token"])
    finally:
        check.uninstall()
    assert [found for found, _ in check.leaks()] == [token["access_token"]]
