"""Ranged GETs of whole blocks on threads, from a plain-http endpoint: how ``open_object`` receives.

Why not the event loop (:mod:`s3pipes._fastget` over :mod:`s3pipes._http`) for these: every
socket read there is Python code on the loop's thread, which needs the GIL; while the main
thread parses tar members it keeps the GIL for up to the switch interval (5 ms) before
handing it over, so each of a pass's ~500 reads waited, the server's sends stalled and blocks
came late. Here a block is one ``recv_into(..., MSG_WAITALL)`` on a blocking socket: the
kernel fills all of it while the thread holds no GIL. Measured on benchmarks/streaming.py's
data (16 shards, 627 MB, 2 cores shared with SeaweedFS): the tar reader waited 0.18-0.23 s
per raw pass for blocks from the loop, 0.07-0.08 s from these threads; raw passes took
~10% less time.

Plain http only: TLS sockets take no receive flags, so https endpoints stay on the loop.
Requests are signed and retried as :meth:`FastGetter._request` does (5xx, a dropped
connection or a body cut short: resumed from the last byte received, ``If-Match`` on the
first answer's ETag), and failures are the same exception classes, so
:func:`s3pipes.errors.translate` names them the same way: ``ClientOSError`` (could not
connect), ``ConnectionTimeoutError``, ``ServerDisconnectedError``, ``ClientPayloadError``,
``ServerTimeoutError`` (no byte for the read timeout: not retried), botocore's
``ClientError`` for an S3 error reply.

A stream read in order gets its blocks from one GET (:class:`Span`), received buffer by
buffer on these threads, one buffer at a time.

A block being received when its stream is closed cannot be interrupted: it is received to
its end (its buffer is not reused meanwhile; see ``ObjectStream._drop``): at most the
stream's blocks ahead, or from a span one block.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from s3pipes._http import ATTEMPTS, HEAD_LIMIT, RETRY_STATUS, parse_head, resume_headers
from s3pipes._sigv4 import Signer, host_header

__all__ = ["BlockGetter", "Span"]

_THREADS = 16  # blocks received at once, over every stream of the process (a few a stream; a span takes one)
_ERROR_BODY_LIMIT = 1 << 20  # an error reply's body is read up to this (S3's are a few hundred bytes)


class _Connection:
    """A blocking keep-alive socket: sends a GET, reads its head, then its body straight into a buffer."""

    def __init__(self, host: str, port: int, connect_timeout: float, read_timeout: float) -> None:
        try:
            self._socket = socket.create_connection((host, port), timeout=connect_timeout)
        except TimeoutError as exc:  # socket.timeout is TimeoutError from 3.10
            raise aiohttp.ConnectionTimeoutError(f"could not connect within {connect_timeout:g} s") from exc
        except OSError as exc:  # refused, DNS: the cause names it (errors.translate reads the chain)
            raise aiohttp.ClientOSError(exc.errno, f"cannot connect to {host}:{port}: {exc}") from exc
        self._socket.settimeout(None)  # blocking (MSG_WAITALL needs it); stalls end by SO_RCVTIMEO instead
        seconds = max(read_timeout, 0.001)
        timeval = struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._read_timeout = read_timeout
        self._extra = b""  # bytes received past the head: the body's start
        self.taken = 0  # bytes put into the sink by the last receive_into, also when it raised
        self.keep_alive = False
        self.reused = False  # kept alive from an earlier request (if the server closed it, the request is retried)
        self.pid = os.getpid()  # the process it belongs to

    def request(self, head: bytes) -> tuple[int, dict[str, str]]:
        """Send ``head``; the reply's status and headers (names lowercased)."""
        self.keep_alive = False
        try:
            self._socket.sendall(head)
        except BlockingIOError:  # SO_SNDTIMEO passed
            raise aiohttp.ServerTimeoutError(f"the server took no bytes for {self._read_timeout:g} s") from None
        except OSError as exc:
            raise aiohttp.ServerDisconnectedError(f"the connection failed while sending: {exc}") from exc
        received = b""
        while True:
            end = received.find(b"\r\n\r\n")
            if end >= 0:
                try:
                    version, status, headers = parse_head(received[:end].decode("latin-1"))
                except ValueError as exc:  # as _http: a garbled reply is a dropped connection (retried)
                    raise aiohttp.ServerDisconnectedError(f"a malformed response head: {exc}") from exc
                received = received[end + 4 :]
                if 100 <= status < 200:  # interim (100 Continue): the final head follows
                    continue
                self._extra = received
                self.keep_alive = version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
                return status, headers
            if len(received) > HEAD_LIMIT:
                raise aiohttp.ServerDisconnectedError(f"a response head longer than {HEAD_LIMIT} bytes")
            piece = self._receive(65536)
            if not piece:
                raise aiohttp.ServerDisconnectedError("the server closed the connection before a reply")
            received += piece

    def receive_into(self, sink: memoryview) -> int:
        """Fill ``sink`` with the body's next bytes; how many came (fewer only if the server closed).

        ``taken`` counts them as they come, so a caller knows how far a failed receive got. A
        stall is reported within twice the read timeout (``SO_RCVTIMEO`` bounds each call, and a
        call that got some bytes waits it out before returning them).
        """
        self.taken = min(len(self._extra), len(sink))
        sink[: self.taken] = self._extra[: self.taken]
        self._extra = self._extra[self.taken :]
        while self.taken < len(sink):
            try:
                got = self._socket.recv_into(sink[self.taken :], len(sink) - self.taken, socket.MSG_WAITALL)
            except BlockingIOError:  # SO_RCVTIMEO passed without a byte
                raise aiohttp.ServerTimeoutError(f"no data from the server for {self._read_timeout:g} s") from None
            except OSError as exc:
                raise aiohttp.ClientPayloadError(f"the connection failed in a body: {exc}") from exc
            if not got:
                break
            self.taken += got
        return self.taken

    def idle_and_open(self) -> bool:
        """Nothing unread on the socket and not closed by the server (a kept-alive socket may have got a
        FIN, a reset or an unasked reply, such as a 408, while it waited): safe to send a request on."""
        try:
            self._socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            return False  # returned: b"" if the server closed it, a byte if it sent one unasked
        except BlockingIOError:
            return True  # nothing there: the usual case
        except OSError:
            return False

    def _receive(self, size: int) -> bytes:
        try:
            return self._socket.recv(size)
        except BlockingIOError:
            raise aiohttp.ServerTimeoutError(f"no data from the server for {self._read_timeout:g} s") from None
        except OSError as exc:
            raise aiohttp.ServerDisconnectedError(f"the connection failed: {exc}") from exc

    def read_body(self, headers: dict[str, str]) -> bytes:
        """A small reply's body (an error's XML), by its Content-Length; without one, up to the limit."""
        length = headers.get("content-length")
        if length is None or not length.isdigit() or "chunked" in headers.get("transfer-encoding", "").lower():
            self.keep_alive = False  # its end is not known: read no further, never reuse
            return self._extra[:_ERROR_BODY_LIMIT]
        size = int(length)
        if size > _ERROR_BODY_LIMIT:
            self.keep_alive = False
            size = _ERROR_BODY_LIMIT
        body = bytearray(size)
        if self.receive_into(memoryview(body)) < size:
            self.keep_alive = False
        return bytes(body)

    def close(self) -> None:
        self._socket.close()


class BlockGetter:
    """Receives byte ranges of objects into given buffers, on a pool of threads with blocking sockets.

    One per :class:`~s3pipes._fastget.FastGetter` with a plain-http endpoint; its threads and
    idle connections belong to the process that made them (a forked DataLoader worker makes
    its own on first use; a pickled one, on its first use after unpickling).

    Args:
        endpoint: ``http://host:port``.
        signer: signs each request.
        timeouts: (connect, read) seconds; read: the longest wait for a byte.
        error: the exception for an error reply (status, body), as the event loop's path raises.
    """

    def __init__(
        self,
        endpoint: str,
        signer: Signer,
        timeouts: tuple[float, float],
        error: Callable[[int, bytes], Exception],
    ) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"BlockGetter takes a plain http endpoint, not {endpoint!r}")
        self._host, self._port = parts.hostname, parts.port or 80
        self._host_header = host_header(endpoint.rstrip("/") + "/")
        self._signer, self._timeouts, self._error = signer, timeouts, error
        self._start()

    def _start(self) -> None:
        self._lock = threading.Lock()
        self._held = _Held()
        weakref.finalize(self, self._held.shut)
        self._pid = os.getpid()  # last: another thread that sees it sees the rest too

    def _own(self) -> None:
        """In a forked child, start afresh: the parent's threads do not exist here, and one of them may
        have held the lock at the fork (so this runs before taking it). The inherited sockets are
        closed here only (the parent's stay open)."""
        if self._pid != os.getpid():
            inherited = self._held
            self._start()
            inherited.close_idle()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_lock", "_pid", "_held"):  # threads and sockets stay with their process
            del state[name]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._start()

    def submit(self, url: str, start: int, end: int, into: memoryview) -> Future[memoryview]:
        """Receive the bytes ``[start, end)`` of object ``url`` (on this endpoint) into ``into``, on a thread."""
        return self._pool().submit(self.receive, url, start, end, into)

    def _pool(self) -> ThreadPoolExecutor:
        self._own()
        with self._lock:
            if self._held.pool is None:
                self._held.pool = ThreadPoolExecutor(_THREADS, thread_name_prefix="s3pipes-block")
            return self._held.pool

    def receive(self, url: str, start: int, end: int, into: memoryview) -> memoryview:
        """:meth:`submit`'s work, on the calling thread."""
        if len(into) != end - start:
            raise ValueError(f"a buffer of {len(into)} bytes for the {end - start} bytes [{start}, {end})")
        span = Span(self, url, start, end)
        span.receive(into)
        return into

    def span(self, url: str, start: int, end: int) -> Span:
        """The bytes ``[start, end)`` of object ``url`` as one GET, received in order into the buffers
        given to :meth:`Span.submit`."""
        return Span(self, url, start, end)

    def _request(self, url: str, headers: dict[str, str]) -> tuple[_Connection, int, dict[str, str]]:
        """Send a signed GET of ``url``; the connection it went on, the reply's status and headers."""
        signed = self._signer.sign("GET", url, headers)
        lines = [f"GET {urlsplit(url).path} HTTP/1.1", f"Host: {self._host_header}"]
        lines += [f"{name}: {value}" for name, value in signed.items()]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        while True:
            connection = self._connection()
            try:
                status, reply_headers = connection.request(head)
                return connection, status, reply_headers
            except aiohttp.ServerDisconnectedError:
                connection.close()
                if not connection.reused:
                    raise
                # a kept-alive socket the server had closed: the request went nowhere, once more on a new one
            except BaseException:
                connection.close()
                raise

    def _connection(self) -> _Connection:
        self._own()
        while True:
            with self._lock:
                if not self._held.idle:
                    break
                connection = self._held.idle.pop()
            if connection.idle_and_open():
                connection.reused = True
                return connection
            connection.close()
        return _Connection(self._host, self._port, *self._timeouts)

    def _release(self, connection: _Connection) -> None:
        self._own()
        with self._lock:
            if connection.keep_alive and connection.pid == self._pid:
                self._held.idle.append(connection)
                return
        connection.close()


class _ErrorReply(Exception):
    """A reply other than 2xx, with its body (raised as the getter's error once no retry is left)."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.status, self.body = status, body


class Span:
    """The bytes ``[start, end)`` of one object, received in order over one GET, into buffer after buffer.

    Why one GET for many blocks: a GET costs the server CPU besides its bytes (SeaweedFS, serving
    benchmarks/streaming.py's data to 4 boto3 threads: 0.55-0.57 s of CPU in 8 MiB ranges, 0.44-0.47 s
    in whole objects, ~1.4 ms a GET), and a stream read in order needs no more than one. The body is
    received as buffers are given: while none is, the reply waits in the socket and the server's
    send blocks (TCP's window), so the memory is the buffers given.

    A drop, a body cut short or a 5xx is retried as :meth:`BlockGetter.receive` does, asking only
    for the bytes still missing, ``If-Match`` on the first reply's ETag (a changed object is an
    error, never two versions spliced); each buffer gets ``ATTEMPTS`` attempts. After an error the
    span is spent: every buffer given later fails with the same error.
    """

    def __init__(self, getter: BlockGetter, url: str, start: int, end: int) -> None:
        self.url, self._getter = url, getter
        self._start, self._end = start, end
        self.next_at = start  # where the next buffer given to submit() starts
        self._at = start  # the next byte to receive
        self._etag: str | None = None
        self._reply = _Reply()  # the connection whose reply's body is unread from _at
        weakref.finalize(self, self._reply.close)  # a span dropped unclosed (a stream left half read)
        self._lock = threading.Lock()
        self._queue: collections.deque[tuple[Future[memoryview], memoryview]] = collections.deque()
        self._running = False  # a thread is receiving (it takes the queue in order)
        self._closed = False
        self._failed: BaseException | None = None

    def submit(self, into: memoryview) -> Future[memoryview]:
        """Receive the span's next ``len(into)`` bytes into ``into``: on the getter's threads, after the buffers
        given before."""
        if self.next_at + len(into) > self._end:
            raise ValueError(f"{len(into)} bytes at {self.next_at} reach past the span's end {self._end}")
        future: Future[memoryview] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"a closed span of {self.url}")
            self._queue.append((future, into))
            start = not self._running
            self._running = True
        if start:
            try:
                self._getter._pool().submit(self._run)
            except BaseException:  # no thread to run it (the interpreter is shutting down): as if never given
                with self._lock:
                    self._queue.pop()
                    self._running = False
                raise
        self.next_at += len(into)
        return future

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._queue or self._closed:
                    self._running = False
                    if self._closed:
                        self._drop_connection()
                    return
                future, into = self._queue.popleft()
            if not future.set_running_or_notify_cancel():  # cancelled: its bytes will not be received
                self._fail(RuntimeError(f"a block of the span of {self.url} was cancelled"))
                continue
            if self._failed is not None:
                future.set_exception(self._failed)
                continue
            try:
                self.receive(into)
            except BaseException as exc:
                self._fail(exc)
                future.set_exception(exc)
            else:
                future.set_result(into)

    def _fail(self, error: BaseException) -> None:
        self._failed = error
        self._drop_connection()

    def close(self) -> None:
        """Stop: buffers not being received are cancelled; the connection is closed after the one
        being received, if any (a receive is not interrupted). Idempotent."""
        with self._lock:
            self._closed = True
            for future, _ in self._queue:
                if future.cancel():
                    future.set_running_or_notify_cancel()  # so that wait() and as_completed() count it done
            self._queue.clear()
            if not self._running:
                self._drop_connection()

    def _drop_connection(self) -> None:
        self._reply.close()

    def receive(self, into: memoryview) -> None:
        """Receive the span's next ``len(into)`` bytes into ``into`` on the calling thread (``submit``'s work)."""
        first = self._at
        failure: Exception | None = None
        for attempt in range(1, ATTEMPTS + 1):
            try:
                self._fill(into, self._at - first)
                return
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                self._drop_connection()
                if isinstance(exc, asyncio.TimeoutError) or self._closed:  # a stall, or nobody waits: not retried
                    raise
                if attempt == ATTEMPTS:
                    exc.s3pipes_attempts = attempt  # type: ignore[union-attr]  # read by errors.translate
                    raise
            except _ErrorReply as reply:
                if reply.status not in RETRY_STATUS or attempt == ATTEMPTS or self._closed:
                    failure = self._getter._error(reply.status, reply.body)
                    failure.s3pipes_attempts = attempt  # type: ignore[attr-defined]  # read by errors.translate
                    break
            except BaseException:
                self._drop_connection()
                raise
            time.sleep(random.uniform(0, min(1.0, 0.05 * 2**attempt)))  # full jitter, capped
        assert failure is not None
        raise failure  # outside the except clause: no _ErrorReply in its context

    def _fill(self, into: memoryview, got: int) -> None:
        """Receive ``into[got:]``, requesting the rest of the span first if no reply is open."""
        if self._reply.connection is None:
            self._open()
        connection = self._reply.connection
        assert connection is not None
        try:
            received = connection.receive_into(into[got:])
        finally:
            self._at += connection.taken  # a retry resumes after what came, also when this failed
        if got + received < len(into):
            raise aiohttp.ClientPayloadError(
                f"{self.url}: {self._at - self._start} bytes of the {self._end - self._start} asked for"
            )
        if self._at == self._end:  # the whole reply is read: the connection may carry another request
            self._reply.connection = None
            self._getter._release(connection)

    def _open(self) -> None:
        """GET the bytes ``[_at, _end)``; raises ``_ErrorReply`` for a reply other than 2xx."""
        wanted = self._end - self._at
        headers = resume_headers(self._at, self._end, self._etag if self._at > self._start else None)
        connection, status, reply = self._getter._request(self.url, headers)
        if status not in (200, 206):
            try:
                body = connection.read_body(reply)
            except BaseException:
                connection.close()
                raise
            self._getter._release(connection)
            raise _ErrorReply(status, body)
        if self._etag is None:
            self._etag = reply.get("etag")
        if reply.get("content-length") != str(wanted) or (status == 200 and self._at > 0):
            connection.close()
            if status == 200:
                raise aiohttp.ClientPayloadError(f"{self.url}: the store ignored the Range of a ranged read")
            raise aiohttp.ClientPayloadError(
                f"{self.url}: a reply of {reply.get('content-length')} bytes to a range of {wanted}"
            )
        self._reply.connection = connection


class _Reply:
    """A span's connection with a reply being read, apart from the span so that its finalizer can close it."""

    def __init__(self) -> None:
        self.connection: _Connection | None = None

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()  # its body is not all read: it cannot carry another request
            self.connection = None


class _Held:
    """A getter's thread pool and idle connections, apart from it so that its finalizer can close them."""

    def __init__(self) -> None:
        self.pool: ThreadPoolExecutor | None = None
        self.idle: list[_Connection] = []
        self.pid = os.getpid()

    def close_idle(self) -> None:
        for connection in self.idle:
            connection.close()
        self.idle.clear()

    def shut(self) -> None:
        """The getter's finalizer: let the threads end and close the idle sockets, never waiting.

        Not in a forked child (a copy of the parent's finalizer runs there at exit): the pool's
        copy may hold a lock that a parent's thread had taken."""
        if os.getpid() != self.pid:
            return
        if self.pool is not None:
            self.pool.shutdown(wait=False)
            self.pool = None
        self.close_idle()
