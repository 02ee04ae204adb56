"""
The request body's limits. twisted.web has none (twisted#4898) and spools
large bodies to a temporary file; this request class keeps bodies in memory
as the chunks they arrived in, refuses one over the size limit before
reading it (by Content-Length) or as soon as the count passes the limit
(chunked), and holds every byte against the face's body budget.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.python.failure import Failure
from twisted.web.server import Request

from credproxy.http._body import BodyBudget, RequestBody
from credproxy.http._errors import ErrorKind
from credproxy.http._head import HeadRefusal, RequestHead

if TYPE_CHECKING:
    from credproxy.http._channel import FaceGuard, ProxyChannel

OVER_BUDGET = HeadRefusal(
    ErrorKind.OVERLOADED,
    "credproxy is holding as many request bodies as it may; retry shortly.",
    "body_budget_full",
)


class BoundedRequest(Request):
    """
    A request of a L{ProxyChannel}: its body may not exceed C{max_body}, and
    all bodies together may not exceed the face's budget.
    """

    head: RequestHead | None = None  # as the channel's gate judged and admitted it
    _refused = False
    _received = 0
    _reserved = 0
    _budget: BodyBudget | None = None
    _body: RequestBody

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Bodies are forwarded untouched. Parsing form uploads out of them
        # would cost twisted.web an email-header parse of the content type on
        # every POST, and memory for every multipart body.
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(*args, **kwargs)

    def _proxy_channel(self) -> ProxyChannel:
        channel: ProxyChannel = self.channel  # type: ignore[assignment]
        return channel

    def _guard(self) -> FaceGuard:
        return self._proxy_channel().guard

    def gotLength(self, length: int | None) -> None:
        self._body = self.content = RequestBody()
        self.head = self._proxy_channel().admitted
        guard = self._guard()
        if length is not None and length > guard.config.max_body:
            self._refuse(self._too_large(guard.config.max_body))
        elif length and not self._hold(length):
            self._refuse(OVER_BUDGET)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        size = len(data)
        self._received += size
        guard = self._guard()
        if self._received > guard.config.max_body:
            self._refuse(self._too_large(guard.config.max_body))
            return
        if self._received > self._reserved and not self._hold(self._received - self._reserved):
            self._refuse(OVER_BUDGET)
            return
        self._body.write(data)

    def _hold(self, size: int) -> bool:
        """
        Reserve C{size} more bytes of the budget, given back when this
        request is done, however it ends.
        """
        budget = self._guard().budget
        if not budget.reserve(size):
            return False
        self._reserved += size
        # Kept here: twisted.web forgets the channel before it tells a
        # request that its connection was lost.
        self._budget = budget
        return True

    def _give_back(self) -> None:
        budget = self._budget
        if budget is not None:
            reserved, self._reserved = self._reserved, 0
            budget.release(reserved)

    def write(self, data: bytes) -> None:
        # The channel holds the answer's head to send it with the body's
        # first bytes; whatever this write was, the head is out after it.
        super().write(data)
        self._proxy_channel().flush_head()

    # The two ways a request ends: its answer is done, or its connection is gone.

    def finish(self) -> None:
        super().finish()
        self._give_back()

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self._give_back()

    @staticmethod
    def _too_large(limit: int) -> HeadRefusal:
        return HeadRefusal(
            ErrorKind.REQUEST_TOO_LARGE,
            f"Request body exceeds the proxy's limit of {limit} bytes.",
            "body_too_large",
        )

    def drop_body(self) -> None:
        """
        Give this request up before its body is whole (refused, or too
        slow): nothing of the body is kept, and its budget goes back now.
        """
        self._refused = True
        self._body = self.content = RequestBody()
        self._give_back()

    def _refuse(self, refusal: HeadRefusal) -> None:
        self.drop_body()
        # Otherwise twisted.web would invite the body with 100 Continue.
        self.requestHeaders.removeHeader(b"expect")
        head = self.head
        self._proxy_channel().refuse(
            refusal,
            method=head.method if head is not None else b"-",
            path=head.path if head is not None else b"-",
        )

    def process(self) -> None:
        if not self._refused:
            super().process()
