"""OpenObject: shard URL -> a lazily opened, seekable byte stream through the Store."""

from __future__ import annotations

from types import TracebackType
from typing import IO

from torchdata.nodes import BaseNode

from s3pipes._types import StateDict
from s3pipes.stages.base import SOURCE_KEY, Stage
from s3pipes.store import Store

__all__ = ["DEFAULT_BLOCK_SIZE", "ObjectStream", "OpenObject"]

DEFAULT_BLOCK_SIZE = 16 << 20
"""Bytes fetched per ranged GET while streaming; with read-ahead, the per-stream buffer bound."""


class ObjectStream:
    """A read-only stream over one object, opened on first read.

    ``seek`` before the first read costs nothing: the first request starts there (a
    ranged GET), which is how a shard is resumed mid-way without re-reading its start.
    """

    def __init__(self, url: str, store: Store, *, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        self.url, self._store, self._block_size = url, store, block_size
        self._file: IO[bytes] | None = None
        self._position = 0

    def _opened(self) -> IO[bytes]:
        if self._file is None:
            self._file = self._store.open(self.url, "rb", block_size=self._block_size, cache_type="readahead")
            if self._position:
                self._file.seek(self._position)
        return self._file

    def read(self, size: int = -1) -> bytes:
        data = self._opened().read(size)
        self._position += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        if self._file is None and whence == 0:
            self._position = offset
        else:
            self._position = self._opened().seek(offset, whence)
        return self._position

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> ObjectStream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ObjectStream({self.url!r}, position={self._position})"


class OpenObject(Stage[ObjectStream]):
    """Turns each URL from ``source`` into an :class:`ObjectStream`. Position: the source's."""

    def __init__(self, source: BaseNode[str], store: Store, *, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        super().__init__()
        if block_size <= 0:
            raise ValueError(f"{block_size=} must be a positive number of bytes")
        self.source, self.store, self.block_size = source, store, block_size

    def reset(self, initial_state: StateDict | None = None) -> None:
        super().reset(initial_state)
        self.source.reset(initial_state[SOURCE_KEY] if initial_state is not None else None)

    def next(self) -> ObjectStream:
        return ObjectStream(next(self.source), self.store, block_size=self.block_size)

    def get_state(self) -> StateDict:
        return {SOURCE_KEY: self.source.state_dict()}
