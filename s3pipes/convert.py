"""Parallel, resumable conversion of source objects into tar shards: :func:`convert`.

The plan is made from the inputs alone, before anything runs: the sorted input URLs are
cut into *work units* of at most ``maxcount`` inputs and ``maxsize`` source bytes, never
between two inputs of one sample (``a/x.png`` and ``a/x.cls``), and unit ``u`` becomes
the shard ``dst_pattern.format(shard=u)``. So the output depends only on the inputs, the
source function and the limits: serial, on threads, processes or a Dask cluster, the
shards are the same bytes. (A source function that makes several samples of one input,
or grows them, makes shards past the limits; the plan cannot know.)

Each unit runs ``source(unit_inputs)`` (a :class:`~s3pipes.pipe.Pipe` or any iterable of
sample dicts) into one shard, published when complete, then writes a small record
``.s3pipes-convert/unit-<u>.json`` next to the shards; the manifest
(``shards.s3pipes.json``) comes last, once every unit has its record. A rerun with the
same arguments skips the units whose record matches (same inputs, same limits), so a
killed conversion resumes where it stopped and ends with what an uninterrupted run
writes. Source objects are only read.

A unit that fails is run again input by input to find the culprit: with
``on_error="raise"`` that input's :class:`~s3pipes.errors.SourceError` (or the store
error naming it) is raised; with ``on_error="skip"`` it is left out, counted and listed
in the manifest's ``skipped``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor, Future, as_completed
from dataclasses import dataclass, field
from typing import Any, Literal

from s3pipes import errors
from s3pipes.errors import SourceError
from s3pipes.stages.group import split_key
from s3pipes.store import Store
from s3pipes.writer import ShardInfo, ShardWriter, check_pattern, write_manifest

__all__ = ["ConvertResult", "Source", "convert", "plan_units"]

Source = Callable[[Sequence[str]], Iterable[Mapping[str, Any]]]
OnError = Literal["raise", "skip"]
RECORDS = ".s3pipes-convert"
_NO_LIMIT = sys.maxsize
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvertResult:
    """What a conversion wrote (shards), left out (skipped), reused from an earlier run (resumed)."""

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


def plan_units(sizes: Mapping[str, int], *, maxcount: int, maxsize: int) -> list[list[str]]:
    """Sorted inputs cut into units of <= ``maxcount`` inputs and <= ``maxsize`` bytes, samples kept whole.

    Example:
        >>> plan_units({"a.png": 5, "a.cls": 1, "b.png": 5, "c.png": 5}, maxcount=3, maxsize=100)
        [['a.cls', 'a.png', 'b.png'], ['c.png']]
        >>> plan_units({"a.png": 5, "b.png": 5, "c.png": 5}, maxcount=10, maxsize=10)
        [['a.png', 'b.png'], ['c.png']]
    """
    units: list[list[str]] = []
    unit: list[str] = []
    unit_bytes = 0
    urls = sorted(sizes)
    i = 0
    while i < len(urls):
        stem = _stem(urls[i])
        sample = [urls[i]]
        while i + len(sample) < len(urls) and _same_sample(urls[i], urls[i + len(sample)], stem):
            sample.append(urls[i + len(sample)])
        sample_bytes = sum(sizes[url] for url in sample)
        if unit and (len(unit) + len(sample) > maxcount or unit_bytes + sample_bytes > maxsize):
            units.append(unit)
            unit, unit_bytes = [], 0
        unit += sample
        unit_bytes += sample_bytes
        i += len(sample)
    if unit:
        units.append(unit)
    return units


def _stem(url: str) -> str:
    """The sample key an input belongs to, by webdataset's rule (``x.seg.png`` -> ``x``)."""
    base = posixpath.basename(url)
    parts = split_key(base)
    return parts[0] if parts is not None else base


def _same_sample(first: str, other: str, stem: str) -> bool:
    return posixpath.dirname(first) == posixpath.dirname(other) and _stem(other) == stem


@dataclass(frozen=True)
class _Unit:
    """One work unit, as sent to an executor (everything in it pickles)."""

    number: int
    inputs: tuple[str, ...]
    source: Source
    pattern: str
    store: Store
    on_error: OnError
    digest: str

    @property
    def record_url(self) -> str:
        return f"{posixpath.dirname(self.pattern.format(shard=0))}/{RECORDS}/unit-{self.number:06d}.json"


def _digest(inputs: Sequence[str], pattern: str, maxcount: int, maxsize: int) -> str:
    """What a unit's output depends on, besides the source function: its inputs and the limits."""
    text = json.dumps([list(inputs), posixpath.basename(pattern), maxcount, maxsize])
    return hashlib.sha256(text.encode()).hexdigest()


def _run_unit(unit: _Unit) -> dict[str, Any]:
    """Write unit's shard and its record; the record. Runs wherever the executor runs it."""
    try:
        shards = _writer(unit).write_all(unit.source(unit.inputs))
        skipped: list[dict[str, str]] = []
    except Exception as exc:  # find which input, then raise naming it or go on without it
        _log.warning("unit %d failed (%s); retrying it input by input", unit.number, exc)
        shards, skipped = _run_by_input(unit)
    shard = shards[0] if shards else None
    record = {
        "digest": unit.digest,
        "shard": None if shard is None else shard.__dict__,
        "skipped": skipped,
    }
    unit.store.write_bytes(unit.record_url, json.dumps(record).encode())
    return record


def _writer(unit: _Unit) -> ShardWriter:
    # One shard per unit whatever it holds: limits were applied when planning.
    return ShardWriter(unit.pattern, maxcount=_NO_LIMIT, maxsize=_NO_LIMIT, store=unit.store, start_shard=unit.number)


def _run_by_input(unit: _Unit) -> tuple[list[ShardInfo], list[dict[str, str]]]:
    skipped: list[dict[str, str]] = []
    with _writer(unit) as writer:
        for url in unit.inputs:
            try:
                samples = list(unit.source([url]))
            except Exception as exc:
                failure = _named(exc, url)
                if unit.on_error == "raise":
                    raise failure from exc
                _log.warning("skipped %s: %s", url, failure)
                skipped.append({"source": url, "error": str(failure)})
                continue
            for sample in samples:
                writer.write(sample)
    return writer.shards, skipped


def _named(exc: Exception, url: str) -> Exception:
    """``exc`` if it already names ``url`` (a store or data error of it), else a SourceError that does."""
    if isinstance(exc, errors.S3PipesError) and url in str(exc):
        return exc
    return SourceError(url, f"cannot be converted: {type(exc).__name__}: {exc}")


def convert(
    source: Source,
    dst_pattern: str,
    inputs: str | Sequence[str],
    *,
    suffix: str = "",
    maxcount: int = 10_000,
    maxsize: int = 256 << 20,
    executor: Executor | None = None,
    on_error: OnError = "raise",
    store: Store | None = None,
    progress: bool | None = None,
) -> ConvertResult:
    """Convert ``inputs`` into shards named ``dst_pattern``, one work unit per shard (see the module docstring).

    Args:
        source: ``source(urls)`` -> the samples of those input objects, in order (a Pipe,
            e.g. ``lambda urls: sp.from_urls(urls).open_object().map(to_sample)``). It must
            pickle for a process pool or Dask (a module-level function or a class instance).
        dst_pattern: ``"s3://shards/mnist/train-{shard:06d}.tar"``.
        inputs: a prefix URL (listed, keeping names ending in ``suffix``) or the input URLs.
        maxcount, maxsize: per shard, in inputs and source bytes (planned; see above).
        executor: runs the units (``ThreadPoolExecutor``, ``ProcessPoolExecutor``, a Dask
            ``Client.get_executor()``, ...); None runs them here, one after another.
        on_error: ``"raise"`` (the failing input named) or ``"skip"`` (listed in the manifest).
        store: the Store to read and write through; ``Store.from_env()`` when None.
        progress: tqdm bars (samples, MB, shards); None shows them when stderr is a terminal.

    Returns:
        A :class:`ConvertResult`; the manifest is written last.

    Raises:
        SourceError: (``on_error="raise"``) an input could not be read or converted.
        StoreError: the store refused (``BucketNotFound``, ``AccessDenied``, ...).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"{on_error=} must be 'raise' or 'skip'")
    if maxcount < 1 or maxsize < 1:
        raise ValueError(f"{maxcount=} and {maxsize=} must be >= 1")
    store = store if store is not None else Store.from_env()
    check_pattern(dst_pattern)
    started = time.perf_counter()
    sizes = _input_sizes(store, inputs, suffix)
    if not sizes:
        if not isinstance(inputs, str):
            raise ValueError(f"no inputs to convert (given {len(inputs)} URLs, {suffix=})")
        ending = f" ending in {suffix!r}" if suffix else ""
        raise errors.ObjectNotFound(inputs, store.endpoint(inputs), f"no input object{ending} under this prefix")
    units = [
        _Unit(n, tuple(urls), source, dst_pattern, store, on_error, _digest(urls, dst_pattern, maxcount, maxsize))
        for n, urls in enumerate(plan_units(sizes, maxcount=maxcount, maxsize=maxsize))
    ]
    done = _finished(store, units)
    bars = _Bars(progress, total_units=len(units), total_inputs=len(sizes))
    records: dict[int, dict[str, Any]] = dict(done)
    for number in done:
        bars.unit_done(records[number], len(units[number].inputs))
    todo = [unit for unit in units if unit.number not in done]
    try:
        if executor is None:
            for unit in todo:
                records[unit.number] = _run_unit(unit)
                bars.unit_done(records[unit.number], len(unit.inputs))
        else:
            futures: dict[Future[dict[str, Any]], _Unit] = {executor.submit(_run_unit, unit): unit for unit in todo}
            try:
                for future in as_completed(futures):
                    unit = futures[future]
                    records[unit.number] = future.result()
                    bars.unit_done(records[unit.number], len(unit.inputs))
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    finally:
        bars.close()
    shards = [ShardInfo(**records[n]["shard"]) for n in sorted(records) if records[n]["shard"] is not None]
    skipped = [item for n in sorted(records) for item in records[n]["skipped"]]
    manifest = write_manifest(store, dst_pattern, shards, skipped)
    result = ConvertResult(shards, skipped, len(done), time.perf_counter() - started, manifest)
    _log.info("%s", result)
    return result


def _input_sizes(store: Store, inputs: str | Sequence[str], suffix: str) -> dict[str, int]:
    """``{url: size}`` of the inputs: a prefix's listing, or the given URLs (sized by one listing of their parent)."""
    if isinstance(inputs, str):
        listing = store.list_info(inputs, suffix=suffix)
        return {url: int(info.get("size") or 0) for url, info in listing.items()}
    return {url: 0 for url in inputs if url.endswith(suffix)}  # unknown sizes: units are cut by count only


def _finished(store: Store, units: Sequence[_Unit]) -> dict[int, dict[str, Any]]:
    """The units an earlier run finished with these same inputs and limits: their records."""
    if not units:
        return {}
    prefix = posixpath.dirname(units[0].record_url) + "/"
    try:
        present = set(store.list(prefix, suffix=".json"))
    except errors.NotFound:
        return {}
    found: dict[int, dict[str, Any]] = {}
    for unit in units:
        if unit.record_url not in present:
            continue
        try:
            record = json.loads(store.read_bytes(unit.record_url))
        except (errors.ObjectNotFound, ValueError):
            continue
        if isinstance(record, dict) and record.get("digest") == unit.digest:
            found[unit.number] = record
    return found


class _Bars:
    """Progress: inputs, MB written and shards, as units finish; nothing when progress is off."""

    def __init__(self, enabled: bool | None, *, total_units: int, total_inputs: int) -> None:
        if enabled is None:
            enabled = sys.stderr.isatty()
        self._bars: list[Any] = []
        if enabled:
            from tqdm import tqdm

            self._bars = [
                tqdm(total=total_inputs, desc="inputs", unit="obj", position=0),
                tqdm(desc="written", unit="B", unit_scale=True, unit_divisor=1024, position=1),
                tqdm(total=total_units, desc="shards", unit="shard", position=2),
            ]

    def unit_done(self, record: Mapping[str, Any], inputs: int) -> None:
        if self._bars:
            inputs_bar, bytes_bar, shards_bar = self._bars
            inputs_bar.update(inputs)
            bytes_bar.update(record["shard"]["bytes"] if record["shard"] else 0)
            shards_bar.update(1)

    def close(self) -> None:
        for bar in self._bars:
            bar.close()
