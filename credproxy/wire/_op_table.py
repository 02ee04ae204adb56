"""
The registered operations besides cancel, which the connection itself
answers. A plain dict keyed by name: nothing else (no attribute, no
prototype) can be reached by naming it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from credproxy.wire import _login_ops, _ops
from credproxy.wire._ops import Handler
from credproxy.wire._spec import Op

OPERATIONS: Final[Mapping[str, Handler]] = {
    Op.GET_TOKEN: _ops.get_token,
    Op.SAVE_TOKEN: _ops.save_token,
    Op.REMOVE_TOKEN: _ops.remove_token,
    Op.LIST_PROVIDERS: _ops.list_providers,
    Op.LIST_BUCKETS: _ops.list_buckets,
    Op.GET_BUCKET_STATS: _ops.get_bucket_stats,
    Op.GET_API_KEY: _ops.get_api_key,
    Op.LIST_API_KEYS: _ops.list_api_keys,
    Op.HAS_API_KEY: _ops.has_api_key,
    Op.REFRESH_TOKEN: _ops.refresh_token,
    Op.OAUTH_INITIATE: _login_ops.oauth_initiate,
    Op.OAUTH_EXCHANGE: _login_ops.oauth_exchange,
    Op.OAUTH_POLL: _login_ops.oauth_poll,
    Op.OAUTH_CANCEL: _login_ops.oauth_cancel,
}
