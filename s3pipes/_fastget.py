"""A low-CPU S3 path (GETs, ranges, listings, multipart uploads): botocore's SigV4 signing, aiohttp's HTTP.

Why: benchmarks/mapstyle.py measured aiobotocore (under s3fs) at ~1.2 ms of client CPU
per GET (event hooks, user-agent building, endpoint rules, response parsing), which
capped a map-style dataset of 4 KB objects at ~820 objects/s on 2 cores. Signing with
botocore's ``S3SigV4Auth`` and sending with aiohttp (both already dependencies) costs
~0.4 ms: ~2,000 objects/s on the same batches. It is used only where it is exact: a
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
import mmap
import random
import re
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import quote, urlencode
from xml.etree import ElementTree

import aiohttp
import aiohttp.abc
import aiohttp.payload
import fsspec.asyn
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

__all__ = ["FastGetter"]

_RETRY_STATUS = {500, 502, 503, 504}
_ATTEMPTS = 3
_CODE = re.compile(rb"<Code>([^<]*)</Code>")
_MESSAGE = re.compile(rb"<Message>([^<]*)</Message>")
_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_UNSIGNED_PAYLOAD = Config(s3={"payload_signing_enabled": False})  # what S3SigV4Auth reads from a request

Range = tuple[str, str, int | None, int | None]  # bucket, key, start, end (exclusive)


Body = TypeVar("Body")


async def _read_all(response: aiohttp.ClientResponse) -> bytes:
    return await response.read()


class _ViewPayload(aiohttp.payload.Payload):
    """A request body sent from a memoryview in 1 MiB writes, without a copy.

    aiohttp's own payload for bytes writes the body in one call and warns (a
    ResourceWarning) past 1 MiB; its file payloads read on a thread, chunk by chunk.
    """

    _CHUNK = 1 << 20

    def __init__(self, view: memoryview) -> None:
        super().__init__(view, content_type="application/octet-stream")
        self._size = self._nbytes = view.nbytes

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return bytes(self._value).decode(encoding, errors)

    async def write(self, writer: aiohttp.abc.AbstractStreamWriter) -> None:
        for start in range(0, self._nbytes, self._CHUNK):
            await writer.write(self._value[start : start + self._CHUNK])


async def _etag(response: aiohttp.ClientResponse) -> str:
    await response.read()
    return response.headers["ETag"]


class FastGetter:
    """Concurrent GETs of whole objects or byte ranges from a path-style S3 endpoint.

    Runs on fsspec's I/O event loop, one aiohttp session per process (built on first use).
    """

    def __init__(self, endpoint: str, credentials: Credentials, region: str, *, timeouts: tuple[float, float]) -> None:
        self._endpoint = endpoint.rstrip("/")
        self._auth = S3SigV4Auth(credentials, "s3", region)
        self._timeout = aiohttp.ClientTimeout(connect=timeouts[0], sock_read=timeouts[1])
        self._session: aiohttp.ClientSession | None = None

    def fetch(self, ranges: Sequence[Range], *, concurrency: int) -> list[bytes | BaseException]:
        """Every range's bytes, or the exception that ended its last attempt, in order."""
        loop = fsspec.asyn.get_loop()
        return list(fsspec.asyn.sync(loop, self._fetch_all, ranges, concurrency))

    async def get_range(
        self, bucket: str, key: str, start: int, end: int, *, into: mmap.mmap | None = None
    ) -> mmap.mmap:
        """The bytes ``[start, end)`` of an object, a coroutine for fsspec's loop (parallel ranged reads).

        The body is received into one buffer of its size (``into``, when it is given and has
        that size): ``aiohttp``'s ``read()`` holds the chunks and their join at once, twice
        the range at its peak.
        """
        self._ensure_session(8)
        url = f"{self._endpoint}/{bucket}/{quote(key, safe='/~')}"
        headers = {"Range": f"bytes={start}-{end - 1}"}
        return await self._request(url, headers, lambda response: _receive(response, end - start, into))

    def _ensure_session(self, connections: int) -> None:
        """Build the session on the running loop, once (its finalizer closes it on that loop)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=max(connections, 8)), timeout=self._timeout
            )
            weakref.finalize(self, _close, self._session, asyncio.get_running_loop())

    async def _fetch_all(self, ranges: Sequence[Range], concurrency: int) -> list[bytes | BaseException]:
        self._ensure_session(concurrency)
        gate = asyncio.Semaphore(concurrency)
        return await asyncio.gather(*(self._get(gate, *item) for item in ranges), return_exceptions=True)

    async def _get(self, gate: asyncio.Semaphore, bucket: str, key: str, start: int | None, end: int | None) -> bytes:
        url = f"{self._endpoint}/{bucket}/{quote(key, safe='/~')}"
        headers = (
            {} if start is None and end is None else {"Range": f"bytes={start or 0}-{'' if end is None else end - 1}"}
        )
        async with gate:
            return await self._request(url, headers, _read_all)

    def list_objects(self, bucket: str, prefix: str) -> dict[str, dict[str, Any]]:
        """``{"bucket/key": info}`` of every object under ``prefix``, sub-prefixes listed concurrently."""
        loop = fsspec.asyn.get_loop()
        return dict(fsspec.asyn.sync(loop, self._list_all, bucket, prefix))

    async def _list_all(self, bucket: str, prefix: str) -> dict[str, dict[str, Any]]:
        self._ensure_session(16)
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
        self._ensure_session(8)
        body = await self._request(self._object_url(bucket, key) + "?uploads", {}, _read_all, method="POST")
        upload_id = ElementTree.fromstring(body).findtext(f"{_NS}UploadId")
        if not upload_id:
            raise _client_error(200, body, "CreateMultipartUpload")
        return upload_id

    async def upload_part(self, bucket: str, key: str, upload_id: str, number: int, body: memoryview) -> str:
        """Send one part; its ETag (for completing the upload)."""
        url = f"{self._object_url(bucket, key)}?partNumber={number}&uploadId={quote(upload_id, safe='')}"
        return await self._request(url, {}, _etag, method="PUT", data=body)

    async def complete_multipart_upload(self, bucket: str, key: str, upload_id: str, etags: Sequence[str]) -> None:
        """Publish the object from its parts (``etags`` in part order)."""
        parts = "".join(f"<Part><PartNumber>{n}</PartNumber><ETag>{e}</ETag></Part>" for n, e in enumerate(etags, 1))
        document = f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode()
        url = f"{self._object_url(bucket, key)}?uploadId={quote(upload_id, safe='')}"
        body = await self._request(url, {}, _read_all, method="POST", data=memoryview(document))
        if b"<Error>" in body:  # S3 may fail a completion after its 200 status line was sent
            raise _client_error(200, body, "CompleteMultipartUpload")

    async def abort_multipart_upload(self, bucket: str, key: str, upload_id: str) -> None:
        url = f"{self._object_url(bucket, key)}?uploadId={quote(upload_id, safe='')}"
        await self._request(url, {}, _read_all, method="DELETE")

    async def put_object(self, bucket: str, key: str, body: memoryview) -> None:
        self._ensure_session(8)
        await self._request(self._object_url(bucket, key), {}, _read_all, method="PUT", data=body)

    def _object_url(self, bucket: str, key: str) -> str:
        return f"{self._endpoint}/{bucket}/{quote(key, safe='/~')}"

    async def _request(
        self,
        url: str,
        headers: dict[str, str],
        receive: Callable[[aiohttp.ClientResponse], Awaitable[Body]],
        *,
        method: str = "GET",
        data: memoryview | None = None,
    ) -> Body:
        """A signed request with retries on 5xx and dropped connections; the body, or a ClientError.

        A successful body is what ``receive`` makes of the response (``_read_all``: its bytes).
        """
        for attempt in range(1, _ATTEMPTS + 1):
            request = AWSRequest(method=method, url=url, headers=dict(headers))
            if data is not None:
                request.context["client_config"] = _UNSIGNED_PAYLOAD
            self._auth.add_auth(request)  # signs now: a retry gets a fresh date
            try:
                assert self._session is not None
                body_payload = _ViewPayload(data) if data is not None else None
                async with self._session.request(
                    method, url, headers=dict(request.headers.items()), data=body_payload
                ) as response:
                    status = response.status
                    if status in (200, 204, 206):
                        return await receive(response)
                    body = await response.read()
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError):
                if attempt == _ATTEMPTS:
                    raise
            else:
                if status not in _RETRY_STATUS or attempt == _ATTEMPTS:
                    raise _client_error(status, body)
            await asyncio.sleep(random.uniform(0, 0.1 * 2**attempt))
        raise AssertionError("unreachable")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_session"] = None  # connections stay with their process
        return state


async def _receive(response: aiohttp.ClientResponse, size: int, into: mmap.mmap | None = None) -> mmap.mmap:
    """The body, received into an anonymous mapping of ``size`` bytes (a shorter body raises).

    A mapping, not a bytearray: glibc keeps freed multi-MiB heap blocks allocated on a
    thread's arena (measured: 1.32x a 256 MiB state's size in RSS on load with
    bytearrays, 1.17x with mappings, which are returned to the system when collected).
    """
    buffer = into if into is not None and len(into) == size else mmap.mmap(-1, size)
    filled = 0
    async for chunk in response.content.iter_any():
        if filled + len(chunk) > size:
            raise aiohttp.ClientPayloadError(f"{response.url}: more than the {size} bytes asked for")
        buffer[filled : filled + len(chunk)] = chunk
        filled += len(chunk)
    if filled < size:
        raise aiohttp.ClientPayloadError(f"{response.url}: {filled} bytes of the {size} asked for")
    return buffer


def _close(session: aiohttp.ClientSession, loop: asyncio.AbstractEventLoop) -> None:
    """Close the session on its loop (from a finalizer: never wait long, never raise)."""
    if session.closed or loop.is_closed() or not loop.is_running():
        return
    with contextlib.suppress(RuntimeError):
        if asyncio.get_running_loop() is loop:  # collected on the loop's own thread: waiting would block it
            loop.create_task(session.close())
            return
    future = asyncio.run_coroutine_threadsafe(session.close(), loop)
    with contextlib.suppress(Exception):
        future.result(timeout=2)


def _client_error(status: int, body: bytes, operation: str = "GetObject") -> ClientError:
    """The error botocore would have raised for this reply (HEAD-less, so the code is in the body)."""
    code = _CODE.search(body)
    message = _MESSAGE.search(body)
    error = {
        "Code": code.group(1).decode() if code else str(status),
        "Message": message.group(1).decode() if message else "",
    }
    return ClientError({"Error": error, "ResponseMetadata": {"HTTPStatusCode": status}}, operation)
