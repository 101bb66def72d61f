"""s3pipes._blockget against a scripted loopback server: ranges into buffers, retries, resumes, stalls."""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import aiohttp
import pytest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from s3pipes._blockget import BlockGetter
from s3pipes._fastget import FastGetter, _client_error
from s3pipes._sigv4 import Signer

PAYLOAD = os.urandom(100_000)
Handler = Callable[[socket.socket, "Server"], None]
Serve = Callable[..., tuple["Server", BlockGetter]]


class Server:
    """Answers each connection with ``handler`` on a thread; keeps the request heads it read."""

    def __init__(self, handler: Handler) -> None:
        self.requests: list[dict[str, str]] = []
        self.connections = 0
        self._handler = handler
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with connection, contextlib.suppress(OSError):  # OSError: the client went
            self._handler(connection, self)

    def read_request(self, connection: socket.socket) -> dict[str, str] | None:
        """The next request's head (request line under ""), or None if the client closed."""
        data = b""
        while b"\r\n\r\n" not in data:
            piece = connection.recv(4096)
            if not piece:
                return None
            data += piece
        line, *rest = data.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
        request = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in rest)}
        request[""] = line
        self.requests.append(request)
        return request

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def serve() -> Iterator[Serve]:
    servers: list[Server] = []

    def start(handler: Handler, read_timeout: float = 5) -> tuple[Server, BlockGetter]:
        server = Server(handler)
        servers.append(server)
        signer = Signer("AKIDEXAMPLE", "secret", None, "us-east-1")
        return server, BlockGetter(f"http://127.0.0.1:{server.port}", signer, (2, read_timeout), _client_error)

    yield start
    for server in servers:
        server.close()


def asked(request: dict[str, str]) -> tuple[int, int]:
    first, _, last = request["range"].removeprefix("bytes=").partition("-")
    return int(first), int(last) + 1


def partial(start: int, end: int, etag: str = '"e1"') -> bytes:
    head = f"HTTP/1.1 206 Partial Content\r\nContent-Length: {end - start}\r\nETag: {etag}\r\n\r\n"
    return head.encode() + PAYLOAD[start:end]


def ranges(connection: socket.socket, server: Server) -> None:
    """A well-behaved server: every request on the connection gets its range."""
    while (request := server.read_request(connection)) is not None:
        connection.sendall(partial(*asked(request)))


def url(server: Server) -> str:
    return f"http://127.0.0.1:{server.port}/bucket/shard%20one.tar"


def test_ranges_arrive_in_the_buffers_over_one_signed_kept_alive_connection(serve: Serve) -> None:
    server, getter = serve(ranges)
    first, second = bytearray(30_000), bytearray(50_000)
    assert getter.receive(url(server), 1000, 31_000, memoryview(first)).obj is first
    getter.receive(url(server), 50_000, 100_000, memoryview(second))
    assert bytes(first) == PAYLOAD[1000:31_000] and bytes(second) == PAYLOAD[50_000:]
    assert server.connections == 1
    request = server.requests[0]
    assert request[""] == "GET /bucket/shard%20one.tar HTTP/1.1"
    assert request["host"] == f"127.0.0.1:{server.port}" and request["range"] == "bytes=1000-30999"
    assert request["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")


def test_submit_receives_on_a_thread(serve: Serve) -> None:
    server, getter = serve(ranges)
    buffers = [bytearray(10_000) for _ in range(6)]
    futures = [getter.submit(url(server), i * 10_000, (i + 1) * 10_000, memoryview(b)) for i, b in enumerate(buffers)]
    assert [bytes(f.result(timeout=10)) for f in futures] == [PAYLOAD[i * 10_000 : (i + 1) * 10_000] for i in range(6)]


def test_a_body_cut_short_is_resumed_from_the_last_byte_on_the_same_version(serve: Serve) -> None:
    def handler(connection: socket.socket, server: Server) -> None:
        request = server.read_request(connection)
        assert request is not None
        if len(server.requests) == 1:
            start, end = asked(request)
            connection.sendall(partial(start, end)[: -(end - start) + 12_345])  # the head and 12,345 bytes
            return  # then the connection closes
        connection.sendall(partial(*asked(request)))

    server, getter = serve(handler)
    buffer = bytearray(40_000)
    getter.receive(url(server), 10_000, 50_000, memoryview(buffer))
    assert bytes(buffer) == PAYLOAD[10_000:50_000]
    assert [r["range"] for r in server.requests] == ["bytes=10000-49999", "bytes=22345-49999"]
    assert server.requests[1]["if-match"] == '"e1"' and "if-match" not in server.requests[0]


def test_a_5xx_is_retried_and_an_s3_error_reply_is_botocores_error(serve: Serve) -> None:
    def handler(connection: socket.socket, server: Server) -> None:
        while (request := server.read_request(connection)) is not None:
            if len(server.requests) == 1:
                connection.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Length: 0\r\n\r\n")
            elif "shard" in request[""]:
                connection.sendall(partial(*asked(request)))
            else:
                body = b"<Error><Code>NoSuchKey</Code><Message>gone</Message></Error>"
                connection.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    server, getter = serve(handler)
    buffer = bytearray(1000)
    getter.receive(url(server), 0, 1000, memoryview(buffer))
    assert bytes(buffer) == PAYLOAD[:1000] and len(server.requests) == 2
    with pytest.raises(ClientError) as info:
        getter.receive(f"http://127.0.0.1:{server.port}/bucket/missing", 0, 10, memoryview(bytearray(10)))
    assert info.value.response["Error"]["Code"] == "NoSuchKey"
    assert info.value.s3pipes_attempts == 1  # type: ignore[attr-defined]
    assert server.connections == 1, "the error reply's body was read: the connection stayed usable"


def test_a_kept_alive_connection_the_server_closed_is_replaced_without_an_error(serve: Serve) -> None:
    def one_reply_per_connection(connection: socket.socket, server: Server) -> None:
        request = server.read_request(connection)
        if request is not None:
            connection.sendall(partial(*asked(request)))  # keep-alive announced, then closed

    server, getter = serve(one_reply_per_connection)
    for start in (0, 1000, 2000):
        buffer = bytearray(1000)
        getter.receive(url(server), start, start + 1000, memoryview(buffer))
        assert bytes(buffer) == PAYLOAD[start : start + 1000]
        time.sleep(0.05)  # the server's close arrives before the next request
    assert len(server.requests) == 3 and server.connections == 3


def test_a_stall_times_out_once_without_retries(serve: Serve) -> None:
    def stalls(connection: socket.socket, server: Server) -> None:
        request = server.read_request(connection)
        assert request is not None
        connection.sendall(partial(*asked(request))[:-500])
        time.sleep(3)

    server, getter = serve(stalls, read_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(aiohttp.ServerTimeoutError, match=r"no data from the server for 0\.3 s"):
        getter.receive(url(server), 0, 5000, memoryview(bytearray(5000)))
    assert time.monotonic() - started < 2 and len(server.requests) == 1


def test_a_refused_connection_names_the_cause() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    getter = BlockGetter(f"http://127.0.0.1:{port}", Signer("a", "b", None, "us-east-1"), (2, 2), _client_error)
    with pytest.raises(aiohttp.ClientOSError, match=f"cannot connect to 127.0.0.1:{port}") as info:
        getter.receive(f"http://127.0.0.1:{port}/b/k", 0, 10, memoryview(bytearray(10)))
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


def test_a_range_the_store_ignored_is_an_error_not_the_wrong_bytes(serve: Serve) -> None:
    def whole(connection: socket.socket, server: Server) -> None:
        while server.read_request(connection) is not None:
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(PAYLOAD), PAYLOAD))

    server, getter = serve(whole)
    buffer = bytearray(100)
    with pytest.raises(aiohttp.ClientPayloadError, match="ignored the Range"):
        getter.receive(url(server), 500, 600, memoryview(buffer))
    assert buffer == bytearray(100)


def test_only_plain_http_endpoints_get_one_and_it_pickles_without_its_threads(serve: Serve) -> None:
    credentials = Credentials("a", "b")
    assert FastGetter("https://s3.example.com", credentials, "us-east-1", timeouts=(1, 1)).blocks is None
    with pytest.raises(ValueError, match="plain http"):
        BlockGetter("https://s3.example.com", Signer("a", "b", None, "us-east-1"), (1, 1), _client_error)
    server, getter = serve(ranges)
    getter.receive(url(server), 0, 10, memoryview(bytearray(10)))
    copy = pickle.loads(pickle.dumps(getter))
    buffer = bytearray(10)
    copy.submit(url(server), 10, 20, memoryview(buffer)).result(timeout=10)
    assert bytes(buffer) == PAYLOAD[10:20] and server.connections == 2


def test_a_forked_child_uses_its_own_threads_and_sockets_and_the_parents_keep_working(serve: Serve) -> None:
    server, getter = serve(ranges)
    getter.submit(url(server), 0, 100, memoryview(bytearray(100))).result(timeout=10)  # threads and a kept socket
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it received, then leave at once
        try:
            buffer = bytearray(100)
            getter.submit(url(server), 100, 200, memoryview(buffer)).result(timeout=10)
            os.write(write, bytes(buffer))
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as child:
        received = child.read()
    assert os.waitpid(pid, 0)[1] == 0
    assert received == PAYLOAD[100:200]
    buffer = bytearray(100)
    getter.submit(url(server), 200, 300, memoryview(buffer)).result(timeout=10)
    assert bytes(buffer) == PAYLOAD[200:300]
    assert server.connections == 2, "the child opened its own connection; the parent's was still usable"


def test_a_reset_mid_body_resumes_after_the_bytes_that_came(serve: Serve) -> None:
    def resets(connection: socket.socket, server: Server) -> None:
        request = server.read_request(connection)
        assert request is not None
        if len(server.requests) == 1:
            start, end = asked(request)
            connection.sendall(partial(start, end)[: -(end - start) + 20_000])
            time.sleep(0.1)  # the bytes reach the client before the reset
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return  # closing with linger 0: a reset
        connection.sendall(partial(*asked(request)))

    server, getter = serve(resets)
    buffer = bytearray(90_000)
    getter.receive(url(server), 5000, 95_000, memoryview(buffer))
    assert bytes(buffer) == PAYLOAD[5000:95_000]
    assert [r["range"] for r in server.requests] == ["bytes=5000-94999", "bytes=25000-94999"]


def test_a_garbled_reply_is_a_dropped_connection_and_retried(serve: Serve) -> None:
    def garbled_first(connection: socket.socket, server: Server) -> None:
        while (request := server.read_request(connection)) is not None:
            if len(server.requests) == 1:
                connection.sendall(b"HTTP/1.1 2x6 Partial\r\nContent-Length: 10\r\n\r\n0123456789")
                return
            connection.sendall(partial(*asked(request)))

    server, getter = serve(garbled_first)
    buffer = bytearray(1000)
    getter.receive(url(server), 0, 1000, memoryview(buffer))
    assert bytes(buffer) == PAYLOAD[:1000] and len(server.requests) == 2


def test_an_idle_socket_with_an_unasked_reply_is_not_reused(serve: Serve) -> None:
    def then_times_out(connection: socket.socket, server: Server) -> None:
        request = server.read_request(connection)
        assert request is not None
        connection.sendall(partial(*asked(request)))
        time.sleep(0.05)  # idle: a server may say so and close
        connection.sendall(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        time.sleep(1)

    server, getter = serve(then_times_out)
    for start in (0, 1000):
        buffer = bytearray(1000)
        getter.receive(url(server), start, start + 1000, memoryview(buffer))
        assert bytes(buffer) == PAYLOAD[start : start + 1000]
        time.sleep(0.2)
    assert server.connections == 2 and len(server.requests) == 2


def test_a_span_fills_its_buffers_in_order_from_one_get_then_keeps_the_connection(serve: Serve) -> None:
    server, getter = serve(ranges)
    span = getter.span(url(server), 1000, 61_000)
    buffers = [bytearray(20_000) for _ in range(3)]
    futures = [span.submit(memoryview(buffer)) for buffer in buffers]
    assert [bytes(future.result(timeout=10)) for future in futures] == [
        PAYLOAD[1000 + i * 20_000 : 21_000 + i * 20_000] for i in range(3)
    ]
    assert [r["range"] for r in server.requests] == ["bytes=1000-60999"]
    with pytest.raises(ValueError, match="past the span's end"):
        span.submit(memoryview(bytearray(1)))
    getter.receive(url(server), 0, 10, memoryview(bytearray(10)))
    assert server.connections == 1, "the span's body was read to its end: its connection was reused"


def test_a_span_cut_short_asks_for_the_rest_of_the_span_on_the_same_version(serve: Serve) -> None:
    def cuts_the_first(connection: socket.socket, server: Server) -> None:
        request = server.read_request(connection)
        assert request is not None
        start, end = asked(request)
        if len(server.requests) == 1:
            connection.sendall(partial(start, end)[: -(end - start) + 25_000])  # the head, 1.25 buffers
            return
        connection.sendall(partial(start, end))

    server, getter = serve(cuts_the_first)
    span = getter.span(url(server), 1000, 61_000)
    futures = [span.submit(memoryview(bytearray(20_000))) for _ in range(3)]
    assert b"".join(bytes(future.result(timeout=10)) for future in futures) == PAYLOAD[1000:61_000]
    assert [r["range"] for r in server.requests] == ["bytes=1000-60999", "bytes=26000-60999"]
    assert server.requests[1]["if-match"] == '"e1"'


def test_a_span_waits_for_buffers_and_a_close_cancels_the_rest_and_drops_its_connection(serve: Serve) -> None:
    server, getter = serve(ranges)
    span = getter.span(url(server), 0, 100_000)
    first = span.submit(memoryview(bytearray(10_000)))
    assert bytes(first.result(timeout=10)) == PAYLOAD[:10_000]
    time.sleep(0.2)  # no buffer given meanwhile: the rest of the reply waits in the socket
    second = span.submit(memoryview(bytearray(10_000)))
    assert bytes(second.result(timeout=10)) == PAYLOAD[10_000:20_000] and len(server.requests) == 1
    span.close()
    with pytest.raises(RuntimeError, match="closed span"):
        span.submit(memoryview(bytearray(10_000)))
    getter.receive(url(server), 0, 10, memoryview(bytearray(10)))
    assert server.connections == 2, "a span closed mid-reply does not give its connection to another request"


def test_after_an_error_reply_every_later_buffer_of_the_span_fails_with_it(serve: Serve) -> None:
    def forbidden(connection: socket.socket, server: Server) -> None:
        while server.read_request(connection) is not None:
            body = b"<Error><Code>AccessDenied</Code><Message>no</Message></Error>"
            connection.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    server, getter = serve(forbidden)
    span = getter.span(url(server), 0, 30_000)
    futures = [span.submit(memoryview(bytearray(10_000))) for _ in range(3)]
    errors = [future.exception(timeout=10) for future in futures]
    assert all(isinstance(error, ClientError) for error in errors) and errors[0] is errors[2]
    assert len(server.requests) == 1, "an error reply is not asked again for each buffer"


def test_a_span_dropped_unclosed_closes_its_connection(serve: Serve) -> None:
    closed = threading.Event()

    def notes_the_close(connection: socket.socket, server: Server) -> None:
        request = server.read_request(connection)
        assert request is not None
        connection.sendall(partial(*asked(request)))
        try:
            if server.read_request(connection) is None:
                closed.set()
        except ConnectionResetError:  # closed with bytes unread: a reset
            closed.set()

    server, getter = serve(notes_the_close)
    span = getter.span(url(server), 0, 100_000)
    span.submit(memoryview(bytearray(10_000))).result(timeout=10)
    del span  # a stream left half read: its reply's body is still in the socket
    deadline = time.monotonic() + 5
    while not closed.wait(0.05) and time.monotonic() < deadline:
        gc.collect()  # the pool's thread lets go of the span once it finds nothing more to receive
    assert closed.is_set(), "the dropped span's connection was not closed"


def test_a_span_whose_buffer_found_no_thread_is_not_left_waiting(serve: Serve) -> None:
    server, getter = serve(ranges)
    span = getter.span(url(server), 0, 20_000)
    span.submit(memoryview(bytearray(10_000))).result(timeout=10)
    getter._pool().shutdown()  # as at interpreter exit: no new work is taken
    for _ in range(2):
        with pytest.raises(RuntimeError, match="shutdown"):
            span.submit(memoryview(bytearray(10_000)))
    assert span.next_at == 10_000, "a buffer not taken does not count as given"
    span.close()  # not "running": the half-read reply's connection is closed now
    assert span._reply.connection is None
