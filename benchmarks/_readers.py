"""The readers under test. Each one is set up once and returns a function that reads every shard once.

``setup(stack, server, dataset) -> run``: ``stack`` owns whatever must outlive the
passes (a registered URL scheme, environment variables); ``run()`` reads all the
shards and returns a :class:`Tally` of what it saw. Setup is untimed; each ``run()``
is one timed pass, so the first pass includes the client's first connections.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any

from PIL import Image
from torch.utils.data import DataLoader

import s3pipes
from benchmarks._data import Dataset
from s3pipes.server import LocalS3Server

__all__ = [
    "CEILING",
    "S3PIPES_DECODE",
    "S3PIPES_DECODE_THREADS",
    "S3PIPES_RAW",
    "S3PIPES_RAW_LOADER",
    "S3PIPES_RAW_LOADER_BATCHED",
    "S3TORCH_RAW",
    "WEBDATASET_DECODE",
    "WEBDATASET_RAW",
    "Reader",
    "Tally",
    "group_members",
    "readers",
    "tally",
]

CHUNK = 1 << 20
"""Bytes per read() in the raw GET ceiling."""


@dataclass(frozen=True)
class Tally:
    """What one pass saw: samples, and the bytes of their still-undecoded fields."""

    samples: int
    payload_bytes: int


Run = Callable[[], Tally]
Setup = Callable[[contextlib.ExitStack, LocalS3Server, Dataset], Run]


@dataclass(frozen=True)
class Reader:
    """One row of the table.

    Attributes:
        name: the row's label.
        setup: builds the reader (untimed) and returns one timed pass.
        decodes: whether samples come out decoded (then payload bytes are not counted).
        optional: a failure is recorded in the row instead of ending the run.
    """

    name: str
    setup: Setup
    decodes: bool = False
    optional: bool = False


def tally(samples: Iterable[Mapping[str, object]]) -> Tally:
    """Count samples and ``bytes`` field sizes; load every PIL image so no decode stays lazy.

    Example:
        >>> tally([{"__key__": "a", "jpg": b"123", "cls": b"7"}, {"__key__": "b", "cls": b"8"}])
        Tally(samples=2, payload_bytes=5)
    """
    count = size = 0
    for sample in samples:
        count += 1
        for field, value in sample.items():
            if field.startswith("__"):
                continue
            if isinstance(value, bytes):
                size += len(value)
            elif isinstance(value, Image.Image):
                value.load()  # a no-op when the decoder already loaded the pixels
    return Tally(count, size)


def group_members(url: str, members: Iterable[tuple[str, bytes]]) -> Iterator[dict[str, object]]:
    """Group consecutive tar members into samples the webdataset way.

    The key is the member path up to the first dot of its basename; the rest is the field.

    Example:
        >>> [sorted(s) for s in group_members("u", [("a/1.jpg", b""), ("a/1.cls", b""), ("a/2.jpg", b"")])]
        [['__key__', '__url__', 'cls', 'jpg'], ['__key__', '__url__', 'jpg']]
    """
    sample: dict[str, object] | None = None
    for name, data in members:
        directory, _, basename = name.rpartition("/")
        stem, _, field = basename.partition(".")
        key = f"{directory}/{stem}" if directory else stem
        if sample is None or sample["__key__"] != key:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        sample[field] = data
    if sample is not None:
        yield sample


def _tar_members(stream: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for info in tar:
            if info.isfile():
                extracted = tar.extractfile(info)
                assert extracted is not None
                yield info.name, extracted.read()


# -- 1. the ceiling: whole objects, parallel, no parsing --------------------------------------


def _ceiling(threads: int) -> Setup:
    def setup(stack: contextlib.ExitStack, server: LocalS3Server, dataset: Dataset) -> Run:
        client = server.client()

        def get(url: str) -> int:
            bucket, _, key = url.removeprefix("s3://").partition("/")
            body = client.get_object(Bucket=bucket, Key=key)["Body"]
            return sum(len(chunk) for chunk in body.iter_chunks(CHUNK))

        def run() -> Tally:
            with ThreadPoolExecutor(threads) as pool:
                received = sum(pool.map(get, dataset.urls))
            if received != dataset.object_bytes:
                raise RuntimeError(f"GET returned {received} bytes, the shards hold {dataset.object_bytes}")
            return Tally(dataset.samples, dataset.payload_bytes)

        return run

    return setup


# -- 2, 3. s3pipes ----------------------------------------------------------------------------


def _s3pipes(decode: bool, *, threads: int = 0, loader_workers: int = 0, batch: int = 0) -> Setup:
    """s3pipes in this process (decoding on ``threads`` threads), or through a DataLoader's workers
    (with ``batch``: lists of that many samples, made in the workers, one message to the main process each)."""

    def setup(stack: contextlib.ExitStack, server: LocalS3Server, dataset: Dataset) -> Run:
        store = s3pipes.Store(server.storage_options)
        pipe = s3pipes.webdataset(dataset.prefix, store=store)
        if decode:
            pipe = pipe.decode("pil", workers=threads)
        if batch:
            pipe = pipe.batch(batch, collate=None)
        samples: Iterable[Any] = pipe
        if loader_workers:
            samples = DataLoader(samples, batch_size=None, num_workers=loader_workers, multiprocessing_context="fork")
        if batch:
            return lambda: tally(itertools.chain.from_iterable(samples))
        return lambda: tally(samples)

    return setup


# -- 4. webdataset, with s3:// opened by s3fs --------------------------------------------------


@contextlib.contextmanager
def _gopen_s3_with(fs: Any) -> Iterator[None]:
    """Route webdataset's ``s3://`` URLs to ``fs.open`` (its ``gopen_schemes`` table); restore on exit."""
    import webdataset

    def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kwargs: Any) -> IO[bytes]:
        return fs.open(url, mode)  # type: ignore[no-any-return]

    schemes = webdataset.gopen_schemes
    previous = schemes.get("s3")
    schemes["s3"] = gopen_s3
    try:
        yield
    finally:
        if previous is None:
            schemes.pop("s3", None)
        else:
            schemes["s3"] = previous


def _webdataset(decode: bool) -> Setup:
    def setup(stack: contextlib.ExitStack, server: LocalS3Server, dataset: Dataset) -> Run:
        import fsspec
        import webdataset

        fs = fsspec.filesystem("s3", skip_instance_cache=True, **server.storage_options)
        stack.enter_context(_gopen_s3_with(fs))
        samples = webdataset.WebDataset(
            list(dataset.urls), shardshuffle=False, handler=webdataset.reraise_exception, empty_check=False
        )
        if decode:
            samples = samples.decode("pil", handler=webdataset.reraise_exception)
        return lambda: tally(samples)

    return setup


# -- 5. s3torchconnector ----------------------------------------------------------------------


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables in this process; restore the previous values on exit."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _s3torchconnector(stack: contextlib.ExitStack, server: LocalS3Server, dataset: Dataset) -> Run:
    from s3torchconnector import S3ClientConfig, S3IterableDataset

    # The CRT client takes credentials from its default chain: the environment, here.
    stack.enter_context(_environment({"AWS_ACCESS_KEY_ID": server.key, "AWS_SECRET_ACCESS_KEY": server.secret}))
    objects = S3IterableDataset.from_objects(
        list(dataset.urls),
        region="us-east-1",
        endpoint=server.endpoint_url,
        s3client_config=S3ClientConfig(force_path_style=True),
    )

    def samples() -> Iterator[dict[str, object]]:
        for reader in objects:
            yield from group_members(f"s3://{reader.bucket}/{reader.key}", _tar_members(reader))

    return lambda: tally(samples())


CEILING = "boto3 parallel GET (ceiling)"
S3PIPES_RAW = "s3pipes raw"
S3PIPES_DECODE = 's3pipes decode("pil")'
S3PIPES_DECODE_THREADS = 's3pipes decode("pil", workers=2)'
S3PIPES_RAW_LOADER = "s3pipes raw, DataLoader 2 workers"
S3PIPES_RAW_LOADER_BATCHED = "s3pipes raw, batch(64), DataLoader 2 workers"
WEBDATASET_RAW = "webdataset + s3fs raw"
WEBDATASET_DECODE = 'webdataset + s3fs decode("pil")'
S3TORCH_RAW = "s3torchconnector + tarfile raw"


def readers(threads: int) -> list[Reader]:
    """Every row, in table order."""
    return [
        Reader(CEILING, _ceiling(threads)),
        Reader(S3PIPES_RAW, _s3pipes(decode=False)),
        Reader(S3PIPES_DECODE, _s3pipes(decode=True), decodes=True),
        Reader(S3PIPES_DECODE_THREADS, _s3pipes(decode=True, threads=2), decodes=True),
        Reader(S3PIPES_RAW_LOADER, _s3pipes(decode=False, loader_workers=2)),
        Reader(S3PIPES_RAW_LOADER_BATCHED, _s3pipes(decode=False, loader_workers=2, batch=64)),
        Reader(WEBDATASET_RAW, _webdataset(decode=False)),
        Reader(WEBDATASET_DECODE, _webdataset(decode=True), decodes=True),
        Reader(S3TORCH_RAW, _s3torchconnector, optional=True),
    ]
