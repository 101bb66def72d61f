"""A small HTTP/1.1 client for the fast path (:mod:`s3pipes._fastget`): keep-alive connections to one endpoint.

Why not aiohttp's ``ClientSession``, which this replaces on that path only: per small GET
it builds a URL object, a request, a response, timers and a stream reader, ~0.16 ms of
client CPU, more than the signing, the socket calls and the parsing together. Measured
with ``python -m benchmarks.mapstyle``'s GETs of 4 KB objects (batches of 64, 32 in
flight, one embedded SeaweedFS on the same 2 cores): aiohttp 0.28 ms of client CPU per
GET and ~2,450 GETs/s; this client 0.12 ms and ~3,400 GETs/s.

What it does: plain ``http`` or ``https`` to one ``host:port``; requests with an optional
body (sent from a memoryview in 1 MiB writes, without a copy); response bodies delimited
by ``Content-Length``, ``chunked`` or the connection's end; connections kept alive and
reused when a body was read to its end. Nothing else: no redirects, proxies, cookies or
content encodings, which S3 requests signed by :mod:`s3pipes._sigv4` do not use.

Failures are aiohttp's exception classes, so the callers' retries and
:func:`s3pipes.errors.translate` treat them as before: ``ServerDisconnectedError`` (the
connection closed before a reply), ``ClientPayloadError`` (a body cut short),
``ServerTimeoutError`` (no byte for ``read_timeout`` seconds, or no connection within
``connect_timeout``: a ``TimeoutError``), ``ClientOSError`` (could not connect; its cause
says why).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterator
from types import TracebackType
from urllib.parse import urlsplit

import aiohttp

__all__ = ["Client", "Response"]

_HEAD_LIMIT = 64 << 10  # a response head larger than this is refused
_PAUSE_AT = 4 << 20  # body bytes received but not yet read before the socket stops being read
_WRITE = 1 << 20  # a request body goes out in writes of this size
_NO_BODY = frozenset({204, 304})


class _Connection(asyncio.Protocol):
    """One socket: sends a request, parses its response head and body as bytes arrive."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._pending = bytearray()  # received, not yet parsed (the head, chunk sizes)
        self._body: collections.deque[bytes] = collections.deque()  # parsed body bytes, not yet read
        self._buffered = 0
        self._head: tuple[int, dict[str, str]] | None = None
        self._in_response = False  # between a request sent and its body's end
        self._left = 0  # Content-Length bytes still to come, or the current chunk's
        self._mode = ""  # how the body ends: "length", "chunked", "close"; "" when it has ended
        self._chunk_state = "size"  # chunked: "size", "data", "crlf", "trailer"
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._method = "GET"
        self.keep_alive = True

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self._in_response:
            self._fail(aiohttp.ServerDisconnectedError("the server sent bytes no request asked for"))
            return
        if self._head is None:
            self._pending += data
            end = self._pending.find(b"\r\n\r\n")
            if end < 0:
                if len(self._pending) > _HEAD_LIMIT:
                    self._fail(aiohttp.ServerDisconnectedError(f"a response head longer than {_HEAD_LIMIT} bytes"))
                return
            head = bytes(self._pending[:end]).decode("latin-1")
            try:
                self._parse_head(head)
            except (ValueError, IndexError):
                self._fail(aiohttp.ServerDisconnectedError(f"a malformed response head: {head[:200]!r}"))
                return
            data = bytes(self._pending[end + 4 :])
            self._pending.clear()
            self._writable()  # a reply before the whole request body went: stop sending it
        if data:
            if self._mode:
                self._feed(data)
            else:  # bytes past the response's end: do not reuse this socket
                self.keep_alive = False
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._mode == "close":  # the body ran to the connection's end: complete
            self._mode = ""
        elif self._in_response and self._error is None:
            if self._head is None:
                self._error = aiohttp.ServerDisconnectedError("the connection closed before a response")
            elif self._mode:
                self._error = aiohttp.ClientPayloadError("the connection closed before the response body's end")
        self._wake()
        self._writable()

    def pause_writing(self) -> None:
        self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        self._writable()
        self._drained = None

    def _writable(self) -> None:
        """Wake a request body's sender waiting for the socket to drain."""
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # -- parsing -------------------------------------------------------------------------------

    def _parse_head(self, head: str) -> None:
        status_line, *lines = head.split("\r\n")
        version, _, rest = status_line.partition(" ")
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            headers[name] = f"{headers[name]}, {value.strip()}" if name in headers else value.strip()
        status = int(rest[:3])
        self._head = (status, headers)
        connection = headers.get("connection", "").lower()
        self.keep_alive = version == "HTTP/1.1" and "close" not in connection
        if status in _NO_BODY or 100 <= status < 200 or self._method == "HEAD":
            self._mode = ""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._mode, self._chunk_state = "chunked", "size"
        elif "content-length" in headers:
            self._mode, self._left = "length", int(headers["content-length"])
            if self._left == 0:
                self._mode = ""
        else:
            self._mode, self.keep_alive = "close", False

    def _feed(self, data: bytes) -> None:
        if self._mode == "length":
            if len(data) > self._left:  # more than announced: keep what was, never reuse this socket
                data, self.keep_alive = data[: self._left], False
            self._left -= len(data)
            self._take(data)
            if self._left == 0:
                self._mode = ""
        elif self._mode == "close":
            self._take(data)
        else:
            self._pending += data
            self._feed_chunked()

    def _feed_chunked(self) -> None:
        pending = self._pending
        while self._mode == "chunked":
            if self._chunk_state == "size":
                end = pending.find(b"\r\n")
                if end < 0:
                    return
                size_text = bytes(pending[:end]).split(b";", 1)[0].strip()
                del pending[: end + 2]
                try:
                    self._left = int(size_text, 16)
                except ValueError:
                    self._fail(aiohttp.ClientPayloadError(f"a bad chunk size {size_text!r}"))
                    return
                self._chunk_state = "data" if self._left else "trailer"
            elif self._chunk_state == "data":
                if not pending:
                    return
                taken = bytes(pending[: self._left])
                del pending[: len(taken)]
                self._left -= len(taken)
                self._take(taken)
                if self._left == 0:
                    self._chunk_state = "crlf"
            elif self._chunk_state == "crlf":
                if len(pending) < 2:
                    return
                del pending[:2]
                self._chunk_state = "size"
            else:  # trailer lines, then an empty line
                end = pending.find(b"\r\n")
                if end < 0:
                    return
                del pending[: end + 2]
                if end == 0:
                    self._mode = ""
                    if pending:
                        self.keep_alive = False

    def _take(self, data: bytes) -> None:
        if data:
            self._body.append(data)
            self._buffered += len(data)
            if self._buffered > _PAUSE_AT and not self._reading_paused and self.transport is not None:
                self.transport.pause_reading()
                self._reading_paused = True

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self.keep_alive = False
        if self.transport is not None:
            self.transport.close()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- the request's side ----------------------------------------------------------------------

    async def send(self, head: bytes, body: memoryview | None, method: str, timeout: float) -> None:
        assert self.transport is not None
        self._method = method
        self._head, self._mode, self._error = None, "", None
        self._in_response = True
        self.transport.write(head)
        if body is None:
            return
        for start in range(0, body.nbytes, _WRITE):
            if self.closed or self._head is not None:  # dropped, or answered early: the head read says which
                self.keep_alive = False  # a request body cut short: this socket's state is unknown
                return
            self.transport.write(body[start : start + _WRITE])
            if self._drained is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(self._drained), timeout)
                except asyncio.TimeoutError:
                    stalled = aiohttp.ServerTimeoutError(f"the server took no bytes for {timeout:g} s")
                    self._fail(stalled)
                    raise stalled from None

    async def head(self, timeout: float) -> tuple[int, dict[str, str]]:
        while self._head is None:
            await self._wait(timeout)
        return self._head

    async def chunk(self, timeout: float) -> bytes | None:
        """The next piece of the body, or None at its end."""
        while not self._body:
            if not self._mode:
                if self._error is not None:
                    raise self._error
                return None
            await self._wait(timeout)
        data = self._body.popleft()
        self._buffered -= len(data)
        if self._reading_paused and self._buffered < _PAUSE_AT // 2 and self.transport is not None:
            self.transport.resume_reading()
            self._reading_paused = False
        return data

    def finish(self) -> bool:
        """End the exchange: True if this socket can carry another (its response was read to the end)."""
        done = self._head is not None and not self._mode and not self._body and self._error is None
        self._in_response = False
        return done and self.keep_alive and not self.closed

    async def _wait(self, timeout: float) -> None:
        if self._error is not None:
            raise self._error
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        timer = loop.call_later(timeout, _expire, waiter, timeout)
        try:
            await waiter
        except aiohttp.ServerTimeoutError:
            self._fail(aiohttp.ServerTimeoutError(f"no data from the server for {timeout:g} s"))
        finally:
            timer.cancel()
            self._waiter = None
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self.closed, self.keep_alive = True, False
        if self.transport is not None:
            self.transport.close()


def _expire(waiter: asyncio.Future[None], timeout: float) -> None:
    if not waiter.done():
        waiter.set_exception(aiohttp.ServerTimeoutError(f"no data from the server for {timeout:g} s"))


class Response:
    """A response's status, headers (names lower-cased) and body; the body is read once."""

    def __init__(self, client: Client, connection: _Connection, url: str, status: int, headers: dict[str, str]) -> None:
        self._client, self._connection = client, connection
        self.url, self.status, self.headers = url, status, headers

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's pieces as they arrive."""
        while (data := await self._connection.chunk(self._client.read_timeout)) is not None:
            yield data

    async def read(self) -> bytes:
        return b"".join([data async for data in self.chunks()])

    def release(self) -> None:
        """Give the connection back for reuse if the body was read to its end; else close it."""
        self._client.release(self._connection)


class _Exchange:
    """``async with client.request(...) as response``: the response, its connection released at the end."""

    def __init__(self, client: Client, method: str, url: str, headers: dict[str, str], body: memoryview | None):
        self._client, self._args = client, (method, url, headers, body)
        self._response: Response | None = None

    async def __aenter__(self) -> Response:
        self._response = await self._client.send(*self._args)
        return self._response

    async def __aexit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._response is not None:
            self._response.release()


def _tls_context(verify: bool | str) -> ssl.SSLContext:
    """What botocore's ``verify`` means: True (the default CAs), a CA bundle's path, or False (no checks)."""
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)


class Client:
    """Requests to one endpoint (``http(s)://host:port``) over a pool of keep-alive connections.

    The pool has no size limit: callers bound their requests in flight. Use it on one event loop.
    ``verify`` (https): True for the default CAs, a CA bundle's path, or False to skip the checks.
    """

    def __init__(
        self, endpoint: str, *, connect_timeout: float, read_timeout: float, verify: bool | str = True
    ) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{endpoint=} must be http(s)://host[:port]")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = _tls_context(verify) if parts.scheme == "https" else None
        default = (parts.scheme == "http" and self._port == 80) or (parts.scheme == "https" and self._port == 443)
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._host_header = host if default else f"{host}:{self._port}"
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self._idle: list[_Connection] = []
        self._closed = False

    def request(self, method: str, url: str, *, headers: dict[str, str], body: memoryview | None = None) -> _Exchange:
        """``url``: absolute, on this client's endpoint. ``headers`` go as given, with Host and Content-Length."""
        return _Exchange(self, method, url, headers, body)

    async def send(self, method: str, url: str, headers: dict[str, str], body: memoryview | None) -> Response:
        parts = urlsplit(url)
        target = f"{parts.path or '/'}?{parts.query}" if parts.query else parts.path or "/"
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self._host_header}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body is not None or method in ("PUT", "POST"):
            lines.append(f"Content-Length: {body.nbytes if body is not None else 0}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        connection = await self._connection()
        try:
            await connection.send(head, body, method, self.read_timeout)
            status, response_headers = await connection.head(self.read_timeout)
        except BaseException:
            connection.close()
            raise
        return Response(self, connection, url, status, response_headers)

    async def _connection(self) -> _Connection:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:  # the server may have closed an idle one
                return connection
        loop = asyncio.get_running_loop()
        try:
            hostname = self._host if self._ssl else None
            connect = loop.create_connection(
                _Connection, self._host, self._port, ssl=self._ssl, server_hostname=hostname
            )
            _, protocol = await asyncio.wait_for(connect, self.connect_timeout)
        except asyncio.TimeoutError as exc:
            raise aiohttp.ConnectionTimeoutError(f"could not connect within {self.connect_timeout:g} s") from exc
        except OSError as exc:  # refused, DNS: the cause names it (errors.translate reads the chain)
            raise aiohttp.ClientOSError(exc.errno, f"cannot connect to {self._host_header}: {exc}") from exc
        return protocol

    def release(self, connection: _Connection) -> None:
        if connection.finish() and not self._closed:
            self._idle.append(connection)
        else:
            connection.close()

    def close(self) -> None:
        """Close every idle connection (call on the client's loop)."""
        self._closed = True
        for connection in self._idle:
            connection.close()
        self._idle.clear()

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        return f"Client({self._host_header}, idle={len(self._idle)})"
