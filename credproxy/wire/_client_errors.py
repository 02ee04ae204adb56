"""
What a credential-socket client raises. Every message is either fixed here or
the server's own C{error} text (which the server keeps free of secrets), so no
exception can carry a token, key or capability token.
"""

from __future__ import annotations

from credproxy.wire._spec import Message


class ProxyClientError(Exception):
    """
    Anything a credential-socket client raises on purpose.
    """


class ProxyRequestError(ProxyClientError):
    """
    The server answered C{ok:false} (or rejected the handshake).

    @ivar code: the answer's C{code}, e.g. C{"NOT_FOUND"}.
    @ivar message: the answer's C{error} text; also C{str()} of the exception.
    @ivar retry_after: seconds from C{retryAfter} (refresh C{RATE_LIMITED}), else None.
    """

    def __init__(self, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.retry_after = retry_after

    def __str__(self) -> str:
        return self.message


class ProxyConnectionLost(ProxyClientError):
    """
    The connection went away (or could not be made) while a request was pending.
    The text is the one llxprt-code shows its user; the next call reconnects.
    """

    def __init__(self) -> None:
        super().__init__(Message.CONNECTION_LOST)


class ProxyTimeoutError(ProxyClientError, TimeoutError):
    """
    No answer within the request's timeout; a C{cancel} was sent for it.
    """

    def __init__(self, seconds: float) -> None:
        super().__init__(f"Credential proxy request timed out after {seconds:g} s")
        self.seconds = seconds


class ProxyClientClosed(ProxyClientError):
    """
    The request was pending when its client was closed by its owner.
    """

    def __init__(self) -> None:
        super().__init__("Credential proxy client closed")


class FrameTooLargeError(ProxyClientError):
    """
    The request would exceed the negotiated frame limit, so it was not sent
    (the server would drop the whole connection for it).
    """

    def __init__(self) -> None:
        super().__init__(Message.FRAME_TOO_LARGE)


class ProtocolViolation(ProxyClientError):
    """
    The server sent something the protocol forbids: an oversized or invalid
    frame, or an answer of the wrong shape. Clients drop the connection on it.
    """
