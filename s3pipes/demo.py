"""The main demo (``make demo``): the whole round trip on the embedded S3 server.

Starts SeaweedFS on 127.0.0.1, writes a small generated image dataset as
WebDataset tar shards, streams it back, saves and loads a checkpoint in the
same store, prints what it did, and stops the server.
"""

from __future__ import annotations

import io
import time

import numpy as np
import torch
import webdataset
from PIL import Image

import s3pipes as sp
from s3pipes import Store
from s3pipes.server import LocalS3Server

SHARDS, PER_SHARD, SIZE = 4, 64, 32


def make_image(index: int) -> bytes:
    """A deterministic SIZE x SIZE RGB gradient, encoded as PNG."""
    rng = np.random.default_rng(index)
    pixels = rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(store: Store, prefix: str) -> list[str]:
    """SHARDS tar shards of PER_SHARD samples each, written with webdataset's TarWriter."""
    urls = []
    for shard in range(SHARDS):
        url = f"{prefix}/shard-{shard:06d}.tar"
        with store.open(url, "wb") as stream, webdataset.TarWriter(stream) as writer:
            for i in range(shard * PER_SHARD, (shard + 1) * PER_SHARD):
                writer.write({"__key__": f"sample{i:06d}", "png": make_image(i), "cls": str(i % 10).encode()})
        urls.append(url)
    return urls


def stream_samples(store: Store, prefix: str) -> tuple[int, int, torch.Tensor]:
    """Stream every shard through a pipeline; returns (samples, distinct classes, a batch of images)."""
    pipe = sp.webdataset(prefix, shuffle_seed=0, store=store).decode("torch").map(lambda s: (s["png"], s["cls"]))
    images, labels = [], []
    for image, label in pipe:
        images.append(image)
        labels.append(label)
    return len(images), len(set(labels)), torch.stack(images[:8])


def main() -> None:
    started = time.perf_counter()
    with LocalS3Server() as server:
        print(f"1. started SeaweedFS S3 at {server.endpoint_url} (pid {server.pid}, credentials enforced)")
        server.create_bucket("datasets")
        server.create_bucket("checkpoints")
        store = Store(server.storage_options)

        urls = write_shards(store, "s3://datasets/demo/train")
        sizes = sum(store.info(url)["size"] for url in urls)
        print(
            f"2. wrote {SHARDS * PER_SHARD} generated {SIZE}x{SIZE} PNG samples as {len(urls)} WebDataset shards"
            f" ({sizes / 1e6:.2f} MB) under s3://datasets/demo/train/"
        )

        count, classes, batch = stream_samples(store, "s3://datasets/demo/train/")
        print(
            f"3. streamed them back through list -> shuffle_shards -> open -> untar -> group -> decode:"
            f" {count} samples, {classes} classes, first batch {tuple(batch.shape)} {batch.dtype}"
        )

        model = torch.nn.Linear(SIZE * SIZE * 3, 10)
        checkpoints = sp.CheckpointStore("s3://checkpoints/demo/run-1", keep_last=2, store=store)
        for step in (1, 2, 3):
            checkpoints.save({"model": model.state_dict(), "step": step}, step=step)
        loaded = checkpoints.load()
        same = all(torch.equal(loaded["model"][k], v) for k, v in model.state_dict().items())
        print(
            f"4. saved checkpoints at steps 1-3 under s3://checkpoints/demo/run-1 (kept {checkpoints.steps()}),"
            f" loaded step {loaded['step']}: weights identical = {same}"
        )
        if not (count == SHARDS * PER_SHARD and same):
            raise SystemExit("demo failed: data or checkpoint did not round-trip")
    print(f"5. stopped the server and removed its data ({time.perf_counter() - started:.1f} s in all)")


if __name__ == "__main__":
    main()
