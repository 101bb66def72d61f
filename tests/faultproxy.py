"""A fault-injecting HTTP/1.1 reverse proxy for tests: loopback only, bounded in time and requests.

It sits between a client and an S3 endpoint (the embedded SeaweedFS) and forwards bytes
unchanged: the request line, the headers (``Host`` included, so SigV4 signatures made for
the proxy's address stay valid: the server checks them against the ``Host`` it receives)
and the bodies. It parses just enough HTTP (request line, headers, ``Content-Length`` /
``chunked``) to know where each request and response ends, so that per request it can:

======== ==============================================================================
kind     what the client sees
======== ==============================================================================
reset    the response head and ``after_bytes`` of the body (default: half), then a TCP
         RST (a body-less reply: the connection is reset before its head; the request
         itself did reach the server)
status   ``status`` (503 ``SlowDown`` or 500 ``InternalError``, an S3 XML body) from the
         proxy; the request never reaches the server
stall    nothing for ``seconds`` (before the head when ``after_bytes`` is None, else after
         ``after_bytes`` of the body), then the connection is closed
truncate the head with the real ``Content-Length`` and fewer body bytes (``after_bytes``,
         default half), then a clean close (FIN)
delay    the real response, ``seconds`` late
======== ==============================================================================

Rules are tried in order; the first that fires applies. A rule fires on requests whose
method is in ``methods`` and whose target (path and query) contains ``path_contains``,
then: with ``probability`` (a seeded RNG), on every ``every_nth`` match, on the first
``first_n`` matches, or on every match when none is given.

Bounds: after ``max_requests`` requests it answers ``503 FaultProxyExhausted`` and closes;
after ``max_lifetime`` seconds it closes every connection and refuses new ones. So a test
that loops forever fails instead of hanging.

Example::

    with FaultProxy(server.endpoint_url, [Rule("reset", probability=0.1)], seed=0) as proxy:
        store = Store({**server.storage_options, "endpoint_url": proxy.endpoint_url})
        ...
        assert proxy.faults["reset"] > 0
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal
from urllib.parse import urlsplit

__all__ = ["FaultProxy", "Kind", "Rule"]

Kind = Literal["reset", "status", "stall", "truncate", "delay"]
_KINDS = ("reset", "status", "stall", "truncate", "delay")
_CODES = {500: "InternalError", 502: "BadGateway", 503: "SlowDown", 504: "GatewayTimeout"}
_HEAD_LIMIT = 1 << 20
_CHUNK = 1 << 16


@dataclass
class Rule:
    """When to inject which fault (see the module docstring).

    Args:
        kind: ``reset``, ``status``, ``stall``, ``truncate`` or ``delay``.
        probability / every_nth / first_n: when it fires among matching requests (at most one;
            none: every matching request).
        methods: HTTP methods it applies to.
        path_contains: a substring of the request target (path and query) it applies to.
        after_bytes: body bytes sent before a ``reset``/``truncate``/``stall`` (None: half, or
            for ``stall``: before the head).
        seconds: how long a ``stall``/``delay`` lasts.
        status: the status of a ``status`` fault (503 SlowDown, 500 InternalError, ...).
    """

    kind: Kind
    probability: float | None = None
    every_nth: int | None = None
    first_n: int | None = None
    methods: Sequence[str] = ("GET",)
    path_contains: str = ""
    after_bytes: int | None = None
    seconds: float = 1.0
    status: int = 503
    matched: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"kind={self.kind!r} must be one of {_KINDS}")
        if sum(x is not None for x in (self.probability, self.every_nth, self.first_n)) > 1:
            raise ValueError("give at most one of probability=, every_nth=, first_n=")
        self.methods = tuple(m.upper() for m in self.methods)

    def fires(self, method: str, target: str, rng: random.Random) -> bool:
        if method not in self.methods or self.path_contains not in target:
            return False
        self.matched += 1
        if self.probability is not None:
            return rng.random() < self.probability
        if self.every_nth is not None:
            return self.matched % self.every_nth == 0
        if self.first_n is not None:
            return self.matched <= self.first_n
        return True


class _Closed(Exception):
    """The client connection is finished (EOF, fault, or shutdown)."""


@dataclass
class _Response:
    head: bytes
    status: int
    length: int | None  # None: chunked or until EOF
    chunked: bool
    close: bool


class FaultProxy:
    """The proxy: a background thread running an asyncio server on 127.0.0.1 (a free port).

    Args:
        upstream: the endpoint URL to forward to (``http://127.0.0.1:PORT``).
        rules: the faults, tried in order.
        seed: the RNG seed for ``probability`` rules.
        max_requests: requests after which it refuses (503 ``FaultProxyExhausted``).
        max_lifetime: seconds after which it closes every connection and refuses new ones.

    Attributes:
        endpoint_url: where clients connect (``http://127.0.0.1:PORT``).
        requests: requests seen; ``faults``: faults injected per kind; ``log``: one
            ``(method, target, kind or "")`` per request; ``refused``: requests refused;
            ``peak_in_flight``: the most requests being answered at once.
    """

    def __init__(
        self,
        upstream: str,
        rules: Sequence[Rule] = (),
        *,
        seed: int = 0,
        max_requests: int = 20_000,
        max_lifetime: float = 120.0,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.hostname not in ("127.0.0.1", "localhost", "::1") or parts.port is None:
            raise ValueError(f"{upstream=} must be a loopback http://host:port")
        self._upstream = (parts.hostname, parts.port)
        self.rules = list(rules)
        self._rng = random.Random(seed)
        self.max_requests, self.max_lifetime = max_requests, max_lifetime
        self.requests, self.refused = 0, 0
        self.peak_in_flight, self._in_flight = 0, 0
        self.faults: collections.Counter[str] = collections.Counter()
        self.log: list[tuple[str, str, str]] = []
        self._started = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._closed = False
        self._port = 0
        self._thread = threading.Thread(target=self._run, name="faultproxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fault proxy did not start within 10 s")
        if self._error is not None:
            raise RuntimeError(f"the fault proxy did not start: {self._error!r}") from self._error

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def set_rules(self, rules: Sequence[Rule]) -> None:
        """Replace the rules (between phases of a test)."""
        self.rules = list(rules)

    def reset_counters(self) -> None:
        self.requests, self.refused, self.peak_in_flight = 0, 0, 0
        self.faults.clear()
        self.log.clear()

    # -- lifecycle ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by __init__ if it happens before ready
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=_HEAD_LIMIT)
        self._port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.max_lifetime)
        finally:
            server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await server.wait_closed()

    def close(self) -> None:
        """Stop accepting, close every connection, join the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended (lifetime over)
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"FaultProxy({self.endpoint_url} -> {self._upstream}, requests={self.requests}, faults={dict(self.faults)})"
        )

    # -- one client connection ---------------------------------------------------------------

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        upstream: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []  # the current one, if any
        try:
            while True:
                await self._one_request(client_r, client_w, upstream)
        except (_Closed, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            _reset(client_w)  # shutdown: the client must not wait on us
        finally:
            self._tasks.discard(task)
            writers = [client_w] + [w for _, w in upstream]
            for writer in writers:
                writer.close()
            for writer in writers:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 1)

    async def _one_request(
        self,
        client_r: asyncio.StreamReader,
        client_w: asyncio.StreamWriter,
        upstream: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
    ) -> None:
        """Relay one request and its response; raises _Closed when the client connection is done."""
        head = await client_r.readuntil(b"\r\n\r\n")  # IncompleteReadError at EOF between requests: done
        request_line, headers = _parse_head(head)
        method, target, _ = request_line.split(" ", 2)
        if headers.get("expect", "").lower() == "100-continue":
            # Answer it ourselves and drop the header (SigV4 never signs Expect), so the body
            # comes before the server could answer.
            head = _drop_header(head, b"expect")
            client_w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await client_w.drain()
        body = await _read_body(client_r, headers)
        self.requests += 1
        self._in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
        try:
            await self._answer(client_w, upstream, method, target, head, body)
        finally:
            self._in_flight -= 1

    async def _answer(
        self,
        client_w: asyncio.StreamWriter,
        upstream: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
        method: str,
        target: str,
        head: bytes,
        body: bytes,
    ) -> None:
        """Answer one request read from the client: a fault, a refusal or the server's response."""
        if self.requests > self.max_requests:
            self.refused += 1
            self.log.append((method, target, "refused"))
            client_w.write(_error_response(503, "FaultProxyExhausted", f"more than {self.max_requests} requests"))
            await client_w.drain()
            raise _Closed
        rule = next((r for r in self.rules if r.fires(method, target, self._rng)), None)
        kind = rule.kind if rule is not None else ""
        self.log.append((method, target, kind))
        if rule is not None:
            self.faults[kind] += 1
        if rule is not None and rule.kind == "status":
            client_w.write(_error_response(rule.status, _CODES.get(rule.status, str(rule.status)), "injected"))
            await client_w.drain()
            return
        if rule is not None and rule.kind == "stall" and rule.after_bytes is None:
            await asyncio.sleep(rule.seconds)
            raise _Closed
        if rule is not None and rule.kind == "delay":
            await asyncio.sleep(rule.seconds)
        if upstream and upstream[0][0].at_eof():
            upstream.pop()[1].close()
        if not upstream:
            upstream.append(await asyncio.open_connection(*self._upstream, limit=_HEAD_LIMIT))
        up_r, up_w = upstream[0]
        up_w.write(head + body)
        await up_w.drain()
        response = await _read_response_head(up_r)
        if method == "HEAD" or response.status in (204, 304):
            response.length, response.chunked = 0, False
        limit: int | None = None  # body bytes to pass before the fault
        if rule is not None and rule.kind in ("reset", "truncate", "stall"):
            if response.length == 0 and rule.kind == "reset":
                _reset(client_w)  # a body-less reply: lose it (the server did the request)
                raise _Closed
            known = response.length if response.length is not None else 2 * _CHUNK
            limit = rule.after_bytes if rule.after_bytes is not None else known // 2
            limit = min(limit, max(known - 1, 0))
        client_w.write(response.head)
        await _relay_body(up_r, client_w, response, limit)
        if limit is None:
            if response.close:
                raise _Closed
            return
        assert rule is not None
        await client_w.drain()
        if rule.kind == "stall":
            await asyncio.sleep(rule.seconds)
        elif rule.kind == "reset":
            await asyncio.sleep(0.05)  # let the partial body reach the client before the RST
            _reset(client_w)
        raise _Closed  # the rest of the upstream response is unread: both connections are done


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


def _drop_header(head: bytes, name: bytes) -> bytes:
    lines = head.split(b"\r\n")
    return b"\r\n".join(line for line in lines if not line.lower().startswith(name + b":"))


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    """The request body, raw (chunked encoding kept as it came)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            parts.append(size_line)
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:  # trailers, then an empty line
                    line = await reader.readuntil(b"\r\n")
                    parts.append(line)
                    if line == b"\r\n":
                        return b"".join(parts)
            parts.append(await reader.readexactly(size + 2))
    length = int(headers.get("content-length", "0") or 0)
    return await reader.readexactly(length) if length else b""


async def _read_response_head(reader: asyncio.StreamReader) -> _Response:
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, headers = _parse_head(head)
        status = int(status_line.split(" ", 2)[1])
        if status >= 200:
            break  # a 1xx interim reply (100 Continue) is not forwarded: the proxy answered it
    chunked = "chunked" in headers.get("transfer-encoding", "").lower()
    length = None if chunked or "content-length" not in headers else int(headers["content-length"])
    close = headers.get("connection", "").lower() == "close" or (length is None and not chunked)
    return _Response(head, status, length, chunked, close)


async def _relay_body(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, response: _Response, limit: int | None
) -> int:
    """Copy the response body (or its first ``limit`` bytes); the bytes sent."""
    sent = 0

    async def send(data: bytes) -> bool:
        nonlocal sent
        if limit is not None and sent + len(data) >= limit:
            writer.write(data[: limit - sent])
            sent = limit
            return False
        writer.write(data)
        sent += len(data)
        await writer.drain()
        return True

    if response.chunked:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                rest = [size_line]
                while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                    rest.append(line)
                rest.append(b"\r\n")
                await send(b"".join(rest))
                return sent
            if not await send(size_line + await reader.readexactly(size + 2)):
                return sent
    remaining = response.length
    while remaining is None or remaining > 0:
        data = await reader.read(_CHUNK if remaining is None else min(_CHUNK, remaining))
        if not data:
            if remaining is not None:
                raise ConnectionResetError("upstream closed mid-body")
            return sent
        if remaining is not None:
            remaining -= len(data)
        if not await send(data):
            return sent
    return sent


def _reset(writer: asyncio.StreamWriter) -> None:
    """Abort the connection with a TCP RST (SO_LINGER 0)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _error_response(status: int, code: str, message: str) -> bytes:
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
        f"<RequestId>faultproxy</RequestId></Error>"
    ).encode()
    reason = {500: "Internal Server Error", 503: "Service Unavailable"}.get(status, "Error")
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
        f"x-amz-request-id: faultproxy\r\n\r\n"
    ).encode()
    return head + body
