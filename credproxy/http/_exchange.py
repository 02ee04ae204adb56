"""
One forwarded request, from credential lookup to the last byte: a slot among
the upstream requests in flight, the upstream request, the first-byte
timeout, the streaming pump (coalescing what one reactor turn brings into one
write to the agent, with backpressure and an idle timer), a malformed
upstream answer, the agent hanging up at any point, and the one replay with a
replaced credential when the upstream refuses a stored OAuth token.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse
from twisted.web.server import Request
from zope.interface import implementer

from credproxy._audit_trail import IAuditTrail
from credproxy.broker.credentials import (
    STORE_UNAVAILABLE,
    CredentialUnavailable,
    ICredentialSource,
    UpstreamCredential,
)
from credproxy.http._audit import audit
from credproxy.http._body import BodyProducer, body_of
from credproxy.http._config import HTTPProxyConfig
from credproxy.http._errors import ErrorKind, error_body, reason_phrase
from credproxy.http._headers import copy_response_headers, upstream_request_headers
from credproxy.http._upstream import NoUpstreamSlot, UpstreamSlots, malformed_kind
from credproxy.http._usage import UsageParser, parser_for

log = Logger(namespace="credproxy.http")

UNAUTHORIZED = 401
# What an agent refused an upstream slot is told to wait before retrying:
# slots are held by streams that last seconds to minutes.
UPSTREAM_BUSY_RETRY_AFTER: Final = 5
MALFORMED_ANSWER: Final = "The upstream API sent a malformed response."


@dataclass(frozen=True)
class ExchangeContext:
    """
    What every exchange needs from the face, built once by the resource and
    handed to each exchange, so that an exchange never reaches into its parent.
    """

    reactor: Any
    config: HTTPProxyConfig
    credentials: ICredentialSource
    agent: IAgent
    upstream_base: bytes
    # The face's cap on upstream requests in flight, shared by its exchanges.
    slots: UpstreamSlots
    # Where each exchange's audit record goes.
    audit_trail: IAuditTrail


def agent_transport(request: Request) -> Any:
    """
    The agent's connection (a TCP or Unix transport: abortable, half-closeable).
    """
    return request.channel.transport


@implementer(IPushProducer)
class _Backpressure:
    """
    Registered on the agent's connection: when the agent stops reading, the
    upstream read is paused (and the idle timer with it, since the silence is
    the agent's, not the upstream's).
    """

    def __init__(self, upstream: IPushProducer, pump: StreamPump) -> None:
        self._upstream = upstream
        self._pump = pump

    def pauseProducing(self) -> None:
        self._pump.paused = True
        self._pump.disarm_idle()
        self._upstream.pauseProducing()

    def resumeProducing(self) -> None:
        self._pump.paused = False
        self._pump.arm_idle()
        self._upstream.resumeProducing()

    def stopProducing(self) -> None:
        self._upstream.stopProducing()


class StreamPump(Protocol):
    """
    Copies the upstream answer's body to the agent, one agent write per
    upstream read: the body decoders deliver each read's data in one call
    (all the chunks of a chunked read together).

    Until the first write, what arrives is held to the start of the next
    reactor turn (or the answer's end), so that a body that breaks within
    the turn it began in can still be answered with an error instead of a
    cut-off; the pieces held meanwhile go out as one write. Once the answer
    has begun, each read is written as it comes: holding it would cost a
    timer per read and gain nothing, since a break can then only cut the
    answer off.
    """

    paused = False

    def __init__(
        self,
        exchange: Exchange,
        parser: UsageParser | None,
        reactor: Any,
        idle_timeout: float,
        length: int | None = None,
    ) -> None:
        self._exchange = exchange
        self._parser = parser
        self._reactor = reactor
        self._idle_timeout = idle_timeout
        self._idle: IDelayedCall | None = None
        # The answer's Content-Length: once that much is held, its end comes
        # in this same read and flushes, so no flush needs scheduling.
        self._length = length
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._flush_call: IDelayedCall | None = None
        self.bytes = 0  # written to the agent
        self.stopped = False

    def connectionMade(self) -> None:
        request = self._exchange.request
        assert self.transport is not None
        request.registerProducer(_Backpressure(self.transport, self), True)  # type: ignore[arg-type]
        self.arm_idle()

    def arm_idle(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.reset(self._idle_timeout)
        elif not self.stopped:
            self._idle = self._reactor.callLater(self._idle_timeout, self._idle_expired)

    def disarm_idle(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None

    def _idle_expired(self) -> None:
        self._idle = None
        log.warn(
            "Upstream stream idle for {seconds} s; closing it",
            seconds=self._idle_timeout,
        )
        self._exchange.outcome = "idle_timeout"
        self.stop()

    def dataReceived(self, data: bytes) -> None:
        if self.bytes and not self._held:
            # The answer has begun: this read goes out now.
            if self._idle is not None:
                self._idle.reset(self._idle_timeout)
            self._write(data)
            return
        self._held.append(data)
        self._held_bytes += len(data)
        if self._flush_call is None:
            # The first bytes of this turn: the idle timer restarts once per
            # turn, not per chunk.
            if self._idle is not None:
                self._idle.reset(self._idle_timeout)
            if self._length is not None and self.bytes + self._held_bytes >= self._length:
                return  # the whole answer: its end follows at once, and flushes
            self._flush_call = self._reactor.callLater(0, self.flush)

    def flush(self) -> None:
        """
        Write what is held to the agent, as one write.
        """
        self._cancel_flush()
        held = self._held
        if not held:
            return
        data = held[0] if len(held) == 1 else b"".join(held)
        self._held = []
        self._held_bytes = 0
        self._write(data)

    def _write(self, data: bytes) -> None:
        if self._parser is not None:
            self._parser.feed(data)
        self.bytes += len(data)
        self._exchange.request.write(data)

    def discard(self) -> None:
        """
        Forget what is held, unwritten (the answer is replaced or cut off).
        """
        self._cancel_flush()
        self._held = []
        self._held_bytes = 0

    def _cancel_flush(self) -> None:
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None

    def usage(self) -> Any:
        return self._parser.finish() if self._parser is not None else None

    def stop(self) -> None:
        """
        Close the upstream connection now (agent gone, idle, or shutdown).
        """
        self.disarm_idle()
        self.discard()
        if not self.stopped and self.transport is not None:
            self.stopped = True
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self.disarm_idle()
        self._cancel_flush()
        self.stopped = True
        self._exchange.stream_ended(reason, self)


class Exchange:
    """
    The life of one forwarded request.

    An upstream slot (L{UpstreamSlots}) is taken just before the first
    upstream request is sent and held until the exchange is done, across a
    replay too; a request that gets none in time is answered 503 and never
    forwarded.

    A stored OAuth token that the upstream refuses with a 401 is replaced and
    the request replayed, once: the decision is made when the answer's
    headers arrive, before anything is written to the agent, so the agent
    sees only the second answer. API keys and environment tokens are never
    replayed, and a second 401 reaches the agent as the upstream sent it.
    """

    def __init__(self, context: ExchangeContext, request: Request, started: float) -> None:
        self._context = context
        self.request = request
        self.started = started
        self.gone = False  # the agent hung up
        self.done = False
        self.outcome = "ok"
        # Read now: twisted.web closes the body file when the agent hangs up,
        # and forgets the channel when the answer is finished. Kept whole for
        # a replay, which sends exactly these bytes again.
        self.body = body_of(request.content)
        self.agent_transport = agent_transport(request)
        self._status = 0
        self._credential: UpstreamCredential | None = None
        self._replayed = False  # a replaced credential was asked for (at most once)
        # The wait for an upstream slot while it lasts; whether one is held.
        self._slot_wait: Deferred[None] | None = None
        self._slot_held = False
        # None whenever no upstream request is under way (before the first,
        # while a slot or a replacement credential is awaited), so that a
        # hang-up then ends the exchange at once.
        self._upstream: Deferred[IResponse] | None = None
        # Deferred.called is already true while it waits on a chained Deferred,
        # so whether the answer's headers are still awaited is kept here.
        self._awaiting_headers = False
        self._first_byte_timer: IDelayedCall | None = None
        self._timed_out = False
        self._pump: StreamPump | None = None
        # The upstream headers copied onto the agent's answer, taken off
        # again if that answer becomes an error before a byte was written.
        self._copied_headers: list[bytes] = []
        self._on_done: list[Callable[[Exchange], object]] = []
        request.notifyFinish().addErrback(self._agent_gone)

    def when_done(self, callback: Callable[[Exchange], object]) -> None:
        self._on_done.append(callback)

    # -- steps ------------------------------------------------------------------

    def start(self) -> None:
        d = self._context.credentials.current_credential()
        d.addCallbacks(self._send, self._credential_failed)
        d.addErrback(self._internal_failure)

    def _send(self, credential: UpstreamCredential | None) -> None:
        if self.gone:
            return
        if credential is None:
            self.answer_error(
                ErrorKind.AUTHENTICATION,
                "credproxy has no credential to forward with: "
                + self._context.credentials.how_to_configure(),
                outcome="no_credential",
            )
            return
        self._credential = credential
        if self._slot_held:  # a replay: the first request's slot serves
            self._forward(credential)
            return
        if self._context.slots.try_acquire():
            self._slot_held = True
            self._forward(credential)
            return
        wait = self._slot_wait = self._context.slots.acquire()
        wait.addCallbacks(self._slot_granted, self._slot_refused, callbackArgs=(credential,))
        wait.addErrback(self._internal_failure)

    def _slot_granted(self, _: None, credential: UpstreamCredential) -> None:
        self._slot_wait = None
        self._slot_held = True
        if self.gone:  # cannot happen (a gone agent's wait is cancelled), but never leak
            self._release_slot()
            return
        self._forward(credential)

    def _slot_refused(self, failure: Failure) -> None:
        self._slot_wait = None
        if failure.check(CancelledError):
            return  # the agent left while waiting; _agent_gone ended the exchange
        failure.trap(NoUpstreamSlot)
        if self.gone:
            return
        self.request.setHeader(b"retry-after", b"%d" % (UPSTREAM_BUSY_RETRY_AFTER,))
        self.answer_error(
            ErrorKind.OVERLOADED,
            "credproxy has as many upstream requests in flight as it may; retry shortly.",
            outcome="upstream_busy",
        )

    def _forward(self, credential: UpstreamCredential) -> None:
        context = self._context
        request = self.request
        headers = upstream_request_headers(request.requestHeaders, credential)
        url = context.upstream_base + request.uri
        self._awaiting_headers = True
        self._upstream = context.agent.request(b"POST", url, headers, BodyProducer(self.body))
        self._first_byte_timer = context.reactor.callLater(
            context.config.first_byte_timeout, self._first_byte_expired
        )
        self._upstream.addCallbacks(self._got_response, self._upstream_failed)
        self._upstream.addErrback(self._internal_failure)
        context.credentials.credential_used(credential)

    def _credential_failed(self, failure: Failure) -> None:
        """
        The source has a credential but cannot give a usable one (its login
        must be renewed on the host, or this refresh failed): the agent
        gets credproxy's own explanation, never the provider's.
        """
        failure.trap(CredentialUnavailable)
        if self.gone:
            return
        error: CredentialUnavailable = failure.value  # type: ignore[assignment]
        if error.retry_after is not None:
            self.request.setHeader(b"retry-after", b"%d" % (math.ceil(error.retry_after),))
        if error.reason == STORE_UNAVAILABLE:  # the host's store is down: 503, retry later
            kind = ErrorKind.OVERLOADED
        else:
            kind = ErrorKind.API if error.transient else ErrorKind.AUTHENTICATION
        self.answer_error(kind, error.message, outcome="credential_unavailable")

    def _first_byte_expired(self) -> None:
        self._first_byte_timer = None
        self._timed_out = True
        if self._upstream is not None:
            self._upstream.cancel()

    def _cancel_first_byte_timer(self) -> None:
        self._awaiting_headers = False
        if self._first_byte_timer is not None and self._first_byte_timer.active():
            self._first_byte_timer.cancel()
        self._first_byte_timer = None

    def _upstream_failed(self, failure: Failure) -> None:
        self._cancel_first_byte_timer()
        if self.gone:
            self._finish_audit()
            return
        if self._timed_out:
            self.answer_error(
                ErrorKind.TIMEOUT,
                "The upstream API sent no response within "
                f"{self._context.config.first_byte_timeout:g} s.",
                outcome="first_byte_timeout",
            )
            return
        kind = malformed_kind(failure)
        if kind is not None:
            self._answer_malformed(kind)
            return
        log.warn("Upstream request failed: {error_type}", error_type=_failure_kind(failure))
        self.answer_error(
            ErrorKind.API, "credproxy could not reach the upstream API.", outcome="unreachable"
        )

    def _answer_malformed(self, kind: str) -> None:
        """
        The upstream was reached and answered something that is not HTTP:
        the agent gets a 502 of credproxy's own, the log the defect's name.
        """
        log.warn("Upstream sent a malformed response: {defect}", defect=kind)
        self.answer_error(ErrorKind.API, MALFORMED_ANSWER, outcome="upstream_malformed")

    def _got_response(self, response: IResponse) -> None:
        self._cancel_first_byte_timer()
        if self.gone:
            response.deliverBody(_Discard())
            self._finish_audit()
            return
        if self._replay_wanted(response):
            self._replay(response)
            return
        parser = parser_for((response.headers.getRawHeaders(b"content-type") or [None])[0])
        length = response.length
        self._pump = StreamPump(
            self,
            parser,
            self._context.reactor,
            self._context.config.stream_idle_timeout,
            length if isinstance(length, int) else None,
        )
        request = self.request
        self._status = response.code
        # The standard phrase, whatever the upstream wrote: its phrase is
        # free text the agent has no use for.
        request.setResponseCode(response.code, reason_phrase(response.code))
        self._copied_headers = copy_response_headers(response.headers, request.responseHeaders)
        if response.length is not UNKNOWN_LENGTH:
            request.setHeader(b"content-length", b"%d" % (response.length,))
            self._copied_headers.append(b"content-length")
        response.deliverBody(self._pump)

    # -- the replay -------------------------------------------------------------

    def _replay_wanted(self, response: IResponse) -> bool:
        """
        Whether to answer this response by replaying with a replaced
        credential: a 401 to a replaceable credential, on the first attempt,
        while the agent has been sent nothing (which holds at headers time,
        the only time this is asked; later bytes are never taken back).
        """
        credential = self._credential
        return (
            response.code == UNAUTHORIZED
            and not self._replayed
            and credential is not None
            and credential.replaceable
            and not self.request.startedWriting
        )

    def _replay(self, response: IResponse) -> None:
        self._replayed = True
        # The refusal's body is the provider's text for a token the agent
        # never saw; its connection is closed rather than read.
        response.deliverBody(_Discard())
        self._upstream = None
        rejected = self._credential
        assert rejected is not None
        log.info("Upstream refused the stored OAuth token; replacing it and replaying once")
        d = self._context.credentials.credential_rejected(rejected)
        d.addCallbacks(self._send_replacement, self._credential_failed)
        d.addErrback(self._internal_failure)

    def _send_replacement(self, credential: UpstreamCredential | None) -> None:
        if credential is None:
            if not self.gone:
                self.answer_error(
                    ErrorKind.AUTHENTICATION,
                    "The upstream API refused credproxy's credential and there is no other: "
                    + self._context.credentials.how_to_configure(),
                    outcome="credential_unavailable",
                )
            return
        self._send(credential)

    # -- the stream ---------------------------------------------------------------

    def stream_ended(self, reason: Failure, pump: StreamPump) -> None:
        """
        The upstream answer's body is over: ended (what is held goes out,
        then the end), or broken. A break before any byte reached the
        agent is answered with an error in place of the answer; after, the
        agent's connection is aborted so its client sees the answer cut off.
        """
        if self.gone:
            pump.discard()
            self._finish_audit(usage=pump.usage(), nbytes=pump.bytes)
            return
        clean = reason.check(ResponseDone, PotentialDataLoss) is not None
        if clean and self.outcome == "ok":
            pump.flush()
            self.request.unregisterProducer()
            self.request.finish()
            self._finish_audit(usage=pump.usage(), nbytes=pump.bytes)
            return
        pump.discard()
        self.request.unregisterProducer()
        kind = None if clean else malformed_kind(reason)
        if not self.request.startedWriting and self.outcome == "ok":
            self._drop_copied_headers()
            if kind is not None:
                self._answer_malformed(kind)
            else:
                log.warn("Upstream stream broke: {error_type}", error_type=_failure_kind(reason))
                self.answer_error(
                    ErrorKind.API,
                    "The upstream API's response broke off.",
                    outcome="upstream_broken",
                )
            return
        if self.outcome == "ok":
            if kind is not None:
                self.outcome = "upstream_malformed"
                log.warn("Upstream sent a malformed response body: {defect}", defect=kind)
            else:
                self.outcome = "upstream_broken"
                log.warn("Upstream stream broke: {error_type}", error_type=_failure_kind(reason))
        # The agent must see the answer as incomplete, not as ended.
        self.agent_transport.abortConnection()
        self._finish_audit(usage=pump.usage(), nbytes=pump.bytes)

    def _drop_copied_headers(self) -> None:
        headers = self.request.responseHeaders
        for name in self._copied_headers:
            headers.removeHeader(name)
        self._copied_headers = []

    # -- endings ----------------------------------------------------------------

    def answer_error(self, kind: ErrorKind, message: str, outcome: str) -> None:
        body = error_body(kind, message)
        request = self.request
        self._status = kind.status
        self.outcome = outcome
        request.setResponseCode(kind.status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % (len(body),))
        request.write(body)
        request.finish()
        self._finish_audit(nbytes=len(body))

    def _internal_failure(self, failure: Failure) -> None:
        log.failure("Unexpected failure while forwarding", failure=failure)
        if self.gone or self.done:
            return
        if not self.request.startedWriting:
            self.answer_error(
                ErrorKind.API, "credproxy failed to forward the request.", outcome="internal"
            )
            return
        # Part of an answer went out: it cannot be taken back, only cut off.
        self.outcome = "internal"
        if self._pump is not None:
            self._pump.stop()
        self.agent_transport.abortConnection()
        self._finish_audit()

    def _agent_gone(self, failure: Failure) -> None:
        self.gone = True
        if self.outcome == "ok":
            self.outcome = "agent_gone"
        if self._slot_wait is not None:
            self._slot_wait.cancel()  # out of the queue at once
        if self._upstream is not None and self._awaiting_headers:
            self._upstream.cancel()  # before the headers: the request is abandoned
        if self._pump is not None:
            self._pump.stop()  # mid-stream: close the upstream connection
        if self._upstream is None:
            self._finish_audit()

    def abort(self) -> None:
        """
        End the exchange now (shutdown grace expired): the agent's connection
        is closed, which cancels the upstream side through L{_agent_gone}.
        """
        if self.outcome == "ok":
            self.outcome = "shutdown"
        self.agent_transport.abortConnection()

    def _release_slot(self) -> None:
        if self._slot_held:
            self._slot_held = False
            self._context.slots.release()

    def _finish_audit(self, usage: Any = None, nbytes: int = 0) -> None:
        if self.done:
            return
        self.done = True
        self._release_slot()
        request = self.request
        outcome = self.outcome
        if self._replayed and outcome == "ok":
            outcome = "replayed"  # answered after one replay with a replaced credential
        audit(
            self._context.audit_trail,
            method=request.method,
            path=request.path,
            status=self._status,
            usage=usage,
            request_body=self.body,
            response_bytes=nbytes,
            duration=self._context.reactor.seconds() - self.started,
            outcome=outcome,
        )
        for callback in self._on_done:
            callback(self)


class _Discard(Protocol):
    """
    Takes an answer nobody will read and closes its connection at once.
    """

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.stopProducing()  # type: ignore[attr-defined]


def _failure_kind(failure: Failure) -> str:
    """
    The types (never the texts) of what made an upstream request fail, so a
    refused connection and a failed certificate check can be told apart in
    the log: C{twisted.web._newclient.ResponseNeverReceived[OpenSSL.SSL.Error]}.
    """

    def name(kind: type | None) -> str:
        if kind is None:
            return "unknown"
        module = kind.__module__
        return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"

    reasons = getattr(failure.value, "reasons", None)
    if isinstance(reasons, list) and reasons:
        inner = ",".join(name(r.type) if isinstance(r, Failure) else "unknown" for r in reasons)
        return f"{name(failure.type)}[{inner}]"
    return name(failure.type)
