"""A small HTTP/1.1 client for the fast path (:mod:`s3pipes._fastget`): keep-alive connections to one endpoint.

Why not aiohttp's ``ClientSession``, which this replaces on that path only: per small GET
it builds a URL object, a request, a response, timers and a stream reader: more client
CPU than the signing, the socket calls and the parsing together. Measured by the parts
table of ``python -m benchmarks.mapstyle`` (``Store.read_ranges`` of 4 KB objects in
batches of 64, 32 in flight, one embedded SeaweedFS on the same 2 cores): through
aiohttp 0.29 ms of client CPU per GET and 2,388 GETs/s; through this client 0.16 ms and
3,158 GETs/s. Streaming 8 MiB blocks: 1.63 -> 1.25 s of client CPU per pass.

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
import time
from collections.abc import AsyncIterator
from types import TracebackType
from urllib.parse import urlsplit

import aiohttp

from s3pipes._sigv4 import host_header

__all__ = ["ATTEMPTS", "HEAD_LIMIT", "RETRY_STATUS", "Client", "Response", "parse_head", "resume_headers"]

HEAD_LIMIT = 64 << 10  # a response head larger than this is refused
_PAUSE_AT = 4 << 20  # body bytes received but not yet read before the socket stops being read
_RECEIVE = 256 << 10  # bytes per socket read into a connection's own buffer (as asyncio reads by default)
_WRITE = 1 << 20  # a request body goes out in writes of this size
_NO_BODY = frozenset({204, 304})
_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE"})
RETRY_STATUS = frozenset({500, 502, 503, 504})  # the callers' retry policy: these replies are tried again,
ATTEMPTS = 6  # as are a dropped connection and a body cut short, this many times in all


class _Connection(asyncio.BufferedProtocol):
    """One socket: sends a request, parses its response head and body as bytes arrive.

    A buffered protocol: the socket is read into the connection's own reused buffer, or, while
    :meth:`receive_into` waits for a ``Content-Length`` body, straight into the caller's buffer.
    Measured streaming 8 MiB blocks from SeaweedFS: asyncio's reads allocate a fresh ``bytes``
    per read and the blocks were joined from them into fresh memory; half of the client's CPU
    went to page faults (every 4 KiB of every block), and the join was one more copy.
    """

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
        self._scratch = memoryview(bytearray(_RECEIVE))  # what the socket is read into, reused
        self._sink: memoryview | None = None  # the caller's buffer the body goes into (receive_into)
        self._sunk = 0  # bytes of the body in _sink
        self._into_sink = False  # the buffer get_buffer gave last is a part of _sink
        self._timer: asyncio.TimerHandle | None = None
        self._sunk_at = 0.0  # the loop time of the last byte into _sink

    # -- asyncio.BufferedProtocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        sink = self._sink
        if sink is not None and self._mode == "length" and not self._body and self._sunk < len(sink):
            self._into_sink = True
            return sink[self._sunk : self._sunk + self._left]  # never past the body's end
        self._into_sink = False
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        if not self._into_sink:
            self.data_received(bytes(self._scratch[:nbytes]))
            return
        assert self._sink is not None
        self._sunk += nbytes
        self._sunk_at = time.monotonic()  # asyncio's loop.time()
        self._left -= nbytes
        if self._left == 0:
            self._mode = ""
            self._wake()
        elif self._sunk == len(self._sink):  # full, and more to come: receive_into says so
            self._wake()

    def data_received(self, data: bytes) -> None:
        if not self._in_response:
            self._fail(aiohttp.ServerDisconnectedError("the server sent bytes no request asked for"))
            return
        if self._head is None:
            self._pending += data
            while self._head is None:
                end = self._pending.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._pending) > HEAD_LIMIT:
                        self._fail(aiohttp.ServerDisconnectedError(f"a response head over {HEAD_LIMIT} bytes"))
                    return
                head = bytes(self._pending[:end]).decode("latin-1")
                del self._pending[: end + 4]
                try:
                    self._parse_head(head)  # an interim 1xx head leaves _head None: the real one follows
                except (ValueError, IndexError):
                    self._fail(aiohttp.ServerDisconnectedError(f"a malformed response head: {head[:200]!r}"))
                    return
            data = bytes(self._pending)
            self._pending.clear()
            self._writable()  # a reply before the whole request body went: stop sending it
        if data:
            if self._mode:
                self._feed(data)
            else:  # bytes past the response's end: do not reuse this socket
                self.keep_alive = False
        self._wake()

    def eof_received(self) -> bool:
        """The server will send no more: never reuse this socket (asyncio closes it)."""
        self.keep_alive = False
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._mode == "close" and exc is None:  # the body ran to the connection's clean end: complete
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
        version, status, headers = parse_head(head)
        if 100 <= status < 200 and status != 101:
            return  # interim (100 Continue, 103 Early Hints): the final head follows
        self._head = (status, headers)
        connection = headers.get("connection", "").lower()
        self.keep_alive = version == "HTTP/1.1" and "close" not in connection and status != 101
        if status in _NO_BODY or status == 101 or self._method == "HEAD":
            self._mode = ""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._mode, self._chunk_state = "chunked", "size"
        elif "content-length" in headers:
            self._mode, self._left = "length", _count(headers["content-length"], 10)
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
                    if len(pending) > HEAD_LIMIT:
                        self._fail(aiohttp.ClientPayloadError(f"a chunk size line over {HEAD_LIMIT} bytes"))
                    return
                size_text = bytes(pending[:end]).split(b";", 1)[0].strip().decode("latin-1")
                del pending[: end + 2]
                try:
                    self._left = _count(size_text, 16)
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
                if pending[:2] != b"\r\n":
                    self._fail(aiohttp.ClientPayloadError("a chunk not followed by CRLF"))
                    return
                del pending[:2]
                self._chunk_state = "size"
            else:  # trailer lines, then an empty line
                end = pending.find(b"\r\n")
                if end < 0:
                    if len(pending) > HEAD_LIMIT:
                        self._fail(aiohttp.ClientPayloadError(f"trailers over {HEAD_LIMIT} bytes"))
                    return
                del pending[: end + 2]
                if end == 0:
                    self._mode = ""
                    if pending:
                        self.keep_alive = False

    def _take(self, data: bytes) -> None:
        sink = self._sink
        if sink is not None and not self._body and self._sunk < len(sink):
            taken = min(len(data), len(sink) - self._sunk)
            sink[self._sunk : self._sunk + taken] = data[:taken]
            self._sunk += taken
            data = data[taken:]
        if data:
            self._body.append(data)
            self._buffered += len(data)
            if self._buffered > _PAUSE_AT and not self._reading_paused and self.transport is not None:
                self.transport.pause_reading()
                self._reading_paused = True

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self.close()
        self._wake()
        self._writable()

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
            if self.closed or self._head is not None or self._error is not None:
                self.keep_alive = False  # dropped, failed or answered early: the head read says which
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
        return self._pop()

    def _pop(self) -> bytes:
        data = self._body.popleft()
        self._buffered -= len(data)
        if self._reading_paused and self._buffered < _PAUSE_AT // 2 and self.transport is not None:
            self.transport.resume_reading()
            self._reading_paused = False
        return data

    async def receive_into(self, sink: memoryview, timeout: float) -> int:
        """Put the (rest of the) body into ``sink``; how many bytes it was. Longer than ``sink``: an error.

        A ``Content-Length`` body is read from the socket into ``sink`` itself; the caller is
        woken once, at its end, and a stall is ``timeout`` seconds without a byte, as for chunks.
        ``sunk`` counts the bytes put into ``sink``, also when it fails.
        """
        self._sink, self._sunk = sink, 0
        try:
            for data in [self._pop() for _ in range(len(self._body))]:  # what came with the head, or unasked
                self._take(data)  # into sink as far as it holds; the rest back into _body
            if self._mode == "length" and self._left > len(sink) - self._sunk:
                raise self._too_long(sink)
            while self._mode:
                if self._body:  # a chunked or close-delimited body with more than sink holds
                    raise self._too_long(sink)
                await self._wait(timeout)
            if self._body:
                raise self._too_long(sink)
            if self._error is not None:
                raise self._error
            return self._sunk
        finally:
            self._sink = None

    @property
    def sunk(self) -> int:
        return self._sunk

    def _too_long(self, sink: memoryview) -> aiohttp.ClientPayloadError:
        self.keep_alive = False  # the rest of the body is still on its way
        return aiohttp.ClientPayloadError(f"a body longer than the {len(sink)} bytes asked for")

    def finish(self) -> bool:
        """End the exchange: True if this socket can carry another (its response read to the end, its request
        sent whole: an early reply can come while request bytes still wait in the transport)."""
        done = self._head is not None and not self._mode and not self._body and self._error is None
        self._in_response = False
        transport = self.transport
        sent = transport is not None and not transport.is_closing() and transport.get_write_buffer_size() == 0
        return done and sent and self.keep_alive and not self.closed

    def reusable(self) -> bool:
        """Idle and still open (a server's FIN or a reset may have come since)."""
        transport = self.transport
        return not self.closed and self.keep_alive and transport is not None and not transport.is_closing()

    async def _wait(self, timeout: float) -> None:
        if self._error is not None:
            raise self._error
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        self._timer = loop.call_later(timeout, self._stalled, waiter, timeout)
        try:
            await waiter
        except aiohttp.ServerTimeoutError:
            self._fail(aiohttp.ServerTimeoutError(f"no data from the server for {timeout:g} s"))
        finally:
            self._timer.cancel()
            self._waiter = None
        if self._error is not None:
            raise self._error

    def _stalled(self, waiter: asyncio.Future[None], timeout: float) -> None:
        """A wait's timer: a stall, unless bytes went into the sink within ``timeout`` (they wake no one)."""
        if waiter.done():
            return
        loop = asyncio.get_running_loop()
        left = self._sunk_at + timeout - loop.time()  # a stall is counted from the last byte
        if self._sink is not None and left > 0:
            self._timer = loop.call_later(left, self._stalled, waiter, timeout)
            return
        waiter.set_exception(aiohttp.ServerTimeoutError(f"no data from the server for {timeout:g} s"))

    def close(self) -> None:
        """Drop the socket now: abort, as ``close()`` would wait for queued request bytes a server may never read."""
        self.closed, self.keep_alive = True, False
        if self.transport is not None:
            self.transport.abort()


def parse_head(head: str) -> tuple[str, int, dict[str, str]]:
    """A response head (without its blank line) -> HTTP version, status, headers (names lowercased,
    repeated ones joined with ", ").

    Example:
        >>> parse_head("HTTP/1.1 206 Partial Content\\r\\nContent-Length: 5\\r\\nETag: \\"a\\"")
        ('HTTP/1.1', 206, {'content-length': '5', 'etag': '"a"'})
    """
    status_line, *lines = head.split("\r\n")
    version, _, rest = status_line.partition(" ")
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        headers[name] = f"{headers[name]}, {value.strip()}" if name in headers else value.strip()
    return version, _count(rest[:3], 10), headers


def resume_headers(first: int, end: int | None, etag: str | None) -> dict[str, str]:
    """A GET's headers for the bytes ``[first, end)`` of an object (``end`` None: to its end), the callers'
    resume rule: a retry asks only for the bytes still missing, ``If-Match`` on the first answer's ETag
    (given only when resuming), so that a store whose object changed in between refuses (412) rather
    than splice two versions.

    Example:
        >>> resume_headers(0, None, None), resume_headers(100, 200, '"e"')
        ({}, {'Range': 'bytes=100-199', 'If-Match': '"e"'})
    """
    headers: dict[str, str] = {}
    if first > 0 or end is not None:
        headers["Range"] = f"bytes={first}-{'' if end is None else end - 1}"
    if etag is not None:
        headers["If-Match"] = etag
    return headers


def _count(text: str, base: int) -> int:
    """A Content-Length or chunk size: digits only (``int`` would take a sign, spaces or underscores)."""
    digits = "0123456789abcdefABCDEF"[: 10 if base == 10 else 22]
    if not text or any(c not in digits for c in text):
        raise ValueError(f"not a size: {text!r}")
    return int(text, base)


class Response:
    """A response's status, headers (names lower-cased) and body; the body is read once."""

    def __init__(self, client: Client, connection: _Connection, url: str, status: int, headers: dict[str, str]) -> None:
        self._client, self._connection = client, connection
        self.url, self.status, self.headers = url, status, headers
        self.received_into = 0  # bytes the last readinto put into its buffer, also when it failed

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's pieces as they arrive."""
        while (data := await self._connection.chunk(self._client.read_timeout)) is not None:
            yield data

    async def read(self) -> bytes:
        return b"".join([data async for data in self.chunks()])

    async def readinto(self, buffer: memoryview) -> int:
        """Receive the body into ``buffer`` (read from the socket straight into it); its length.

        ``received_into`` says how much of ``buffer`` was written, also when this raised.

        Raises:
            aiohttp.ClientPayloadError: the body is longer than ``buffer``, or was cut short.
        """
        try:
            return await self._connection.receive_into(buffer, self._client.read_timeout)
        finally:
            self.received_into = self._connection.sunk

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
        self._host_header = host_header(endpoint)  # as signed
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
        while True:
            connection, reused = await self._connection()
            try:
                await connection.send(head, body, method, self.read_timeout)
                status, response_headers = await connection.head(self.read_timeout)
            except aiohttp.ServerDisconnectedError:
                connection.close()
                # A kept-alive socket the server closed just as we reused it (its FIN still on the
                # way): the request went nowhere. Once more on a new socket, as aiohttp does.
                if reused and method in _IDEMPOTENT:
                    continue
                raise
            except BaseException:
                connection.close()
                raise
            if body is not None and status >= 300:
                # Refusals come early, maybe before the server read the body we sent: what it
                # left unread would be taken for the next request's start.
                connection.keep_alive = False
            return Response(self, connection, url, status, response_headers)

    async def _connection(self) -> tuple[_Connection, bool]:
        """A connection, and whether it was kept alive from an earlier request."""
        while self._idle:
            connection = self._idle.pop()
            if connection.reusable():  # the server may have closed an idle one
                return connection, True
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
        return protocol, False

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
