"""Where s3pipes' map-style time goes at ``num_workers=0``: requests, decoding, and the rest.

:func:`breakdown` times the parts of one pass alone, over the same batches the
DataLoader gets, with the CPU they cost this process (all threads) and the server:
``Store.read_ranges`` (what ``__getitems__`` waits for), the same through a Store
whose s3fs does not HEAD each object before its GET, botocore and s3torchconnector's
CRT client fetching the same batches on a thread pool, one GET at a time (latency),
and :func:`decode_png` + collate on bytes already in memory.

:func:`profile_pass` runs cProfile on the main thread *and* on fsspec's event-loop
thread, where s3fs/aiobotocore do the requests of a batch.
"""

from __future__ import annotations

import cProfile
import io
import itertools
import pstats
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec.asyn

import s3pipes
from benchmarks._cpu import process_cpu, server_cpu
from benchmarks._map_data import Objects, botocore_client
from benchmarks._map_readers import collate, decode_png, s3torch_dataset, s3torch_environment
from s3pipes.mapstyle import DEFAULT_CONCURRENCY
from s3pipes.server import LocalS3Server

__all__ = ["Part", "breakdown", "profile_pass"]

SINGLE_GETS = 200
CRT_THREADS = 8


@dataclass(frozen=True)
class Part:
    """One part of a pass, timed alone (best of ``repeats``), or why it could not run.

    Attributes:
        seconds: wall-clock time of the best run.
        items, batches: objects and batches (one "batch" for the one-at-a-time rows).
        client_cpu_ms, server_cpu_ms: CPU per object of this process (all threads) and of
            SeaweedFS, in the best run (server: None where /proc is unavailable).
    """

    name: str
    seconds: float = 0.0
    items: int = 0
    batches: int = 1
    client_cpu_ms: float | None = None
    server_cpu_ms: float | None = None
    error: str | None = None

    @property
    def objects_per_s(self) -> float | None:
        return self.items / self.seconds if self.seconds else None

    @property
    def ms_per_batch(self) -> float | None:
        return 1000 * self.seconds / self.batches if self.seconds else None


def _measure(name: str, run: Callable[[], object], items: int, batches: int, *, repeats: int, pid: int | None) -> Part:
    """The best of ``repeats`` runs of ``run`` (the first includes any new client's connections)."""
    best: Part | None = None
    for _ in range(repeats):
        cpu, server = process_cpu(), server_cpu(pid)
        started = time.perf_counter()
        run()
        seconds = time.perf_counter() - started
        server_after = server_cpu(pid)
        served = 1000 * (server_after - server) / items if server is not None and server_after is not None else None
        part = Part(name, seconds, items, batches, 1000 * (process_cpu() - cpu) / items, served)
        if best is None or part.seconds < best.seconds:
            best = part
    assert best is not None
    return best


def breakdown(
    server: LocalS3Server, objects: Objects, indices: Sequence[int], *, batch_size: int, repeats: int
) -> list[Part]:
    """Time fetching, decoding and single GETs of the benchmark's batches, each alone."""
    keys = [objects.keys[i] for i in indices]
    urls = [f"s3://{objects.bucket}/{key}" for key in keys]
    url_batches = [urls[at : at + batch_size] for at in range(0, len(urls), batch_size)]
    key_batches = [keys[at : at + batch_size] for at in range(0, len(keys), batch_size)]
    n, count, single = len(urls), len(url_batches), urls[:SINGLE_GETS]
    store = s3pipes.Store(server.storage_options)
    client = botocore_client(server.endpoint_url, server.key, server.secret, pool=DEFAULT_CONCURRENCY)
    blobs: list[list[bytes]] = []

    def fetch(with_store: s3pipes.Store) -> Callable[[], None]:
        def run() -> None:
            blobs[:] = [with_store.read_ranges(batch, concurrency=DEFAULT_CONCURRENCY) for batch in url_batches]

        return run

    def decode() -> None:
        for batch, data in zip(url_batches, blobs, strict=True):
            collate(
                [decode_png(s3pipes.ObjectReader(u, u.split("/", 3)[3], b)) for u, b in zip(batch, data, strict=True)]
            )

    def get(key: str) -> bytes:
        return bytes(client.get_object(Bucket=objects.bucket, Key=key)["Body"].read())

    def measure(name: str, run: Callable[[], object], items: int = n, batches: int = count) -> Part:
        return _measure(name, run, items, batches, repeats=repeats, pid=server.pid)

    with ThreadPoolExecutor(DEFAULT_CONCURRENCY, thread_name_prefix="bench-get") as pool:
        parts = [
            measure(f"Store.read_ranges, batches of {batch_size} (one GET per object)", fetch(store)),
            measure(
                f"botocore get_object on {DEFAULT_CONCURRENCY} threads, same batches",
                lambda: [list(pool.map(get, batch)) for batch in key_batches],
            ),
        ]
    parts.append(_crt(server, objects, key_batches, measure))
    parts += [
        measure("decode_png + collate (bytes in memory)", decode),
        measure("Store.read_bytes, one at a time", lambda: [store.read_bytes(u) for u in single], len(single), 1),
        measure("botocore get_object, one at a time", lambda: [get(k) for k in keys[:SINGLE_GETS]], len(single), 1),
    ]
    return parts


def _crt(server: LocalS3Server, objects: Objects, key_batches: list[list[str]], measure: Callable[..., Part]) -> Part:
    """s3torchconnector's CRT client (through S3MapDataset.from_objects) on a thread pool: what a native client gets."""
    name = f"s3torchconnector CRT get on {CRT_THREADS} threads, same batches"
    try:
        with s3torch_environment(server), ThreadPoolExecutor(CRT_THREADS) as pool:
            every = [key for batch in key_batches for key in batch]
            dataset = s3torch_dataset(server, [f"s3://{objects.bucket}/{key}" for key in every], raw=True)
            dataset[0].read()  # build the client before the threads share it
            bounds = list(itertools.accumulate((len(batch) for batch in key_batches), initial=0))

            def run() -> None:
                for start, end in itertools.pairwise(bounds):
                    list(pool.map(lambda i: dataset[i].read(), range(start, end)))

            return measure(name, run)
    except Exception as exc:
        return Part(name, error=f"{type(exc).__name__}: {exc}"[:200])


def _on_loop_thread(action: Callable[[], None]) -> None:
    """Run ``action`` on fsspec's event-loop thread and wait for it (cProfile hooks the calling thread)."""
    done = threading.Event()

    def call() -> None:
        try:
            action()
        finally:
            done.set()

    fsspec.asyn.get_loop().call_soon_threadsafe(call)
    done.wait()


def profile_pass(run: Callable[[], object], top: int) -> tuple[str, str]:
    """``(main thread, event-loop thread)``: the ``top`` functions by own time during one ``run()``."""
    main, loop = cProfile.Profile(), cProfile.Profile()
    _on_loop_thread(loop.enable)
    try:
        main.runcall(run)
    finally:
        _on_loop_thread(loop.disable)
    return _top(main, top), _top(loop, top)


def _top(profiler: Any, top: int) -> str:
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue().strip()
