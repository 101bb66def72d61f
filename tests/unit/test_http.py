"""s3pipes._http against a scripted loopback server: framing, keep-alive, and each way a response can fail."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import socket
import ssl
import struct
import subprocess
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from s3pipes import _http
from s3pipes._http import Client

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _request_head(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    line, *rest = head.split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in rest if x)}
    return line, headers


def serve(handler: Handler, test: Callable[[Client], Awaitable[None]], *, read_timeout: float = 5) -> list[str]:
    """Run ``test`` against a server answering each connection with ``handler``; the request lines it saw."""
    seen: list[str] = []

    async def main() -> None:
        async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append("connect")
            try:
                await handler(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
                pass  # the client went, or the test ended
            finally:
                writer.close()

        server = await asyncio.start_server(connection, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = Client(f"http://127.0.0.1:{port}", connect_timeout=2, read_timeout=read_timeout)
        try:
            await test(client)
        finally:
            client.close()
            server.close()

    asyncio.run(main())
    return seen


def answering(wire: bytes, *, then_wait: float = 0) -> Handler:
    """A handler answering one request with ``wire``, then waiting ``then_wait`` seconds before it closes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request_head(reader)
        writer.write(wire)
        await writer.drain()
        await asyncio.sleep(then_wait)

    return handler


async def get(client: Client, path: str = "/b/k", method: str = "GET", body: bytes | None = None) -> tuple[int, bytes]:
    url = f"http://127.0.0.1{path}"
    async with client.request(method, url, headers={"X-Test": "1"}, body=memoryview(body) if body else None) as r:
        return r.status, await r.read()


def test_content_length_bodies_reuse_one_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            line, headers = await _request_head(reader)
            body = f"{line}|{headers['host']}|{headers['x-test']}".encode()
            writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: %d\r\nETag: "e"\r\n\r\n%s' % (len(body), body))
            await writer.drain()

    results: list[tuple[int, bytes]] = []

    async def test(client: Client) -> None:
        results.append(await get(client, "/b/one?x=1"))
        results.append(await get(client, "/b/two"))

    seen = serve(handler, test)
    port = results[0][1].split(b"|")[1].split(b":")[1]
    assert results == [
        (200, b"GET /b/one?x=1 HTTP/1.1|127.0.0.1:%s|1" % port),
        (200, b"GET /b/two HTTP/1.1|127.0.0.1:%s|1" % port),
    ]
    assert seen == ["connect"], "the second request went over the first connection"


@pytest.mark.parametrize("piece", [1, 7, 4096])
def test_chunked_body_with_extensions_and_trailers_in_any_pieces(piece: int) -> None:
    payload = os.urandom(10_000)
    chunks = [payload[:1], payload[1:4000], payload[4000:]]
    wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    wire += b"".join(b"%x;ext=1\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\nX-Trailer: t\r\n\r\n"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            await _request_head(reader)
            for start in range(0, len(wire), piece):
                writer.write(wire[start : start + piece])
                await writer.drain()

    got: list[bytes] = []

    async def test(client: Client) -> None:
        got.extend([(await get(client))[1], (await get(client))[1]])

    seen = serve(handler, test)
    assert got == [payload, payload] and seen == ["connect"]


def test_body_to_the_connection_end_is_whole_and_the_connection_not_reused() -> None:
    handler = answering(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")

    got: list[tuple[int, bytes]] = []

    async def test(client: Client) -> None:
        got.extend([await get(client), await get(client)])

    assert serve(handler, test) == ["connect", "connect"]
    assert got == [(200, b"until the end")] * 2


def test_head_and_no_content_replies_have_no_body() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 12345\r\n\r\n")  # HEAD: the size, no body
        await _request_head(reader)
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()
        await _request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    got: list[object] = []

    async def test(client: Client) -> None:
        async with client.request("HEAD", "http://127.0.0.1/b/k", headers={}) as r:
            got.append((r.status, r.headers["content-length"], await r.read()))
        got.extend([await get(client, method="DELETE"), await get(client)])

    assert serve(handler, test) == ["connect"]
    assert got == [(200, "12345", b""), (204, b""), (200, b"ok")]


def test_request_body_is_sent_whole_with_its_length() -> None:
    payload = os.urandom(3 << 20)  # several of the client's 1 MiB writes

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, headers = await _request_head(reader)
        body = await reader.readexactly(int(headers["content-length"]))
        digest = hashlib.sha256(body).hexdigest().encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(digest), digest))
        await writer.drain()

    got: list[tuple[int, bytes]] = []

    async def test(client: Client) -> None:
        got.append(await get(client, method="PUT", body=payload))

    serve(handler, test)
    assert got == [(200, hashlib.sha256(payload).hexdigest().encode())]


def test_large_body_read_slowly_arrives_whole() -> None:
    payload = os.urandom(24 << 20)  # past the buffer at which the client stops reading the socket

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload))
        writer.write(payload)
        await writer.drain()

    digest = hashlib.sha256()

    async def test(client: Client) -> None:
        async with client.request("GET", "http://127.0.0.1/b/big", headers={}) as r:
            async for piece in r.chunks():
                digest.update(piece)
                await asyncio.sleep(0)  # let more arrive than is read

    serve(handler, test)
    assert digest.digest() == hashlib.sha256(payload).digest()


def test_a_body_cut_short_is_a_payload_error() -> None:
    handler = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 40)

    async def test(client: Client) -> None:
        with pytest.raises(aiohttp.ClientPayloadError, match="before the response body's end"):
            await get(client)

    serve(handler, test)


def test_a_connection_closed_before_the_reply_is_a_disconnect() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request_head(reader)

    async def test(client: Client) -> None:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await get(client)

    serve(handler, test)


@pytest.mark.parametrize("where", ["head", "body"])
def test_a_stall_times_out_as_a_timeout_error(where: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request_head(reader)
        if where == "body":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nxx")
            await writer.drain()
        await asyncio.sleep(3)

    async def test(client: Client) -> None:
        with pytest.raises(aiohttp.ServerTimeoutError, match=r"no data from the server for 0\.2 s") as caught:
            await get(client)
        assert isinstance(caught.value, TimeoutError)

    serve(handler, test, read_timeout=0.2)


def test_refused_connection_names_the_cause() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there

    async def main() -> None:
        client = Client(f"http://127.0.0.1:{port}", connect_timeout=2, read_timeout=2)
        with pytest.raises(aiohttp.ClientOSError, match=rf"cannot connect to 127\.0\.0\.1:{port}") as caught:
            await get(client)
        assert isinstance(caught.value.__cause__, ConnectionRefusedError)

    asyncio.run(main())


def test_endpoint_must_be_http_with_a_host() -> None:
    with pytest.raises(ValueError, match="must be http"):
        Client("ftp://example.com", connect_timeout=1, read_timeout=1)


def test_an_early_reply_stops_the_request_body_and_is_returned() -> None:
    """A server refusing an upload answers before reading its body: the client must not wait to send it all."""

    handler = answering(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 6\r\n\r\ndenied", then_wait=3)  # body unread

    got: list[tuple[int, bytes]] = []

    async def test(client: Client) -> None:
        got.append(await asyncio.wait_for(get(client, method="PUT", body=os.urandom(64 << 20)), 2))

    serve(handler, test, read_timeout=1)
    assert got == [(403, b"denied")]


def test_a_malformed_head_is_a_disconnect_naming_it() -> None:
    handler = answering(b"HTTP/1.1 abc Nonsense\r\n\r\n", then_wait=1)

    async def test(client: Client) -> None:
        with pytest.raises(aiohttp.ServerDisconnectedError, match=r"a malformed response head: 'HTTP/1\.1 abc"):
            await get(client)

    serve(handler, test)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (as a MinIO with its own CA has): (cert, key) paths."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.mark.parametrize("verify", ["bundle", False, True])
def test_https_checks_the_certificate_as_verify_says(certificate: tuple[str, str], verify: str | bool) -> None:
    cert, key = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            await _request_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecret")
            await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_tls)
        port = server.sockets[0].getsockname()[1]
        checks = cert if verify == "bundle" else verify
        client = Client(f"https://127.0.0.1:{port}", connect_timeout=5, read_timeout=5, verify=checks)
        try:
            if verify is True:  # the default CAs do not know this certificate
                with pytest.raises(aiohttp.ClientOSError) as caught:
                    await get(client)
                assert isinstance(caught.value.__cause__, ssl.SSLCertVerificationError)
            else:
                assert await get(client) == (200, b"secret")
        finally:
            client.close()
            server.close()

    asyncio.run(main())


# -- found in review: each was a hang, a wrong body or a socket left open ------------------------


def test_a_failed_upload_drops_its_socket_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """``transport.close()`` would keep the socket open until a stalled server read the queued body."""
    sockets: list[socket.socket] = []
    made = _http._Connection.connection_made

    def record(self: _http._Connection, transport: asyncio.BaseTransport) -> None:
        sockets.append(transport.get_extra_info("socket"))
        made(self, transport)

    monkeypatch.setattr(_http._Connection, "connection_made", record)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request_head(reader)
        await asyncio.sleep(3)  # reads nothing

    async def test(client: Client) -> None:
        with pytest.raises(aiohttp.ServerTimeoutError, match="took no bytes"):
            await get(client, method="PUT", body=bytes(32 << 20))
        await asyncio.sleep(0.1)
        assert [s.fileno() for s in sockets] == [-1], "the socket is closed, its queued bytes dropped"

    serve(handler, test, read_timeout=0.3)


def test_a_malformed_reply_during_an_upload_fails_at_once_not_as_a_timeout() -> None:
    handler = answering(b"HTTP/1.1 abc Nonsense\r\n\r\n", then_wait=3)

    async def test(client: Client) -> None:
        with pytest.raises(aiohttp.ServerDisconnectedError, match="malformed"):
            await get(client, method="PUT", body=bytes(64 << 20))

    serve(handler, test, read_timeout=2)


def test_a_reset_is_not_the_end_of_a_body_that_runs_to_the_close() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 1000)
        await writer.drain()
        await asyncio.sleep(0.1)
        linger = struct.pack("ii", 1, 0)  # close with an RST, not a FIN
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        writer.transport.abort()

    async def test(client: Client) -> None:
        with pytest.raises(aiohttp.ClientPayloadError):
            await get(client)

    serve(handler, test)


def test_a_refused_upload_does_not_leave_its_unread_body_for_the_next_request() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line, _ = await _request_head(reader)
        if line.startswith("PUT"):  # refuse without reading the body, keep the connection open
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 6\r\n\r\ndenied")
            await writer.drain()
            await asyncio.sleep(3)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    got: list[tuple[int, bytes]] = []

    async def test(client: Client) -> None:
        got.extend([await get(client, method="PUT", body=bytes(1 << 20)), await get(client)])

    assert serve(handler, test, read_timeout=1) == ["connect", "connect"]
    assert got == [(403, b"denied"), (200, b"ok")]


def test_interim_replies_are_skipped() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for body in (b"first", b"second"):
            await _request_head(reader)
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()

    got: list[tuple[int, bytes]] = []

    async def test(client: Client) -> None:
        got.extend([await get(client), await get(client)])

    serve(handler, test)
    assert got == [(200, b"first"), (200, b"second")]


def test_a_server_closing_after_each_reply_costs_no_failed_request() -> None:
    """Its FIN may come just after the kept-alive socket was taken again: the GET goes once more, on a new one."""

    handler = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    got: list[tuple[int, bytes]] = []

    async def test(client: Client) -> None:
        for _ in range(20):
            got.append(await get(client))

    assert len(serve(handler, test)) == 20
    assert got == [(200, b"ok")] * 20


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1_0\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
    ],
)
def test_bad_sizes_and_framing_are_errors_not_hangs(reply: bytes) -> None:
    handler = answering(reply, then_wait=3)

    async def test(client: Client) -> None:
        with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError)):
            await asyncio.wait_for(get(client), 2)

    serve(handler, test)


# -- readinto: the body received into the caller's buffer --------------------------------------


async def get_into(client: Client, size: int, path: str = "/b/k") -> tuple[int, bytearray]:
    buffer = bytearray(size)
    async with client.request("GET", f"http://127.0.0.1{path}", headers={}) as r:
        return await r.readinto(memoryview(buffer)), buffer


@pytest.mark.parametrize("piece", [1000, 1 << 20])
def test_readinto_fills_the_buffer_from_content_length_and_chunked_bodies(piece: int) -> None:
    payload = os.urandom(600_000)  # more than one socket read into the connection's own buffer
    framed = [
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload),
    ]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for wire in [*framed, framed[0]]:  # the third: a reused socket after two bodies into buffers
            await _request_head(reader)
            for start in range(0, len(wire), piece):
                writer.write(wire[start : start + piece])
                await writer.drain()

    got: list[tuple[int, bytes]] = []

    async def test(client: Client) -> None:
        for _ in range(3):
            count, buffer = await get_into(client, len(payload) + 10)  # room to spare: the count says
            got.append((count, bytes(buffer[:count])))

    assert serve(handler, test) == ["connect"]
    assert got == [(len(payload), payload)] * 3


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_readinto_a_body_longer_than_the_buffer_is_a_payload_error_and_the_socket_dropped(framing: str) -> None:
    body = b"x" * 100
    head = {
        "length": b"Content-Length: 100\r\n\r\n" + body,
        "chunked": b"Transfer-Encoding: chunked\r\n\r\n64\r\n" + body + b"\r\n0\r\n\r\n",
        "close": b"\r\n" + body,
    }[framing]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await _request_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\n" + head)
            await writer.drain()
            if framing == "close":
                return

    async def test(client: Client) -> None:
        with pytest.raises(aiohttp.ClientPayloadError, match="longer than the 60 bytes asked for"):
            await get_into(client, 60)
        assert await get_into(client, 100) == (100, bytearray(body))

    assert serve(handler, test) == ["connect", "connect"], "the socket with the rest of a body was not reused"


def test_readinto_a_slow_body_is_no_stall_and_a_cut_one_says_how_much_came() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        for _ in range(8):  # 0.8 s in all, never 0.3 s without a byte
            writer.write(b"y" * 5)
            await writer.drain()
            await asyncio.sleep(0.1)
        # then the connection closes, 60 bytes short

    async def test(client: Client) -> None:
        buffer = bytearray(100)
        async with client.request("GET", "http://127.0.0.1/b/k", headers={}) as r:
            with pytest.raises(aiohttp.ClientPayloadError, match="before the response body's end"):
                await r.readinto(memoryview(buffer))
            assert r.received_into == 40
        assert buffer == b"y" * 40 + bytes(60)

    serve(handler, test, read_timeout=0.3)


def test_readinto_a_stall_times_out() -> None:
    handler = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nxx", then_wait=3)

    async def test(client: Client) -> None:
        with pytest.raises(aiohttp.ServerTimeoutError, match=r"no data from the server for 0\.2 s"):
            await get_into(client, 100)

    serve(handler, test, read_timeout=0.2)


def test_readinto_a_stall_is_counted_from_the_last_byte() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"z" * 10)  # into the buffer, then nothing
        await writer.drain()
        await asyncio.sleep(5)

    async def test(client: Client) -> None:
        started = asyncio.get_running_loop().time()
        with pytest.raises(aiohttp.ServerTimeoutError):
            await get_into(client, 100)
        # One read_timeout after the last byte (~1.05 s), not a second full one from the first check (~2 s).
        assert asyncio.get_running_loop().time() - started < 1.6

    serve(handler, test, read_timeout=1.0)
