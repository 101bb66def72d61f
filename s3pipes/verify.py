"""Check a directory of tar shards against its manifest: :func:`verify_shards` (``s3pipes verify``).

Every shard is read whole through the stages a training pipeline uses (``OpenObject`` ->
``Untar`` -> ``GroupByKey``): every member is read and its header checksum checked, and
every sample is grouped. Then, per shard: it is in the manifest (``shards.s3pipes.json``)
and the manifest's shards are in the store; its sample count, stored size, first and last
key are the manifest's. Across shards: no key appears twice; the manifest's totals are the
sums of its shards and of what was read.

Not checked: that a sample's bytes are the source's (the manifest has no checksums), and
shards in subdirectories (a manifest names the shards next to it).
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from torchdata.nodes import IterableWrapper

from s3pipes.errors import DataError, ObjectNotFound
from s3pipes.stages.group import GroupByKey
from s3pipes.stages.open import OpenObject
from s3pipes.stages.tar import Untar
from s3pipes.store import Store
from s3pipes.writer import MANIFEST_NAME, read_manifest

__all__ = ["Problem", "VerifyReport", "verify_shards"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong, with the shard (or manifest) it is about: ``str()`` is ``"<url>: <detail>"``."""

    url: str
    detail: str

    def __str__(self) -> str:
        return f"{self.url}: {self.detail}"


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify_shards` read, and every problem it found (none: ``ok``)."""

    prefix: str
    manifest: str
    shards: int
    samples: int
    bytes: int
    skipped: int  # inputs the conversion left out (the manifest's "skipped")
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        verdict = "OK" if self.ok else f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        skipped = f", {self.skipped} source inputs skipped at conversion" if self.skipped else ""
        return (
            f"{verdict}: {self.shards} shards, {self.samples:,} samples, {self.bytes / 1e6:,.1f} MB "
            f"under {self.prefix}{skipped}"
        )


@dataclass
class _Scan:
    """One shard as read: its keys in order (one per sample), or where reading it failed."""

    url: str
    keys: list[str] = field(default_factory=list)
    error: str | None = None


def verify_shards(store: Store, prefix: str, *, manifest: str | None = None, workers: int = 4) -> VerifyReport:
    """Read every ``.tar`` shard directly under ``prefix`` and compare it with the manifest.

    Args:
        store: the Store to read through.
        prefix: the directory of the shards (``"s3://shards/mnist/"``).
        manifest: the manifest's URL; ``<prefix>/shards.s3pipes.json`` when None. Its shard
            names are taken relative to ``prefix`` either way.
        workers: shards read concurrently (threads).

    Returns:
        A :class:`VerifyReport`; ``report.problems`` lists each problem once, naming the
        shard (or the manifest): per shard in sorted order, then duplicate keys, then the
        manifest's totals. A shard that cannot be read as tar (truncated, corrupt header) is
        a problem, not an exception. A shard cut exactly between two members reads as a
        shorter valid tar: only the manifest's size and counts tell.

    Raises:
        StoreError: listing ``prefix`` failed (``BucketNotFound``, ``ObjectNotFound`` for a
            missing directory, ``AccessDenied``, ...), or reading a shard failed other than
            by its being gone.

    Example::

        report = verify_shards(Store.from_env(), "s3://shards/mnist/")
        for problem in report.problems:
            print(problem)
    """
    if workers < 1:
        raise ValueError(f"{workers=} must be >= 1")
    root = prefix.rstrip("/")
    manifest_url = manifest if manifest is not None else f"{root}/{MANIFEST_NAME}"
    listed = {
        url: int(info.get("size") or 0)
        for url, info in store.list_info(root + "/", suffix=".tar").items()
        if "/" not in url[len(root) + 1 :]
    }
    problems: list[Problem] = []
    document, entries = _manifest(store, manifest_url, root, problems)
    with ThreadPoolExecutor(workers, thread_name_prefix="s3pipes-verify") as pool:
        scans = dict(zip(sorted(listed), pool.map(lambda url: _scan(store, url), sorted(listed)), strict=True))
    for url in sorted(set(listed) | set(entries)):
        problems += _compare(url, listed.get(url), scans.get(url), entries.get(url), document is not None)
    problems += _duplicates(scans)
    samples = sum(len(scan.keys) for scan in scans.values())
    if document is not None:
        complete = all(scan.error is None for scan in scans.values())
        problems += _totals(manifest_url, document, entries, samples, complete=complete)
    skipped = len(document.get("skipped") or []) if document is not None else 0
    return VerifyReport(root + "/", manifest_url, len(listed), samples, sum(listed.values()), skipped, problems)


def _manifest(
    store: Store, url: str, root: str, problems: list[Problem]
) -> tuple[dict[str, Any] | None, dict[str, Mapping[str, Any]]]:
    """The manifest and its shard entries by URL; a missing or malformed one is a problem."""
    try:
        document = read_manifest(store, url)
    except ObjectNotFound:
        problems.append(Problem(url, "no manifest (it is written last: was the conversion interrupted?)"))
        return None, {}
    except ValueError as exc:  # not JSON, or not our format
        problems.append(Problem(url, f"not a readable manifest: {str(exc).removeprefix(url + ': ')}"))
        return None, {}
    entries: dict[str, Mapping[str, Any]] = {}
    for entry in document.get("shards") or []:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            problems.append(Problem(url, f"malformed shard entry {entry!r}"))
            continue
        shard = f"{root}/{entry['name']}"
        if shard in entries:
            problems.append(Problem(shard, "listed twice in the manifest"))
        entries[shard] = entry
    return document, entries


def _scan(store: Store, url: str) -> _Scan:
    """Read every member and group every sample of one shard, as a pipeline would."""
    scan = _Scan(url)
    node = GroupByKey(Untar(OpenObject(IterableWrapper([url]), store)))
    try:
        for sample in node:
            scan.keys.append(sample["__key__"])
    except DataError as exc:  # CorruptShard, DuplicateField
        where = "".join([f", member {exc.member!r}" if exc.member else "", _at(exc.offset)])
        scan.error = f"{exc.detail}{where}, after {len(scan.keys)} samples read"
    except ObjectNotFound:
        scan.error = "listed, but gone when read"
    return scan


def _at(offset: int | None) -> str:
    return f" at byte offset {offset}" if offset is not None else ""


def _compare(
    url: str, size: int | None, scan: _Scan | None, entry: Mapping[str, Any] | None, have_manifest: bool
) -> list[Problem]:
    """One shard: present on both sides, readable, and as the manifest describes it."""
    if size is None:
        return [Problem(url, "in the manifest but not in the store")]
    assert scan is not None
    found = [Problem(url, scan.error)] if scan.error is not None else []
    if entry is None:
        return [*found, Problem(url, "in the store but not in the manifest")] if have_manifest else found
    if size != entry.get("bytes"):
        found.append(Problem(url, f"{size:,} bytes in the store, the manifest says {entry.get('bytes')!r}"))
    if scan.error is not None:
        return found  # counts and keys of a partly read shard say nothing more
    keys = scan.keys
    if len(keys) != entry.get("samples"):
        found.append(Problem(url, f"{len(keys):,} samples, the manifest says {entry.get('samples')!r}"))
    for name, actual in (("first_key", keys[0] if keys else ""), ("last_key", keys[-1] if keys else "")):
        if actual != entry.get(name):
            found.append(Problem(url, f"{name} is {actual!r}, the manifest says {entry.get(name)!r}"))
    return found


def _duplicates(scans: Mapping[str, _Scan]) -> list[Problem]:
    """Keys that appear more than once: one problem per shard and the shard that had them first."""
    first_seen: dict[str, str] = {}
    found: list[Problem] = []
    for url in sorted(scans):
        repeats: dict[str, list[str]] = {}  # where a key was first seen -> the keys seen again here
        here: set[str] = set()
        for key in scans[url].keys:
            if key in here:
                repeats.setdefault(url, []).append(key)
                continue
            here.add(key)
            other = first_seen.setdefault(key, url)
            if other != url:
                repeats.setdefault(other, []).append(key)
        found += _duplicate_problems(url, repeats)
    return found


def _duplicate_problems(url: str, repeats: Mapping[str, list[str]]) -> list[Problem]:
    problems = []
    for other, keys in sorted(repeats.items()):
        where = "earlier in this shard" if other == url else f"in {posixpath.basename(other)}"
        problems.append(Problem(url, f"{len(keys):,} duplicate keys, also {where} (first: {keys[0]!r})"))
    return problems


def _totals(
    url: str, document: Mapping[str, Any], entries: Mapping[str, Mapping[str, Any]], read: int, *, complete: bool
) -> list[Problem]:
    """The manifest's totals against its own shard entries, and against what was read."""
    found = []
    for name in ("samples", "bytes"):
        total = sum(int(entry.get(name) or 0) for entry in entries.values())
        if document.get(name) != total:
            found.append(Problem(url, f"total {name} is {document.get(name)!r}, its shards add up to {total:,}"))
    if complete and document.get("samples") != read:
        found.append(Problem(url, f"total samples is {document.get('samples')!r}, the shards hold {read:,}"))
    return found
