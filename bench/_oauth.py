"""
A token endpoint for the broker benchmark: L{FakeOAuthServer} (the test
suite's real OAuth server) on loopback, in its own process so it shares no
core with the proxy, with two control paths for the benchmark:

    POST /_bench/issue?expires_in=S   a stored login: a token (JSON, absolute
                                       C{expiry}) whose refresh token is live here
    GET  /_bench/stats                 token-endpoint calls per path, grants per
                                       type, and every access token issued
    GET  /_bench/config                a --config file (TOML) pointing the
                                       anthropic provider here

    python -m bench._oauth

Prints its port once listening; everything else is the fake's own paths
(C{/v1/oauth/token} for the anthropic provider's refreshes).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from credproxy.testing import FakeOAuthServer

CONTROL = b"/_bench/"


class Control(Resource):
    """
    The fake's own resource, with the benchmark's control paths in front.
    """

    isLeaf = True

    def __init__(self, server: FakeOAuthServer) -> None:
        super().__init__()
        self.fake = server
        self.inner = server.resource()

    def render(self, request: Request) -> Any:
        if not request.path.startswith(CONTROL):
            return self.inner.render(request)
        request.setHeader(b"content-type", b"application/json")
        what = request.path[len(CONTROL) :]
        if what == b"issue" and request.method == b"POST":
            expires_in = float(request.args.get(b"expires_in", [b"3600"])[0])
            return json.dumps(self.fake.issue_token(expires_in=expires_in).to_json()).encode()
        if what == b"config":
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return self.fake.oauth_toml().encode()
        if what == b"stats":
            return json.dumps(
                {
                    "calls": dict(self.fake.calls),
                    "grants": dict(self.fake.grants),
                    "access_tokens": self.fake.access_tokens,
                }
            ).encode()
        request.setResponseCode(404)
        return b"{}"


def main() -> None:
    server = FakeOAuthServer(reactor)
    site = Site(Control(server))
    site.log = lambda request: None  # type: ignore[method-assign]
    port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[arg-type]
    number: int = port.getHost().port  # type: ignore[attr-defined]
    server.base_url = f"http://127.0.0.1:{number}"
    print(number, flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
