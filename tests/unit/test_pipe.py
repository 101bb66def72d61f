"""The streaming pipeline on memory:// and file://: resume, split, format compatibility, errors."""

from __future__ import annotations

import io
import itertools
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset
from PIL import Image
from torch.utils.data import DataLoader

import s3pipes as sp
from s3pipes import Store, index
from s3pipes.stages import Consumer, ShardPlan, TooFewShards
from tests.contract import assert_disjoint_cover, assert_resumes, run

SHARDS, PER_SHARD = 5, 7


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def write_shards(root: str, shards: int = SHARDS, per_shard: int = PER_SHARD, store: Store | None = None) -> list[str]:
    store = store or Store()
    urls = []
    for s in range(shards):
        url = f"{root}/shard-{s:03d}.tar"
        with store.open(url, "wb") as f, webdataset.TarWriter(f) as writer:
            for i in range(per_shard):
                n = s * per_shard + i
                writer.write(
                    {"__key__": f"sample{n:04d}", "png": png(n), "cls": str(n % 3).encode(), "json": b'{"n": %d}' % n}
                )
        urls.append(url)
    return urls


@pytest.fixture
def shards(tmp_path: Path) -> str:
    # file://, not memory://: memory:// hands every reader of an object the same file
    # object, so two live iterators over one shard would move each other's position.
    root = f"file://{tmp_path}"
    write_shards(root)
    return root


def keys(pipe: sp.Pipe) -> list[str]:
    return [sample["__key__"] for sample in pipe]


def test_every_sample_once_with_key_url_and_fields(shards: str) -> None:
    samples = list(sp.webdataset(f"{shards}/"))
    assert [s["__key__"] for s in samples] == [f"sample{n:04d}" for n in range(SHARDS * PER_SHARD)]
    assert samples[8]["__url__"] == f"{shards}/shard-001.tar"
    assert set(samples[0]) == {"__key__", "__url__", "png", "cls", "json"}


def test_shard_order_is_a_pure_function_of_seed_and_epoch(shards: str) -> None:
    def order(seed: int, epoch: int) -> list[str]:
        pipe = sp.webdataset(f"{shards}/", shuffle_seed=seed)
        pipe.set_epoch(epoch)
        return keys(pipe)

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert sorted(order(0, 1)) == sorted(order(1, 3))


@pytest.mark.parametrize(
    "extend",
    [
        pytest.param(lambda p: p, id="group"),
        pytest.param(lambda p: p.map(lambda s: s["__key__"]).filter(lambda k: not k.endswith("3")), id="map-filter"),
        pytest.param(lambda p: p.decode("torch").map(lambda s: (s["__key__"], s["png"], s["cls"])), id="decode"),
        pytest.param(
            lambda p: p.decode("numpy", workers=2).map(lambda s: (s["__key__"], s["png"])), id="decode-threads"
        ),
        pytest.param(lambda p: p.map(lambda s: s["__key__"]).shuffle(5, seed=3), id="shuffle-buffer"),
        pytest.param(lambda p: p.decode("numpy").map(lambda s: s["cls"]).batch(4), id="batch"),
    ],
)
def test_resumes_exactly_after_every_item(shards: str, extend: object) -> None:
    def make() -> sp.Pipe:
        return extend(sp.webdataset(f"{shards}/", shuffle_seed=1))  # type: ignore[operator, no-any-return]

    assert_resumes(make, json_state=False)


def test_state_is_small_and_json_serialisable(shards: str) -> None:
    pipe = sp.webdataset(f"{shards}/", shuffle_seed=1).decode()
    iterator = iter(pipe)
    for _ in range(10):
        next(iterator)
    text = json.dumps(pipe.state_dict())
    assert len(text) < 400, text
    assert_resumes(lambda: sp.webdataset(f"{shards}/", shuffle_seed=1).map(lambda s: s["__key__"]), json_state=True)


def test_mid_shard_resume_reopens_at_the_member_offset(shards: str) -> None:
    pipe = sp.webdataset(f"{shards}/")
    iterator = iter(pipe)
    for _ in range(PER_SHARD + 3):
        next(iterator)
    state = pipe.state_dict()
    untar_state = state["node"]["source"]
    assert untar_state["offset"] > 0, "the position is a byte offset inside the shard"


def test_load_refuses_state_of_another_consumer(shards: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = sp.webdataset(f"{shards}/")
    next(iter(pipe))
    state = pipe.state_dict()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    other = sp.webdataset(f"{shards}/")
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="rank 0/1, worker 0/1 but is being loaded by rank 1/2"):
        iter(other)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_plan_split_is_a_disjoint_cover(world: int, workers: int) -> None:
    plan = ShardPlan(tuple(f"s{i}" for i in range(11)), seed=4)
    parts = [
        plan.assigned(2, Consumer(rank=r, world_size=world, worker=w, num_workers=workers))
        for r in range(world)
        for w in range(workers)
    ]
    assert_disjoint_cover(parts, plan.urls)


def test_fewer_shards_than_consumers_is_a_clear_error() -> None:
    plan = ShardPlan(("a", "b"))
    with pytest.raises(TooFewShards, match=r"2 shard.* 2 rank.* 2 DataLoader worker.* = 4 consumers"):
        plan.assigned(0, Consumer(rank=0, world_size=2, worker=0, num_workers=2))


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes:UserWarning")
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("num_workers", [0, 1, 2, 3])
def test_dataloader_workers_and_ranks_see_every_sample_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, world: int, num_workers: int
) -> None:
    root = f"file://{tmp_path}"
    write_shards(root, shards=9, per_shard=3)
    everything = [f"sample{n:04d}" for n in range(27)]
    parts = []
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        pipe = sp.webdataset(f"{root}/", shuffle_seed=0).map(lambda s: s["__key__"])
        loader = DataLoader(
            pipe, batch_size=None, num_workers=num_workers, multiprocessing_context="fork" if num_workers else None
        )
        parts.append(list(loader))
    assert_disjoint_cover(parts, everything)


def test_reads_shards_written_by_gnu_tar(tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "a" / "b").mkdir(parents=True)
    (source / "a" / "b" / "x.seg.png").write_bytes(png(1))
    (source / "a" / "b" / "x.cls").write_text("7")
    (source / "a" / "b" / ("long" * 40 + ".txt")).write_text("a GNU long name")
    (source / "README").write_text("not a sample member")
    out = tmp_path / "shards"
    out.mkdir()
    subprocess.run(["tar", "--format=gnu", "-cf", str(out / "gnu.tar"), "-C", str(source), "a", "README"], check=True)
    samples = list(sp.webdataset(f"file://{out}/").decode())
    by_key = {s["__key__"]: s for s in samples}
    assert by_key["a/b/x"]["cls"] == 7
    assert by_key["a/b/x"]["seg.png"].size == (4, 4)
    assert by_key["a/b/" + "long" * 40]["txt"] == "a GNU long name"
    assert all("README" not in key for key in by_key)


def test_repeated_field_names_shard_and_member(mem_root: str) -> None:
    import tarfile

    url = f"{mem_root}/dup.tar"
    with Store().open(url, "wb") as f, tarfile.open(fileobj=f, mode="w|") as tar:
        for name in ("k1.txt", "k1.txt"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(sp.DuplicateField, match=r"dup\.tar, member 'k1\.txt'"):
        list(sp.webdataset(url))


def test_corrupt_shard_names_url_and_offset(mem_root: str) -> None:
    url = write_shards(mem_root, shards=1)[0]
    data = Store().read_bytes(url)
    Store().write_bytes(url, data[:1500] + b"\xff" * 600)
    with pytest.raises(sp.CorruptShard, match=r"shard-000\.tar, byte offset \d+") as info:
        list(sp.webdataset(url))
    assert isinstance(info.value, ValueError)


def test_repr_shows_the_chain_without_secrets(shards: str) -> None:
    store = Store({"key": "AKIDEXAMPLE", "secret": "hunter2-secret"})
    pipe = sp.from_urls(f"{shards}/shard-{{000..004}}.tar", store=store).shuffle_shards(3).open_object().untar()
    text = repr(pipe)
    assert "5 shards, seed=3" in text and ".untar()" in text
    assert "hunter2-secret" not in text


def test_pipe_is_an_iterable_dataset(shards: str) -> None:
    assert isinstance(sp.webdataset(f"{shards}/"), torch.utils.data.IterableDataset)
    assert len(run(sp.webdataset(f"{shards}/").map(lambda s: s["__key__"]))) == SHARDS * PER_SHARD


def test_decode_threads_end_with_the_epoch(shards: str) -> None:
    import threading

    before = {t for t in threading.enumerate() if t.name.startswith("s3pipes-map")}
    decoded = list(sp.webdataset(f"{shards}/").decode("pil", workers=2))
    assert len(decoded) == SHARDS * PER_SHARD and decoded[0]["png"].size == (4, 4)
    after = {t for t in threading.enumerate() if t.name.startswith("s3pipes-map")}
    assert after <= before, "decode threads left running after the epoch"


def test_empty_prefix_is_an_object_not_found_naming_it(shards: str) -> None:
    with pytest.raises(sp.ObjectNotFound, match=r"no objects ending in '\.tgz' under this prefix") as info:
        sp.list_prefix(f"{shards}/", suffix=".tgz")
    assert shards in str(info.value)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_stateful_dataloader_saved_at_epoch_end_resumes_with_the_next_epoch(shards: str, num_workers: int) -> None:
    """The usual loop: save the loader's state after each epoch, resume from the next. With
    num_workers=0 the loader loads the pipe's state at iter(), after set_epoch(next)."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    def loader() -> tuple[sp.Pipe, StatefulDataLoader]:
        pipe = sp.webdataset(f"{shards}/", shuffle_seed=1).map(lambda s: s["__key__"])
        return pipe, StatefulDataLoader(pipe, batch_size=None, num_workers=num_workers)

    pipe, first = loader()
    pipe.set_epoch(0)
    list(first)
    saved = first.state_dict()
    pipe, resumed = loader()
    resumed.load_state_dict(saved)
    pipe.set_epoch(1)
    got = list(resumed)
    pipe, fresh = loader()
    pipe.set_epoch(1)
    assert got == list(fresh) and len(got) == SHARDS * PER_SHARD


@pytest.mark.parametrize(
    "last",
    [
        pytest.param(lambda p: p.batch(3, collate=None), id="batch"),
        pytest.param(lambda p: p.map(str.upper, workers=2), id="map-threads"),
        pytest.param(lambda p: p.batch(2, collate=None).map(len, workers=2), id="batch-then-map-threads"),
    ],
)
def test_the_state_after_a_store_error_mid_stage_loses_no_item(
    shards: str, last: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read fails (after the store's retries) while a stage is pulling items ahead: the state
    then resumes with exactly the items not yet yielded, whichever read failed."""

    def make() -> sp.Pipe:
        pipe = sp.list_prefix(f"{shards}/").open_object(block_size=1024, ahead=1).untar().group_by_key()
        return last(pipe.map(lambda s: s["__key__"]))  # type: ignore[no-any-return]

    everything = list(make())
    real, calls, failing = Store.read_bytes, [0], [0]

    def flaky(self: Store, url: str, start: int | None = None, end: int | None = None) -> bytes:
        calls[0] += 1
        if calls[0] == failing[0]:
            raise sp.StoreError(url, "file", "injected")
        return real(self, url, start, end)

    monkeypatch.setattr(Store, "read_bytes", flaky)
    for failing[0] in itertools.count(1):
        calls[0], got, pipe = 0, [], make()
        try:
            got.extend(pipe)
        except sp.StoreError as exc:
            assert "injected" in str(exc)
        else:
            break  # no read left to fail
        resumed = make()
        resumed.load_state_dict(pipe.state_dict())
        assert got + list(resumed) == everything, f"read #{failing[0]} failing lost or repeated items"
    assert failing[0] > 20, "the test must fail reads at many points"


def test_loading_an_earlier_epochs_end_goes_back_to_it(shards: str) -> None:
    """A rollback: without a set_epoch since the last pass, a loaded state wins whatever its epoch."""
    pipe = sp.webdataset(f"{shards}/", shuffle_seed=1).map(lambda s: s["__key__"])
    everything = list(pipe)
    end_of_0 = pipe.state_dict()
    pipe.set_epoch(1)
    assert sorted(pipe) == sorted(everything)
    pipe.load_state_dict(end_of_0)
    assert pipe.state_dict() == end_of_0 and list(pipe) == []


def test_after_a_data_error_iterating_on_and_resuming_both_go_past_the_bad_sample(mem_root: str) -> None:
    """The sample a DataError was raised for counts as taken, also under batch() and map threads."""
    urls = [f"{mem_root}/{n}" for n in range(8)]
    for url in urls:
        Store().write_bytes(url, b"")

    def check(url: str) -> str:
        if url.endswith("/5"):
            raise sp.DataError(url, "bad sample")
        return url[-1]

    def make(extend: Any) -> sp.Pipe:
        return extend(sp.from_urls(urls, store=Store()))  # type: ignore[no-any-return]

    for extend in (lambda p: p.map(check).batch(4, collate=None), lambda p: p.map(check, workers=2)):
        pipe, got = make(extend), []
        items = iter(pipe)
        with pytest.raises(sp.DataError, match="bad sample"):
            got.extend(items)
        resumed = make(extend)
        resumed.load_state_dict(pipe.state_dict())
        assert list(resumed) in ([["6", "7"]], ["6", "7"]), "a resume meets the bad sample no more"
        assert got + list(items) in ([["0", "1", "2", "3"], ["4", "6", "7"]], ["0", "1", "2", "3", "4", "6", "7"])


def test_an_error_raised_by_a_threaded_map_is_raised_once(mem_root: str) -> None:
    urls = [f"{mem_root}/{n}" for n in range(6)]
    for url in urls:
        Store().write_bytes(url, b"")
    failed: list[str] = []

    def once(url: str) -> str:
        if url.endswith("/2") and not failed:
            failed.append(url)
            raise sp.StoreError(url, "memory", "injected")
        return url[-1]

    items = iter(sp.from_urls(urls, store=Store()).map(once, workers=2))
    got = [next(items), next(items)]
    with pytest.raises(sp.StoreError, match="injected"):
        next(items)
    assert got + list(items) == ["0", "1", "3", "4", "5"], "as without threads: the item fn raised for is done with"


def test_list_prefix_leaves_out_our_own_files(mem_root: str) -> None:
    store = Store()
    for n in range(2):
        store.write_bytes(f"{mem_root}/src/{n}.jpg", b"")
    index.write_manifest(store, f"{mem_root}/src/")  # `s3pipes index SRC`
    assert sp.list_prefix(f"{mem_root}/src/", store=store).urls == tuple(f"{mem_root}/src/{n}.jpg" for n in range(2))
