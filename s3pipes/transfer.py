"""Big objects to and from S3 in parallel parts, never holding a second full copy.

Checkpoint payloads and tar shards go up through :func:`open_upload`; checkpoints come down
through :func:`open_download`.

Saving: :func:`open_upload` returns a file that ``torch.save`` (or a tar writer) writes into. Every
``PART_SIZE`` bytes it hands a part to the store (S3 multipart upload) and goes on
serialising while up to ``IN_FLIGHT`` parts upload concurrently; when that many are
in flight, ``write`` waits. Memory: ``(IN_FLIGHT + 1) * PART_SIZE``, whatever the state's
size. The object appears only when the file is closed cleanly (complete), and a failed
or abandoned save aborts the upload (discard): nothing partial is ever visible.

Loading: :func:`open_download` returns a seekable file that ``torch.load`` reads. It
keeps a window of ``IN_FLIGHT`` blocks of ``PART_SIZE`` bytes ahead of the reader,
fetched by concurrent ranged GETs, and drops each block once the reader is past it;
``torch.load`` copies every tensor's bytes straight from a block into the tensor's
storage (``readinto``). Memory: the loaded state plus the window. Reads outside the
window (torch first reads the zip directory at the end of the file) are served by
small ranged GETs of their own. With ``sha256=True`` every block is hashed in order as
it is dropped, and :meth:`ParallelReader.finish` fetches whatever the reader skipped,
so the digest covers the whole object.

Measured (benchmarks/checkpoint.py, 256 MiB state, 2 cores, local SeaweedFS): see the
README. Other stores than S3 go through :meth:`Store.open`, unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import io
import mmap
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any, Protocol, TypeVar, cast

from fsspec.core import split_protocol

from s3pipes._memory import anonymous_buffer
from s3pipes.errors import CorruptCheckpoint
from s3pipes.store import Store, StoreFile

__all__ = ["IN_FLIGHT", "PART_SIZE", "ParallelReader", "open_download", "open_upload"]

PART_SIZE = 8 << 20  # S3 wants >= 5 MiB parts (but the last); 8 MiB is what boto3 and the CRT use
IN_FLIGHT = 4  # parts or blocks transferring at once: the local server's CPU is saturated at 4 (see README)
_SIDE_READ = 256 << 10  # smallest GET for a read outside the window (the zip directory at the end)
_S3_PROTOCOLS = ("s3", "s3a")
Chunk = bytes | bytearray | mmap.mmap
T = TypeVar("T")


def _is_s3(url: str) -> bool:
    return split_protocol(url)[0] in _S3_PROTOCOLS


def _submit(fs: Any, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
    """Run ``coroutine`` on the filesystem's event loop; a future for this thread."""
    return asyncio.run_coroutine_threadsafe(coroutine, fs.loop)


# -- saving -----------------------------------------------------------------------------------


def open_upload(store: Store, url: str, *, part_size: int = PART_SIZE, in_flight: int = IN_FLIGHT) -> IO[bytes]:
    """A file that writes ``url`` in parallel parts; published on a clean close, aborted otherwise."""
    if not _is_s3(url):
        return store.open(url, "wb", block_size=part_size)
    fs, path = store.resolve(url)
    bucket, _, key = path.partition("/")
    client: _PartClient = store._fast_getter(url) or _BotocoreParts(fs)  # the low-CPU path, where it applies
    upload = _MultipartUpload(fs.loop, client, bucket, key, part_size=part_size, in_flight=in_flight)
    return cast(IO[bytes], StoreFile(upload, store, url, commit=True))


class _PartClient(Protocol):
    """The five S3 calls an upload makes: :class:`s3pipes._fastget.FastGetter` or :class:`_BotocoreParts`."""

    async def create_multipart_upload(self, bucket: str, key: str) -> str: ...
    async def upload_part(self, bucket: str, key: str, upload_id: str, number: int, body: memoryview) -> str: ...
    async def complete_multipart_upload(self, bucket: str, key: str, upload_id: str, etags: Sequence[str]) -> None: ...
    async def abort_multipart_upload(self, bucket: str, key: str, upload_id: str) -> None: ...
    async def put_object(self, bucket: str, key: str, body: memoryview) -> None: ...


class _BotocoreParts:
    """The five calls through s3fs's aiobotocore client: any S3 (AWS, virtual-hosted buckets, SSO, ...)."""

    def __init__(self, fs: Any) -> None:
        self._fs = fs

    async def create_multipart_upload(self, bucket: str, key: str) -> str:
        return str((await self._fs._call_s3("create_multipart_upload", Bucket=bucket, Key=key))["UploadId"])

    async def upload_part(self, bucket: str, key: str, upload_id: str, number: int, body: memoryview) -> str:
        reply = await self._fs._call_s3(
            "upload_part", Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=bytes(body)
        )  # botocore takes bytes, not a view: one more copy, of one part
        return str(reply["ETag"])

    async def complete_multipart_upload(self, bucket: str, key: str, upload_id: str, etags: Sequence[str]) -> None:
        parts = [{"PartNumber": number, "ETag": etag} for number, etag in enumerate(etags, 1)]
        await self._fs._call_s3(
            "complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
        )

    async def abort_multipart_upload(self, bucket: str, key: str, upload_id: str) -> None:
        await self._fs._call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)

    async def put_object(self, bucket: str, key: str, body: memoryview) -> None:
        await self._fs._call_s3("put_object", Bucket=bucket, Key=key, Body=bytes(body))


class _MultipartUpload:
    """The handle behind :func:`open_upload`: parts go up while the caller keeps writing.

    Each part is filled in an anonymous mapping (one copy of the caller's bytes, which
    ``torch.save`` may reuse once ``write`` returns) and handed to the upload whole; the
    mapping of a part done is filled again (see ``_fastget._receive`` for why mappings, and
    ParallelReader's ``recycle`` for why again). An object smaller than one part is sent by
    one PUT when committed.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: _PartClient,
        bucket: str,
        key: str,
        *,
        part_size: int,
        in_flight: int,
    ) -> None:
        if part_size < 5 << 20 or in_flight < 1:
            raise ValueError(f"{part_size=} must be >= 5 MiB (S3's minimum) and {in_flight=} >= 1")
        self._loop, self._client, self._bucket, self._key = loop, client, bucket, key
        self._part_size, self._in_flight = part_size, in_flight
        self._buffer, self._filled = anonymous_buffer(part_size), 0
        self._upload_id: str | None = None
        self._pending: list[tuple[Future[str], mmap.mmap]] = []  # parts in flight, in order: ETag, buffer
        self._spare: mmap.mmap | None = None  # the buffer of a part done, filled again (no page faults)
        self._etags: list[str] = []  # of the parts done, in order
        self._position = 0
        self.closed = False

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        written = len(view)
        while view:
            take = min(len(view), self._part_size - self._filled)
            self._buffer[self._filled : self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
            if self._filled == self._part_size:
                self._send_part()
        self._position += written
        return written

    def _send_part(self) -> None:
        if self._upload_id is None:
            self._upload_id = self._run(self._client.create_multipart_upload(self._bucket, self._key)).result()
        while len(self._pending) >= self._in_flight:
            future, self._spare = self._pending.pop(0)
            self._etags.append(future.result())  # raises the part's error, if any
        number = len(self._etags) + len(self._pending) + 1
        buffer, body = self._buffer, memoryview(self._buffer)[: self._filled]
        self._buffer, self._filled = self._spare or anonymous_buffer(self._part_size), 0
        self._spare = None
        part = self._client.upload_part(self._bucket, self._key, self._upload_id, number, body)
        self._pending.append((self._run(part), buffer))

    def flush(self) -> None:
        """Nothing to do: parts go up as they fill, the rest when committed."""

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = 0) -> int:
        if (offset, whence) in ((self._position, 0), (0, 1)):
            return self._position
        raise io.UnsupportedOperation("an upload in progress only appends")

    def close(self) -> None:
        self.closed = True

    def commit(self) -> None:
        """Publish: the last part, then complete the upload (or one PUT for a small object)."""
        if self._upload_id is None:
            body = memoryview(self._buffer)[: self._filled]
            self._run(self._client.put_object(self._bucket, self._key, body)).result()
            return
        if self._filled or not (self._etags or self._pending):
            self._send_part()
        self._etags += [future.result() for future, _ in self._pending]
        self._pending = []
        self._run(
            self._client.complete_multipart_upload(self._bucket, self._key, self._upload_id, self._etags)
        ).result()

    def discard(self) -> None:
        """Abort: parts in flight are awaited (a cancelled request may still land after the abort),
        then the store drops the uploaded ones."""
        for future, _ in self._pending:
            with contextlib.suppress(Exception):  # the part's own error is not the one to report
                future.result()
        self._pending = []
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            self._run(self._client.abort_multipart_upload(self._bucket, self._key, upload_id)).result()

    def readable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False


# -- loading ----------------------------------------------------------------------------------


def open_download(
    store: Store,
    url: str,
    *,
    size: int | None = None,
    sha256: bool = False,
    block_size: int = PART_SIZE,
    in_flight: int = IN_FLIGHT,
) -> ParallelReader:
    """A seekable file reading ``url`` through a window of parallel ranged GETs.

    ``size`` saves a HEAD when the caller knows it (a checkpoint marker records it).
    On S3 the GETs run on fsspec's event loop (the low-CPU path where it applies); other
    stores read ranges on a small thread pool.
    """
    if size is None:
        size = int(store.info(url)["size"])
    fetch: Callable[[int, int], Future[Chunk]]
    if _is_s3(url):
        fs, path = store.resolve(url)
        getter = store._fast_getter(url)  # the low-CPU GET path, where it applies
        bucket, _, key = path.partition("/")

        spare: list[mmap.mmap] = []  # blocks the reader dropped, received into again

        def fetch(start: int, end: int) -> Future[Chunk]:
            if getter is not None:
                into = spare.pop() if spare and len(spare[-1]) == end - start else None
                return _submit(fs, getter.get_range(bucket, key, start, end, into=into))
            return _submit(fs, fs._cat_file(path, start=start, end=end))

        def recycle(block: Chunk) -> None:
            if isinstance(block, mmap.mmap) and len(spare) < 2:
                spare.append(block)

        return ParallelReader(
            store, url, fetch, size, sha256=sha256, block_size=block_size, in_flight=in_flight, recycle=recycle
        )

    else:

        def fetch(start: int, end: int) -> Future[Chunk]:
            return _threads().submit(store.read_bytes, url, start, end)

    return ParallelReader(store, url, fetch, size, sha256=sha256, block_size=block_size, in_flight=in_flight)


@functools.cache
def _threads() -> ThreadPoolExecutor:
    """The pool reading ranges of non-S3 stores (file://, memory://, ...), shared by every reader."""
    return ThreadPoolExecutor(max_workers=IN_FLIGHT, thread_name_prefix="s3pipes-read")


class ParallelReader(io.RawIOBase):
    """A seekable reader over ``size`` bytes, fetched in blocks by a window of concurrent GETs.

    Args:
        store, url: for translating errors (the message names ``url``).
        fetch: ``fetch(start, end)`` returns a future of those bytes.
        size: the object's size in bytes.
        sha256: hash every byte in order (:meth:`finish` returns the digest).
        block_size, in_flight: the window is ``in_flight`` blocks of ``block_size`` bytes.
        recycle: called with each block the reader dropped (and will never read again), for
            ``fetch`` to receive a later block into. Measured: receiving into fresh mappings
            costs a page fault per 4 KiB, ~10% of a load's CPU.
    """

    def __init__(
        self,
        store: Store,
        url: str,
        fetch: Callable[[int, int], Future[Chunk]],
        size: int,
        *,
        sha256: bool = False,
        block_size: int = PART_SIZE,
        in_flight: int = IN_FLIGHT,
        recycle: Callable[[Chunk], None] | None = None,
    ) -> None:
        super().__init__()
        self._store, self._url, self._fetch, self._recycle = store, url, fetch, recycle
        self._size, self._block, self._window = size, block_size, in_flight
        self._blocks: dict[int, Future[Chunk]] = {}
        self._low = 0  # the lowest block still held; blocks below it were dropped (and hashed)
        self._issued = 0  # blocks [0, _issued) were requested
        self._count = -(-size // block_size)
        self._position = 0
        self._hash = hashlib.sha256() if sha256 else None
        self._side: OrderedDict[int, Chunk] = OrderedDict()  # start -> bytes, for reads outside the window
        self.error: Exception | None = None  # the store error that ended a read, for the caller to re-raise
        self._issue()

    # the window ------------------------------------------------------------------------------

    def _span(self, block: int) -> tuple[int, int]:
        start = block * self._block
        return start, min(start + self._block, self._size)

    def _issue(self) -> None:
        while self._issued < min(self._low + self._window, self._count):
            self._blocks[self._issued] = self._fetch(*self._span(self._issued))
            self._issued += 1

    def _result(self, future: Future[Chunk], start: int, end: int) -> Chunk:
        """The bytes of a finished (or awaited) GET, with store errors translated; the length checked."""
        try:
            with self._store.errors(self._url):
                data = future.result()
            if len(data) != end - start:
                raise CorruptCheckpoint(
                    self._url, f"changed while being read: bytes {start}..{end} came back {len(data)} long"
                )
        except Exception as exc:
            self.error = exc  # torch.load turns what readinto raises into its own RuntimeError
            raise
        return data

    def _advance(self, block: int) -> None:
        """Drop (and hash) every block below ``block``; fetch ahead up to the window."""
        while self._low < block:
            data = self._result(self._blocks.pop(self._low), *self._span(self._low))
            if self._hash is not None:
                self._hash.update(data)
            if self._recycle is not None:
                self._recycle(data)
            self._low += 1
            self._issue()

    def finish(self) -> str | None:
        """Fetch and hash what the reader skipped; the object's sha256 (hex), if asked for."""
        self._advance(self._count)
        return self._hash.hexdigest() if self._hash is not None else None

    # the file --------------------------------------------------------------------------------

    def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` completely, unless the object ends first (torch treats short reads as errors)."""
        self._checkClosed()  # io.IOBase's: ValueError on a closed file
        target = memoryview(buffer).cast("B")
        done = 0
        while done < len(target) and self._position < self._size:
            chunk = self._bytes_at(self._position, len(target) - done)
            target[done : done + len(chunk)] = chunk
            done += len(chunk)
            self._position += len(chunk)
        return done

    def _bytes_at(self, position: int, wanted: int) -> memoryview:
        """Some bytes (at most ``wanted``) starting at ``position``: from the window or a side read."""
        block = position // self._block
        if self._low <= block < self._low + self._window:
            self._advance(block)
            data, start = self._result(self._blocks[block], *self._span(block)), block * self._block
        else:
            data, start = self._side_read(position, wanted)
        offset = position - start
        return memoryview(data)[offset : offset + wanted]

    def _side_read(self, position: int, wanted: int) -> tuple[Chunk, int]:
        for start, data in self._side.items():
            if start <= position < start + len(data):
                return data, start
        if wanted > _SIDE_READ:  # a big read far from the window: fetched as asked, not kept
            end = min(self._size, position + wanted)
            return self._result(self._fetch(position, end), position, end), position
        start = max(0, position - _SIDE_READ // 2)
        end = min(self._size, position + _SIDE_READ)
        data = self._result(self._fetch(start, end), start, end)
        self._side[start] = data
        while len(self._side) > 2:
            self._side.popitem(last=False)
        return data, start

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        bases = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}
        if whence not in bases:
            raise ValueError(f"{whence=} is not one of io.SEEK_SET, SEEK_CUR, SEEK_END")
        base = bases[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset} in {self._url}")
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        """Drop the blocks; GETs in flight finish in the background and are discarded."""
        for future in self._blocks.values():
            future.cancel()
        self._blocks.clear()
        self._side.clear()
        super().close()

    def __repr__(self) -> str:
        return f"<s3pipes parallel reader {self._url}>"
