"""Manifests and shard indexes: what a map-style dataset needs to open with one GET.

Two JSON files, written next to the data by ``s3pipes index URL`` (or the functions here):

- ``manifest.s3pipes.json`` under a prefix of objects: every object's key (relative
  to the prefix), size and ETag. A snapshot: objects added after it are not seen and a
  removed one fails when read (naming its URL); rebuild it after changing the prefix.
- ``index.s3pipes.json`` under a prefix of tar shards: for every shard its size and
  ETag, and for every sample its key and the byte range ``[start, end)`` of its members.
  Each shard's size and ETag are compared with a listing when the index is opened: a
  shard rewritten since is reported (:class:`StaleIndex`), never misread.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from s3pipes import errors
from s3pipes.errors import DataError, ObjectNotFound, StaleIndex
from s3pipes.stages._tarparse import TarReader
from s3pipes.stages.group import split_key
from s3pipes.stages.open import ObjectStream
from s3pipes.store import Store

__all__ = [
    "INDEX_NAME",
    "MANIFEST_NAME",
    "ShardIndex",
    "StaleIndex",
    "build_shard_index",
    "read_manifest",
    "write_manifest",
]

_log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.s3pipes.json"
INDEX_NAME = "index.s3pipes.json"
_VERSION = 1


def _join(prefix: str, name: str) -> str:
    return prefix.rstrip("/") + "/" + name


def is_own_file(url: str) -> bool:
    """Whether ``url`` is one of s3pipes' own files (a manifest, an index, a conversion's records): never data."""
    return url.endswith(".s3pipes.json")


def no_objects(store: Store, prefix: str, suffix: str) -> ObjectNotFound:
    """The error for a prefix with no data objects ending in ``suffix`` (a typo, most likely)."""
    return ObjectNotFound(prefix, store.endpoint(prefix), f"no objects ending in {suffix!r} under this prefix")


def _listing(store: Store, prefix: str, suffix: str) -> dict[str, dict[str, Any]]:
    """``{url: info}`` for every object under ``prefix`` ending in ``suffix``, our own files excluded."""
    return {url: info for url, info in store.list_info(prefix, suffix=suffix).items() if not is_own_file(url)}


def _etag(info: dict[str, Any]) -> str:
    return str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("created") or "")


def write_manifest(store: Store, prefix: str, *, suffix: str = "") -> str:
    """List ``prefix`` once and write its manifest there; returns the manifest's URL.

    Raises:
        ObjectNotFound: no object under ``prefix`` ends in ``suffix`` (nothing is written).
    """
    listing = _listing(store, prefix, suffix)
    if not listing:
        raise no_objects(store, prefix, suffix)
    base = prefix.rstrip("/") + "/"
    objects = [[url[len(base) :], int(info.get("size", 0)), _etag(info)] for url, info in listing.items()]
    url = _join(prefix, MANIFEST_NAME)
    body = {"version": _VERSION, "kind": "objects", "suffix": suffix, "created": time.time(), "objects": objects}
    store.write_bytes(url, json.dumps(body).encode())
    return url


def _read_document(store: Store, url: str, kind: str) -> dict[str, Any] | None:
    """The s3pipes JSON document of ``kind`` at ``url`` (one GET), or None if there is none."""
    try:
        body = json.loads(store.read_bytes(url))
    except ObjectNotFound:
        return None
    except json.JSONDecodeError as exc:
        raise DataError(url, f"not JSON: {exc}") from exc
    if not isinstance(body, dict) or body.get("version") != _VERSION or body.get("kind") != kind:
        raise DataError(url, f"not an s3pipes {kind} document of version {_VERSION}")
    return body


def read_manifest(store: Store, prefix: str, *, suffix: str = "") -> list[str] | None:
    """Object URLs ending in ``suffix`` from the manifest under ``prefix`` (one GET), or None if
    there is none, or if it was written for other objects (a suffix that ``suffix`` does not end in).
    """
    body = _read_document(store, _join(prefix, MANIFEST_NAME), "objects")
    if body is None:
        return None
    covers = str(body.get("suffix", ""))
    if not suffix.endswith(covers):
        _log.info(
            "%s lists objects ending in %r, not %r: listing instead", _join(prefix, MANIFEST_NAME), covers, suffix
        )
        return None
    return [_join(prefix, name) for name, _, _ in body["objects"] if name.endswith(suffix)]


@dataclass(frozen=True)
class ShardIndex:
    """Samples of a set of shards: ``samples[i] = (shard number, key, start, end)``."""

    shards: tuple[str, ...]
    samples: tuple[tuple[int, str, int, int], ...]

    def to_json(self, prefix: str, listing: dict[str, dict[str, Any]], *, suffix: str = ".tar") -> bytes:
        base = prefix.rstrip("/") + "/"
        per_shard: list[list[list[Any]]] = [[] for _ in self.shards]
        for shard, key, start, end in self.samples:  # one pass: a scan per shard was quadratic
            per_shard[shard].append([key, start, end])
        shards = [
            {
                "name": url[len(base) :],
                "size": int(listing[url].get("size", 0)),
                "etag": _etag(listing[url]),
                "samples": samples,
            }
            for url, samples in zip(self.shards, per_shard, strict=True)
        ]
        body = {"version": _VERSION, "kind": "shards", "suffix": suffix, "created": time.time(), "shards": shards}
        return json.dumps(body).encode()

    @classmethod
    def load(cls, store: Store, prefix: str, *, suffix: str = ".tar") -> ShardIndex | None:
        """The index under ``prefix`` (one GET plus one listing), or None if there is none.

        Raises:
            StaleIndex: a shard's size or ETag differs from the index's, a shard is gone, or a
                shard ending in ``suffix`` is not in it (written since, or the index is of other
                shards); names the shard.
        """
        url = _join(prefix, INDEX_NAME)
        body = _read_document(store, url, "shards")
        if body is None:
            return None
        rebuild = f"rebuild it: s3pipes index {prefix} --shards --suffix {suffix}"
        listing = _listing(store, prefix, suffix)
        shards, samples = [], []
        for number, entry in enumerate(body["shards"]):
            shard = _join(prefix, entry["name"])
            now = listing.get(shard)
            if now is None or int(now.get("size", -1)) != entry["size"] or _etag(now) != entry["etag"]:
                change = "is gone" if now is None else "changed (size or ETag differs)"
                raise StaleIndex(shard, f"shard {change} since {url} was written; {rebuild}")
            shards.append(shard)
            samples += [(number, key, start, end) for key, start, end in entry["samples"]]
        missing = sorted(set(listing) - set(shards))
        if missing:
            built_for = f"shards ending in {body['suffix']!r}" if "suffix" in body else "other shards"
            raise StaleIndex(
                missing[0],
                f"shard not in {url} ({len(missing)} such; the index was written for {built_for} "
                f"before these existed, or for other shards); {rebuild}",
            )
        return cls(tuple(shards), tuple(samples))


def _scan(store: Store, url: str, number: int) -> list[tuple[int, str, int, int]]:
    """Every sample of one shard with the byte range of its members (reads the shard once)."""
    samples: list[tuple[int, str, int, int]] = []
    with ObjectStream(url, store) as stream:
        reader = TarReader(stream.read)
        try:
            while (member := reader.next()) is not None:
                parts = split_key(member.name)
                if parts is None:
                    continue
                if samples and samples[-1][1] == parts[0]:
                    samples[-1] = (number, parts[0], samples[-1][2], member.next_offset)
                else:
                    samples.append((number, parts[0], member.offset, member.next_offset))
        except ValueError as exc:
            raise DataError(url, f"cannot index shard: {exc}", offset=getattr(exc, "offset", None)) from exc
    return samples


def build_shard_index(
    store: Store, prefix: str, *, suffix: str = ".tar", write: bool | Literal["if-allowed"] = True, threads: int = 4
) -> ShardIndex:
    """Read every shard under ``prefix`` once and index its samples; write the index there.

    Args:
        store: where the shards are.
        prefix: the shards' prefix.
        suffix: shard names end in this.
        write: store the index as ``index.s3pipes.json`` under the prefix; ``"if-allowed"``:
            unless the credentials may not write there (read-only training credentials), which
            is logged as a warning and leaves the index in memory only.
        threads: shards read at once.
    """
    listing = _listing(store, prefix, suffix)
    if not listing:
        raise DataError(prefix, f"no shards ending in {suffix!r} to index")
    shards = tuple(listing)
    with ThreadPoolExecutor(threads, thread_name_prefix="s3pipes-index") as pool:
        per_shard: Sequence[list[tuple[int, str, int, int]]] = list(
            pool.map(lambda item: _scan(store, item[1], item[0]), enumerate(shards))
        )
    index = ShardIndex(shards, tuple(sample for samples in per_shard for sample in samples))
    if write:
        try:
            store.write_bytes(_join(prefix, INDEX_NAME), index.to_json(prefix, listing, suffix=suffix))
        except errors.AuthError as exc:
            if write != "if-allowed":
                raise
            _log.warning("%s; the index is kept in memory only (save it once with `s3pipes index`)", exc)
    return index
