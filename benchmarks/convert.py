"""How fast s3pipes converts small objects into tar shards, serially and on 2 workers.

Run from the repository root::

    python -m benchmarks.convert [--objects 20000] [--maxcount 2000] [--quick] [--json out.json]

The default (20,000 objects) takes about 3 minutes on 2 cores (the untimed upload about
one); --quick (2,000 objects) well under one.

One embedded SeaweedFS (:class:`s3pipes.server.LocalS3Server`, 127.0.0.1 only) is filled
once, untimed, with N small PNGs (32x32 RGB noise, about 3 KB) under
``s3://mnist/train/<label>/<id>.png``, as in ``benchmarks.mapstyle``. Each row then runs
what ``s3pipes convert s3://mnist/train/ <dst> --label-from-path 1`` runs
(``sp.convert(ObjectSamples(label_from_path=1), ...)``, ``maxcount`` samples per shard)
into a fresh prefix:

1. serial (``executor=None``);
2. ``ProcessPoolExecutor(2)``;
3. a Dask ``distributed.LocalCluster`` of 2 single-threaded worker processes
   (``client.get_executor()``), started before the clock.

Every row's shards must equal the serial row's byte for byte (their ETags are compared)
or the row is reported as failed. samples/s and MB/s (tar bytes written) are wall-clock,
from the ``convert`` call to its return. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import multiprocessing
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import s3pipes as sp
from benchmarks._map_data import botocore_client, object_keys, png_pool, upload
from benchmarks._report import machine, versions
from s3pipes.convert import ObjectSamples
from s3pipes.server import LocalS3Server

BUCKET, SOURCE = "mnist", "s3://mnist/train/"
MB = 10**6


@dataclass
class Row:
    name: str
    seconds: float | None = None
    samples: int = 0
    bytes: int = 0
    shards: int = 0
    error: str | None = None

    @property
    def samples_per_s(self) -> float | None:
        return self.samples / self.seconds if self.seconds else None

    @property
    def mb_per_s(self) -> float | None:
        return self.bytes / self.seconds / MB if self.seconds else None


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _process_pool() -> Iterator[Executor]:
    # spawn: a forked child would inherit the parent's event-loop thread state and sockets
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


@contextlib.contextmanager
def _dask() -> Iterator[Executor]:
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        yield client.get_executor()


@contextlib.contextmanager
def _serial() -> Iterator[None]:
    yield None


EXECUTORS: dict[str, Callable[[], contextlib.AbstractContextManager[Executor | None]]] = {
    "serial": _serial,
    "ProcessPoolExecutor(2)": _process_pool,
    "Dask LocalCluster, 2 workers": _dask,
}


def run_row(
    number: int, name: str, store: sp.Store, maxcount: int, reference: dict[str, str] | None
) -> tuple[Row, dict[str, str]]:
    """Convert into ``s3://mnist/out-<number>/``; the row and its shards' ETags."""
    dst = f"s3://{BUCKET}/out-{number}/"
    row = Row(name)
    try:
        with EXECUTORS[name]() as executor:
            started = time.perf_counter()
            result = sp.convert(
                ObjectSamples(SOURCE, label_from_path=1, store=store),
                dst + "train-{shard:06d}.tar",
                SOURCE,
                suffix=".png",
                maxcount=maxcount,
                executor=executor,
                store=store,
                progress=False,
            )
            row.seconds = time.perf_counter() - started
    except Exception as exc:
        row.error = f"{type(exc).__name__}: {exc}"[:200]
        return row, {}
    row.samples, row.bytes, row.shards = result.samples, result.bytes, len(result.shards)
    etags = {url.rsplit("/", 1)[1]: str(info.get("ETag")) for url, info in store.list_info(dst, suffix=".tar").items()}
    if reference is not None and etags != reference:
        row.error = "shards differ from the serial run's"
    return row, etags


def markdown(rows: Sequence[Row], settings: dict[str, Any], context: dict[str, Any]) -> str:
    m = context["machine"]
    serial = rows[0].samples_per_s
    lines = [
        f"Conversion of {settings['objects']:,} PNG objects (~3 KB) into shards of {settings['maxcount']:,}"
        f" ({context['date']}; {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB; one local SeaweedFS):",
        "",
        "| executor | samples/s | MB/s written | shards | vs serial |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row.error or row.samples_per_s is None:
            lines.append(f"| {row.name} | failed: {row.error} | | | |")
            continue
        ratio = f"{row.samples_per_s / serial:.2f}x" if serial else "n/a"
        lines.append(f"| {row.name} | {row.samples_per_s:,.0f} | {row.mb_per_s:.1f} | {row.shards} | {ratio} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--objects", type=int, default=20_000)
    parser.add_argument("--maxcount", type=int, default=2_000)
    parser.add_argument("--quick", action="store_true", help="2,000 objects, shards of 200")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    settings = (
        {"objects": 2_000, "maxcount": 200} if args.quick else {"objects": args.objects, "maxcount": args.maxcount}
    )
    with LocalS3Server() as server:
        server.create_bucket(BUCKET)
        keys = object_keys("train", settings["objects"])
        client = botocore_client(server.endpoint_url, server.key, server.secret, pool=16)
        started = time.perf_counter()
        stored = upload(client, BUCKET, keys, png_pool(256), threads=16)
        _log(f"uploaded {len(keys):,} objects, {stored / 1e6:.1f} MB in {time.perf_counter() - started:.1f} s")
        store = sp.Store({"endpoint_url": server.endpoint_url, "key": server.key, "secret": server.secret})
        rows: list[Row] = []
        reference: dict[str, str] | None = None
        for number, name in enumerate(EXECUTORS):
            row, etags = run_row(number, name, store, settings["maxcount"], reference)
            reference = etags if reference is None else reference
            _log(f"{name}: {row.samples_per_s or 0:,.0f} samples/s{' (' + row.error + ')' if row.error else ''}")
            rows.append(row)
    context = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat("T", "seconds"),
        "machine": machine(),
        "versions": versions(),
    }
    print(markdown(rows, settings, context))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({**context, "settings": settings, "rows": [asdict(row) for row in rows]}, out, indent=1)


if __name__ == "__main__":
    main()
