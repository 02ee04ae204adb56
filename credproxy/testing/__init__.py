"""
Test doubles for credproxy's users and its own tests, as C{treq.testing} is
for treq: real servers on loopback and in-memory stand-ins for the edges
(threads, token endpoints, the upstream API), never for the thing under test.
"""

from credproxy.testing._http import (
    AgentConnection,
    AgentTransport,
    FaceHarness,
    RawResponse,
    ScriptedResponse,
    ScriptedUpstream,
    UpstreamRequest,
    parse_responses,
)
from credproxy.testing._oauth_server import FakeOAuthServer, ReceivedRequest
from credproxy.testing._threads import InlineBlockingCalls

__all__: list[str] = [
    "AgentConnection",
    "AgentTransport",
    "FaceHarness",
    "FakeOAuthServer",
    "InlineBlockingCalls",
    "RawResponse",
    "ReceivedRequest",
    "ScriptedResponse",
    "ScriptedUpstream",
    "UpstreamRequest",
    "parse_responses",
]
