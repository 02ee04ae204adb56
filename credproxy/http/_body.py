"""
Request bodies in memory, once: the chunks as they arrived, never joined or
spooled to disk (prompts are sensitive), and the budget all bodies in flight
share.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

# Pieces smaller than this are gathered into one chunk of at least this
# size: each stored chunk costs a bytes object (33 bytes) and one upstream
# write, so a body sent as one-byte chunks must not cost 34 times its size
# (the budget counts only the body's own bytes).
MERGE_BELOW: Final = 16 * 1024


class RequestBody:
    """
    A request's body as the chunks it arrived in (small pieces gathered),
    standing in for the file twisted.web keeps in C{request.content} (which
    it may close while the body is still needed for a replay: closing here
    forgets nothing).
    """

    __slots__ = ("_chunks", "_small", "length")

    def __init__(self, chunks: Sequence[bytes] = ()) -> None:
        self._chunks: list[bytes] = list(chunks)
        self._small = bytearray()  # pieces not yet gathered into a chunk
        self.length = sum(len(chunk) for chunk in self._chunks)

    def write(self, data: bytes) -> None:
        self.length += len(data)
        if len(data) >= MERGE_BELOW and not self._small:
            self._chunks.append(data)  # the usual case: a whole read, kept as it is
            return
        self._small += data
        if len(self._small) >= MERGE_BELOW:
            self._gather()

    def _gather(self) -> None:
        if self._small:
            self._chunks.append(bytes(self._small))
            self._small = bytearray()

    @property
    def chunks(self) -> list[bytes]:
        """
        The body's chunks, in order; once read, the body is taken as whole.
        """
        self._gather()
        return self._chunks

    def tell(self) -> int:
        return self.length

    def seek(self, offset: int, whence: int = 0) -> int:
        """
        twisted.web rewinds the body before rendering; chunks need no rewinding.
        """
        return 0

    def close(self) -> None:
        """
        Kept until the last reference goes: an exchange may still replay it.
        """

    def prefix(self, size: int) -> bytes:
        """
        At least the first C{size} bytes (or all of a shorter body), copying
        only when they span several chunks.
        """
        chunks = self.chunks
        if not chunks:
            return b""
        if len(chunks) == 1 or len(chunks[0]) >= size:
            return chunks[0]
        taken: list[bytes] = []
        count = 0
        for chunk in chunks:
            taken.append(chunk)
            count += len(chunk)
            if count >= size:
                break
        return b"".join(taken)

    def getvalue(self) -> bytes:
        """
        The whole body as one bytes object (a copy): for tests and callers
        that need it joined.
        """
        return b"".join(self.chunks)


def body_of(content: object) -> RequestBody:
    """
    The body a request holds: its own chunks under L{ProxySite}; read from
    the file twisted.web keeps when the resource is served by another site;
    an empty one when it has none (twisted.web deletes C{content} once a
    request is finished).
    """
    if isinstance(content, RequestBody):
        return content
    read = getattr(content, "read", None)
    if read is None:
        return RequestBody()
    content.seek(0)  # type: ignore[attr-defined]
    data = read()
    return RequestBody([data] if data else [])


@implementer(IBodyProducer)
class BodyProducer:
    """
    A request body for the upstream hop, written chunk by chunk without
    joining them; the same body can be produced again for a replay.
    """

    def __init__(self, body: RequestBody) -> None:
        self._body = body
        self.length = body.length

    @property
    def chunks(self) -> list[bytes]:
        return self._body.chunks

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        for chunk in self._body.chunks:
            consumer.write(chunk)
        return succeed(None)

    def pauseProducing(self) -> None:
        """The whole body is written at once; nothing to pause."""

    def resumeProducing(self) -> None:
        """The whole body is written at once; nothing to resume."""

    def stopProducing(self) -> None:
        """The whole body is written at once; nothing to stop."""


class BodyBudget:
    """
    The bytes all bodies in flight may hold together. A request reserves
    what it will hold before holding it and gives it back when its answer is
    done; a reservation that does not fit is refused whole.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the body budget must be at least 1 byte")
        self.limit = limit
        self.reserved = 0

    def reserve(self, size: int) -> bool:
        if self.reserved + size > self.limit:
            return False
        self.reserved += size
        return True

    def release(self, size: int) -> None:
        self.reserved = max(0, self.reserved - size)
