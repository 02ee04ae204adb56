"""
The request body limit. twisted.web has none (twisted#4898) and spools large
bodies to a temporary file; this request class refuses an oversized body before
reading it (by Content-Length) or as soon as the count passes the limit
(chunked), and keeps accepted bodies in memory.
"""

from __future__ import annotations

from io import BytesIO
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IHalfCloseableDescriptor
from twisted.logger import Logger
from twisted.web.server import Request

from credproxy.http._errors import ErrorKind, raw_error_response
from credproxy.http._exchange import agent_transport

if TYPE_CHECKING:
    from credproxy.http._site import ProxySite

log = Logger(namespace="credproxy.http")

# After answering 413 we stop sending and read (and drop) what the agent still
# sends, so it sees our answer rather than a reset; this bounds how long.
REFUSED_BODY_DRAIN_SECONDS = 5.0


class BoundedRequest(Request):
    """
    A request whose body may not exceed the site's C{max_body}.
    """

    _refused = False
    _received = 0
    _body: BytesIO

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Bodies are forwarded untouched. Parsing form uploads out of them
        # would cost twisted.web an email-header parse of the content type on
        # every POST, and memory for every multipart body.
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(*args, **kwargs)

    def _site(self) -> ProxySite:
        site: ProxySite = self.channel.site  # type: ignore[attr-defined]
        return site

    def gotLength(self, length: int | None) -> None:
        self._body = self.content = BytesIO()
        if length is not None and length > self._site().max_body:
            # Otherwise twisted.web would invite the body with 100 Continue.
            self.requestHeaders.removeHeader(b"expect")
            self._refuse_too_large()

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._site().max_body:
            self._refuse_too_large()
            return
        self._body.write(data)

    def _refuse_too_large(self) -> None:
        self._refused = True
        self._body = self.content = BytesIO()
        site = self._site()
        # The request line is not parsed onto the request yet, so only the limit is named.
        log.info("413: request body over {limit} bytes refused", limit=site.max_body)
        transport = agent_transport(self)
        transport.write(
            raw_error_response(
                ErrorKind.REQUEST_TOO_LARGE,
                f"Request body exceeds the proxy's limit of {site.max_body} bytes.",
            )
        )
        half_closeable = IHalfCloseableDescriptor.providedBy(transport)
        if half_closeable:
            transport.loseWriteConnection()
            timer = site.reactor.callLater(REFUSED_BODY_DRAIN_SECONDS, transport.abortConnection)
            self.notifyFinish().addBoth(lambda _: timer.cancel() if timer.active() else None)
        else:
            transport.loseConnection()

    def process(self) -> None:
        if not self._refused:
            super().process()
