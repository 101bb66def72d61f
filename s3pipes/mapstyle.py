"""MapDataset: random access to objects under a prefix, or to samples inside tar shards.

``ds[i]`` is one GET; ``ds.__getitems__(indices)`` (what a DataLoader calls for a
whole batch) fetches the batch concurrently, at most ``concurrency`` requests in
flight, and returns it in the order asked. For shards, neighbouring samples of the same
shard are coalesced into one ranged GET.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from fsspec.utils import merge_offset_ranges
from torch.utils.data import Dataset

from s3pipes._types import Sample
from s3pipes.errors import DataError, StaleIndex
from s3pipes.index import ShardIndex, build_shard_index, is_own_file, no_objects, read_manifest
from s3pipes.preview import Preview, peek_count
from s3pipes.stages._tarparse import TarFormatError, TarReader
from s3pipes.stages.group import Places, add_field, locate, split_key
from s3pipes.store import Store

__all__ = ["DEFAULT_CONCURRENCY", "MapDataset", "ObjectReader"]

DEFAULT_CONCURRENCY = 32
"""Requests in flight at most during one ``__getitems__`` call."""

_MAX_GAP = 64 << 10  # coalesce ranges of one shard closer than this: one GET beats two

Item = TypeVar("Item")


class ObjectReader(io.BytesIO):
    """What a transform receives: a seekable reader over one object's bytes, with its names.

    Attributes:
        url: the object's URL.
        key: its key in the bucket (for S3) or its path, e.g. ``"mnist/train/3/00042.png"``.

    Example:
        >>> store = Store()
        >>> store.write_bytes("memory://doc-reader/3/a.txt", b"hello")
        >>> head = lambda reader: (reader.key, reader.read(2))
        >>> MapDataset.from_objects(["memory://doc-reader/3/a.txt"], transform=head, store=store)[0]
        ('/doc-reader/3/a.txt', b'he')
    """

    def __init__(self, url: str, key: str, data: bytes) -> None:
        super().__init__(data)
        self.url, self.key = url, key

    def __repr__(self) -> str:
        return f"ObjectReader({self.url!r}, {len(self.getbuffer())} bytes)"


def _as_is(sample: Sample) -> Sample:
    """``from_shards``' default transform: the sample dict unchanged (a function, so datasets pickle)."""
    return sample


def _read_all(reader: ObjectReader) -> bytes:
    return reader.read()


def _object_key(store: Store, url: str) -> str:
    _, path = store.resolve(url)
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    return path.split("/", 1)[1] if protocol in ("s3", "s3a") and "/" in path else path


class MapDataset(Dataset[Item], Generic[Item]):
    """A map-style dataset over objects (one per item) or over samples inside tar shards.

    Build it with :meth:`from_prefix`, :meth:`from_objects` or :meth:`from_shards`.
    Items are ordered by key, so index ``i`` means the same item in every process.

    Example:
        >>> store = Store()
        >>> for i in range(3):
        ...     store.write_bytes(f"memory://doc-mapdataset/{i}.txt", f"item {i}".encode())
        >>> ds = MapDataset.from_prefix("memory://doc-mapdataset/", transform=lambda r: r.read().decode(), store=store)
        >>> len(ds), ds[1], ds.__getitems__([2, 0])
        (3, 'item 1', ['item 2', 'item 0'])
    """

    def __init__(
        self,
        store: Store,
        urls: Sequence[str],
        *,
        transform: Callable[[Any], Item],
        shards: ShardIndex | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"{concurrency=} must be at least 1")
        self._store, self._urls, self._shards = store, tuple(urls), shards
        self._transform, self._concurrency = transform, concurrency

    # -- constructors ------------------------------------------------------------------------

    @classmethod
    def from_objects(
        cls,
        urls: Sequence[str],
        *,
        transform: Callable[[ObjectReader], Item] = _read_all,  # type: ignore[assignment]
        store: Store | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> MapDataset[Item]:
        """One item per object URL, sorted. ``transform`` gets an :class:`ObjectReader` (default: its bytes).

        Example:
            >>> store = Store()
            >>> urls = ["memory://doc-from-objects/b", "memory://doc-from-objects/a"]
            >>> for url in urls:
            ...     store.write_bytes(url, url[-1].upper().encode())
            >>> ds = MapDataset.from_objects(urls, store=store)
            >>> ds[0], ds[1]
            (b'A', b'B')
        """
        return cls(store or Store.from_env(), sorted(urls), transform=transform, concurrency=concurrency)

    @classmethod
    def from_prefix(
        cls,
        prefix: str,
        *,
        suffix: str = "",
        transform: Callable[[ObjectReader], Item] = _read_all,  # type: ignore[assignment]
        store: Store | None = None,
        manifest: bool = True,
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> MapDataset[Item]:
        """One item per object under ``prefix`` ending in ``suffix``, sorted by key.

        With ``manifest=True`` (default) a ``manifest.s3pipes.json`` under the prefix
        (``s3pipes index``) is used when present: one GET instead of a listing.

        Example:
            >>> store = Store()
            >>> for name in ("b/2.png", "a/1.png"):
            ...     store.write_bytes(f"memory://doc-map/{name}", name.encode())
            >>> ds = MapDataset.from_prefix("memory://doc-map/", suffix=".png", store=store)
            >>> len(ds), ds[0], ds[-1]
            (2, b'a/1.png', b'b/2.png')
        """
        store = store or Store.from_env()
        urls = read_manifest(store, prefix, suffix=suffix) if manifest else None
        if urls is None:
            urls = [url for url in store.list(prefix, suffix=suffix) if not is_own_file(url)]
        if not urls:
            raise no_objects(store, prefix, suffix)
        return cls(store, urls, transform=transform, concurrency=concurrency)

    @classmethod
    def from_shards(
        cls,
        prefix: str,
        *,
        suffix: str = ".tar",
        transform: Callable[[Sample], Item] = _as_is,  # type: ignore[assignment]
        store: Store | None = None,
        build_index: bool = True,
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> MapDataset[Item]:
        """One item per sample inside the tar shards under ``prefix``, as the streaming pipeline gives it.

        Uses ``index.s3pipes.json`` under the prefix; without one, builds it (reading every
        shard once) and writes it there (unless ``build_index=False``; credentials that may
        not write keep it in memory, with a warning).

        Raises:
            StaleIndex: a shard changed since the index was written, or is not in it; or, when
                read, a sample is no longer where the index says.

        Example:
            >>> import io, webdataset as wds
            >>> buffer = io.BytesIO()
            >>> with wds.TarWriter(buffer) as tar:
            ...     for i in range(2):
            ...         _ = tar.write({"__key__": f"k{i}", "txt": f"sample {i}".encode()})
            >>> store = Store()
            >>> store.write_bytes("memory://doc-from-shards/shard-0.tar", buffer.getvalue())
            >>> ds = MapDataset.from_shards("memory://doc-from-shards/", store=store)
            >>> len(ds), ds[1]["__key__"], ds[1]["txt"]
            (2, 'k1', b'sample 1')
        """
        store = store or Store.from_env()
        index = ShardIndex.load(store, prefix, suffix=suffix)
        if index is None:
            if not build_index:
                raise FileNotFoundError(f"no index.s3pipes.json under {prefix}: run `s3pipes index {prefix}`")
            index = build_shard_index(store, prefix, suffix=suffix, write="if-allowed")
        return cls(store, index.shards, transform=transform, shards=index, concurrency=concurrency)

    # -- access -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._shards.samples) if self._shards is not None else len(self._urls)

    def _check(self, index: int) -> int:
        size = len(self)
        if not -size <= index < size:
            raise IndexError(f"index {index} out of range for a dataset of {size} items")
        return index % size

    def __getitem__(self, index: int) -> Item:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[Item]:
        """The items at ``indices``, fetched concurrently, in that order."""
        positions = [self._check(i) for i in indices]
        if self._shards is not None:
            return [self._transform_located(sample, places) for sample, places in self._samples(positions)]
        urls = [self._urls[i] for i in positions]
        blobs = self._store.read_ranges(urls, concurrency=self._concurrency)
        return [
            self._transform(ObjectReader(url, _object_key(self._store, url), blob))
            for url, blob in zip(urls, blobs, strict=True)
        ]

    def _transform_located(self, sample: Sample, places: Places) -> Item:
        """``transform(sample)``; a ``DecodeError`` it raises is given the field's member and offset."""
        try:
            return self._transform(sample)
        except DataError as exc:
            locate(exc, places)
            raise

    def _samples(self, positions: Sequence[int]) -> list[tuple[Sample, Places]]:
        assert self._shards is not None
        wanted = [self._shards.samples[i] for i in positions]
        urls = [self._shards.shards[shard] for shard, _, _, _ in wanted]
        # One GET per run of neighbouring samples of a shard (fsspec merges the ranges).
        merged_urls, starts, ends = merge_offset_ranges(
            urls, [s for _, _, s, _ in wanted], [e for _, _, _, e in wanted], max_gap=_MAX_GAP, sort=True
        )
        blobs = self._store.read_ranges(merged_urls, starts, ends, concurrency=self._concurrency)
        fetched: dict[str, list[tuple[int, int, bytes]]] = {}
        for url, start, end, blob in zip(merged_urls, starts, ends, blobs, strict=True):
            fetched.setdefault(url, []).append((start, end, blob))
        out = []
        for url, (_, key, start, end) in zip(urls, wanted, strict=True):
            blob_start, blob = next((s, b) for s, e, b in fetched[url] if s <= start and end <= e)
            out.append(_parse_sample(url, key, start, blob[start - blob_start : end - blob_start]))
        return out

    def peek(self, n: int = 5) -> Preview[Item]:
        """Items ``0 .. n-1`` (fewer if the dataset is shorter), fetched as one batch, shown as a table.

        :class:`~s3pipes.preview.Preview` has the display (thumbnails in a notebook).

        Raises:
            ValueError: ``n`` is not a non-negative int.

        Example:
            >>> store = Store()
            >>> for name in ("b.txt", "a.txt"):
            ...     store.write_bytes(f"memory://doc-map-peek/{name}", name.encode())
            >>> MapDataset.from_prefix("memory://doc-map-peek/", store=store).peek(5)
            Preview of 2 items
            #  item
            0  5 B b'a.txt'
            1  5 B b'b.txt'
        """
        return Preview(self.__getitems__(range(min(peek_count(n), len(self)))))

    def __repr__(self) -> str:
        kind = f"{len(self)} samples in {len(self._urls)} shards" if self._shards else f"{len(self)} objects"
        return f"MapDataset({kind}, transform={getattr(self._transform, '__name__', self._transform)!r})"


def _parse_sample(url: str, key: str, start: int, data: bytes) -> tuple[Sample, Places]:
    """The sample dict of one sample's members, exactly as GroupByKey builds it, and its fields' places.

    Raises:
        StaleIndex: the bytes the index points at are not sample ``key`` (the shard was
            rewritten after the dataset was opened, or unnoticed by its size and ETag).
    """
    reader = TarReader(io.BytesIO(data).read, start)
    sample: Sample = {"__key__": key, "__url__": url}
    places: Places = {}
    stale = f"the index says sample {key!r} is at byte offset {start}"
    while True:
        try:
            member = reader.next()
        except TarFormatError as exc:
            raise StaleIndex(url, f"{stale}, but the bytes there are no tar member ({exc}): the shard changed "
                             "since the index was written; rebuild it", offset=exc.offset) from exc  # fmt: skip
        if member is None:
            break
        parts = split_key(member.name)
        if parts is None:
            continue
        if parts[0] != key:
            raise StaleIndex(url, f"{stale}, but member {member.name!r} is there: the shard changed since "
                             "the index was written; rebuild it", offset=member.offset)  # fmt: skip
        add_field(sample, parts[1], member.data, member=member.name, offset=member.offset)
        places[parts[1]] = (member.name, member.offset)
    if not places:
        raise StaleIndex(url, f"{stale}, but no member of it is there: the shard changed since the index was "
                         "written; rebuild it", offset=start)  # fmt: skip
    return sample, places
