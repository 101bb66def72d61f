"""The conversion ``test_convert_s3.py`` SIGKILLs mid-run, and the source function its tests share.

Run as a script (pytest never runs it), it converts the ``.png`` objects under
``$S3PIPES_TEST_RAW`` into ``$S3PIPES_TEST_DST`` (a shard pattern) serially, ``MAXCOUNT``
inputs per shard, with a source that sleeps ``$S3PIPES_TEST_DELAY`` seconds per sample so
that the run lasts a few seconds. It prints (unbuffered) ``ready`` once imported and set up
and ``done`` after ``convert`` returns. The store comes from ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` (set by the test for this process).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import s3pipes as sp
from s3pipes.stages.open import ObjectStream

LABELS = ("ant", "bee", "cat")
MAXCOUNT = 30


@dataclass(frozen=True)
class PngSource:
    """``source(urls)`` for ``convert``: ``<raw>/<label>/<id>.png`` -> ``{"__key__": "<label>/<id>", "png", "cls"}``.

    Picklable (a frozen dataclass of strings and a Store), so the same object runs serially,
    in a process pool or on a Dask worker; ``delay`` (seconds per sample) does not change
    what it yields, and raising for ``fail_on`` stands for an object that cannot be decoded.
    """

    raw: str
    store: sp.Store
    delay: float = 0.0
    fail_on: frozenset[str] = frozenset()

    def __call__(self, urls: Sequence[str]) -> Iterable[dict[str, Any]]:
        return sp.from_urls(list(urls), store=self.store).open_object().map(self.to_sample)

    def to_sample(self, stream: ObjectStream) -> dict[str, Any]:
        with stream:
            if self.delay:
                time.sleep(self.delay)
            if stream.url in self.fail_on:
                raise ValueError(f"{stream.url} is not a PNG")
            data = stream.read()
        relative = stream.url[len(self.raw) + 1 :]
        return {"__key__": relative.removesuffix(".png"), "png": data, "cls": LABELS.index(relative.split("/")[0])}


def main() -> None:
    raw, dst = os.environ["S3PIPES_TEST_RAW"], os.environ["S3PIPES_TEST_DST"]
    store = sp.Store.from_env()
    source = PngSource(raw, store, delay=float(os.environ["S3PIPES_TEST_DELAY"]))
    print("ready", flush=True)
    sp.convert(source, dst, f"{raw}/", suffix=".png", maxcount=MAXCOUNT, store=store, progress=False)
    print("done", flush=True)


if __name__ == "__main__":
    main()
