"""The fault proxy itself (tests/faultproxy.py): byte-exact pass-through, each fault as a plain client sees it."""

from __future__ import annotations

import http.client
import os
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.config import Config

from s3pipes.server import LocalS3Server
from tests.faultproxy import FaultProxy, Rule

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

BODY = os.urandom(1 << 20)  # 1 MiB


def client(server: LocalS3Server, endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=server.key,
        aws_secret_access_key=server.secret,
        region_name="us-east-1",
        config=Config(
            s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}, read_timeout=5, connect_timeout=2
        ),
    )


@pytest.fixture
def key(s3_server: LocalS3Server, s3_bucket: str) -> str:
    """An object of BODY, written directly (not through a proxy)."""
    name = f"{uuid.uuid4().hex[:12]}/blob"
    client(s3_server, s3_server.endpoint_url).put_object(Bucket=s3_bucket.removeprefix("s3://"), Key=name, Body=BODY)
    return name


@pytest.fixture
def proxy(s3_server: LocalS3Server) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint_url, seed=1, max_lifetime=50) as proxy:
        yield proxy


def presigned(server: LocalS3Server, proxy: FaultProxy, bucket: str, key: str) -> str:
    """A GET URL signed for the proxy's address, for plain (unsigned) HTTP clients."""
    s3 = client(server, proxy.endpoint_url)
    return str(s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=300))


def raw_get(url: str, timeout: float = 5) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
    """The response (its head read) and its connection (the caller closes it)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    try:
        connection.request("GET", f"{parts.path}?{parts.query}")
        return connection.getresponse(), connection
    except BaseException:
        connection.close()
        raise


def test_pass_through_is_byte_exact_for_get_put_and_multipart(
    s3_server: LocalS3Server, s3_bucket: str, proxy: FaultProxy
) -> None:
    bucket = s3_bucket.removeprefix("s3://")
    s3 = client(s3_server, proxy.endpoint_url)
    prefix = uuid.uuid4().hex[:12]
    s3.put_object(Bucket=bucket, Key=f"{prefix}/one", Body=BODY)
    assert s3.get_object(Bucket=bucket, Key=f"{prefix}/one")["Body"].read() == BODY
    assert s3.get_object(Bucket=bucket, Key=f"{prefix}/one", Range="bytes=1000-1999")["Body"].read() == BODY[1000:2000]
    assert s3.head_object(Bucket=bucket, Key=f"{prefix}/one")["ContentLength"] == len(BODY)

    parts = [os.urandom(5 << 20), os.urandom(5 << 20), b"tail"]
    upload = s3.create_multipart_upload(Bucket=bucket, Key=f"{prefix}/multi")["UploadId"]
    etags = [
        s3.upload_part(Bucket=bucket, Key=f"{prefix}/multi", UploadId=upload, PartNumber=n, Body=part)["ETag"]
        for n, part in enumerate(parts, 1)
    ]
    s3.complete_multipart_upload(
        Bucket=bucket,
        Key=f"{prefix}/multi",
        UploadId=upload,
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, 1)]},
    )
    direct = client(s3_server, s3_server.endpoint_url)
    assert direct.get_object(Bucket=bucket, Key=f"{prefix}/multi")["Body"].read() == b"".join(parts)
    assert s3.get_object(Bucket=bucket, Key=f"{prefix}/multi")["Body"].read() == b"".join(parts)
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/")
    assert [o["Key"] for o in listed["Contents"]] == [f"{prefix}/multi", f"{prefix}/one"]
    assert proxy.requests == 11 and not proxy.faults and proxy.refused == 0


def test_keep_alive_connections_are_reused(
    s3_server: LocalS3Server, s3_bucket: str, proxy: FaultProxy, key: str
) -> None:
    url = presigned(s3_server, proxy, s3_bucket.removeprefix("s3://"), key)
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=5)
    try:
        for _ in range(3):
            connection.request("GET", f"{parts.path}?{parts.query}")
            assert connection.getresponse().read() == BODY
        assert proxy.requests == 3
    finally:
        connection.close()


@pytest.mark.parametrize(("status", "code"), [(503, "SlowDown"), (500, "InternalError")])
def test_status_fault_answers_an_s3_error(
    s3_server: LocalS3Server, s3_bucket: str, proxy: FaultProxy, key: str, status: int, code: str
) -> None:
    proxy.set_rules([Rule("status", status=status, first_n=1)])
    url = presigned(s3_server, proxy, s3_bucket.removeprefix("s3://"), key)
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(url, timeout=5)
    with caught.value:
        assert caught.value.code == status and f"<Code>{code}</Code>".encode() in caught.value.read()
    with urllib.request.urlopen(url, timeout=5) as reply:  # first_n=1: the next one passes
        assert reply.read() == BODY
    assert proxy.faults == {"status": 1} and proxy.requests == 2


def test_reset_sends_part_of_the_body_then_resets(
    s3_server: LocalS3Server, s3_bucket: str, proxy: FaultProxy, key: str
) -> None:
    proxy.set_rules([Rule("reset", after_bytes=100_000)])
    response, connection = raw_get(presigned(s3_server, proxy, s3_bucket.removeprefix("s3://"), key))
    try:
        assert response.status == 200 and int(response.headers["Content-Length"]) == len(BODY)
        received = b""
        with pytest.raises((ConnectionResetError, http.client.IncompleteRead)):
            while chunk := response.read(8192):
                received += chunk
            raise AssertionError("the body ended cleanly")  # pragma: no cover
        assert received == BODY[: len(received)] and len(received) <= 100_000
    finally:
        connection.close()
    assert proxy.faults == {"reset": 1}


def test_truncate_sends_fewer_bytes_than_content_length(
    s3_server: LocalS3Server, s3_bucket: str, proxy: FaultProxy, key: str
) -> None:
    proxy.set_rules([Rule("truncate")])  # half the body
    response, connection = raw_get(presigned(s3_server, proxy, s3_bucket.removeprefix("s3://"), key))
    try:
        assert int(response.headers["Content-Length"]) == len(BODY)
        with pytest.raises(http.client.IncompleteRead) as caught:
            response.read()
        assert caught.value.partial == BODY[: len(BODY) // 2]
    finally:
        connection.close()
    assert proxy.faults == {"truncate": 1}


@pytest.mark.parametrize("after_bytes", [None, 50_000])
def test_stall_stops_sending(
    s3_server: LocalS3Server, s3_bucket: str, proxy: FaultProxy, key: str, after_bytes: int | None
) -> None:
    proxy.set_rules([Rule("stall", seconds=2, after_bytes=after_bytes)])
    url = presigned(s3_server, proxy, s3_bucket.removeprefix("s3://"), key)
    started = time.monotonic()
    with pytest.raises((TimeoutError, socket.timeout)):
        response, connection = raw_get(url, timeout=0.5)  # before the head: getresponse times out
        try:
            assert after_bytes is not None and response.status == 200
            response.read()  # mid-body: the read times out
        finally:
            connection.close()
    assert time.monotonic() - started < 2
    assert proxy.faults == {"stall": 1}


def test_delay_answers_late_but_whole(s3_server: LocalS3Server, s3_bucket: str, proxy: FaultProxy, key: str) -> None:
    proxy.set_rules([Rule("delay", seconds=0.5)])
    started = time.monotonic()
    with urllib.request.urlopen(presigned(s3_server, proxy, s3_bucket.removeprefix("s3://"), key), timeout=5) as r:
        assert r.read() == BODY
    assert time.monotonic() - started >= 0.5 and proxy.faults == {"delay": 1}


def test_rules_select_by_method_path_and_count(
    s3_server: LocalS3Server, s3_bucket: str, proxy: FaultProxy, key: str
) -> None:
    proxy.set_rules([Rule("status", every_nth=2, path_contains="blob"), Rule("status", status=500, methods=("HEAD",))])
    url = presigned(s3_server, proxy, s3_bucket.removeprefix("s3://"), key)
    codes = []
    for _ in range(4):
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                codes.append(reply.status)
        except urllib.error.HTTPError as exc:
            with exc:
                codes.append(exc.code)
    assert codes == [200, 503, 200, 503]
    with pytest.raises(Exception, match="500"):
        client(s3_server, proxy.endpoint_url).head_object(Bucket=s3_bucket.removeprefix("s3://"), Key=key)
    assert proxy.faults == {"status": 3} and [kind for *_, kind in proxy.log] == ["", "status"] * 2 + ["status"]


def test_probability_rules_are_seeded(s3_server: LocalS3Server, s3_bucket: str, key: str) -> None:
    def pattern() -> list[str]:
        with FaultProxy(s3_server.endpoint_url, [Rule("status", probability=0.5)], seed=7) as proxy:
            url = presigned(s3_server, proxy, s3_bucket.removeprefix("s3://"), key)
            for _ in range(8):
                try:
                    urllib.request.urlopen(url, timeout=5).close()
                except urllib.error.HTTPError as exc:
                    exc.close()
            return [kind for *_, kind in proxy.log]

    first = pattern()
    assert first == pattern() and 0 < first.count("status") < 8


def test_bounded_in_requests_and_lifetime(s3_server: LocalS3Server, s3_bucket: str, key: str) -> None:
    with FaultProxy(s3_server.endpoint_url, max_requests=1) as proxy:
        url = presigned(s3_server, proxy, s3_bucket.removeprefix("s3://"), key)
        urllib.request.urlopen(url, timeout=5).close()
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(url, timeout=5)
        with caught.value:
            assert caught.value.code == 503 and b"FaultProxyExhausted" in caught.value.read()
        assert proxy.refused == 1
    with FaultProxy(s3_server.endpoint_url, [Rule("stall", seconds=30)], max_lifetime=1) as proxy:
        url = presigned(s3_server, proxy, s3_bucket.removeprefix("s3://"), key)
        started = time.monotonic()
        with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
            raw_get(url, timeout=10)  # stalled, until the lifetime ends and the proxy resets it
        assert time.monotonic() - started < 3
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", int(proxy.endpoint_url.rsplit(":", 1)[1])), timeout=2).close()
