"""OpenObject: shard URL -> a lazily opened, seekable byte stream through the Store.

The stream reads the object in ranged GETs of ``block_size`` bytes, ``ahead`` blocks
ahead (four by default) on other threads, so the network and the parsing overlap. It
replaces fsspec's buffered file on this hot path; measured on one 1 GiB shard of 4 MiB
members against SeaweedFS (same run):

===================================  ==============  ======================
reader                               MB/s            peak RSS growth
===================================  ==============  ======================
fsspec ``readahead``, 16 MiB blocks  592             138 MiB
fsspec ``readahead``, 8 MiB blocks   563             86 MiB
fsspec ``background``, 8 MiB blocks  457             317 MiB (grows)
this stream, 8 MiB blocks            see benchmarks  <= 5 blocks + a member
===================================  ==============  ======================

On S3's low-CPU path (:mod:`s3pipes._fastget`) each block is received from the socket
straight into one of the stream's own buffers, reused from block to block. Measured
fetching a 627 MB data set in 8 MiB blocks from SeaweedFS: into a fresh ``bytes`` per
block, half the client's CPU was page faults (0.79 s per pass, 147k faults, ~490 MB/s one
block ahead); into reused buffers 0.31 s, ~1,000 MB/s two blocks ahead (a thread pool of 8
boto3 GETs: 0.21 s, ~1,300 MB/s). :meth:`ObjectStream.read_view` hands those buffers out
without a copy to a reader that copies what it keeps (the tar parser). From a plain-http
endpoint the blocks come on threads with blocking sockets (:mod:`s3pipes._blockget`: one
``recv_into`` per block, no GIL held while the kernel fills it) instead of the event loop,
whose thread waited for the GIL held by the parser for every socket read.

A stream read whole, in order (``sequential``: ``Untar``'s, through ``OpenObject(open_ahead=True)``),
asks a plain-http endpoint for the rest of its object in one GET and receives that body block by
block, as buffers free up (:class:`s3pipes._blockget.Span`), instead of one ranged GET a block.
Measured on benchmarks/streaming.py's data (SeaweedFS on the same 2 cores, 12 raw passes each,
alternating): 32.9k -> 35.2k samples/s, 0.62x -> 0.65x the boto3 ceiling; per pass, SeaweedFS's
CPU 0.55-0.58 -> 0.53-0.54 s and the receiving threads' 0.15-0.16 -> 0.12-0.13 s (a GET costs the
server ~1 ms of CPU besides its bytes). The price: one connection per stream, not ``ahead``; the
parallelism is across streams (the next one opened ahead, DataLoader workers). A GET per ``ahead``
blocks (two connections) measured between the two (34.0k samples/s).

Memory: a stream holds ``ahead + 1`` blocks (the one being read and those being fetched);
``OpenObject``, opening the next stream ahead, gives it only the fetches the current one no longer
needs (``on_spare``): one window of ``ahead`` blocks across the two, 5 x 8 MiB by default.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import mmap
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any, cast

import fsspec.asyn
from torchdata.nodes import BaseNode

from s3pipes._blockget import Span
from s3pipes._memory import anonymous_buffer
from s3pipes._types import StateDict
from s3pipes.errors import StoreError
from s3pipes.stages.base import SOURCE_KEY, Stage
from s3pipes.store import Store

__all__ = ["DEFAULT_AHEAD", "DEFAULT_BLOCK_SIZE", "Block", "ObjectStream", "OpenObject"]

DEFAULT_BLOCK_SIZE = 8 << 20
"""Bytes per block while streaming (a ranged GET each, or received one after the other from one GET)."""

DEFAULT_AHEAD = 4
"""Blocks fetched ahead of the one being read: a stream holds at most this many plus one.

Measured (8 MiB blocks, SeaweedFS on the same 2 cores), receive only: one ahead ~770 MB/s,
two ~980 MB/s, three ~1,000 MB/s. Parsing 40 MB shards, the tar reader waited for blocks
0.25-0.39 s of a ~1 s pass with two ahead, 0.17-0.23 s with four, 0.14-0.27 s with six or
eight (alternating runs): the rest is waiting for a CPU, not for blocks asked too late.
"""

Block = bytes | memoryview
"""What :meth:`ObjectStream.read_view` returns: bytes, or a view of the stream's buffer."""


class ObjectStream:
    """A read-only stream over one object: ranged GETs, ``ahead`` blocks fetched ahead.

    Nothing is requested before the first read (or :meth:`prefetch`), so ``seek`` first costs
    nothing: the first GET starts there, which is how a shard resumes mid-way without re-reading
    its start. Errors are the Store's (translated, naming the URL; ``stage``, if given, is
    set on them so a pipeline's message says which stage failed). ``on_read(n)``, if
    given, is called with the size of every read's result (``OpenObject`` counts bytes so).
    ``buffers``: a list of spare block buffers shared with other streams read one after the
    other (``OpenObject`` shares one between its streams); a closed stream leaves its buffers
    there. Measured: three fresh 8 MiB buffers per 40 MB shard were 98k page faults per pass.
    ``on_spare(n)``, if given, is called after a read once every block has been asked for,
    with the number of fetches (of ``ahead``) the stream no longer uses: ``OpenObject`` gives
    them to the next stream. ``sequential``: the stream will be read from its position to its end
    in order; from a plain-http endpoint its blocks then come over one GET (a seek starts another).
    """

    def __init__(
        self,
        url: str,
        store: Store,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        ahead: int = DEFAULT_AHEAD,
        buffers: list[mmap.mmap] | None = None,
        on_read: Callable[[int], None] | None = None,
        on_spare: Callable[[int], None] | None = None,
        stage: str = "",
        sequential: bool = False,
    ) -> None:
        if ahead < 1:
            raise ValueError(f"{ahead=} must be at least 1")
        self.url, self._store, self._block_size, self._on_read = url, store, block_size, on_read
        self._on_spare = on_spare
        self._depth, self._stage = ahead, stage
        self._position = 0  # of the next byte a read returns
        self._size: int | None = None
        self._size_lookup: Future[dict[str, Any]] | None = None  # a HEAD started by prefetch(0)
        self._block: Block = b""  # the block being read
        self._block_at = 0  # the offset of its start
        self._ahead: collections.deque[Future[Block]] = collections.deque()  # the next blocks, in order
        self._ahead_at = 0  # where the block after the last one ahead starts
        self._spare = buffers if buffers is not None else []  # to receive blocks into again
        self._used: list[Block] = []  # blocks passed in the last read: reused from the next read on
        self._pool: ThreadPoolExecutor | None = None
        self._sequential = sequential
        self._span: Span | None = None  # the GET the blocks ahead come from (``sequential``, plain http)
        getter = store._fast_getter(url)  # the low-CPU path, where it applies
        self._getter = getter
        if getter is not None:
            self._bucket, _, self._key = store.resolve(url)[1].partition("/")
            self._object_url = getter.object_url(self._bucket, self._key)  # what blocks and spans GET

    @property
    def block_size(self) -> int:
        """Bytes per block; a ``read`` of this size at a block boundary returns the whole block."""
        return self._block_size

    def _fetch(self, start: int) -> Future[Block]:
        assert self._size is not None
        end = min(start + self._block_size, self._size)
        if self._getter is not None:
            try:  # pop, not a test then a pop: streams of one OpenObject may be read on threads
                buffer = self._spare.pop()
            except IndexError:
                buffer = anonymous_buffer(self._block_size)
            into = memoryview(buffer)[: end - start]
            blocks = self._getter.blocks
            if blocks is not None and self._sequential:  # one GET for the rest of the object
                if self._span is None or self._span.next_at != start:
                    self._close_span()
                    self._span = blocks.span(self._object_url, start, self._size)
                return cast("Future[Block]", self._span.submit(into))
            if blocks is not None:  # plain http: on a thread, off the event loop
                return cast("Future[Block]", blocks.submit(self._object_url, start, end, into))
            receive = self._receive(into, start, end)
            return asyncio.run_coroutine_threadsafe(receive, fsspec.asyn.get_loop())
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._depth, thread_name_prefix="s3pipes-fetch")
        return self._pool.submit(self._store.read_bytes, self.url, start, end)

    async def _receive(self, into: memoryview, start: int, end: int) -> Block:
        assert self._getter is not None
        await self._getter.receive_range(self._bucket, self._key, start, end, into)
        return into

    @contextlib.contextmanager
    def _naming_stage(self) -> Iterator[None]:
        """Store errors raised inside name this stream's stage (when it has one)."""
        try:
            yield
        except StoreError as exc:
            exc.in_stage(self._stage)
            raise

    def _object_size(self) -> int:
        if self._size is None:
            if self._size_lookup is not None:
                with self._store.errors(self.url):  # a failed HEAD raises here, each time it is asked
                    self._size = int(self._size_lookup.result()["size"])
            else:
                self._size = int(self._store.info(self.url)["size"])
        return self._size

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all the rest if negative); fewer only at the object's end."""
        with self._naming_stage():
            return bytes(self._read(size))

    def read_view(self, size: int = -1) -> Block:
        """As :meth:`read`, but without a copy where it can: valid only until the next read.

        The result may be a view of a buffer that a later block is received into after the
        next ``read``/``read_view`` (or ``close``): a caller copies what it keeps before then.
        """
        with self._naming_stage():
            return self._read(size)

    def _read(self, size: int) -> Block:
        self._size = self._object_size()
        if size < 0:
            size = self._size - self._position
        self._reuse(self._used)  # the caller is done with what the last read returned
        self._used = []
        parts: list[Block] = []
        while size > 0 and self._position < self._size:
            offset = self._position - self._block_at
            if offset >= len(self._block):  # this block is used up: take the next one
                block, self._block, self._block_at = self._block, b"", self._position  # never kept twice
                if parts:  # a piece of it is in this read's result
                    self._used.append(block)
                else:
                    self._keep_buffer(block)
                self._next_block()
                offset = 0
            piece = self._block[offset : offset + size]
            parts.append(piece)
            self._position += len(piece)
            size -= len(piece)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if self._on_read is not None:
            self._on_read(len(data))
        return data

    def _next_block(self) -> None:
        """Make the block at the position the one being read, and keep ``ahead`` blocks coming."""
        assert self._size is not None
        if not self._ahead:  # the first read, or after a seek (which drops them) or a failure
            self._ahead_at = self._position
        self._fill()
        future = self._ahead.popleft()
        self._block, self._block_at = b"", self._position  # the old block's buffer may be reused already
        try:
            with self._store.errors(self.url):
                self._block = future.result()
        except BaseException:
            self._drop()  # those ahead follow the failed one: a later read starts again here
            raise
        self._fill()
        if self._on_spare is not None and self._ahead_at >= self._size:
            self._on_spare(self._depth - len(self._ahead))  # every block is asked for: the rest is free

    def _fill(self, depth: int | None = None) -> None:
        assert self._size is not None
        depth = self._depth if depth is None else depth
        while len(self._ahead) < depth and self._ahead_at < self._size:
            self._ahead.append(self._fetch(self._ahead_at))
            self._ahead_at = min(self._ahead_at + self._block_size, self._size)

    def _keep_buffer(self, block: Block) -> None:
        """Keep ``block``'s buffer to receive a later block into (only the stream's own buffers)."""
        if isinstance(block, memoryview) and isinstance(block.obj, mmap.mmap) and len(self._spare) <= self._depth:
            self._spare.append(block.obj)

    def _reuse(self, blocks: list[Block]) -> None:
        for block in blocks:
            self._keep_buffer(block)

    def prefetch(self, blocks: int | None = None) -> None:
        """Before the first read, have ``blocks`` blocks (default and at most ``ahead``) coming from the position.

        Calls add blocks up to that number. ``blocks=0`` only looks the object's size up: on the
        store's event loop where it can (the HEAD's errors are raised by the first read), so the
        caller does not wait for it. A HEAD first, for any number, if the size is unknown.
        """
        if self._block or self._used:  # being read: its own reads keep blocks coming
            return
        if blocks == 0:
            if self._size is None and self._size_lookup is None and self._getter is not None:
                lookup = self._getter.head_async(self._bucket, self._key)
                self._size_lookup = asyncio.run_coroutine_threadsafe(lookup, fsspec.asyn.get_loop())
            return
        if self._size is None and self._size_lookup is not None and self._size_lookup.exception() is not None:
            return  # the lookup failed: the first read raises it (translating an error can cost a request)
        with self._naming_stage():
            self._object_size()
        if not self._ahead:
            self._ahead_at = self._position
        self._fill(self._depth if blocks is None else min(blocks, self._depth))

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 1:
            offset += self._position
        elif whence == 2:
            with self._naming_stage():
                offset += self._object_size()
        if offset < 0:
            raise ValueError(f"negative seek position {offset} in {self.url}")
        if offset == self._position:  # the blocks ahead (prefetched ones too) still follow
            return offset
        if not self._block_at <= offset < self._block_at + len(self._block):
            self._drop()
            self._block, self._block_at = b"", offset
        self._position = offset
        return offset

    def tell(self) -> int:
        return self._position

    def _drop(self) -> None:
        """Cancel the blocks ahead; only the buffers of those already received are reused
        (a cancelled GET may still be writing into its buffer)."""
        for future in self._ahead:
            if future.done() and not future.cancelled() and future.exception() is None:
                self._keep_buffer(future.result())
            else:
                future.cancel()
        self._ahead.clear()
        self._close_span()

    def _close_span(self) -> None:
        if self._span is not None:
            self._span.close()
            self._span = None

    def close(self) -> None:
        """Stop fetching; the buffers go back to ``buffers`` (when given). Idempotent."""
        self._drop()
        self._reuse([self._block, *self._used])
        self._block, self._used = b"", []
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> ObjectStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ObjectStream({self.url!r}, position={self._position})"


class OpenObject(Stage[ObjectStream]):
    """Turns each URL from ``source`` into an :class:`ObjectStream`. Position: the source's.

    With ``open_ahead`` (``Untar`` turns it on: it reads each stream whole, one after the other),
    the next URL's stream is opened one ahead: its size is looked up at once (a HEAD on the
    event loop, on S3), and its first blocks are fetched as soon as the current stream has asked
    for its last one, with the fetches that stream no longer needs, so a shard's first block does
    not wait for the last one to be parsed and no more than ``ahead`` blocks are fetched ahead in all.
    Off by default: streams read on threads, or kept unread, would each hold blocks early.
    Measured (16 shards of 40 MB, SeaweedFS on the same 2 cores, four alternating pairs of raw
    passes): 350-481 MB/s without, 402-486 MB/s with. The position is that of the stream
    handed out last: the one opened ahead is not counted as taken (its source's item count is).

    ``bytes_out`` counts the bytes read through its streams since the last ``reset`` (for ``Pipe.stats()``).
    ``shutdown()`` closes the stream opened ahead.
    """

    def __init__(
        self,
        source: BaseNode[str],
        store: Store,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        ahead: int = DEFAULT_AHEAD,
        open_ahead: bool = False,
    ) -> None:
        super().__init__()
        if block_size <= 0:
            raise ValueError(f"{block_size=} must be a positive number of bytes")
        if ahead < 1:
            raise ValueError(f"{ahead=} must be at least 1 block")
        self.source, self.store, self.block_size, self.ahead = source, store, block_size, ahead
        self.open_ahead = open_ahead
        self.bytes_out = 0
        self._buffers: list[mmap.mmap] = []  # spare block buffers, shared by its streams

    def reset(self, initial_state: StateDict | None = None) -> None:
        super().reset(initial_state)
        self.shutdown()
        self.source.reset(initial_state[SOURCE_KEY] if initial_state is not None else None)
        self.bytes_out = 0
        # The stream opened ahead, or what taking its URL raised (StopIteration too: raised when
        # that stream is asked for), with the source's state from before the URL was taken.
        self._following: tuple[ObjectStream | Exception, StateDict] | None = None

    def _open(self, url: str) -> ObjectStream:
        return ObjectStream(
            url,
            self.store,
            block_size=self.block_size,
            ahead=self.ahead,
            buffers=self._buffers,
            on_read=self._count,
            on_spare=self._give_spare if self.open_ahead else None,
            stage="open_object",
            sequential=self.open_ahead,
        )

    def next(self) -> ObjectStream:
        if self._following is not None:
            stream, self._following = self._following[0], None
            if isinstance(stream, Exception):
                raise stream
        else:
            stream = self._open(next(self.source))
        if self.open_ahead:
            self._open_following()
        self.items_out += 1
        return stream

    def _open_following(self) -> None:
        before = self.source.state_dict()
        try:
            following = self._open(next(self.source))
        except Exception as exc:  # StopIteration too: raised when the next stream is asked for
            self._following = exc, before
            return
        self._following = following, before
        with contextlib.suppress(Exception):  # reading it raises it again, in its turn
            following.prefetch(0)  # its size, looked up while the current stream is read

    def _give_spare(self, blocks: int) -> None:
        """The stream being read has asked for its last block: ``blocks`` more may come for the next one."""
        following = self._following[0] if self._following is not None else None
        if blocks > 0 and isinstance(following, ObjectStream):
            with contextlib.suppress(Exception):  # reading it raises it again, in its turn
                following.prefetch(blocks)

    def _count(self, size: int) -> None:
        self.bytes_out += size

    def shutdown(self) -> None:
        """Close the stream opened ahead, if any. Idempotent. ``reset()`` before iterating again."""
        following = getattr(self, "_following", None)
        if following is not None and isinstance(following[0], ObjectStream):
            following[0].close()
        self._following = None

    def get_state(self) -> StateDict:
        if self._following is not None:
            return {SOURCE_KEY: self._following[1]}
        return {SOURCE_KEY: self.source.state_dict()}
