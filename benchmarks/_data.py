"""Synthetic WebDataset shards for the benchmarks: a JPEG image and a class label per sample.

The images are smooth random colour fields plus noise, so they compress like photos
(about 27 KB at 256x256, quality 90), not like white noise. Encoding is the slow part
of making data, so a pool of distinct images is encoded once and the samples cycle
through it: readers and decoders do the same work whichever bytes they get.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import webdataset
from PIL import Image

from s3pipes import Store

__all__ = ["Dataset", "jpeg_pool", "synthetic_jpeg", "write_shards"]

IMAGE_SIDE = 256
JPEG_QUALITY = 90
CLASSES = 1000


@dataclass(frozen=True)
class Dataset:
    """What was written: the shard URLs and the sizes every reader must reproduce.

    Attributes:
        prefix: the listing prefix, ending in "/".
        urls: the shard URLs, sorted.
        samples: number of samples over all shards.
        payload_bytes: bytes of all fields (``jpg`` + ``cls``) over all samples.
        object_bytes: bytes of the tar shards as stored (payload + tar headers and padding).
    """

    prefix: str
    urls: tuple[str, ...]
    samples: int
    payload_bytes: int
    object_bytes: int


def synthetic_jpeg(rng: np.random.Generator, side: int = IMAGE_SIDE) -> bytes:
    """One ``side`` x ``side`` RGB JPEG: an upscaled 8x8 random field plus Gaussian noise.

    Example:
        >>> synthetic_jpeg(np.random.default_rng(0), side=32)[:2]
        b'\\xff\\xd8'
    """
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32)
    pixels = np.clip(smooth + rng.normal(0.0, 12.0, smooth.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def jpeg_pool(count: int, seed: int = 0) -> list[bytes]:
    """``count`` distinct synthetic JPEGs, a pure function of ``seed``."""
    rng = np.random.default_rng(seed)
    return [synthetic_jpeg(rng) for _ in range(count)]


def write_shards(store: Store, prefix: str, *, shards: int, per_shard: int, images: list[bytes]) -> Dataset:
    """Write ``shards`` tar shards of ``per_shard`` samples under ``prefix`` with webdataset's TarWriter.

    Sample ``n`` has key ``f"{n:08d}"``, ``jpg = images[n % len(images)]`` and
    ``cls = str(n % 1000)``.
    """
    if not prefix.endswith("/"):
        raise ValueError(f"{prefix=} must end in '/'")
    urls, payload = [], 0
    for shard in range(shards):
        url = f"{prefix}shard-{shard:05d}.tar"
        with store.open(url, "wb") as stream, webdataset.TarWriter(stream) as writer:
            for n in range(shard * per_shard, (shard + 1) * per_shard):
                jpg, cls = images[n % len(images)], str(n % CLASSES).encode()
                writer.write({"__key__": f"{n:08d}", "jpg": jpg, "cls": cls})
                payload += len(jpg) + len(cls)
        urls.append(url)
    stored = sum(int(store.info(url)["size"]) for url in urls)
    return Dataset(prefix, tuple(urls), shards * per_shard, payload, stored)
