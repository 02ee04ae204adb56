"""
Test doubles for credproxy's users and its own tests, as C{treq.testing} is
for treq: real servers on loopback and in-memory stand-ins for the edges
(threads, token endpoints), never for the thing under test.
"""

from credproxy.testing._oauth_server import FakeOAuthServer, ReceivedRequest
from credproxy.testing._threads import InlineBlockingCalls

__all__: list[str] = ["FakeOAuthServer", "InlineBlockingCalls", "ReceivedRequest"]
