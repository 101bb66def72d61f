"""A low-CPU S3 path (GETs, ranges, listings, multipart uploads): SigV4 signing, a small HTTP/1.1 client.

Why: benchmarks/mapstyle.py measured aiobotocore (under s3fs) at ~1.2 ms of client CPU
per GET (event hooks, user-agent building, endpoint rules, response parsing), which
capped a map-style dataset of 4 KB objects at ~820 objects/s on 2 cores. Signing with
botocore's ``S3SigV4Auth`` and sending with aiohttp (both already dependencies) cost
~0.4 ms: ~2,000 objects/s on the same batches; signing with :mod:`s3pipes._sigv4`
instead (the same signatures, 96 -> ~15 us each) took it to ~0.3 ms, and sending with
:mod:`s3pipes._http` instead of aiohttp's session to ~0.16 ms. It is used only where it is exact: a
custom endpoint with path-style addressing (MinIO, SeaweedFS, ...) and explicit
credentials; everything else goes through s3fs. Errors come back as botocore
``ClientError``/aiohttp exceptions, so :func:`s3pipes.errors.translate` maps them as
it maps s3fs's.

Uploads (checkpoint parts) send ``UNSIGNED-PAYLOAD``: botocore hashes every body
with SHA-256 for a plain-http endpoint and adds a CRC32 (0.26 s of CPU per 256 MiB
here, on a machine whose two cores the local server needs), and takes no memoryview,
so each part would be copied once more. Integrity is the checkpoint's own sha256.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import mmap
import os
import random
import re
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import quote, urlencode
from xml.etree import ElementTree

import aiohttp
import fsspec.asyn
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from s3pipes._blockget import BlockGetter
from s3pipes._http import ATTEMPTS, RETRY_STATUS, Client, Response, resume_headers
from s3pipes._memory import anonymous_buffer
from s3pipes._sigv4 import Signer
from s3pipes.errors import NOT_S3_CODE

__all__ = ["FastGetter"]

_CODE = re.compile(rb"<Code>([^<]*)</Code>")
_MESSAGE = re.compile(rb"<Message>([^<]*)</Message>")
_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"

Range = tuple[str, str, int | None, int | None]  # bucket, key, start, end (exclusive)


Body = TypeVar("Body")


async def _read_all(response: Response) -> bytes:
    return await response.read()


class _Resumable:
    """One GET's body (an object, or its range ``[start, end)``), received across attempts.

    A retry asks only for the bytes still missing, on the same version (:func:`resume_headers`).
    """

    def __init__(self, start: int | None, end: int | None, buffer: memoryview | None = None) -> None:
        self._start, self._end, self._buffer = start or 0, end, buffer
        self._chunks: list[bytes] = []
        self._received = 0
        self._etag: str | None = None

    def headers(self) -> dict[str, str]:
        return resume_headers(self._start + self._received, self._end, self._etag if self._received else None)

    async def receive(self, response: Response) -> None:
        """Take the body; the client raises ClientPayloadError if it ends before its Content-Length."""
        if self._etag is None:
            self._etag = response.headers.get("etag")
        if response.status == 200 and self._start + self._received > 0:  # the Range was ignored: whole object
            if self._start or self._buffer is not None:
                raise aiohttp.ClientPayloadError(f"{response.url}: the store ignored the Range of a ranged read")
            self._chunks, self._received = [], 0  # a resumed whole-object read: start again from this answer
        if self._buffer is None:
            async for chunk in response.chunks():
                self._chunks.append(chunk)
                self._received += len(chunk)
            return
        size = len(self._buffer)  # a range inside the object: exactly this many bytes
        try:
            await response.readinto(self._buffer[self._received :])
        finally:
            self._received += response.received_into
        if self._received < size:
            raise aiohttp.ClientPayloadError(f"{response.url}: {self._received} bytes of the {size} asked for")

    def value(self) -> bytes:
        return b"".join(self._chunks)


async def _headers(response: Response) -> dict[str, str]:
    """The response's headers, names lowercased (servers differ: ``ETag``, ``Etag``)."""
    await response.read()
    return response.headers


async def _etag(response: Response) -> str:
    await response.read()
    return response.headers["etag"]


class FastGetter:
    """Concurrent GETs of whole objects or byte ranges from a path-style S3 endpoint.

    Runs on fsspec's I/O event loop, one HTTP client per process (built on first use).
    """

    def __init__(
        self,
        endpoint: str,
        credentials: Credentials,
        region: str,
        *,
        timeouts: tuple[float, float],
        verify: bool | str = True,
    ) -> None:
        self._endpoint = endpoint.rstrip("/")
        self._verify = verify
        self._signer = Signer(credentials.access_key, credentials.secret_key, credentials.token, region)
        self._timeouts = timeouts
        self._client: Client | None = None
        # Blocks of streams from a plain-http endpoint come on threads (see _blockget for why).
        plain = endpoint.startswith("http://")
        self.blocks = BlockGetter(endpoint, self._signer, timeouts, _client_error) if plain else None

    def fetch(self, ranges: Sequence[Range], *, concurrency: int) -> list[bytes | BaseException]:
        """Every range's bytes, or the exception that ended its last attempt, in order."""
        loop = fsspec.asyn.get_loop()
        return list(fsspec.asyn.sync(loop, self._fetch_all, ranges, concurrency))

    async def get_range(
        self, bucket: str, key: str, start: int, end: int, *, into: mmap.mmap | None = None
    ) -> mmap.mmap:
        """The bytes ``[start, end)`` of an object, a coroutine for fsspec's loop (parallel ranged reads).

        The body is received into one buffer of its size (``into``, when it is given and has
        that size): a ``read()`` holds the chunks and their join at once, twice
        the range at its peak.
        """
        buffer = into if into is not None and len(into) == end - start else anonymous_buffer(end - start)
        await self.receive_range(bucket, key, start, end, memoryview(buffer))
        return buffer

    async def receive_range(self, bucket: str, key: str, start: int, end: int, into: memoryview) -> None:
        """Receive the bytes ``[start, end)`` of an object into ``into`` (exactly that long), from the socket.

        A body cut short is resumed from the last byte received.
        """
        self._ensure_client()
        body = _Resumable(start, end, into)
        await self._request(self.object_url(bucket, key), body.headers, body.receive)

    def _ensure_client(self) -> None:
        """Build the HTTP client on the running loop, once (its finalizer closes it on that loop).

        Its pool has no limit of its own: every caller bounds its requests in flight (a
        ``concurrency``, the transfer window). A pool limit fixed by whichever call came
        first (a listing's 16, a write's 8) capped a later ``read_ranges(concurrency=32)``
        at that many: measured on 4 KB objects, 1,950 GETs/s instead of 2,400.
        """
        if self._client is None:
            connect, read = self._timeouts
            self._client = Client(self._endpoint, connect_timeout=connect, read_timeout=read, verify=self._verify)
            weakref.finalize(self, _close, self._client, asyncio.get_running_loop(), os.getpid())

    async def _fetch_all(self, ranges: Sequence[Range], concurrency: int) -> list[bytes | BaseException]:
        self._ensure_client()
        gate = asyncio.Semaphore(concurrency)
        return await asyncio.gather(*(self._get(gate, *item) for item in ranges), return_exceptions=True)

    async def _get(self, gate: asyncio.Semaphore, bucket: str, key: str, start: int | None, end: int | None) -> bytes:
        body = _Resumable(start, end)
        async with gate:
            await self._request(self.object_url(bucket, key), body.headers, body.receive)
        return body.value()

    def head(self, bucket: str, key: str) -> dict[str, Any]:
        """An object's info as s3fs gives it (``size``, ``ETag``, ``LastModified``, ...), from one HEAD."""
        loop = fsspec.asyn.get_loop()
        return dict(fsspec.asyn.sync(loop, self.head_async, bucket, key))

    async def head_async(self, bucket: str, key: str) -> dict[str, Any]:
        """:meth:`head` on the store's event loop."""
        self._ensure_client()
        headers = await self._request(self.object_url(bucket, key), {}, _headers, method="HEAD")
        return {
            "name": f"{bucket}/{key}",
            "size": int(headers.get("content-length", 0)),
            "ETag": headers.get("etag", ""),
            "LastModified": headers.get("last-modified", ""),
            "ContentType": headers.get("content-type", ""),
            "type": "file",
        }

    def list_objects(self, bucket: str, prefix: str) -> dict[str, dict[str, Any]]:
        """``{"bucket/key": info}`` of every object under ``prefix``, sub-prefixes listed concurrently."""
        loop = fsspec.asyn.get_loop()
        return dict(fsspec.asyn.sync(loop, self._list_all, bucket, prefix))

    async def _list_all(self, bucket: str, prefix: str) -> dict[str, dict[str, Any]]:
        self._ensure_client()
        found, subprefixes = await self._list(bucket, prefix, delimiter="/")
        for part in await asyncio.gather(*(self._list(bucket, sub, delimiter="") for sub in subprefixes)):
            found.update(part[0])
        return found

    async def _list(self, bucket: str, prefix: str, *, delimiter: str) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """One prefix, all pages: ``({"bucket/key": info}, [common prefixes])``."""
        found: dict[str, dict[str, Any]] = {}
        subprefixes: list[str] = []
        token: str | None = None
        while True:
            query = {"list-type": "2", "prefix": prefix, "max-keys": "1000"}
            if delimiter:
                query["delimiter"] = delimiter
            if token:
                query["continuation-token"] = token
            query_string = urlencode(sorted(query.items()), quote_via=quote)
            body = await self._request(f"{self._endpoint}/{bucket}?{query_string}", {}, _read_all)
            root = ElementTree.fromstring(body)
            for item in root.iterfind(f"{_NS}Contents"):
                key = item.findtext(f"{_NS}Key", "")
                found[f"{bucket}/{key}"] = {
                    "name": f"{bucket}/{key}",
                    "size": int(item.findtext(f"{_NS}Size", "0")),
                    "ETag": item.findtext(f"{_NS}ETag", ""),
                    "LastModified": item.findtext(f"{_NS}LastModified", ""),
                    "type": "file",
                }
            subprefixes += [p.findtext(f"{_NS}Prefix", "") for p in root.iterfind(f"{_NS}CommonPrefixes")]
            token = root.findtext(f"{_NS}NextContinuationToken")
            if root.findtext(f"{_NS}IsTruncated") != "true" or not token:
                return found, subprefixes

    # -- uploads: coroutines for fsspec's loop ---------------------------------------------

    async def create_multipart_upload(self, bucket: str, key: str) -> str:
        """A new multipart upload's id."""
        self._ensure_client()
        body = await self._request(self.object_url(bucket, key) + "?uploads", {}, _read_all, method="POST")
        upload_id = ElementTree.fromstring(body).findtext(f"{_NS}UploadId")
        if not upload_id:
            raise _client_error(200, body, "CreateMultipartUpload")
        return upload_id

    async def upload_part(self, bucket: str, key: str, upload_id: str, number: int, body: memoryview) -> str:
        """Send one part; its ETag (for completing the upload)."""
        url = f"{self.object_url(bucket, key)}?partNumber={number}&uploadId={quote(upload_id, safe='')}"
        return await self._request(url, {}, _etag, method="PUT", data=body)

    async def complete_multipart_upload(self, bucket: str, key: str, upload_id: str, etags: Sequence[str]) -> None:
        """Publish the object from its parts (``etags`` in part order)."""
        parts = "".join(f"<Part><PartNumber>{n}</PartNumber><ETag>{e}</ETag></Part>" for n, e in enumerate(etags, 1))
        document = f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode()
        url = f"{self.object_url(bucket, key)}?uploadId={quote(upload_id, safe='')}"
        try:
            body = await self._request(url, {}, _read_all, method="POST", data=memoryview(document))
        except ClientError as exc:
            # A retry after a lost reply finds the upload gone: completed, if the object is the one
            # these parts make (S3's multipart ETag: the MD5 of the parts' MD5s, "-", their count).
            if exc.response.get("Error", {}).get("Code") == "NoSuchUpload" and await self._has_parts(
                bucket, key, etags
            ):
                return
            raise
        if b"<Error>" in body:  # S3 may fail a completion after its 200 status line was sent
            raise _client_error(200, body, "CompleteMultipartUpload")

    async def _has_parts(self, bucket: str, key: str, etags: Sequence[str]) -> bool:
        digests = b"".join(bytes.fromhex(etag.strip('"')) for etag in etags)
        expected = f'"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{len(etags)}"'
        try:
            found = await self._request(self.object_url(bucket, key), {}, _etag, method="HEAD")
        except ClientError:
            return False
        return found == expected

    async def abort_multipart_upload(self, bucket: str, key: str, upload_id: str) -> None:
        url = f"{self.object_url(bucket, key)}?uploadId={quote(upload_id, safe='')}"
        try:
            await self._request(url, {}, _read_all, method="DELETE")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":  # gone: a retry after a lost reply
                raise

    async def put_object(self, bucket: str, key: str, body: memoryview) -> None:
        self._ensure_client()
        await self._request(self.object_url(bucket, key), {}, _read_all, method="PUT", data=body)

    def object_url(self, bucket: str, key: str) -> str:
        return f"{self._endpoint}/{bucket}/{quote(key, safe='/~')}"

    async def _request(
        self,
        url: str,
        headers: Mapping[str, str] | Callable[[], Mapping[str, str]],
        receive: Callable[[Response], Awaitable[Body]],
        *,
        method: str = "GET",
        data: memoryview | None = None,
    ) -> Body:
        """A signed request with retries on 5xx, dropped connections and bodies cut short (not on stalls).

        ``headers`` may be a function, called for every attempt (a resumed GET asks for
        the bytes it still lacks). A successful body is what ``receive`` makes of the
        response. The exception that ends the last attempt carries ``s3pipes_attempts``,
        which the error message reports.
        """
        for attempt in range(1, ATTEMPTS + 1):
            given = headers() if callable(headers) else headers
            signed = self._signer.sign(method, url, given, unsigned_payload=data is not None)  # a retry: a fresh date
            try:
                assert self._client is not None
                async with self._client.request(method, url, headers=signed, body=data) as response:
                    status = response.status
                    if status in (200, 204, 206):
                        return await receive(response)
                    body = await response.read()
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                if isinstance(exc, asyncio.TimeoutError):  # the client's timeouts are both: a stall is not retried,
                    raise  # so the timeout bounds the wait
                if attempt == ATTEMPTS:
                    exc.s3pipes_attempts = attempt  # type: ignore[union-attr]  # read by errors.translate
                    raise
            else:
                if status not in RETRY_STATUS or attempt == ATTEMPTS:
                    error = _client_error(status, body, _OPERATIONS.get(method, method))
                    error.s3pipes_attempts = attempt  # read by errors.translate
                    raise error
            await asyncio.sleep(random.uniform(0, min(1.0, 0.05 * 2**attempt)))  # full jitter, capped
        raise AssertionError("unreachable")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None  # connections stay with their process
        return state


def _close(client: Client, loop: asyncio.AbstractEventLoop, pid: int) -> None:
    """Close the client's connections on its loop (from a finalizer: never wait, never raise).

    Not in a forked child (``pid`` is the creator's): there the loop is a copy that no thread
    runs, whose wake-up socket is shared with the parent's. (With aiohttp's session, waiting
    for that copy stalled each DataLoader worker that collected an inherited getter by 2 s.)
    """
    if os.getpid() != pid or client.closed or loop.is_closed():
        return
    with contextlib.suppress(RuntimeError):  # the loop closed in between
        loop.call_soon_threadsafe(client.close)


_OPERATIONS = {"GET": "GetObject", "HEAD": "HeadObject", "PUT": "PutObject", "POST": "PostObject"}
"""The S3 operation an HTTP method stands for in error messages (a listing is a GET too)."""


def _client_error(status: int, body: bytes, operation: str = "GetObject") -> ClientError:
    """The error botocore would have raised for this reply (HEAD-less, so the code is in the body)."""
    code = _CODE.search(body)
    message = _MESSAGE.search(body)
    # S3 says why in its body, except to a HEAD
    fallback = NOT_S3_CODE if code is None and body.strip() and 400 <= status < 500 else str(status)
    error = {
        "Code": code.group(1).decode() if code else fallback,
        "Message": message.group(1).decode() if message else "",
    }
    return ClientError({"Error": error, "ResponseMetadata": {"HTTPStatusCode": status}}, operation)
