"""writer.py and convert.py without a server: shards on memory:// and file://, plans, resume, errors, progress.

``RawSource`` is the conversion's source function: module-level and picklable (a frozen
dataclass holding the Store), so the same object runs serially, on threads and in a
spawned process pool. It turns ``<root>/<label>/<id>.png`` into
``{"__key__": "<label>/<id>", "png": bytes, "cls": label index}`` and raises for the
inputs named in ``fail_on``.
"""

from __future__ import annotations

import functools
import gc
import io
import json
import logging
import multiprocessing
import random
import re
import sys
import tarfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import s3pipes as sp
from s3pipes import ShardInfo, ShardWriter, SourceError, Store, index
from s3pipes.convert import RECORDS, ObjectSamples, plan_units
from s3pipes.writer import MANIFEST_NAME, manifest_url, read_manifest, write_manifest

REPO = Path(__file__).resolve().parents[2]
LABELS = ("ant", "bee", "cat")
PER_LABEL = 8  # 24 inputs: with maxcount=5, units of 5, 5, 5, 5, 4
PATTERN = "train-{shard:04d}.tar"
TAR_BLOCK = 512


# -- helpers ----------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "file"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh root on memory:// and on file:// (the writer publishes through each store's own commit)."""
    if request.param == "memory":
        return str(request.getfixturevalue("mem_root"))
    return f"file://{tmp_path}/root"


def tar_members(data: bytes) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of every member of a tar, in order."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]


def tree(store: Store, prefix: str) -> dict[str, bytes]:
    """``{name relative to prefix: bytes}`` of every object under ``prefix``."""
    return {url[len(prefix) + 1 :]: store.read_bytes(url) for url in store.list(prefix + "/")}


def shards_and_manifest(store: Store, prefix: str) -> dict[str, bytes]:
    return {name: data for name, data in tree(store, prefix).items() if not name.startswith(RECORDS)}


def samples(count: int, size: int = 100, *, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"__key__": f"s{i:04d}", "bin": rng.randbytes(size), "cls": i % 3} for i in range(count)]


@dataclass(frozen=True)
class RawSource:
    """``source(urls)`` for convert: one sample per input object (see the module docstring)."""

    root: str
    store: Store
    fail_on: frozenset[str] = frozenset()

    def __call__(self, urls: Sequence[str]) -> Iterator[dict[str, Any]]:
        for url in urls:
            if url in self.fail_on:
                raise OSError(f"cannot decode {url}")
            relative = url[len(self.root) + 1 :]
            label = relative.split("/")[0]
            yield {
                "__key__": relative.rsplit(".", 1)[0],
                "png": self.store.read_bytes(url),
                "cls": LABELS.index(label),
            }


@dataclass(frozen=True)
class PipeSource:
    """The source ``convert``'s docstring suggests: ``sp.from_urls(urls).open_object().map(to_sample)``."""

    root: str
    store: Store

    def __call__(self, urls: Sequence[str]) -> sp.Pipe[dict[str, Any]]:
        return sp.from_urls(list(urls), store=self.store).open_object().map(self.to_sample)

    def to_sample(self, stream: Any) -> dict[str, Any]:
        with stream:
            relative = stream.url[len(self.root) + 1 :]
            return {"__key__": relative.rsplit(".", 1)[0], "png": stream.read()}


@pytest.fixture
def raw(tmp_path: Path) -> str:
    """``file://.../raw`` holding ``<label>/<id>.png`` (random bytes) and a README that is not an input."""
    rng = random.Random(6)
    for label in LABELS:
        for i in range(PER_LABEL):
            path = tmp_path / "raw" / label / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(rng.randbytes(rng.randint(50, 400)))
    (tmp_path / "raw" / "README.txt").write_text("not an input")
    return f"file://{tmp_path}/raw"


def source_state(raw: str) -> dict[str, tuple[bytes, int]]:
    """Every file under the source root: bytes and mtime (ns)."""
    base = Path(raw.removeprefix("file://"))
    return {str(p.relative_to(base)): (p.read_bytes(), p.stat().st_mtime_ns) for p in base.rglob("*") if p.is_file()}


def inputs_of(raw: str) -> list[str]:
    return [f"{raw}/{label}/{i:04d}.png" for label in LABELS for i in range(PER_LABEL)]


def run_convert(raw: str, out: str, **kwargs: Any) -> sp.ConvertResult:
    store = Store()
    kwargs.setdefault("maxcount", 5)
    source = RawSource(raw, store, kwargs.pop("fail_on", frozenset()))
    return sp.convert(source, f"{out}/{PATTERN}", f"{raw}/", suffix=".png", store=store, **kwargs)


# -- ShardWriter ------------------------------------------------------------------------------


def test_rolls_over_at_maxcount_and_names_shards_from_pattern_and_start_shard(root: str) -> None:
    store = Store()
    with ShardWriter(f"{root}/out/{PATTERN}", maxcount=3, store=store, start_shard=5) as writer:
        for sample in samples(7):
            writer.write(sample)
    assert [(s.name, s.samples, s.first_key, s.last_key) for s in writer.shards] == [
        ("train-0005.tar", 3, "s0000", "s0002"),
        ("train-0006.tar", 3, "s0003", "s0005"),
        ("train-0007.tar", 1, "s0006", "s0006"),
    ]
    assert store.list(f"{root}/out/") == [f"{root}/out/train-000{i}.tar" for i in (5, 6, 7)]
    for shard in writer.shards:
        data = store.read_bytes(f"{root}/out/{shard.name}")
        assert shard.bytes == len(data) == store.info(f"{root}/out/{shard.name}")["size"]
        keys = sorted({name.split(".")[0] for name, _ in tar_members(data)})
        assert (keys[0], keys[-1], len(keys)) == (shard.first_key, shard.last_key, shard.samples)


def sample_spans(data: bytes) -> list[tuple[str, int]]:
    """``(key, bytes)`` per sample of a shard, in order: from its first header (PAX headers included)
    to the next sample's, the last one to the end of its data blocks (end-of-archive blocks excluded)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    starts: dict[str, int] = {}
    for member in members:
        starts.setdefault(member.name.split(".")[0], member.offset)
    last = members[-1]
    ends = [*list(starts.values())[1:], last.offset_data + -(-last.size // TAR_BLOCK) * TAR_BLOCK]
    return [(key, end - start) for (key, start), end in zip(starts.items(), ends, strict=True)]


@pytest.mark.parametrize("size", [100, 1000, 7000, 30_000])
def test_a_shard_is_closed_once_it_reached_maxsize(mem_root: str, size: int) -> None:
    """Each shard but the last: below maxsize before its last sample, at or above it with it."""
    store, maxsize = Store(), 16_000
    written = samples(12, size)
    shards = ShardWriter(f"{mem_root}/{PATTERN}", maxcount=1000, maxsize=maxsize, store=store).write_all(written)
    reread: list[str] = []
    for shard in shards:
        spans = sample_spans(store.read_bytes(f"{mem_root}/{shard.name}"))
        reread += [key for key, _ in spans]
        sizes = [n for _, n in spans]
        if shard is not shards[-1]:
            assert sum(sizes[:-1]) < maxsize <= sum(sizes), (
                f"{shard.name}: {len(sizes)} samples of {sizes[0]} bytes with {maxsize=}: "
                f"it should have been closed after {-(-maxsize // sizes[0])}"
            )
    assert reread == [s["__key__"] for s in written]


def test_a_sample_bigger_than_maxsize_is_a_shard_of_its_own(mem_root: str) -> None:
    shards = ShardWriter(f"{mem_root}/{PATTERN}", maxsize=100, store=Store()).write_all(samples(3, 1000))
    assert [s.samples for s in shards] == [1, 1, 1]


def test_same_samples_make_identical_bytes(root: str) -> None:
    store = Store()
    for run in ("a", "b"):
        ShardWriter(f"{root}/{run}/{PATTERN}", maxcount=4, store=store).write_all(samples(10))
    first, second = tree(store, f"{root}/a"), tree(store, f"{root}/b")
    assert list(first) == ["train-0000.tar", "train-0001.tar", "train-0002.tar"]
    assert first == second
    with tarfile.open(fileobj=io.BytesIO(first["train-0000.tar"])) as tar:
        assert {m.mtime for m in tar.getmembers()} == {0}


def test_members_carry_no_pax_headers(mem_root: str) -> None:
    """A fixed integral mtime fits the plain ustar header: a float one adds a 1 KiB PAX header to every member.

    For small samples (a 300-byte PNG and its class) that doubles the shard: 4096 instead of 2048 bytes each.
    """
    store = Store()
    sample = {"__key__": "k0", "png": bytes(300), "cls": 1}
    [shard] = ShardWriter(f"{mem_root}/{PATTERN}", store=store).write_all([sample])
    with tarfile.open(fileobj=io.BytesIO(store.read_bytes(f"{mem_root}/{shard.name}"))) as tar:
        members = tar.getmembers()
    assert [(m.name, m.mtime, m.pax_headers) for m in members] == [("k0.cls", 0, {}), ("k0.png", 0, {})]
    assert sample_spans(store.read_bytes(f"{mem_root}/{shard.name}")) == [("k0", 2 * TAR_BLOCK + TAR_BLOCK + TAR_BLOCK)]


def test_fields_are_encoded_by_extension(mem_root: str) -> None:
    store = Store()
    sample = {"__key__": "dir/x1", "cls": 7, "txt": "héllo", "bin": b"\x00\xff", "json": {"a": [1, 2], "b": None}}
    ShardWriter(f"{mem_root}/{PATTERN}", store=store).write_all([sample])
    members = dict(tar_members(store.read_bytes(f"{mem_root}/train-0000.tar")))
    assert members == {
        "dir/x1.bin": b"\x00\xff",
        "dir/x1.cls": b"7",
        "dir/x1.json": json.dumps({"a": [1, 2], "b": None}).encode(),
        "dir/x1.txt": "héllo".encode(),
    }
    [read] = sp.webdataset(f"{mem_root}/", store=store)
    assert (read["__key__"], int(read["cls"]), json.loads(read["json"])) == ("dir/x1", 7, sample["json"])


@pytest.mark.parametrize("key", [None, "", 3])
def test_a_sample_without_a_str_key_is_refused_naming_its_fields(mem_root: str, key: Any) -> None:
    store = Store()
    sample: dict[str, Any] = {"png": b"x", "cls": 1}
    if key is not None:
        sample["__key__"] = key
    writer = ShardWriter(f"{mem_root}/{PATTERN}", store=store)
    with pytest.raises(ValueError, match=r"__key__.*fields: \['.*cls', 'png'\]"):
        writer.write(sample)
    writer.close()
    assert writer.shards == [] and not store.exists(f"{mem_root}/train-0000.tar")


@pytest.mark.parametrize(
    ("key", "cause"),
    [
        ("../escape", "outside the shard's directory"),
        ("/etc/cron.d/x", "outside the shard's directory"),
        ("a/../../b", "outside the shard's directory"),
        ("a//b", "outside the shard's directory"),
        ("dir/img.001", "read back as key 'dir/img'"),
    ],
)
def test_a_key_that_would_not_read_back_safely_is_refused_keeping_what_was_written(
    root: str, key: str, cause: str
) -> None:
    store = Store()
    writer = ShardWriter(f"{root}/{PATTERN}", store=store)
    writer.write({"__key__": "good", "cls": 1})
    with pytest.raises(ValueError, match=re.escape(cause)) as info:
        writer.write({"__key__": key, "cls": 2})
    assert repr(key) in str(info.value)
    writer.close()
    assert [s["__key__"] for s in sp.webdataset(f"{root}/", store=store)] == ["good"]


def test_the_open_shard_is_invisible_until_closed(root: str) -> None:
    store = Store()
    writer = ShardWriter(f"{root}/{PATTERN}", maxcount=2, store=store)
    writer.write(samples(1)[0])
    assert writer.url == f"{root}/train-0000.tar"
    assert not store.exists(writer.url)
    writer.close()
    assert store.exists(f"{root}/train-0000.tar") and writer.url == ""


def test_an_exception_inside_with_publishes_nothing_of_the_open_shard(
    root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closed shards stay; the open one is dropped whole, and nothing is written into it afterwards."""
    store = Store()
    ignored: list[Any] = []  # exceptions raised where nobody can catch them (__del__), e.g. a write after discard
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)
    with (
        pytest.raises(RuntimeError, match="source broke"),
        ShardWriter(f"{root}/out/{PATTERN}", maxcount=2, store=store) as writer,
    ):
        for sample in samples(5):
            writer.write(sample)
        raise RuntimeError("source broke")
    gc.collect()
    assert [f"{u.exc_type.__name__}: {u.exc_value} in {u.object}" for u in ignored] == [], (
        "the discarded shard's tar stream was flushed into its aborted upload when collected"
    )
    assert [s.name for s in writer.shards] == ["train-0000.tar", "train-0001.tar"]
    assert store.list(f"{root}/out/") == [f"{root}/out/train-0000.tar", f"{root}/out/train-0001.tar"]
    assert [name for name, _ in tar_members(store.read_bytes(f"{root}/out/train-0001.tar"))] == [
        "s0002.bin",
        "s0002.cls",
        "s0003.bin",
        "s0003.cls",
    ]
    if root.startswith("file://"):  # no temporary file left beside the shards
        assert sorted(p.name for p in Path(root.removeprefix("file://"), "out").iterdir()) == [
            "train-0000.tar",
            "train-0001.tar",
        ]


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("out/train.tar", "must contain {shard}"),
        ("out/{shard:04d}/train.tar", "must be in the file name, not in a directory"),
        ("out/train-{0}.tar", "must have one {shard} field"),
        ("out/train-{n}.tar", "must have one {shard} field"),
    ],
)
def test_bad_patterns_are_refused(mem_root: str, pattern: str, message: str) -> None:
    store = Store()
    with pytest.raises(ValueError, match=rf"pattern=.*{message.replace('{', '.').replace('}', '.')}"):
        ShardWriter(f"{mem_root}/{pattern}", store=store)
    with pytest.raises(ValueError, match="pattern="):
        sp.convert(RawSource(mem_root, store), f"{mem_root}/{pattern}", ["memory://x/a.png"], store=store)
    assert not store.exists(mem_root), "something was written"


@pytest.mark.parametrize("limits", [{"maxcount": 0}, {"maxsize": 0}])
def test_limits_must_be_positive(mem_root: str, limits: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=r"maxcount=.* and maxsize=.* must be >= 1"):
        ShardWriter(f"{mem_root}/{PATTERN}", store=Store(), **limits)


def test_manifest_lists_every_shard_and_the_skipped_inputs(mem_root: str) -> None:
    store, pattern = Store(), f"{mem_root}/out/{PATTERN}"
    shards = ShardWriter(pattern, maxcount=4, store=store).write_all(samples(10))
    skipped = [{"source": "memory://raw/x.png", "error": "cannot decode"}]
    url = write_manifest(store, pattern, shards, skipped)
    assert url == manifest_url(pattern) == f"{mem_root}/out/{MANIFEST_NAME}"
    assert read_manifest(store, url) == {
        "format": "s3pipes.shards/1",
        "pattern": PATTERN,
        "samples": 10,
        "bytes": sum(s.bytes for s in shards),
        "shards": [
            {"name": s.name, "samples": s.samples, "bytes": s.bytes, "first_key": s.first_key, "last_key": s.last_key}
            for s in shards
        ],
        "skipped": skipped,
    }
    assert [s["samples"] for s in read_manifest(store, url)["shards"]] == [4, 4, 2]
    store.write_bytes(f"{mem_root}/other.json", b'{"format": "something else"}')
    with pytest.raises(ValueError, match=r"other.json: not an s3pipes.shards/1 manifest"):
        read_manifest(store, f"{mem_root}/other.json")


def test_pipe_write_shards_writes_shards_then_the_manifest(raw: str, mem_root: str) -> None:
    store = Store()
    source = RawSource(raw, store)
    pipe = sp.from_urls(inputs_of(raw), store=store).map(lambda url: next(source([url])))
    result = pipe.write_shards(f"{mem_root}/{PATTERN}", maxcount=10, start_shard=2, progress=False)
    assert [(s.name, s.samples) for s in result.shards] == [
        ("train-0002.tar", 10),
        ("train-0003.tar", 10),
        ("train-0004.tar", 4),
    ]
    assert read_manifest(store, result.manifest)["samples"] == result.samples == 24
    read = {s["__key__"]: s["png"] for s in sp.webdataset(f"{mem_root}/", store=store)}
    assert read == {sample["__key__"]: sample["png"] for sample in source(inputs_of(raw))}


# -- plan_units -------------------------------------------------------------------------------


def test_plan_keeps_the_files_of_a_sample_together() -> None:
    sizes = {f"d/{stem}.{ext}": 1 for stem in ("a", "b", "c", "d", "e") for ext in ("cls", "png", "seg.png")}
    units = plan_units(sizes, maxcount=4, maxsize=1000)
    assert [url for unit in units for url in unit] == sorted(sizes)
    assert [[url.split("/")[1].split(".")[0] for url in unit] for unit in units] == [
        ["a"] * 3,
        ["b"] * 3,
        ["c"] * 3,
        ["d"] * 3,
        ["e"] * 3,
    ]
    units = plan_units(sizes, maxcount=6, maxsize=1000)
    assert [len(unit) for unit in units] == [6, 6, 3]


def test_plan_keeps_a_sample_whole_when_a_sibling_directory_shares_its_stem() -> None:
    """``a/x.d/`` sorts between ``a/x.cls`` and ``a/x.png``: the sample ``a/x`` must still be one unit's."""
    sizes = {"a/x.cls": 1, "a/x.d/z.png": 1, "a/x.png": 1, "a/y.png": 1}
    units = plan_units(sizes, maxcount=2, maxsize=100)
    owner = {url: n for n, unit in enumerate(units) for url in unit}
    assert owner["a/x.cls"] == owner["a/x.png"], units


def test_plan_cuts_at_maxcount_and_at_maxsize() -> None:
    sizes = {f"k{i}.png": 10 for i in range(7)}
    assert plan_units(sizes, maxcount=3, maxsize=1000) == [
        ["k0.png", "k1.png", "k2.png"],
        ["k3.png", "k4.png", "k5.png"],
        ["k6.png"],
    ]
    assert plan_units(sizes, maxcount=100, maxsize=25) == [
        ["k0.png", "k1.png"],
        ["k2.png", "k3.png"],
        ["k4.png", "k5.png"],
        ["k6.png"],
    ]
    assert plan_units(sizes, maxcount=100, maxsize=20) == [
        ["k0.png", "k1.png"],
        ["k2.png", "k3.png"],
        ["k4.png", "k5.png"],
        ["k6.png"],
    ]


def test_plan_gives_an_oversized_sample_a_unit_of_its_own() -> None:
    sizes = {"a.png": 5, "b.cls": 1, "b.png": 500, "c.png": 5}
    assert plan_units(sizes, maxcount=10, maxsize=50) == [["a.png"], ["b.cls", "b.png"], ["c.png"]]
    assert plan_units(sizes, maxcount=1, maxsize=10**9) == [["a.png"], ["b.cls", "b.png"], ["c.png"]]


def test_plan_names_without_dots_and_same_stems_in_other_directories_are_samples_of_their_own() -> None:
    sizes = {"a/README": 1, "a/READMEs": 1, "a/.hidden": 1, "a/x.png": 1, "b/x.png": 1, "b/x.cls": 1}
    units = plan_units(sizes, maxcount=1, maxsize=100)
    assert units == [["a/.hidden"], ["a/README"], ["a/READMEs"], ["a/x.png"], ["b/x.cls", "b/x.png"]]
    assert plan_units({}, maxcount=1, maxsize=1) == []


# -- convert ----------------------------------------------------------------------------------


def test_serial_threads_and_processes_write_identical_shards_and_manifest(
    raw: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = source_state(raw)
    store = Store()
    serial = run_convert(raw, f"file://{tmp_path}/serial")
    assert (len(serial.shards), serial.samples, serial.resumed, serial.skipped) == (5, 24, 0, [])
    with ThreadPoolExecutor(4) as pool:
        threads = run_convert(raw, f"file://{tmp_path}/threads", executor=pool)
    # spawn: a fresh interpreter per worker (no fork of a process with threads); it imports this
    # module by name to unpickle RawSource, so the repository must be on the path it inherits.
    monkeypatch.syspath_prepend(str(REPO))
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        processes = run_convert(raw, f"file://{tmp_path}/processes", executor=pool)
    expected = shards_and_manifest(store, f"file://{tmp_path}/serial")
    assert sorted(expected) == [MANIFEST_NAME] + [f"train-000{i}.tar" for i in range(5)]
    for name, result in (("threads", threads), ("processes", processes)):
        assert result.shards == serial.shards, name
        assert shards_and_manifest(store, f"file://{tmp_path}/{name}") == expected, name
    manifest = json.loads(expected[MANIFEST_NAME])
    assert [(s["samples"], s["first_key"], s["last_key"]) for s in manifest["shards"]] == [
        (5, "ant/0000", "ant/0004"),
        (5, "ant/0005", "bee/0001"),
        (5, "bee/0002", "bee/0006"),
        (5, "bee/0007", "cat/0003"),
        (4, "cat/0004", "cat/0007"),
    ]
    assert (manifest["samples"], manifest["skipped"]) == (24, [])
    read = list(sp.webdataset(f"file://{tmp_path}/processes/", store=store))
    assert [s["__key__"] for s in read] == [url[len(raw) + 1 : -4] for url in inputs_of(raw)]
    for sample in read:
        assert sample["png"] == store.read_bytes(f"{raw}/{sample['__key__']}.png")
        assert int(sample["cls"]) == LABELS.index(sample["__key__"].split("/")[0])
    assert source_state(raw) == before, "a source object was modified, added or removed"


def test_a_rerun_skips_the_units_whose_records_match(raw: str, mem_root: str) -> None:
    store, out = Store(), f"{mem_root}/out"
    first = run_convert(raw, out)
    written = tree(store, out)
    assert sorted(name for name in written if name.startswith(RECORDS)) == [
        f"{RECORDS}/unit-{n:06d}.json" for n in range(5)
    ]
    again = run_convert(raw, out)
    assert again.resumed == 5 and again.shards == first.shards
    assert tree(store, out) == written
    # a run killed after units 0, 2 and 4: the others' records (and one shard) are missing
    for n in (1, 3):
        store.delete(f"{out}/{RECORDS}/unit-{n:06d}.json")
    store.delete(f"{out}/train-0003.tar")
    store.delete(f"{out}/{MANIFEST_NAME}")
    resumed = run_convert(raw, out)
    assert resumed.resumed == 3 and resumed.shards == first.shards
    assert tree(store, out) == written


def test_a_record_of_other_limits_or_inputs_is_not_reused(raw: str, tmp_path: Path, mem_root: str) -> None:
    store, out = Store(), f"{mem_root}/out"
    run_convert(raw, out, maxcount=5)
    changed = run_convert(raw, out, maxcount=4)
    assert changed.resumed == 0 and [s.samples for s in changed.shards] == [4] * 6
    run_convert(raw, f"{mem_root}/reference", maxcount=4)
    assert shards_and_manifest(store, out) == shards_and_manifest(store, f"{mem_root}/reference")
    # one more input, sorting last: only the last unit's inputs changed
    (tmp_path / "raw" / "cat" / "0008.png").write_bytes(b"new")
    grown = run_convert(raw, out, maxcount=4)
    assert grown.resumed == 6 and [s.samples for s in grown.shards] == [4] * 6 + [1]
    # a record whose digest does not match (another run's) is redone
    record_url = f"{out}/{RECORDS}/unit-000000.json"
    record = json.loads(store.read_bytes(record_url))
    store.write_bytes(record_url, json.dumps({**record, "digest": "0" * 64}).encode())
    assert run_convert(raw, out, maxcount=4).resumed == 6


def test_a_pipe_source_converts_every_input_under_a_distributed_launcher(
    raw: str, mem_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A unit is one shard whoever runs it: the rank of the converting process must not split its inputs."""
    monkeypatch.setenv("RANK", "1")  # as torchrun sets them, e.g. when a training script converts first
    monkeypatch.setenv("WORLD_SIZE", "2")
    store = Store()
    result = sp.convert(PipeSource(raw, store), f"{mem_root}/{PATTERN}", f"{raw}/", suffix=".png", store=store)
    assert result.samples == len(inputs_of(raw)), f"{result.samples} of {len(inputs_of(raw))} inputs converted"


def test_on_error_raise_names_the_input_and_writes_no_manifest(raw: str, mem_root: str) -> None:
    before = source_state(raw)
    bad = f"{raw}/bee/0003.png"
    with pytest.raises(SourceError, match=r"bee/0003\.png.*OSError: cannot decode") as caught:
        run_convert(raw, f"{mem_root}/out", fail_on=frozenset({bad}))
    assert caught.value.url == bad
    assert not Store().exists(f"{mem_root}/out/{MANIFEST_NAME}")
    # serial: units 0 and 1 were done; unit 2 (ant 5 + bee 5 + ...: bee/0003 is input 11) published nothing
    assert Store().list(f"{mem_root}/out/", suffix=".tar") == [f"{mem_root}/out/train-000{i}.tar" for i in (0, 1)]
    assert source_state(raw) == before


def test_on_error_skip_lists_the_input_in_the_manifest_and_the_result(raw: str, mem_root: str) -> None:
    store = Store()
    bad = f"{raw}/bee/0003.png"
    result = run_convert(raw, f"{mem_root}/out", fail_on=frozenset({bad}), on_error="skip")
    assert [item["source"] for item in result.skipped] == [bad]
    assert "cannot decode" in result.skipped[0]["error"] and bad in result.skipped[0]["error"]
    manifest = read_manifest(store, result.manifest)
    assert manifest["skipped"] == result.skipped
    assert manifest["samples"] == result.samples == 23
    assert [s["samples"] for s in manifest["shards"]] == [5, 5, 4, 5, 4]
    keys = [s["__key__"] for s in sp.webdataset(f"{mem_root}/out/", store=store)]
    assert "bee/0003" not in keys and len(keys) == len(set(keys)) == 23
    assert "1 skipped" in repr(result)


def test_a_rerun_with_on_error_raise_does_not_reuse_the_skips_of_a_skip_run(raw: str, mem_root: str) -> None:
    """on_error="raise" must raise for an input that cannot be converted, even if an earlier run skipped it."""
    bad = frozenset({f"{raw}/bee/0003.png"})
    assert len(run_convert(raw, f"{mem_root}/out", fail_on=bad, on_error="skip").skipped) == 1
    with pytest.raises(SourceError, match=r"bee/0003\.png"):
        result = run_convert(raw, f"{mem_root}/out", fail_on=bad, on_error="raise")
        pytest.fail(f"on_error='raise' returned, reusing a record of on_error='skip': skipped {result.skipped}")


def test_on_error_must_be_raise_or_skip(raw: str, mem_root: str) -> None:
    with pytest.raises(ValueError, match=r"on_error='ignore' must be 'raise' or 'skip'"):
        run_convert(raw, f"{mem_root}/out", on_error="ignore")


def test_no_inputs_is_an_error_naming_the_prefix(raw: str, mem_root: str) -> None:
    with pytest.raises(sp.ObjectNotFound, match=r"raw/.*no input object ending in '\.jpg'"):
        sp.convert(RawSource(raw, Store()), f"{mem_root}/{PATTERN}", f"{raw}/", suffix=".jpg", store=Store())
    with pytest.raises(ValueError, match="no inputs to convert"):
        sp.convert(RawSource(raw, Store()), f"{mem_root}/{PATTERN}", [], store=Store())


def test_our_own_files_under_the_source_prefix_are_not_inputs(raw: str, mem_root: str) -> None:
    """`s3pipes index SRC` (as the README suggests) leaves manifest.s3pipes.json among the inputs."""
    store = Store()
    (Path(raw.removeprefix("file://")) / "README.txt").unlink()
    index.write_manifest(store, f"{raw}/")
    source = ObjectSamples(f"{raw}/", store=store)
    result = sp.convert(source, f"{mem_root}/out/{PATTERN}", f"{raw}/", store=store)
    assert result.samples == len(LABELS) * PER_LABEL


def test_a_rerun_with_fewer_units_leaves_only_its_own_shards(raw: str, mem_root: str) -> None:
    """An earlier run into the same directory planned more units: its extra shards stayed, and a
    reader of the directory saw their samples twice."""
    store, out = Store(), f"{mem_root}/out"
    run_convert(raw, out, maxcount=2)  # 12 shards
    result = run_convert(raw, out, maxcount=10)  # 3
    assert sorted(tree(store, out)) == sorted(
        [MANIFEST_NAME, *(f"train-{n:04d}.tar" for n in range(3)), *(f"{RECORDS}/unit-{n:06d}.json" for n in range(3))]
    )
    keys = [sample["__key__"] for sample in sp.webdataset(f"{out}/", store=store)]
    assert sorted(keys) == sorted(url[len(raw) + 1 : -4] for url in inputs_of(raw)) and result.samples == 24


def test_a_failed_rerun_leaves_no_manifest_of_the_run_before(raw: str, mem_root: str) -> None:
    out = f"{mem_root}/out"
    run_convert(raw, out, maxcount=2)
    with pytest.raises(SourceError):
        run_convert(raw, out, maxcount=5, fail_on=frozenset({f"{raw}/bee/0003.png"}))
    assert not Store().exists(f"{out}/{MANIFEST_NAME}"), "no manifest, no finished conversion"


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_sample_the_writer_refuses_is_an_input_error(raw: str, mem_root: str, on_error: str) -> None:
    """A field it cannot encode (a set as json): a bare TypeError, and with skip the unit was lost."""

    def source(urls: Sequence[str]) -> Iterator[dict[str, Any]]:
        for url in urls:
            yield {"__key__": url[len(raw) + 1 : -4], "json": {1, 2} if url.endswith("bee/0003.png") else [1]}

    convert = functools.partial(
        sp.convert, source, f"{mem_root}/out/{PATTERN}", f"{raw}/", suffix=".png", maxcount=5, store=Store()
    )
    if on_error == "raise":
        with pytest.raises(SourceError, match=r"bee/0003\.png.*cannot be written: TypeError"):
            convert(on_error="raise")
        return
    result = convert(on_error="skip")
    assert result.samples == 23 and [item["source"] for item in result.skipped] == [f"{raw}/bee/0003.png"]


def test_a_key_repeating_the_previous_samples_is_refused(mem_root: str) -> None:
    writer = ShardWriter(f"{mem_root}/{PATTERN}", store=Store())
    writer.write({"__key__": "img", "txt": "first"})
    with pytest.raises(ValueError, match=r"'img' repeats the previous sample's"):
        writer.write({"__key__": "img", "cls": 1})
    writer.discard()


def test_write_shards_refuses_to_run_on_every_rank(mem_root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    pipe = sp.from_urls([f"{mem_root}/in/{n}" for n in range(4)], store=Store()).map(lambda u: {"__key__": u[-1]})
    with pytest.raises(sp.ConfigError, match=r"rank 1 of 2 .*s3pipes\.convert\(\)"):
        pipe.write_shards(f"{mem_root}/out/{PATTERN}", progress=False)


def test_explicit_inputs_are_cut_by_count(raw: str, mem_root: str) -> None:
    store = Store()
    urls = inputs_of(raw)[::-1]  # any order: the plan sorts them
    result = sp.convert(RawSource(raw, store), f"{mem_root}/{PATTERN}", urls, maxcount=10, maxsize=1, store=store)
    assert [s.samples for s in result.shards] == [10, 10, 4]
    assert result.shards[0].first_key == "ant/0000"


def test_progress_is_quiet_when_stderr_is_not_a_terminal(
    raw: str, mem_root: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run_convert(raw, f"{mem_root}/out")
    assert capsys.readouterr() == ("", "")


def test_progress_true_draws_bars_on_stderr_and_the_result_summarises(
    raw: str, mem_root: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="s3pipes.convert"):
        result = run_convert(raw, f"{mem_root}/out", progress=True)
    out, err = capsys.readouterr()
    assert out == ""
    for bar in ("samples", "written", "shards"):
        assert bar in err, err
    assert "24/24" in err and "5/5" in err
    summary = repr(result)
    assert summary.startswith("ConvertResult(5 shards, 24 samples,") and "0 skipped" in summary
    assert summary in caplog.text


def test_source_objects_are_never_modified(raw: str, mem_root: str) -> None:
    """Every path (fresh run, resumed run, skip, raise) leaves the sources byte- and mtime-identical."""
    before = source_state(raw)
    run_convert(raw, f"{mem_root}/a")
    run_convert(raw, f"{mem_root}/a")
    run_convert(raw, f"{mem_root}/b", on_error="skip", fail_on=frozenset({f"{raw}/ant/0000.png"}))
    with pytest.raises(SourceError):
        run_convert(raw, f"{mem_root}/c", fail_on=frozenset({f"{raw}/ant/0000.png"}))
    assert source_state(raw) == before


def test_shard_info_round_trips_through_a_record() -> None:
    info = ShardInfo("train-0000.tar", 3, 10240, "a", "c")
    assert ShardInfo(**json.loads(json.dumps(info.__dict__))) == info
