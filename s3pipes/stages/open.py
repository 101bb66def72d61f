"""OpenObject: shard URL -> a lazily opened, seekable byte stream through the Store.

The stream reads the object in ranged GETs of ``block_size`` bytes, one block ahead
on a background thread, so the network and the parsing overlap. It replaces fsspec's
buffered file on this hot path; measured on one 1 GiB shard of 4 MiB members against
SeaweedFS (same run):

===================================  ==============  ======================
reader                               MB/s            peak RSS growth
===================================  ==============  ======================
fsspec ``readahead``, 16 MiB blocks  592             138 MiB
fsspec ``readahead``, 8 MiB blocks   563             86 MiB
fsspec ``background``, 8 MiB blocks  457             317 MiB (grows)
this stream, 8 MiB blocks            see benchmarks  <= 2 blocks + a member
===================================  ==============  ======================

Memory: at most two blocks (the one being read and the one being fetched).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType

from torchdata.nodes import BaseNode

from s3pipes._types import StateDict
from s3pipes.errors import StoreError
from s3pipes.stages.base import SOURCE_KEY, Stage
from s3pipes.store import Store

__all__ = ["DEFAULT_BLOCK_SIZE", "ObjectStream", "OpenObject"]

DEFAULT_BLOCK_SIZE = 8 << 20
"""Bytes per ranged GET while streaming; a stream holds at most two such blocks."""


class ObjectStream:
    """A read-only stream over one object: ranged GETs, one block fetched ahead.

    Nothing is requested before the first read, so ``seek`` first costs nothing: the
    first GET starts there, which is how a shard resumes mid-way without re-reading
    its start. Errors are the Store's (translated, naming the URL; ``stage``, if given, is
    set on them so a pipeline's message says which stage failed). ``on_read(n)``, if
    given, is called with the size of every ``read()`` result (``OpenObject`` counts bytes so).
    """

    def __init__(
        self,
        url: str,
        store: Store,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        on_read: Callable[[int], None] | None = None,
        stage: str = "",
    ) -> None:
        self.url, self._store, self._block_size, self._on_read = url, store, block_size, on_read
        self._stage = stage
        self._position = 0  # of the next byte read() returns
        self._size: int | None = None
        self._block, self._block_at = b"", 0  # bytes held, and the offset of their start
        self._ahead: Future[bytes] | None = None  # the next block, being fetched
        self._pool: ThreadPoolExecutor | None = None

    @property
    def block_size(self) -> int:
        """Bytes per ranged GET; a ``read`` of this size at a block boundary returns the block itself."""
        return self._block_size

    def _fetch(self, start: int) -> Future[bytes]:
        assert self._size is not None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="s3pipes-fetch")
        end = min(start + self._block_size, self._size)
        return self._pool.submit(self._store.read_bytes, self.url, start, end)

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
            self._size = int(self._store.info(self.url)["size"])
        return self._size

    def read(self, size: int = -1) -> bytes:
        with self._naming_stage():
            return self._read(size)

    def _read(self, size: int) -> bytes:
        self._size = self._object_size()
        if size < 0:
            size = self._size - self._position
        parts: list[bytes] = [b""]
        while size > 0 and self._position < self._size:
            offset = self._position - self._block_at
            if offset >= len(self._block):  # this block is used up: take the next one
                self._block_at += len(self._block)
                if self._ahead is None or self._block_at != self._position:
                    self._block_at, self._ahead = self._position, self._fetch(self._position)
                self._block = self._ahead.result()
                next_at = self._block_at + len(self._block)
                self._ahead = self._fetch(next_at) if next_at < self._size else None
                offset = 0
            piece = self._block[offset : offset + size]
            parts.append(piece)
            self._position += len(piece)
            size -= len(piece)
        data = parts[-1] if len(parts) == 2 else b"".join(parts)
        if self._on_read is not None:
            self._on_read(len(data))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 1:
            offset += self._position
        elif whence == 2:
            with self._naming_stage():
                offset += self._object_size()
        if offset < 0:
            raise ValueError(f"negative seek position {offset} in {self.url}")
        if not self._block_at <= offset < self._block_at + len(self._block):
            self._drop()
            self._block, self._block_at = b"", offset
        self._position = offset
        return offset

    def tell(self) -> int:
        return self._position

    def _drop(self) -> None:
        if self._ahead is not None:
            self._ahead.cancel()
            self._ahead = None

    def close(self) -> None:
        """Stop fetching and release the buffers. Idempotent."""
        self._drop()
        self._block = b""
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

    ``bytes_out`` counts the bytes read through its streams since the last ``reset`` (for ``Pipe.stats()``).
    """

    def __init__(self, source: BaseNode[str], store: Store, *, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        super().__init__()
        if block_size <= 0:
            raise ValueError(f"{block_size=} must be a positive number of bytes")
        self.source, self.store, self.block_size = source, store, block_size
        self.bytes_out = 0

    def reset(self, initial_state: StateDict | None = None) -> None:
        super().reset(initial_state)
        self.source.reset(initial_state[SOURCE_KEY] if initial_state is not None else None)
        self.bytes_out = 0

    def next(self) -> ObjectStream:
        url = next(self.source)
        stream = ObjectStream(url, self.store, block_size=self.block_size, on_read=self._count, stage="open_object")
        self.items_out += 1
        return stream

    def _count(self, size: int) -> None:
        self.bytes_out += size

    def get_state(self) -> StateDict:
        return {SOURCE_KEY: self.source.state_dict()}
