"""Synthetic MNIST-like objects for the map-style benchmark: one small PNG per object, 10 labels.

Objects are ``<prefix><label>/<id>.png`` with ``label = id % 10``. Each image is
``IMAGE_SIDE`` x ``IMAGE_SIDE`` RGB noise (PNG cannot compress it, so every object
is about 3 KB). A pool of distinct images is encoded once and cycled: every reader
decodes the same kind of bytes whichever it gets.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["IMAGE_SIDE", "LABELS", "Objects", "botocore_client", "object_keys", "png_pool", "upload"]

IMAGE_SIDE = 32
LABELS = 10


@dataclass(frozen=True)
class Objects:
    """What was uploaded.

    Attributes:
        prefix: the listing prefix, ``s3://bucket/dir/``.
        keys: every object's key in the bucket, sorted (so ``keys[i]`` is item ``i`` of every reader).
        stored_bytes: the objects' total size.
    """

    prefix: str
    keys: tuple[str, ...]
    stored_bytes: int

    @property
    def bucket(self) -> str:
        return self.prefix.removeprefix("s3://").split("/", 1)[0]

    def label(self, index: int) -> int:
        """The label of item ``index`` (its key's directory)."""
        return int(self.keys[index].split("/")[-2])


def png_pool(count: int, seed: int = 0) -> list[bytes]:
    """``count`` distinct RGB noise PNGs, a pure function of ``seed``.

    Example:
        >>> png_pool(1)[0][:8]
        b'\\x89PNG\\r\\n\\x1a\\n'
    """
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)).save(buffer, "PNG")
        pool.append(buffer.getvalue())
    return pool


def object_keys(directory: str, count: int) -> list[str]:
    """The keys of ``count`` objects under ``directory`` (a key prefix without the bucket), sorted.

    Example:
        >>> object_keys("train", 3)
        ['train/0/000000.png', 'train/1/000001.png', 'train/2/000002.png']
    """
    return sorted(f"{directory}/{n % LABELS}/{n:06d}.png" for n in range(count))


def botocore_client(endpoint_url: str, key: str, secret: str, *, pool: int = 10) -> Any:
    """A path-style botocore S3 client with ``pool`` connections (thread-safe, not fork-safe)."""
    import botocore.config
    import botocore.session

    config = botocore.config.Config(
        s3={"addressing_style": "path"}, max_pool_connections=pool, retries={"mode": "standard", "max_attempts": 3}
    )
    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        config=config,
    )


def upload(client: Any, bucket: str, keys: Sequence[str], images: Sequence[bytes], *, threads: int) -> int:
    """PUT ``images[n % len(images)]`` as object ``n`` of the sorted-by-id ``keys``; returns the bytes written.

    The image of an object depends on its id (the number in its name), not on the sort order.
    """

    def put(key: str) -> int:
        body = images[int(key.rsplit("/", 1)[1].split(".")[0]) % len(images)]
        client.put_object(Bucket=bucket, Key=key, Body=body)
        return len(body)

    with ThreadPoolExecutor(threads, thread_name_prefix="bench-upload") as pool:
        return sum(pool.map(put, keys))
