"""uvicorn's httptools HTTP/1.1 protocol with the per-connection bounds uvicorn lacks.

uvicorn bounds only the idle time between requests (``timeout_keep_alive``): a connection that sends nothing,
or trickles its headers or body a byte at a time, stays open for good, and httptools keeps a header of any
size in memory. Here, per connection:

- the request line and headers must be in within ``header_timeout_s`` of the connection (or of the request's
  first byte on a kept-alive connection), and the body within ``body_timeout_s`` of the headers: else a 408
  and the connection is closed (the deadlines are absolute, so a byte now and then does not extend them);
- the request line and headers hold at most ``max_header_bytes`` in all: else a 431 (checked while they
  arrive, so memory stays bounded by the limit plus one read);
- beyond ``max_connections`` open connections, a new one gets a 503 and is closed;
- a client gone before its answer was written (it closed early, e.g. after pipelining requests) is counted
  in ``COUNTERS["client_gone"]``; uvloop raises on a write to a closed transport, which uvicorn logged as
  "Exception in ASGI application" with a traceback, once per connection.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from deepfm.serve.counters import COUNTERS


@dataclass(frozen=True)
class ConnLimits:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_header_bytes: int = 64 << 10
    max_connections: int = 1000


class _Reject(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class GuardedHttpTools(HttpToolsProtocol):
    """``functools.partial(GuardedHttpTools, limits=ConnLimits(...))`` as uvicorn's ``http``."""

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None, limits: ConnLimits = ConnLimits()) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self._timer: asyncio.TimerHandle | None = None
        self._in_head = True  # reading a request line and headers
        self._head_bytes = 0  # URL + header names and values so far (parser callbacks)
        self._raw_head = 0  # bytes received while the headers were still incomplete
        self._began_in_chunk = False  # a request began inside the chunk being parsed
        self._active: RequestResponseCycle | None = None  # the request whose app is running

    # -------------------------------------------------------------- connection
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            COUNTERS["connections_refused"] += 1
            self._answer(503, f"over {self.limits.max_connections} open connections; retry later")
            return
        self._arm(self.limits.header_timeout_s, "header")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._gone(self._active)
        super().connection_lost(exc)

    def _gone(self, cycle: RequestResponseCycle | None) -> None:
        """The client left before ``cycle``'s answer was complete: count it once, and let the app see it."""
        if cycle is not None and not cycle.response_complete and not cycle.disconnected:
            COUNTERS["client_gone"] += 1
            cycle.disconnected = True
            cycle.message_event.set()

    def _answer(self, status: int, message: str) -> None:
        """A complete JSON answer, then close (for a request the app never saw)."""
        if self.transport.is_closing():
            return
        body = json.dumps({"detail": message}).encode()
        self.transport.write(STATUS_LINE[status] + b"content-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n" % len(body) + body)
        self.transport.close()

    # -------------------------------------------------------------- deadlines
    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expired, seconds, what)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, seconds: float, what: str) -> None:
        self._timer = None
        COUNTERS[f"{what}_timeouts"] += 1
        active = self._active if self._active is not None and not self._active.response_complete else None
        if active is None or (active is self.cycle and not active.response_started):
            self._answer(408, f"request {what} not received within {seconds:g} s")
        else:  # another request's answer is being written: a 408 would interleave with it
            self.transport.close()
        for c in (active, self.cycle):  # the app sees a disconnect (counted as a timeout, not as client_gone)
            if c is not None and not c.response_complete:
                c.disconnected = True
                c.message_event.set()

    # -------------------------------------------------------------- parsing
    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        self._began_in_chunk = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            reject = e.__context__ if isinstance(e.__context__, _Reject) else None
            if reject is not None:
                COUNTERS["headers_too_large"] += 1
                self._disarm()
                self._answer(reject.status, reject.message)
            else:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._in_head and not self.transport.is_closing():
            if not self._began_in_chunk:  # every byte of this chunk belongs to the unfinished headers
                self._raw_head += len(data)
            if self._raw_head > self.limits.max_header_bytes:
                COUNTERS["headers_too_large"] += 1
                self._disarm()
                self._answer(431, self._too_large())

    def _too_large(self) -> str:
        return f"request line and headers over {self.limits.max_header_bytes} bytes"

    def _count(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > self.limits.max_header_bytes:
            raise _Reject(431, self._too_large())

    def on_message_begin(self) -> None:
        self._in_head, self._head_bytes, self._raw_head, self._began_in_chunk = True, 0, 0, True
        if self._timer is None:  # a new request on a kept-alive connection: its headers' deadline starts now
            self._arm(self.limits.header_timeout_s, "header")
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._arm(self.limits.body_timeout_s, "body")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    # -------------------------------------------------------------- running the app
    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        self._active = cycle
        send = cycle.send

        async def guarded(message: Any) -> None:
            if self.transport.is_closing() and not cycle.response_complete:
                self._gone(cycle)  # closed under it (uvloop raises on such a write)
                return
            await send(message)

        cycle.send = guarded  # type: ignore[method-assign]
        super()._start_asgi_task(cycle, app)
