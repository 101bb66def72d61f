"""The map-style datasets under test, and what every DataLoader in the benchmark shares.

Every dataset maps index ``i`` to the ``i``-th key in sorted order and applies the
same transform, :func:`decode_png`, to something with ``.key`` and ``.read()``
(s3pipes' ObjectReader, s3torchconnector's S3Reader, or :class:`_Body` here).
``make(stack, server, objects)`` builds one (untimed); ``stack`` owns what must
outlive it (environment variables).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from unittest import mock

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

import s3pipes
from benchmarks._map_data import Objects, botocore_client
from s3pipes.server import LocalS3Server

__all__ = [
    "BOTO3",
    "S3PIPES",
    "S3TORCH",
    "IndexSampler",
    "MapReader",
    "collate",
    "decode_png",
    "map_readers",
]


def decode_png(reader: Any) -> tuple[torch.Tensor, int]:
    """``(uint8 CHW tensor, label)`` of one object; the label is its key's directory."""
    with Image.open(io.BytesIO(reader.read())) as image:
        pixels = np.array(image)  # a writable copy: torch warns about read-only arrays
    return torch.from_numpy(pixels).permute(2, 0, 1), int(reader.key.split("/")[-2])


def collate(pairs: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack a batch of ``(image, label)`` pairs into ``(N x C x H x W, N)``."""
    images, labels = zip(*pairs, strict=True)
    return torch.stack(images), torch.tensor(labels)


class IndexSampler(Sampler[int]):
    """Yields ``indices`` in order. The benchmark re-points it between passes (warm-up, timed).

    A DataLoader with persistent workers asks its sampler for a fresh iterator on each
    ``iter(loader)``, in the main process, so the change is seen by the next pass.
    """

    def __init__(self, indices: Sequence[int]) -> None:
        self.indices = list(indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass(frozen=True)
class _Body:
    """What the naive reader hands the transform: the object's key and bytes."""

    key: str
    data: bytes

    def read(self) -> bytes:
        return self.data


class NaiveBoto3Dataset(Dataset[tuple[torch.Tensor, int]]):
    """One botocore ``get_object`` per item, no batching; the client is built lazily in each process."""

    def __init__(self, server: LocalS3Server, objects: Objects) -> None:
        self._connect = (server.endpoint_url, server.key, server.secret)
        self._bucket, self._keys = objects.bucket, objects.keys
        self._client: Any = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self._pid != os.getpid():  # a forked worker must not use its parent's connections
            self._client, self._pid = botocore_client(*self._connect), os.getpid()
        key = self._keys[index]
        body = self._client.get_object(Bucket=self._bucket, Key=key)["Body"]
        return decode_png(_Body(key, body.read()))


Make = Callable[[contextlib.ExitStack, LocalS3Server, Objects], "Dataset[tuple[torch.Tensor, int]]"]


@dataclass(frozen=True)
class MapReader:
    """One reader of the random-access table.

    Attributes:
        name: the row's label.
        make: builds the dataset (untimed; listing included).
        optional: a failure is recorded in the row instead of ending the run.
    """

    name: str
    make: Make
    optional: bool = False


def _s3pipes() -> Make:
    """s3pipes with its defaults."""

    def make(stack: contextlib.ExitStack, server: LocalS3Server, objects: Objects) -> Any:
        store = s3pipes.Store(server.storage_options)
        return s3pipes.MapDataset.from_prefix(objects.prefix, suffix=".png", transform=decode_png, store=store)

    return make


def s3torch_environment(server: LocalS3Server) -> contextlib.AbstractContextManager[Any]:
    """The server's credentials in ``os.environ`` (the CRT client's default chain reads them), restored on exit."""
    return mock.patch.dict(os.environ, {"AWS_ACCESS_KEY_ID": server.key, "AWS_SECRET_ACCESS_KEY": server.secret})


def s3torch_dataset(server: LocalS3Server, source: str | list[str], *, raw: bool = False) -> Any:
    """``S3MapDataset`` against ``server``: ``from_prefix`` for a prefix, ``from_objects`` for a list of URLs.

    Items are decoded with :func:`decode_png`, or (``raw``) are the S3Readers. The
    server's credentials must already be in the environment (:func:`s3torch_environment`).
    """
    from s3torchconnector import S3ClientConfig, S3MapDataset

    options: dict[str, Any] = {
        "region": "us-east-1",
        "endpoint": server.endpoint_url,
        "s3client_config": S3ClientConfig(force_path_style=True),
    }
    if not raw:
        options["transform"] = decode_png
    if isinstance(source, str):
        return S3MapDataset.from_prefix(source, **options)
    return S3MapDataset.from_objects(source, **options)


def _s3torch(stack: contextlib.ExitStack, server: LocalS3Server, objects: Objects) -> Any:
    stack.enter_context(s3torch_environment(server))
    dataset = s3torch_dataset(server, objects.prefix)
    # It lists on first use; do it here so forked workers inherit the listing. The prefix
    # also holds s3pipes' manifest, listed last ("manifest..." sorts after "9/..."), so
    # indices below len(objects.keys) are the same objects as everyone else's.
    if len(dataset) < len(objects.keys):
        raise RuntimeError(f"S3MapDataset listed {len(dataset)} objects, {len(objects.keys)} were uploaded")
    return dataset


def _boto3(stack: contextlib.ExitStack, server: LocalS3Server, objects: Objects) -> Any:
    return NaiveBoto3Dataset(server, objects)


S3PIPES = "s3pipes MapDataset"
S3TORCH = "s3torchconnector S3MapDataset"
BOTO3 = "naive boto3 get_object per item"


def map_readers() -> list[MapReader]:
    """Every reader, in table order."""
    return [
        MapReader(S3PIPES, _s3pipes()),
        MapReader(S3TORCH, _s3torch, optional=True),
        MapReader(BOTO3, _boto3),
    ]
