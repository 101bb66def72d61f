"""Every error kind, against the real auth-enforcing SeaweedFS: right class, names the URL, fast, no secret."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

import s3pipes
from s3pipes import Store
from s3pipes.server import LocalS3Server

pytestmark = pytest.mark.integration

FAST = 5.0  # seconds: every error must arrive within this by default


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def expect(
    error: type[BaseException], builtin: type[BaseException], call: Callable[[], object], *names: str
) -> BaseException:
    started = time.monotonic()
    with pytest.raises(error) as info:
        call()
    elapsed = time.monotonic() - started
    assert isinstance(info.value, builtin)
    assert elapsed < FAST, f"{error.__name__} took {elapsed:.1f} s"
    for name in names:
        assert name in str(info.value), f"{name!r} not in {info.value}"
    return info.value


# Each failing operation is tried through the three paths users take: list, read, open+read.
def operations(store: Store, url: str) -> dict[str, Callable[[], object]]:
    return {
        "list": lambda: store.list(url),
        "read": lambda: store.read_bytes(url),
        "open": lambda: read_via_open(store, url),
    }


def read_via_open(store: Store, url: str) -> bytes:
    with store.open(url) as f:
        return f.read()


@pytest.mark.parametrize("op", ["list", "read", "open"])
def test_missing_bucket(s3_server: LocalS3Server, s3_store: Store, op: str) -> None:
    url = "s3://no-such-bucket-here/train/shard-000.tar"
    expect(s3pipes.BucketNotFound, FileNotFoundError, operations(s3_store, url)[op], url, s3_server.endpoint_url)


@pytest.mark.parametrize("op", ["read", "open"])
def test_missing_object(s3_server: LocalS3Server, s3_store: Store, s3_root: str, op: str) -> None:
    url = f"{s3_root}/no/such/object.tar"
    expect(s3pipes.ObjectNotFound, FileNotFoundError, operations(s3_store, url)[op], url, s3_server.endpoint_url)


@pytest.mark.parametrize("op", ["list", "read", "open"])
def test_bad_secret(s3_server: LocalS3Server, s3_store: Store, s3_root: str, op: str) -> None:
    url = f"{s3_root}/object.bin"
    s3_store.write_bytes(url, b"payload")
    wrong = Store({**s3_server.storage_options, "secret": "not-the-secret"})
    err = expect(s3pipes.SignatureMismatch, PermissionError, operations(wrong, url)[op], url, "AWS_SECRET_ACCESS_KEY")
    assert "not-the-secret" not in str(err)


@pytest.mark.parametrize("op", ["list", "read", "open"])
def test_unknown_access_key(s3_server: LocalS3Server, s3_store: Store, s3_root: str, op: str) -> None:
    url = f"{s3_root}/object.bin"
    s3_store.write_bytes(url, b"payload")
    stranger = Store({**s3_server.storage_options, "key": "AKIDONTKNOWYOU"})
    expect(s3pipes.UnknownAccessKey, PermissionError, operations(stranger, url)[op], url, "AWS_ACCESS_KEY_ID")


@pytest.mark.parametrize("op", ["list", "read", "open", "write"])
def test_missing_credentials(s3_server: LocalS3Server, s3_root: str, op: str) -> None:
    url = f"{s3_root}/object.bin"
    anonymous = Store({"endpoint_url": s3_server.endpoint_url})
    calls = {**operations(anonymous, url), "write": lambda: anonymous.write_bytes(url, b"x")}
    expect(s3pipes.CredentialsMissing, PermissionError, calls[op], url, "AWS_ACCESS_KEY_ID")


def test_read_only_identity_cannot_write(s3_server: LocalS3Server, s3_store: Store, s3_root: str) -> None:
    url = f"{s3_root}/written-by-reader.bin"
    reader = Store(s3_server.readonly_storage_options)
    expect(s3pipes.AccessDenied, PermissionError, lambda: reader.write_bytes(url, b"x"), url)
    assert not s3_store.exists(url)


@pytest.mark.parametrize("op", ["list", "read", "open"])
def test_nothing_listening(op: str) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    store = Store({"endpoint_url": endpoint, "key": "k", "secret": "s"})
    url = "s3://bucket/object.bin"
    err = expect(s3pipes.EndpointUnreachable, ConnectionError, operations(store, url)[op], url, endpoint)
    assert "refused" in str(err)


@pytest.fixture(scope="module")
def web_page_endpoint() -> Iterator[str]:
    """An HTTP server that is not S3: every request gets an HTML 404 page (a console port, a wrong service)."""
    import http.server
    import threading

    class NotFoundPage(http.server.BaseHTTPRequestHandler):
        def answer(self) -> None:
            body = b"<html><body><h1>404 Not Found</h1></body></html>"
            self.send_response(404)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = answer

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFoundPage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("op", ["list", "read", "open", "info", "exists", "write", "pipe"])
def test_an_endpoint_that_is_not_s3_is_named_so(web_page_endpoint: str, op: str) -> None:
    """It answered 404 to everything, which read as "object does not exist" (and exists() False)."""
    store = Store({"endpoint_url": web_page_endpoint, "key": "k", "secret": "s"})
    url = "s3://bucket/train/object.bin"
    calls = {
        **operations(store, url),
        "info": lambda: store.info(url),
        "exists": lambda: store.exists(url),
        "write": lambda: store.write_bytes(url, b"x"),
        "pipe": lambda: s3pipes.webdataset("s3://bucket/train/", store=store),
    }
    err = expect(s3pipes.EndpointNotS3, ConnectionError, calls[op], "s3://bucket/train/", web_page_endpoint)
    assert "HTTP 404 without an S3 error code" in str(err)


def test_malformed_endpoint_from_environment(monkeypatch: pytest.MonkeyPatch, s3_server: LocalS3Server) -> None:
    no_scheme = s3_server.endpoint_url.removeprefix("http://")
    monkeypatch.setenv("AWS_ENDPOINT_URL", no_scheme)
    err = expect(s3pipes.MalformedEndpoint, ValueError, Store.from_env, no_scheme, "AWS_ENDPOINT_URL")
    assert f"http://{no_scheme}" in str(err)


def test_write_to_missing_bucket_fails_at_close_and_names_it(s3_server: LocalS3Server, s3_store: Store) -> None:
    url = "s3://no-such-bucket-for-writes/out.bin"

    def write() -> None:
        with s3_store.open(url, "wb") as f:
            f.write(b"data")

    expect(s3pipes.BucketNotFound, FileNotFoundError, write, url)


def test_environment_configuration_reaches_the_server(
    monkeypatch: pytest.MonkeyPatch, s3_server: LocalS3Server, s3_root: str
) -> None:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    store = Store.from_env()
    store.write_bytes(f"{s3_root}/from-env.txt", b"ok")
    assert store.list(s3_root) == [f"{s3_root}/from-env.txt"]


def test_secret_never_printed(s3_server: LocalS3Server, s3_root: str, caplog: pytest.LogCaptureFixture) -> None:
    """Exceptions, reprs, DEBUG logs and CLI output of failing and succeeding calls never contain the secret."""
    caplog.set_level(logging.DEBUG)
    secret = s3_server.secret
    Store(s3_server.storage_options).write_bytes(f"{s3_root}/ok.bin", b"logged")
    seen: list[str] = [repr(Store(s3_server.storage_options)), repr(s3_server), str(Store(s3_server.storage_options))]
    wrong_key = Store({**s3_server.storage_options, "key": "AKIDONTKNOWYOU"})
    for call in (lambda: wrong_key.list(s3_root), lambda: wrong_key.read_bytes(f"{s3_root}/x")):
        try:
            call()
        except s3pipes.S3PipesError as exc:
            seen += [str(exc), repr(exc), repr(exc.__cause__)]
    env = {**dict(__import__("os").environ), **s3_server.env()}
    for argv in (["ls", s3_root], ["ls", "s3://no-such-bucket-cli/"], ["ls", f"{s3_root}/missing/"]):
        result = subprocess.run(
            [sys.executable, "-m", "s3pipes.cli", *argv], capture_output=True, text=True, env=env, timeout=60
        )
        seen += [result.stdout, result.stderr]
    missing_bucket_output = seen[-3]
    assert "no-such-bucket-cli" in missing_bucket_output and "bucket does not exist" in missing_bucket_output
    seen.append(caplog.text)
    assert len(caplog.text) > 1000, "DEBUG logging was captured"
    for text in seen:
        assert secret not in text


@pytest.mark.parametrize(
    ("options", "url_of", "error"),
    [
        ({}, lambda root: "s3://no-such-bucket-batch/k.png", s3pipes.BucketNotFound),
        ({}, lambda root: f"{root}/missing.png", s3pipes.ObjectNotFound),
        ({"secret": "not-the-secret"}, lambda root: f"{root}/present.png", s3pipes.SignatureMismatch),
        ({"key": "AKIDONTKNOWYOU"}, lambda root: f"{root}/present.png", s3pipes.UnknownAccessKey),
    ],
    ids=["missing-bucket", "missing-object", "bad-secret", "unknown-key"],
)
def test_batched_reads_name_the_failing_object(
    s3_server: LocalS3Server,
    s3_store: Store,
    s3_root: str,
    options: dict[str, str],
    url_of: Callable[[str], str],
    error: type,
) -> None:
    """read_ranges (MapDataset batches) takes its own low-CPU GET path: same errors, same names."""
    s3_store.write_bytes(f"{s3_root}/present.png", b"x")
    store = Store({**s3_server.storage_options, **options})
    url = url_of(s3_root)
    expect(error, s3pipes.StoreError, lambda: store.read_ranges([f"{s3_root}/present.png", url]), url)
