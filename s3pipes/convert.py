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
writes. A run starts by removing the directory's manifest and, before writing its own,
removes the shards named by the pattern that it did not write and the records past its
plan (left by an earlier run with more units), so the directory holds one run's shards.
Source objects are only read.

A unit that fails is run again input by input to find the culprit: with
``on_error="raise"`` that input's :class:`~s3pipes.errors.SourceError` (or the store
error naming it) is raised; with ``on_error="skip"`` it is left out, counted and listed
in the manifest's ``skipped``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import posixpath
import re
import string
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, as_completed
from dataclasses import dataclass
from typing import Any, Literal

from s3pipes import errors
from s3pipes.errors import SourceError
from s3pipes.index import is_own_file
from s3pipes.pipe import sole_consumer
from s3pipes.stages.group import split_key
from s3pipes.store import Store
from s3pipes.writer import ConvertResult, ShardInfo, ShardWriter, check_pattern, manifest_url, write_manifest

__all__ = ["ConvertResult", "ObjectSamples", "Source", "convert", "plan_units"]

Source = Callable[[Sequence[str]], Iterable[Mapping[str, Any]]]
OnError = Literal["raise", "skip"]
RECORDS = ".s3pipes-convert"
_NO_LIMIT = sys.maxsize
_log = logging.getLogger(__name__)


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
    for sample in _samples(sorted(sizes, key=lambda url: (posixpath.dirname(url), posixpath.basename(url)))):
        sample_bytes = sum(sizes[url] for url in sample)
        if unit and (len(unit) + len(sample) > maxcount or unit_bytes + sample_bytes > maxsize):
            units.append(unit)
            unit, unit_bytes = [], 0
        unit += sample
        unit_bytes += sample_bytes
    if unit:
        units.append(unit)
    return units


def _samples(urls: Sequence[str]) -> list[list[str]]:
    """``urls`` (sorted by directory, then name) in runs that make one sample each: same directory, same stem."""
    runs: list[list[str]] = []
    for url in urls:
        if runs and _same_sample(runs[-1][0], url, _stem(runs[-1][0])):
            runs[-1].append(url)
        else:
            runs.append([url])
    return runs


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


def _digest(inputs: Sequence[str], pattern: str, maxcount: int, maxsize: int, on_error: str, source: Source) -> str:
    """What a unit's output depends on: inputs, limits, error policy and the source's ``fingerprint``, if it has one
    (a plain function has none: changing it and rerunning into the same prefix keeps the old shards)."""
    fingerprint = str(getattr(source, "fingerprint", ""))
    text = json.dumps([list(inputs), posixpath.basename(pattern), maxcount, maxsize, on_error, fingerprint])
    return hashlib.sha256(text.encode()).hexdigest()


def _run_unit(unit: _Unit) -> dict[str, Any]:
    """Write unit's shard and its record; the record. Runs wherever the executor runs it."""
    try:
        with sole_consumer():  # the unit is this process's share already: a launcher's RANK must not split it
            shards = _writer(unit).write_all(unit.source(unit.inputs))
        skipped: list[dict[str, str]] = []
    except errors.BucketNotFound:
        raise  # the destination's: no input is to blame
    except Exception as exc:  # find which input, then raise naming it or go on without it
        _log.warning("unit %d failed (%s); retrying it input by input", unit.number, exc)
        with sole_consumer():
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
        for inputs in _samples(unit.inputs):  # one sample's objects at a time: a sample is never split
            try:
                samples = list(unit.source(inputs))
            except Exception as exc:
                url = next((url for url in inputs if url in str(exc)), inputs[0])
                failure = _named(exc, url)
                if unit.on_error == "raise":
                    raise failure from exc
                _log.warning("skipped %s: %s", url, failure)
                skipped += [{"source": url, "error": str(failure)} for url in inputs]
                continue
            for sample in samples:
                try:
                    writer.write(sample)  # refuses before writing a byte of it (a bad key, a field it cannot encode)
                except (ValueError, TypeError) as exc:
                    url = inputs[0]
                    failure = SourceError(url, f"its sample cannot be written: {type(exc).__name__}: {exc}")
                    if unit.on_error == "raise":
                        raise failure from exc
                    _log.warning("skipped %s: %s", url, failure)
                    skipped += [{"source": url, "error": str(failure)} for url in inputs]
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

    Example:
        >>> store = Store()
        >>> for label, name in [(0, "a"), (1, "b"), (1, "c")]:
        ...     store.write_bytes(f"memory://doc-convert/raw/{label}/{name}.txt", name.encode())
        >>> source = ObjectSamples("memory://doc-convert/raw/", label_from_path=1, store=store)
        >>> result = convert(source, "memory://doc-convert/out/{shard}.tar", "memory://doc-convert/raw/",
        ...                  maxcount=2, store=store, progress=False)
        >>> [(shard.name, shard.samples, shard.first_key) for shard in result.shards], result.samples
        ([('0.tar', 2, '0/a'), ('1.tar', 1, '1/c')], 3)
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
        _Unit(
            n,
            tuple(urls),
            source,
            dst_pattern,
            store,
            on_error,
            _digest(urls, dst_pattern, maxcount, maxsize, on_error, source),
        )
        for n, urls in enumerate(plan_units(sizes, maxcount=maxcount, maxsize=maxsize))
    ]
    done = _finished(store, units)
    with contextlib.suppress(errors.ObjectNotFound):  # a failed rerun must not leave the last run's manifest
        store.delete(manifest_url(dst_pattern))
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
    _remove_earlier_outputs(store, dst_pattern, {shard.name for shard in shards}, len(units))
    manifest = write_manifest(store, dst_pattern, shards, skipped)
    result = ConvertResult(shards, skipped, len(done), time.perf_counter() - started, manifest)
    _log.info("%s", result)
    return result


def _remove_earlier_outputs(store: Store, pattern: str, kept: set[str], units: int) -> None:
    """Delete the shards named by ``pattern`` that this run did not write, and records of units past
    its plan: an earlier run into the same directory planned more units (other limits or inputs),
    or a unit is empty now. Left there, readers of the directory saw their samples twice.
    """
    directory = posixpath.dirname(pattern.format(shard=0))
    shard_name = _name_pattern(posixpath.basename(pattern))
    record_name = re.compile(rf"{re.escape(RECORDS)}/unit-(\d+)\.json")
    try:
        listing = store.list(directory + "/")
    except errors.ObjectNotFound:  # nothing written there (every input skipped), on file:// or memory://
        return
    for url in listing:
        name = url[len(directory) + 1 :]
        record = record_name.fullmatch(name)
        if (shard_name.fullmatch(name) and name not in kept) or (record and int(record.group(1)) >= units):
            _log.info("removing %s: left by an earlier conversion into %s", url, directory)
            with contextlib.suppress(errors.ObjectNotFound):
                store.delete(url)


def _name_pattern(basename: str) -> re.Pattern[str]:
    """A regex for the names ``basename.format(shard=n)`` gives (the ``{shard}`` field as digits)."""
    parts = []
    for literal, field, _spec, _conversion in string.Formatter().parse(basename):
        parts.append(re.escape(literal.replace("{{", "{").replace("}}", "}")))
        if field is not None:
            parts.append(r"\d+")
    return re.compile("".join(parts))


def _input_sizes(store: Store, inputs: str | Sequence[str], suffix: str) -> dict[str, int]:
    """``{url: size}`` of the inputs: a prefix's listing, or the given URLs (sized by one listing of their parent)."""
    if isinstance(inputs, str):
        listing = store.list_info(inputs, suffix=suffix)
        return {url: int(info.get("size") or 0) for url, info in listing.items() if not is_own_file(url)}
    return {url: 0 for url in inputs if url.endswith(suffix)}  # unknown sizes: units are cut by count only


def _finished(store: Store, units: Sequence[_Unit]) -> dict[int, dict[str, Any]]:
    """The units an earlier run finished with these same inputs and limits: their records."""
    if not units:
        return {}
    directory = posixpath.dirname(units[0].pattern.format(shard=0))
    try:
        listing = store.list_info(directory + "/")  # records and shards; a missing bucket fails here, early
    except errors.BucketNotFound:
        raise
    except errors.NotFound:
        return {}
    found: dict[int, dict[str, Any]] = {}
    for unit in units:
        if unit.record_url not in listing:
            continue
        try:
            record = json.loads(store.read_bytes(unit.record_url))
        except (errors.ObjectNotFound, ValueError):
            continue
        if not isinstance(record, dict) or record.get("digest") != unit.digest:
            continue
        shard = record.get("shard")
        shard_info = listing.get(f"{directory}/{shard['name']}") if shard else None
        if shard and (shard_info is None or int(shard_info.get("size") or -1) != shard["bytes"]):
            continue  # the record outlived its shard (deleted or replaced since): write it again
        found[unit.number] = record
    return found


class _Bars:
    """Progress as units finish: samples written, bytes written, shards (of the plan); nothing when off."""

    def __init__(self, enabled: bool | None, *, total_units: int, total_inputs: int) -> None:
        if enabled is None:
            enabled = sys.stderr.isatty()
        self._bars: list[Any] = []
        if enabled:
            from tqdm import tqdm

            # total: the inputs, which are the samples when each object is one (a sample's files count once each)
            self._bars = [
                tqdm(total=total_inputs, desc="samples", unit="sample", position=0),
                tqdm(desc="written", unit="B", unit_scale=True, unit_divisor=1024, position=1),
                tqdm(total=total_units, desc="shards", unit="shard", position=2),
            ]

    def unit_done(self, record: Mapping[str, Any], inputs: int) -> None:
        if self._bars:
            samples_bar, bytes_bar, shards_bar = self._bars
            samples_bar.update(record["shard"]["samples"] if record["shard"] else 0)
            bytes_bar.update(record["shard"]["bytes"] if record["shard"] else 0)
            shards_bar.update(1)

    def close(self) -> None:
        for bar in self._bars:
            bar.close()


_LABEL = re.compile(r"-?[0-9]+", re.ASCII)


@dataclass(frozen=True)
class ObjectSamples:
    """A :data:`Source` for :func:`convert` over one-object-per-sample data: objects -> samples, bytes as they are.

    ``s3://raw/mnist/train/3/00017.png`` under ``prefix="s3://raw/mnist/train/"`` becomes
    ``{"__key__": "3/00017", "png": <the object's bytes>}``, and with ``label_from_path=1``
    also ``"cls": 3``. The key is the object's path relative to ``prefix`` without its
    extensions, the field is the extensions lower-cased (webdataset's rule,
    :func:`~s3pipes.stages.group.split_key`: ``x.seg.png`` -> key ``x``, field ``seg.png``).
    Consecutive objects with one key (``x.json``, ``x.png``) make one sample, as
    :func:`plan_units` keeps them in one unit. Nothing is decoded.

    Each call reads its objects with one GET each, ``concurrency`` at a time
    (:meth:`Store.read_ranges <s3pipes.store.Store.read_ranges>`), about ``4 * concurrency``
    objects in memory at once. It is not a :class:`~s3pipes.pipe.Pipe`: a Pipe splits its
    URLs over ranks and DataLoader workers (``RANK``/``WORLD_SIZE``), which would drop
    inputs from a unit run under ``torchrun``. Instances pickle (process pools, Dask).

    Args:
        prefix: the source prefix the keys are relative to (what ``convert`` lists).
        label_from_path: store ``int(component)`` as ``cls``, taking the component of the
            path under ``prefix`` at this position, counting from 1 and directories only
            (1: ``<label>/<id>.png``; 2: ``<split>/<label>/<id>.png``). None: no label.
        store: the Store to read through; ``Store.from_env()`` in the process running the
            unit when None (pass one for Dask workers that lack the environment).
        concurrency: GETs in flight.

    Raises:
        ValueError: ``label_from_path`` < 1 or ``concurrency`` < 1 (when constructed).
        SourceError: (when called) an object is outside ``prefix``, has no extension, has no
            integer label at ``label_from_path``, or repeats a field of its sample; names it.
        StoreError: (when called) an object could not be read; names it.

    Example::

        source = ObjectSamples("s3://raw/mnist/train/", label_from_path=1, store=store)
        convert(source, "s3://shards/mnist/train-{shard:06d}.tar", "s3://raw/mnist/train/", suffix=".png")
    """

    prefix: str
    label_from_path: int | None = None
    store: Store | None = None
    concurrency: int = 32

    @property
    def fingerprint(self) -> str:
        """What the samples depend on (``convert`` redoes units a different fingerprint made)."""
        return f"ObjectSamples({self.prefix!r}, label_from_path={self.label_from_path})"

    def __post_init__(self) -> None:
        if self.label_from_path is not None and self.label_from_path < 1:
            raise ValueError(f"label_from_path={self.label_from_path} must be >= 1 (1 = the first directory)")
        if self.concurrency < 1:
            raise ValueError(f"concurrency={self.concurrency} must be >= 1")

    def __call__(self, urls: Sequence[str]) -> Iterator[dict[str, Any]]:
        """The samples of ``urls``, in their order."""
        store = self.store if self.store is not None else Store.from_env()
        batch_size = 4 * self.concurrency
        sample: dict[str, Any] | None = None
        for start in range(0, len(urls), batch_size):
            batch = urls[start : start + batch_size]
            named = [(url, *self._key_field(url)) for url in batch]  # fail on names before any GET
            contents = store.read_ranges(batch, concurrency=self.concurrency)
            for (url, key, extension), data in zip(named, contents, strict=True):
                if sample is not None and sample["__key__"] != key:
                    yield sample
                    sample = None
                if sample is None:
                    sample = {"__key__": key}
                    if self.label_from_path is not None:
                        sample["cls"] = self._label(url)
                if extension in sample:
                    source = "label_from_path" if extension == "cls" and self.label_from_path else "another object"
                    raise SourceError(url, f"field {extension!r} of sample {key!r} is already set by {source}")
                sample[extension] = data
        if sample is not None:
            yield sample

    def _relative(self, url: str) -> str:
        root = self.prefix.rstrip("/") + "/"
        if not url.startswith(root):
            raise SourceError(url, f"is not under prefix={self.prefix!r}, so it has no key relative to it")
        return url[len(root) :]

    def _key_field(self, url: str) -> tuple[str, str]:
        parts = split_key(self._relative(url))
        if parts is None:
            raise SourceError(url, "has no extension to name its field (select objects with suffix=, e.g. '.png')")
        return parts

    def _label(self, url: str) -> int:
        k = self.label_from_path
        assert k is not None
        directories = self._relative(url).split("/")[:-1]
        if k > len(directories):
            raise SourceError(
                url, f"has {len(directories)} directories under the prefix: no label at label_from_path={k}"
            )
        component = directories[k - 1]
        if not _LABEL.fullmatch(component):
            raise SourceError(url, f"path component {k} is {component!r}, not an integer label (label_from_path={k})")
        return int(component)
