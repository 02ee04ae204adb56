"""
A fleet host for tests/integration/test_fleet_refresh.py: a RefreshCoordinator
with the Redis token store and the fleet's Redis refresh lock (its expiry
short, so a killed holder frees it soon), refreshing through the real
Anthropic provider against the test's token endpoint.

    python -m tests.integration.redis_refresh_worker URL PREFIX KEY_FILE CONFIG_JSON LOCK_TTL \
        [LOCK_PREFIX]

With LOCK_PREFIX its refresh lock lives under another prefix than the
store, so it does not exclude the other hosts (as a lock lost in a Redis
failover). It takes the commands of refresh_worker.py on stdin and answers
as it does.
"""

from __future__ import annotations

import json
import sys

from twisted.internet import reactor, stdio
from twisted.logger import globalLogBeginner, textFileLogObserver

from credproxy.broker import RedisRefreshLock
from credproxy.broker._locks import EntryLocks
from credproxy.broker._refresh import RefreshCoordinator
from credproxy.oauth import AnthropicPKCEProvider, PKCEProviderConfig, default_oauth_agent
from credproxy.stores import BlockingCalls, RedisConnection, RedisTokenStore
from credproxy.stores._crypto import ValueCipher, read_store_key_file
from credproxy.stores._redis_target import parse_redis_url
from tests.integration.refresh_worker import Commands


def main(
    url: str, prefix: str, key_file: str, provider_config: str, ttl: str, *lock_prefix: str
) -> None:
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    fields = json.loads(provider_config)
    config = PKCEProviderConfig(**{**fields, "scopes": tuple(fields["scopes"])})
    calls = BlockingCalls(reactor)
    calls.startService()
    connection = RedisConnection(reactor, calls, parse_redis_url(url), prefix=prefix)
    connection.startService()
    store = RedisTokenStore(connection, ValueCipher(read_store_key_file(key_file)))
    locks = connection
    if lock_prefix:
        locks = RedisConnection(reactor, calls, parse_redis_url(url), prefix=lock_prefix[0])
    provider = AnthropicPKCEProvider(config, reactor, default_oauth_agent(reactor))
    coordinator = RefreshCoordinator(
        reactor,
        store,
        {config.name: provider},
        RedisRefreshLock(reactor, locks, ttl=float(ttl)),
        EntryLocks(),
        lambda provider, bucket, token: None,
    )
    stdio.StandardIO(Commands(coordinator, calls, config.name))
    reactor.run()


if __name__ == "__main__":
    main(*sys.argv[1:])
