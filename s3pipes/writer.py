"""Samples into WebDataset tar shards in the store: the writer behind ``Pipe.write_shards`` and ``convert``.

A shard is written by webdataset's ``TarWriter`` straight into a multipart upload
(:func:`s3pipes.transfer.open_upload`): no local file, at most a few parts in memory, and
the shard appears under its final name only when it is complete. A writer that fails or
is abandoned publishes nothing of the shard it was filling; shards already closed stay.

Shards are named ``pattern.format(shard=i)`` (``"s3://b/train-{shard:06d}.tar"``), in order
from ``start_shard``; a shard is closed before a sample would make it exceed ``maxcount``
samples or once it has reached ``maxsize`` bytes. Members get a fixed ``mtime`` (0 by
default), so the same samples always make the same bytes.

The manifest (``shards.s3pipes.json`` next to the shards, written last) records, per shard,
its sample count, size, first and last key, plus the samples skipped and why::

    {"format": "s3pipes.shards/1", "pattern": ..., "samples": N, "bytes": B,
     "shards": [{"name": "train-000000.tar", "samples": n, "bytes": b, "first_key": ..., "last_key": ...}],
     "skipped": [{"source": url, "error": "..."}]}
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import IO, Any

from webdataset import TarWriter
from webdataset.writer import make_encoder

from s3pipes.store import Store
from s3pipes.transfer import open_upload

__all__ = [
    "MANIFEST_NAME",
    "ConvertResult",
    "ShardInfo",
    "ShardWriter",
    "manifest_url",
    "read_manifest",
    "write_manifest",
]

MANIFEST_NAME = "shards.s3pipes.json"
_FORMAT = "s3pipes.shards/1"


@dataclass(frozen=True)
class ShardInfo:
    """One written shard: its name (relative to the manifest), samples, bytes, first and last ``__key__``.

    Example:
        >>> writer = ShardWriter("memory://doc-shard-info/{shard}.tar", store=Store())
        >>> writer.write_all([{"__key__": "a", "txt": "x"}, {"__key__": "b", "txt": "y"}])
        [ShardInfo(name='0.tar', samples=2, bytes=10240, first_key='a', last_key='b')]
    """

    name: str
    samples: int
    bytes: int
    first_key: str
    last_key: str


@dataclass(frozen=True)
class ConvertResult:
    """What a conversion or ``write_shards`` wrote (shards), left out (skipped), took from an earlier run (resumed).

    ``samples`` and ``bytes`` are the totals over ``shards``.

    Example:
        >>> result = ConvertResult([ShardInfo("0.tar", 2, 10240, "a", "b")], [], 0, 0.5, "memory://x/shards.s3pipes.json")
        >>> result.samples, result.bytes
        (2, 10240)
        >>> result
        ConvertResult(1 shards, 2 samples, 0.0 MB, 0 skipped, 0 shards from an earlier run, 0.5 s, 4 samples/s)
    """

    shards: list[ShardInfo]
    skipped: list[dict[str, str]]
    resumed: int
    seconds: float
    manifest: str
    samples: int = field(init=False)
    bytes: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "samples", sum(shard.samples for shard in self.shards))
        object.__setattr__(self, "bytes", sum(shard.bytes for shard in self.shards))

    def __repr__(self) -> str:
        rate = self.samples / self.seconds if self.seconds > 0 else 0.0
        return (
            f"ConvertResult({len(self.shards)} shards, {self.samples:,} samples, {self.bytes / 1e6:,.1f} MB, "
            f"{len(self.skipped)} skipped, {self.resumed} shards from an earlier run, "
            f"{self.seconds:.1f} s, {rate:,.0f} samples/s)"
        )


def check_pattern(pattern: str) -> str:
    """``pattern`` if ``pattern.format(shard=i)`` names distinct shards in one directory, else ValueError."""
    try:
        names = {pattern.format(shard=i) for i in (0, 1)}
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"{pattern=} must have one {{shard}} field, like 'train-{{shard:06d}}.tar': {exc}") from exc
    if len(names) != 2:
        raise ValueError(f"{pattern=} must contain {{shard}}, like 'train-{{shard:06d}}.tar': one name per shard")
    if len({posixpath.dirname(name) for name in names}) != 1:
        raise ValueError(f"{pattern=}: the shard number must be in the file name, not in a directory")
    return pattern


def manifest_url(pattern: str) -> str:
    """Where the manifest of shards named by ``pattern`` goes: next to them."""
    return f"{posixpath.dirname(pattern.format(shard=0))}/{MANIFEST_NAME}"


_ENCODE_BY_EXTENSION = make_encoder(True)


def _encode(sample: dict[str, Any]) -> dict[str, Any]:
    """webdataset's encoding by extension for values; bytes stay as they are (it would gzip ``x.json.gz`` again)."""
    raw = {k: v for k, v in sample.items() if isinstance(v, (bytes, bytearray, memoryview))}
    encoded: dict[str, Any] = _ENCODE_BY_EXTENSION({k: v for k, v in sample.items() if k not in raw})
    return {**encoded, **raw}


class _Counting:
    """The upload as ``TarWriter`` sees it, counting the bytes that reach it."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file, self.bytes = file, 0
        self.discarded = False

    def write(self, data: Any) -> int:
        if self.discarded:
            return memoryview(data).nbytes
        written = self.file.write(data)
        self.bytes += memoryview(data).nbytes
        return written

    def flush(self) -> None:
        self.file.flush()

    def tell(self) -> int:
        return self.bytes


def _check_key(sample: Mapping[str, Any]) -> None:
    """ValueError unless ``sample["__key__"]`` names members that read back as this sample, and only inside.

    A member is ``<key>.<field>``: the key must be a non-empty relative path with no ``.``/``..``
    parts (``tar -x`` of the shard must not write outside its directory) and no dot in its last
    part (readers split the key off at the first dot, so ``a.b`` would read back as key ``a``).
    """
    key = sample.get("__key__")
    if not isinstance(key, str) or not key:
        raise ValueError(f"a sample needs a non-empty str '__key__', got {key!r} (fields: {sorted(sample)})")
    parts = key.split("/")
    if key.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(
            f"__key__ {key!r} is not a relative path of plain names: members named after it could be "
            "extracted outside the shard's directory"
        )
    if "." in parts[-1]:
        raise ValueError(
            f"__key__ {key!r} has a dot in its last part: its members would read back as key "
            f"{key.rpartition('/')[0] + key.rpartition('/')[1] + parts[-1].partition('.')[0]!r}; "
            "replace the dot (webdataset splits keys at the first dot)"
        )


class ShardWriter:
    """Writes samples (``{"__key__": ..., "png": bytes, "cls": 3, ...}``) into numbered tar shards.

    Args:
        pattern: shard URLs, ``pattern.format(shard=i)``.
        maxcount: samples per shard, at most.
        maxsize: bytes per shard: a shard is closed once it has reached this size (so it
            exceeds it by less than one sample).
        store: the Store to write through; ``Store.from_env()`` when None.
        start_shard: the number of the first shard.
        mtime: every member's modification time (fixed, so output is reproducible; an int:
            tarfile writes a PAX header for every member with a fractional one).

    Fields are encoded by extension as webdataset's ``TarWriter`` does (``cls`` int -> text,
    ``json`` -> JSON, images of PIL/numpy -> that format, bytes as they are).

    Use it as a context manager: leaving with an exception discards the open shard.

    Example:
        >>> store = Store()
        >>> with ShardWriter("memory://doc-writer/s-{shard:02d}.tar", maxcount=2, store=store) as writer:
        ...     for i in range(3):
        ...         writer.write({"__key__": f"k{i}", "txt": f"sample {i}"})
        >>> [(s.name, s.samples) for s in writer.shards]
        [('s-00.tar', 2), ('s-01.tar', 1)]
    """

    def __init__(
        self,
        pattern: str,
        *,
        maxcount: int = 10_000,
        maxsize: int = 256 << 20,
        store: Store | None = None,
        start_shard: int = 0,
        mtime: int = 0,
    ) -> None:
        if maxcount < 1 or maxsize < 1:
            raise ValueError(f"{maxcount=} and {maxsize=} must be >= 1")
        self.pattern = check_pattern(pattern)
        self.maxcount, self.maxsize, self.mtime = maxcount, maxsize, mtime
        self.store = store if store is not None else Store.from_env()
        self._next = start_shard
        self.shards: list[ShardInfo] = []  # closed, published
        self._file: IO[bytes] | None = None
        self._counting: _Counting | None = None
        self._tar: TarWriter | None = None
        self._url = ""
        self._count, self._first, self._last = 0, "", ""

    @property
    def url(self) -> str:
        """The shard being filled ('' between shards)."""
        return self._url

    def write(self, sample: Mapping[str, Any]) -> None:
        """Add ``sample`` to the current shard, starting the next one first if this one is full.

        Example:
            >>> writer = ShardWriter("memory://doc-shard-write/{shard}.tar", maxcount=1, store=Store())
            >>> writer.write({"__key__": "a", "txt": "x"})
            >>> writer.url, writer.shards
            ('memory://doc-shard-write/0.tar', [])
            >>> writer.write({"__key__": "b", "txt": "y"})  # shard 0 is full: it is published, shard 1 begins
            >>> writer.url, [shard.name for shard in writer.shards]
            ('memory://doc-shard-write/1.tar', ['0.tar'])
            >>> writer.discard()
        """
        _check_key(sample)
        key = sample["__key__"]
        if self._tar is not None and self._full():
            self._close_shard()
        if self._tar is None:
            self._open_shard()
        assert self._tar is not None
        if self._count and key == self._last:
            raise ValueError(
                f"__key__ {key!r} repeats the previous sample's: readers would take both as one sample "
                "(a repeated field); give each sample its own key"
            )
        self._tar.write(dict(sample))
        self._count += 1
        self._first = self._first or key
        self._last = key

    def write_all(self, samples: Iterable[Mapping[str, Any]]) -> list[ShardInfo]:
        """Write every sample, close, and return the shards (the writer is done after this).

        Example:
            >>> writer = ShardWriter("memory://doc-write-all/{shard}.tar", maxcount=2, store=Store())
            >>> shards = writer.write_all({"__key__": f"k{i}", "cls": i} for i in range(5))
            >>> [(shard.name, shard.first_key, shard.last_key) for shard in shards]
            [('0.tar', 'k0', 'k1'), ('1.tar', 'k2', 'k3'), ('2.tar', 'k4', 'k4')]
        """
        with self:
            for sample in samples:
                self.write(sample)
        return self.shards

    def _full(self) -> bool:
        assert self._tar is not None
        # The tar stream's offset, not the bytes sent: tarfile buffers up to 10 KiB before writing.
        return self._count >= self.maxcount or self._tar.tarstream.offset >= self.maxsize

    def _open_shard(self) -> None:
        self._url = self.pattern.format(shard=self._next)
        self._next += 1
        self._file = open_upload(self.store, self._url)
        self._counting = _Counting(self._file)
        self._tar = TarWriter(self._counting, mtime=self.mtime, encoder=_encode)
        self._count, self._first, self._last = 0, "", ""

    def _close_shard(self) -> None:
        """Finish the tar stream and publish the shard."""
        assert self._tar is not None and self._file is not None and self._counting is not None
        self._tar.close()  # the end-of-archive blocks; TarWriter leaves a file object it did not open open
        self._file.close()  # publishes
        name = posixpath.basename(self._url)
        self.shards.append(ShardInfo(name, self._count, self._counting.bytes, self._first, self._last))
        self._tar = self._file = self._counting = None
        self._url = ""

    def close(self) -> list[ShardInfo]:
        """Publish the shard being filled (if any sample went into it); the shards written.

        Example:
            >>> store = Store()
            >>> writer = ShardWriter("memory://doc-shard-close/{shard}.tar", store=store)
            >>> writer.write({"__key__": "a", "txt": "x"})
            >>> [shard.name for shard in writer.close()], store.exists("memory://doc-shard-close/0.tar")
            (['0.tar'], True)
        """
        if self._tar is not None:
            self._close_shard()
        return self.shards

    def discard(self) -> None:
        """Drop the shard being filled: nothing of it is published. Closed shards stay.

        Example:
            >>> store = Store()
            >>> writer = ShardWriter("memory://doc-shard-discard/{shard}.tar", store=store)
            >>> writer.write({"__key__": "a", "txt": "x"})
            >>> writer.discard()
            >>> writer.shards, store.exists("memory://doc-shard-discard/0.tar")
            ([], False)
        """
        if self._counting is not None:
            self._counting.discarded = True  # tarfile flushes its buffer when collected: not into this upload
        if self._file is not None:
            discard = getattr(self._file, "discard", None)
            if discard is not None:
                discard()
        self._tar = self._file = self._counting = None
        self._url = ""

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()

    def __repr__(self) -> str:
        return f"ShardWriter({self.pattern!r}, shards={len(self.shards)}, filling={self._url or None!r})"


def write_manifest(
    store: Store,
    pattern: str,
    shards: Sequence[ShardInfo],
    skipped: Sequence[Mapping[str, str]] = (),
) -> str:
    """Write the manifest of ``shards`` next to them (last, after every shard); its URL."""
    url = manifest_url(pattern)
    document = {
        "format": _FORMAT,
        "pattern": posixpath.basename(pattern),
        "samples": sum(shard.samples for shard in shards),
        "bytes": sum(shard.bytes for shard in shards),
        "shards": [asdict(shard) for shard in shards],
        "skipped": [dict(item) for item in skipped],
    }
    store.write_bytes(url, json.dumps(document, indent=1).encode())
    return url


def read_manifest(store: Store, url: str) -> dict[str, Any]:
    """The manifest at ``url`` (a ``shards.s3pipes.json``), checked to be one."""
    document = json.loads(store.read_bytes(url))
    if not isinstance(document, dict) or document.get("format") != _FORMAT:
        raise ValueError(f"{url}: not an {_FORMAT} manifest")
    return document
