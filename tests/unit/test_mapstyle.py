"""MapDataset on file:// and memory://: order, access, transforms, manifests, shard indexes."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import webdataset
from torch.utils.data import DataLoader, DistributedSampler

import s3pipes as sp
from s3pipes import MapDataset, ObjectReader, Store
from s3pipes.index import INDEX_NAME, build_shard_index, write_manifest
from tests.contract import assert_disjoint_cover
from tests.unit.test_pipe import png, write_shards


class CountingStore(Store):
    """A real Store that also records how many requests each read_ranges call made."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[int] = []

    def read_ranges(self, urls: Sequence[str], *args: object, **kwargs: object) -> list[bytes]:  # type: ignore[override]
        self.requests.append(len(urls))
        return super().read_ranges(urls, *args, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def objects(tmp_path: Path) -> str:
    root = f"file://{tmp_path}/mnist/train"
    store = Store()
    for label in (3, 0, 7):
        for n in range(4):
            store.write_bytes(f"{root}/{label}/{n:05d}.png", f"{label}-{n}".encode())
    store.write_bytes(f"{root}/README.txt", b"not an image")
    return root


def label_and_bytes(reader: ObjectReader) -> tuple[int, bytes]:
    reader.seek(0, 2)
    assert reader.tell() > 0
    reader.seek(0)
    return int(reader.key.split("/")[-2]), reader.read()


def test_from_prefix_orders_by_key_and_indexes_like_a_sequence(objects: str) -> None:
    ds = MapDataset.from_prefix(f"{objects}/", suffix=".png")
    assert len(ds) == 12
    assert ds[0] == b"0-0" and ds[-1] == b"7-3" and ds[4] == b"3-0"
    with pytest.raises(IndexError, match="index 12 out of range for a dataset of 12 items"):
        ds[12]


def test_transform_gets_a_seekable_reader_with_url_and_key(objects: str) -> None:
    ds = MapDataset.from_prefix(f"{objects}/", suffix=".png", transform=label_and_bytes)
    assert ds[5] == (3, b"3-1")
    seen: list[ObjectReader] = []
    MapDataset.from_prefix(f"{objects}/", suffix=".png", transform=seen.append)[0]
    assert seen[0].url == f"{objects}/0/00000.png" and seen[0].key.endswith("mnist/train/0/00000.png")


def test_getitems_returns_the_batch_in_the_order_asked(objects: str) -> None:
    ds = MapDataset.from_prefix(f"{objects}/", suffix=".png")
    assert ds.__getitems__([11, 0, 5, 5, -1]) == [b"7-3", b"0-0", b"3-1", b"3-1", b"7-3"]


def test_missing_object_names_its_url(objects: str) -> None:
    ds = MapDataset.from_objects([f"{objects}/3/00000.png", f"{objects}/3/gone.png"])
    with pytest.raises(sp.ObjectNotFound, match=r"gone\.png"):
        ds.__getitems__([0, 1])


def test_a_prefix_without_objects_is_an_error_and_writes_no_manifest(objects: str) -> None:
    """A typo in the prefix gave an empty dataset, or wrote a manifest under the wrong prefix."""
    for call in (
        lambda: MapDataset.from_prefix(f"{objects}/", suffix=".jpg"),
        lambda: write_manifest(Store(), f"{objects}/", suffix=".jpg"),
    ):
        with pytest.raises(sp.ObjectNotFound, match=r"no objects ending in '\.jpg' under this prefix") as info:
            call()
        assert objects in str(info.value)
    assert not Store().exists(f"{objects}/manifest.s3pipes.json")


def test_manifest_opens_without_listing(objects: str) -> None:
    write_manifest(Store(), f"{objects}/", suffix=".png")
    Path(objects.removeprefix("file://"), "7", "00003.png").unlink()  # after the manifest: it is a snapshot
    ds = MapDataset.from_prefix(f"{objects}/", suffix=".png")
    assert len(ds) == 12, "the manifest, not a listing, gave the items"
    with pytest.raises(sp.ObjectNotFound, match=r"7/00003\.png"):
        ds[-1]
    assert len(MapDataset.from_prefix(f"{objects}/", suffix=".png", manifest=False)) == 11


def test_distributed_sampler_with_workers_sees_every_item_once(objects: str) -> None:
    ds = MapDataset.from_prefix(f"{objects}/", suffix=".png")
    parts = []
    for rank in range(3):
        sampler = DistributedSampler(ds, num_replicas=3, rank=rank, shuffle=True, seed=1)
        loader = DataLoader(
            ds, batch_size=2, sampler=sampler, num_workers=2, collate_fn=list, multiprocessing_context="fork"
        )
        parts.append([item for batch in loader for item in batch])
    assert_disjoint_cover(parts, [ds[i] for i in range(len(ds))])


@pytest.fixture
def shards(tmp_path: Path) -> str:
    root = f"file://{tmp_path}/shards"
    write_shards(root, shards=3, per_shard=6)
    return root


def test_from_shards_matches_streaming_sample_for_sample(shards: str) -> None:
    streamed = list(sp.webdataset(f"{shards}/"))
    ds = MapDataset.from_shards(f"{shards}/")
    assert len(ds) == len(streamed)
    assert [ds[i] for i in range(len(ds))] == streamed
    assert ds.__getitems__([17, 3]) == [streamed[17], streamed[3]]


def test_from_shards_writes_and_reuses_the_index(shards: str) -> None:
    MapDataset.from_shards(f"{shards}/")
    index = json.loads(Store().read_bytes(f"{shards}/{INDEX_NAME}"))
    assert [len(shard["samples"]) for shard in index["shards"]] == [6, 6, 6]
    assert len(MapDataset.from_shards(f"{shards}/", build_index=False)) == 18


def test_a_shard_dataset_pickles_for_spawned_workers(shards: str) -> None:
    ds = MapDataset.from_shards(f"{shards}/")  # its default transform was a lambda
    again = pickle.loads(pickle.dumps(ds))
    assert again[5] == ds[5]


def test_a_manifest_or_index_of_other_objects_is_not_taken_for_these(objects: str, shards: str) -> None:
    """A manifest written for .png does not answer for every object; an index missing shards is stale."""
    write_manifest(Store(), f"{objects}/", suffix=".png")
    assert len(MapDataset.from_prefix(f"{objects}/")) == 13, "listed: 12 png and the README"
    assert len(MapDataset.from_prefix(f"{objects}/", suffix=".txt")) == 1
    assert len(MapDataset.from_prefix(f"{objects}/", suffix=".png")) == 12
    MapDataset.from_shards(f"{shards}/")
    write_shards(f"{shards}/later", shards=1, per_shard=2)  # a conversion still writing, say
    with pytest.raises(sp.StaleIndex, match=r"later/shard-000\.tar.*shard not in .*index\.s3pipes\.json"):
        MapDataset.from_shards(f"{shards}/")


@pytest.mark.parametrize("change", ["other samples", "shorter", "moved"])
def test_a_shard_rewritten_after_the_dataset_opened_is_a_stale_index(shards: str, change: str) -> None:
    """Same size and layout (or an unnoticed change): another sample's fields came back under this key."""
    ds = MapDataset.from_shards(f"{shards}/")
    path = Path(shards.removeprefix("file://"), "shard-001.tar")
    if change == "other samples":  # the same layout byte for byte, other keys
        with Store().open(f"file://{path}", "wb") as f, webdataset.TarWriter(f) as writer:
            for n in range(6, 12):
                writer.write({"__key__": f"other{n:05d}", "png": png(n), "cls": str(n % 3).encode(),
                              "json": b'{"n": %d}' % n})  # fmt: skip
    elif change == "shorter":
        path.write_bytes(path.read_bytes()[:2048])
    else:
        path.write_bytes(bytes(512) * 7 + path.read_bytes())
    with pytest.raises(sp.StaleIndex, match=r"shard-001\.tar.*the shard changed since the index was written"):
        ds[8]


def test_neighbouring_samples_are_fetched_in_one_request(shards: str) -> None:
    store = CountingStore()
    build_shard_index(store, f"{shards}/")
    ds = MapDataset.from_shards(f"{shards}/", store=store, build_index=False)
    store.requests.clear()
    batch = ds.__getitems__([0, 1, 2, 3, 7, 8, 15])  # 4 neighbours in shard 0, 2 in shard 1, 1 in shard 2
    assert [s["__key__"] for s in batch] == [f"sample{n:04d}" for n in (0, 1, 2, 3, 7, 8, 15)]
    assert store.requests == [3]


def test_a_changed_shard_makes_the_index_stale(shards: str) -> None:
    build_shard_index(Store(), f"{shards}/")
    write_shards(shards, shards=1, per_shard=2)  # rewrites shard-000.tar
    with pytest.raises(sp.StaleIndex, match=r"shard-000\.tar.*changed.*s3pipes index"):
        MapDataset.from_shards(f"{shards}/")


def test_cli_index_writes_a_manifest_and_a_shard_index(objects: str, shards: str) -> None:
    for argv in (["index", f"{objects}/", "--suffix", ".png"], ["index", f"{shards}/", "--shards"]):
        result = subprocess.run(
            [sys.executable, "-m", "s3pipes.cli", *argv], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
    assert len(MapDataset.from_shards(f"{shards}/", build_index=False)) == 18
    assert Store().exists(f"{objects}/manifest.s3pipes.json")


def test_decoded_shard_samples(shards: str) -> None:
    ds = MapDataset.from_shards(f"{shards}/", transform=sp.Decoder(image="torch"))
    sample = ds[4]
    assert isinstance(sample["png"], torch.Tensor) and sample["png"].shape == (3, 4, 4)
    assert sample["cls"] == 4 % 3


def test_a_repeated_field_is_an_error_as_in_streaming(tmp_path: Path) -> None:
    import io
    import tarfile

    url = f"file://{tmp_path}/dup/shard.tar"
    with Store().open(url, "wb") as f, tarfile.open(fileobj=f, mode="w|") as tar:
        for name in ("k0.txt", "k1.txt", "k1.txt"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"hi"))
    ds = MapDataset.from_shards(f"file://{tmp_path}/dup/")
    assert ds[0]["txt"] == b"hi"
    with pytest.raises(sp.DuplicateField, match=r"shard\.tar, member 'k1\.txt'"):
        ds[1]
