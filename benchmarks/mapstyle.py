"""How fast s3pipes opens and randomly reads many small objects, against s3torchconnector and naive boto3.

Run from the repository root::

    python -m benchmarks.mapstyle [--objects N] [--items M] [--quick] [--json out.json] [--profile K]

The defaults (20,000 objects, 5,000 items) take about 5 minutes on 2 cores (the
untimed upload about one); --quick (2,000 objects, 500 items) under one.

One embedded SeaweedFS (:class:`s3pipes.server.LocalS3Server`, 127.0.0.1 only) is
started and filled once, untimed, with N small PNGs (32x32 RGB noise, about 3 KB)
under ``s3://mnist/train/<label>/<id>.png`` (botocore ``put_object`` on a thread pool).
On that same data, in this one process:

1. listing: ``Store.list(prefix, suffix=".png")``; ``s3pipes.index.write_manifest``
   (once); ``MapDataset.from_prefix`` opened from that manifest; and, each from a new
   client, "open + first item" for s3pipes (manifest or listing) and for
   ``S3MapDataset.from_prefix`` (which lists on first use);
2. random access: a fixed, seeded sample of M indices, transform = PNG decode to a
   uint8 CHW tensor + the label from the key, ``DataLoader(batch_size=64,
   sampler=<those indices>, num_workers in {0, 2} (fork, persistent))`` over
   s3pipes ``MapDataset.from_prefix`` (the DataLoader calls its ``__getitems__`` with
   the whole batch: concurrent GETs), s3torchconnector ``S3MapDataset.from_prefix``
   and a naive dataset doing one botocore ``get_object`` per item.

Each loader runs one untimed warm-up pass (its first ``--warmup`` indices), then
``--repeats`` timed passes over all M; objects/s is of the best pass. Every pass is
checked to return every index's label, in order. Then, for s3pipes at
``num_workers=0``, the parts of a pass over the first 1,024 indices are timed alone,
with the CPU they cost client and server (fetch, decode, one GET at a time; see
``benchmarks._map_profile``) and, with ``--profile K``, cProfile shows the top K
functions of such a pass on the main thread and on fsspec's event-loop thread.

Timing numbers are noisy on a shared machine; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

import s3pipes
from benchmarks._map_data import IMAGE_SIDE, Objects, botocore_client, object_keys, png_pool, upload
from benchmarks._map_profile import Part, breakdown, profile_pass
from benchmarks._map_readers import (
    S3PIPES,
    S3TORCH,
    IndexSampler,
    MapReader,
    collate,
    decode_png,
    map_readers,
    s3torch_dataset,
    s3torch_environment,
)
from benchmarks._report import machine, versions
from s3pipes.index import write_manifest
from s3pipes.server import LocalS3Server

__all__ = ["Config", "main"]

BUCKET = "mnist"
DIRECTORY = "train"
PREFIX = f"s3://{BUCKET}/{DIRECTORY}/"
LIST_TARGET_S = 0.5  # for 20,000 objects
MANIFEST_TARGET_S = 0.1
RATIO_TARGETS = {0: 2.0, 2: 1.3}  # s3pipes / s3torchconnector objects/s, by num_workers
PARTS_ITEMS = 1024  # the breakdown and the profile use this many of the sampled indices (16 batches of 64)


@dataclass(frozen=True)
class Config:
    """The run's settings (``--quick`` only changes the defaults)."""

    objects: int
    items: int
    warmup: int
    repeats: int
    batch_size: int
    workers: tuple[int, ...]
    upload_threads: int
    distinct_images: int
    seed: int
    json_path: str | None
    profile: int

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None) -> Config:
        parser = argparse.ArgumentParser(prog="python -m benchmarks.mapstyle", description=__doc__.split("\n")[0])
        parser.add_argument("--objects", type=int, help="PNG objects to upload (default 20000; --quick 2000)")
        parser.add_argument("--items", type=int, help="random indices read per pass (default 5000; --quick 500)")
        parser.add_argument("--warmup", type=int, help="indices of the untimed warm-up pass (default 500; --quick 100)")
        parser.add_argument("--repeats", type=int, default=2, help="timed passes per loader (default 2)")
        parser.add_argument("--batch-size", type=int, default=64, help="DataLoader batch size (default 64)")
        parser.add_argument(
            "--workers", type=int, nargs="+", default=[0, 2], help="DataLoader num_workers values (default 0 2)"
        )
        parser.add_argument("--upload-threads", type=int, default=16, help="threads of the upload (default 16)")
        parser.add_argument("--distinct-images", type=int, default=256, help="distinct PNGs cycled (default 256)")
        parser.add_argument("--seed", type=int, default=0, help="seed of the images and of the index sample")
        parser.add_argument("--quick", action="store_true", help="a small data set, to check that it all runs")
        parser.add_argument("--json", dest="json_path", metavar="PATH", help="also write the results as JSON")
        parser.add_argument(
            "--profile", type=int, default=0, metavar="K", help="cProfile one s3pipes num_workers=0 pass; top K"
        )
        args = parser.parse_args(argv)
        config = cls(
            objects=args.objects or (2000 if args.quick else 20000),
            items=args.items or (500 if args.quick else 5000),
            warmup=args.warmup or (100 if args.quick else 500),
            repeats=args.repeats,
            batch_size=args.batch_size,
            workers=tuple(args.workers),
            upload_threads=args.upload_threads,
            distinct_images=args.distinct_images,
            seed=args.seed,
            json_path=args.json_path,
            profile=args.profile,
        )
        for name in ("objects", "items", "warmup", "repeats", "batch_size", "upload_threads", "distinct_images"):
            if getattr(config, name) <= 0:
                parser.error(f"--{name.replace('_', '-')}={getattr(config, name)} must be a positive integer")
        if any(w < 0 for w in config.workers):
            parser.error(f"--workers={list(config.workers)} must not be negative")
        return config

    def sample(self) -> list[int]:
        """The timed indices: ``items`` distinct ones (with repeats if there are fewer objects), by ``seed``."""
        rng = np.random.default_rng(self.seed)
        return [int(i) for i in rng.choice(self.objects, size=self.items, replace=self.items > self.objects)]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".replace("|", "/").replace("\n", " ")[:200]


def prepare(server: LocalS3Server, config: Config) -> tuple[Objects, float]:
    """Create the bucket and upload the PNGs; returns them and the seconds it took."""
    started = time.perf_counter()
    server.create_bucket(BUCKET)
    keys = object_keys(DIRECTORY, config.objects)
    client = botocore_client(server.endpoint_url, server.key, server.secret, pool=config.upload_threads)
    stored = upload(client, BUCKET, keys, png_pool(config.distinct_images, config.seed), threads=config.upload_threads)
    elapsed = time.perf_counter() - started
    _log(f"uploaded {len(keys)} objects, {stored / 1e6:.1f} MB in {elapsed:.1f} s")
    return Objects(PREFIX, tuple(keys), stored), elapsed


# -- 1. listing and opening ---------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """One listing/opening operation: wall-clock seconds per pass (empty if it failed)."""

    name: str
    seconds: tuple[float, ...] = ()
    target_s: float | None = None
    error: str | None = None

    @property
    def best(self) -> float | None:
        return min(self.seconds) if self.seconds else None


def _timed(name: str, run: Callable[[], object], repeats: int, target_s: float | None = None) -> Timing:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    _log(f"{name}: {', '.join(f'{t:.3f}' for t in seconds)} s")
    return Timing(name, tuple(seconds), target_s)


def listing(server: LocalS3Server, objects: Objects) -> list[Timing]:
    """Time listing, writing the manifest, and opening datasets (3 passes each, the manifest once)."""
    n = len(objects.keys)
    store = s3pipes.Store(server.storage_options)
    store.info(f"s3://{BUCKET}/{objects.keys[0]}")  # connect: the calls below reuse this client

    def listed() -> None:
        if len(store.list(PREFIX, suffix=".png")) != n:
            raise RuntimeError(f"Store.list did not return the {n} objects uploaded")

    def opened(on: s3pipes.Store | None = None, *, manifest: bool = True, first: bool = False) -> Callable[[], None]:
        """Open the dataset (on ``on``, or on a new Store each time), and read item 0 if ``first``."""

        def run() -> None:
            store_ = on or s3pipes.Store(server.storage_options)
            dataset = s3pipes.MapDataset.from_prefix(
                PREFIX, suffix=".png", transform=decode_png, store=store_, manifest=manifest
            )
            if len(dataset) != n:
                raise RuntimeError(f"MapDataset.from_prefix({manifest=}) has {len(dataset)} items, not {n}")
            if first:
                dataset[0]

        return run

    list_target = LIST_TARGET_S if n == 20000 else None
    rows = [
        _timed(f'Store.list(prefix, suffix=".png"), {n:,} objects', listed, 3, list_target),
        _timed("s3pipes.index.write_manifest (once)", lambda: write_manifest(store, PREFIX, suffix=".png"), 1),
        _timed("MapDataset.from_prefix(manifest=True)", opened(store), 3, MANIFEST_TARGET_S),
        _timed("new Store + MapDataset.from_prefix(manifest=True) + ds[0]", opened(first=True), 3),
        _timed("new Store + MapDataset.from_prefix(manifest=False) + ds[0]", opened(manifest=False, first=True), 3),
    ]
    name = "S3MapDataset.from_prefix + ds[0] (lists on first use)"
    try:
        with s3torch_environment(server):
            rows.append(_timed(name, lambda: s3torch_dataset(server, PREFIX)[0], 3))
    except Exception as exc:
        _log(f"{name}: failed: {_one_line(exc)}")
        rows.append(Timing(name, error=_one_line(exc)))
    return rows


# -- 2. random access through a DataLoader -----------------------------------------------------


@dataclass(frozen=True)
class Access:
    """One reader at one ``num_workers``: timed passes over the sample (or why it could not run)."""

    name: str
    workers: int
    seconds: tuple[float, ...] = ()
    objects_per_s: float | None = None
    error: str | None = None


def _shutdown(loader: DataLoader[Any]) -> None:
    """Stop a persistent-worker loader's workers now, not whenever it is collected."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


def _labels(loader: DataLoader[Any]) -> torch.Tensor:
    """One pass: every batch's labels, in order (and a check of the images' shape)."""
    labels = []
    for images, batch_labels in loader:
        if images.shape[1:] != (3, IMAGE_SIDE, IMAGE_SIDE) or images.dtype != torch.uint8:
            raise RuntimeError(f"got images of shape {tuple(images.shape)} and {images.dtype}")
        labels.append(batch_labels)
    return torch.cat(labels)


def access(reader: MapReader, workers: int, server: LocalS3Server, objects: Objects, config: Config) -> Access:
    """Build ``reader``'s dataset and loader (untimed), warm up, time ``config.repeats`` passes, check each."""
    indices = config.sample()
    expected = torch.tensor([objects.label(i) for i in indices])
    seconds: list[float] = []
    # Collect the previous rows' clients here, not in a forked worker that inherited them
    # (their finalizers would run on the worker's fresh event loop and fail there).
    gc.collect()
    try:
        with contextlib.ExitStack() as stack:
            dataset = reader.make(stack, server, objects)
            sampler = IndexSampler(indices[: config.warmup])
            loader = DataLoader(
                dataset,
                batch_size=config.batch_size,
                sampler=sampler,
                num_workers=workers,
                collate_fn=collate,
                persistent_workers=workers > 0,
                multiprocessing_context="fork" if workers else None,
            )
            stack.callback(_shutdown, loader)
            _labels(loader)
            sampler.indices = indices
            for _ in range(config.repeats):
                started = time.perf_counter()
                labels = _labels(loader)
                seconds.append(time.perf_counter() - started)
                if not torch.equal(labels, expected):
                    raise RuntimeError(f"a pass returned {len(labels)} labels, not the {len(expected)} expected")
    except Exception as exc:
        if not reader.optional:
            raise
        _log(f"{reader.name}, num_workers={workers}: failed: {_one_line(exc)}")
        return Access(reader.name, workers, error=_one_line(exc))
    _log(f"{reader.name}, num_workers={workers}: {', '.join(f'{t:.2f}' for t in seconds)} s")
    return Access(reader.name, workers, tuple(seconds), objects_per_s=len(indices) / min(seconds))


# -- report ---------------------------------------------------------------------------------------


@dataclass
class Report:
    """Everything one run measured, with its context."""

    config: Config
    objects: Objects
    upload_s: float
    timings: list[Timing]
    rows: list[Access]
    parts: list[Part]
    profiled: tuple[str, str] | None = None
    date: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat("T", "seconds"))
    machine: dict[str, Any] = field(default_factory=machine)
    versions: dict[str, str] = field(default_factory=versions)

    def _rate(self, name: str, workers: int) -> float | None:
        return next((r.objects_per_s for r in self.rows if r.name == name and r.workers == workers), None)

    def targets(self) -> list[dict[str, Any]]:
        """Each measure the project aims at: its value, the target, and whether it is met."""
        out = []
        for workers, target in RATIO_TARGETS.items():
            top, bottom = self._rate(S3PIPES, workers), self._rate(S3TORCH, workers)
            value = top / bottom if top is not None and bottom else None
            name = f"s3pipes / s3torchconnector objects/s, num_workers={workers}"
            out.append({"name": name, "value": value, "target": f">= {target:g}", "met": _met(value, target)})
        for timing in self.timings:
            if timing.target_s is not None:
                best, name = timing.best, f"{timing.name}: seconds (best)"
                met = None if best is None else best <= timing.target_s
                out.append({"name": name, "value": best, "target": f"<= {timing.target_s:g} s", "met": met})
        return out

    def to_json(self) -> dict[str, Any]:
        o = self.objects
        return {
            "date": self.date,
            "machine": self.machine,
            "versions": self.versions,
            "settings": {k: v for k, v in asdict(self.config).items() if k != "json_path"},
            "data": {
                "prefix": o.prefix,
                "objects": len(o.keys),
                "stored_bytes": o.stored_bytes,
                "upload_s": self.upload_s,
            },
            "listing": [asdict(t) for t in self.timings],
            "random_access": [asdict(r) for r in self.rows],
            "targets": self.targets(),
            "s3pipes_breakdown": [{**asdict(p), "objects_per_s": p.objects_per_s} for p in self.parts],
        }

    def markdown(self) -> str:
        sections = [self._context(), self._listing(), self._access(), self._targets(), self._parts(), self._profile()]
        return "\n".join(line for section in sections for line in section)

    def _context(self) -> list[str]:
        m, c, o = self.machine, self.config, self.objects
        packages = ", ".join(f"{name} {version}" for name, version in self.versions.items())
        return [
            "## s3pipes map-style benchmark",
            "",
            f"- date: {self.date}",
            f"- machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['os']}, Python {m['python']}",
            f"- versions: {packages}",
            f"- data: {len(o.keys):,} PNGs ({IMAGE_SIDE}x{IMAGE_SIDE} RGB noise, {c.distinct_images} distinct, "
            f"{o.stored_bytes / len(o.keys) / 1e3:.1f} KB each) under {o.prefix}<label>/<id>.png, 10 labels; "
            f"uploaded untimed in {self.upload_s:.1f} s ({c.upload_threads} threads)",
            "- server: one embedded SeaweedFS (LocalS3Server) on 127.0.0.1, same data for every row",
            f"- random access: {c.items:,} indices sampled with seed {c.seed}; DataLoader(batch_size={c.batch_size}, "
            "that sampler, collate=stack, fork, persistent workers); transform = PIL PNG decode -> uint8 CHW tensor "
            f"+ label from the key; one untimed warm-up pass of {c.warmup} indices, then best of {c.repeats} passes",
        ]

    def _listing(self) -> list[str]:
        lines = [
            "",
            "### Listing and opening",
            "",
            "| operation | best (s) | passes (s) | target |",
            "|---|---:|---|---|",
        ]
        for t in self.timings:
            target = f"<= {t.target_s:g} s" if t.target_s is not None else ""
            if t.best is None:
                lines.append(f"| {t.name} | n/a | failed: {t.error} | {target} |")
            else:
                lines.append(f"| {t.name} | {t.best:.3f} | {_times(t.seconds, 3)} | {target} |")
        return lines

    def _access(self) -> list[str]:
        lines = [
            "",
            "### Random access",
            "",
            "| reader | num_workers | objects/s | pass times (s) |",
            "|---|---:|---:|---|",
        ]
        for r in self.rows:
            rate = "n/a" if r.objects_per_s is None else f"{r.objects_per_s:,.0f}"
            lines.append(f"| {r.name} | {r.workers} | {rate} | {_times(r.seconds, 2) or f'failed: {r.error}'} |")
        return lines

    def _targets(self) -> list[str]:
        lines = ["", "### Targets", "", "| measure | value | target | met |", "|---|---:|---|---|"]
        for t in self.targets():
            value = "n/a" if t["value"] is None else f"{t['value']:.3g}"
            lines.append(f"| {t['name']} | {value} | {t['target']} | {_YES[t['met']]} |")
        return lines

    def _parts(self) -> list[str]:
        return [
            "",
            f"### s3pipes at num_workers=0: the parts of a pass, each timed alone (the first "
            f"{min(PARTS_ITEMS, self.config.items):,} sampled indices; best of {self.config.repeats})",
            "",
            "| part | objects/s | ms per batch | client CPU ms/object | server CPU ms/object |",
            "|---|---:|---:|---:|---:|",
            *(_part_line(p) for p in self.parts),
        ]

    def _profile(self) -> list[str]:
        lines: list[str] = []
        if self.profiled is None:
            return []
        for thread, text in zip(("main thread", "fsspec event-loop thread"), self.profiled, strict=True):
            heading = (
                f"### cProfile of one s3pipes num_workers=0 pass, {thread} (top {self.config.profile} by own time)"
            )
            lines += ["", heading, "", "```", text, "```"]
        return lines


_YES = {True: "yes", False: "NO", None: "n/a"}


def _times(seconds: Sequence[float], digits: int) -> str:
    return ", ".join(f"{t:.{digits}f}" for t in seconds)


def _part_line(part: Part) -> str:
    if part.objects_per_s is None or part.ms_per_batch is None:
        return f"| {part.name} | n/a | n/a | n/a | failed: {part.error} |"
    cpu = ["n/a" if ms is None else f"{ms:.2f}" for ms in (part.client_cpu_ms, part.server_cpu_ms)]
    return f"| {part.name} | {part.objects_per_s:,.0f} | {part.ms_per_batch:.1f} | {cpu[0]} | {cpu[1]} |"


def _met(value: float | None, target: float) -> bool | None:
    return None if value is None else value >= target


def main(argv: Sequence[str] | None = None) -> int:
    config = Config.from_args(argv)
    with LocalS3Server() as server:
        _log(f"SeaweedFS at {server.endpoint_url}")
        objects, upload_s = prepare(server, config)
        timings = listing(server, objects)
        rows = [access(reader, w, server, objects, config) for reader in map_readers() for w in config.workers]
        indices = config.sample()[:PARTS_ITEMS]
        started = time.perf_counter()
        parts = breakdown(server, objects, indices, batch_size=config.batch_size, repeats=config.repeats)
        _log(f"timed the parts of an s3pipes pass in {time.perf_counter() - started:.1f} s")
        profiled = None
        if config.profile:
            profiled = _profile(server, objects, config)
    report = Report(config, objects, upload_s, timings, rows, parts, profiled)
    print(report.markdown())
    if config.json_path:
        with open(config.json_path, "w") as out:
            json.dump(report.to_json(), out, indent=2)
            out.write("\n")
        _log(f"wrote {config.json_path}")
    return 0


def _profile(server: LocalS3Server, objects: Objects, config: Config) -> tuple[str, str]:
    """cProfile one s3pipes pass at ``num_workers=0`` (after an untimed one)."""
    with contextlib.ExitStack() as stack:
        dataset = next(r for r in map_readers() if r.name == S3PIPES).make(stack, server, objects)
        loader = DataLoader(
            dataset,
            batch_size=config.batch_size,
            sampler=IndexSampler(config.sample()[:PARTS_ITEMS]),
            collate_fn=collate,
        )
        _labels(loader)
        return profile_pass(lambda: _labels(loader), config.profile)


if __name__ == "__main__":
    sys.exit(main())
