"""MapDataset against SeaweedFS: concurrent batches, manifests, shard indexes, errors."""

from __future__ import annotations

import pytest
from torch.utils.data import DataLoader

import s3pipes as sp
from s3pipes import MapDataset, Store
from s3pipes.index import write_manifest
from s3pipes.server import LocalS3Server
from tests.faultproxy import FaultProxy, Rule
from tests.unit.test_pipe import write_shards

pytestmark = pytest.mark.integration


def test_objects_by_key_with_labels_through_a_dataloader(s3_store: Store, s3_root: str) -> None:
    for label in range(3):
        for n in range(10):
            s3_store.write_bytes(f"{s3_root}/train/{label}/{n:05d}.png", bytes([label, n]))
    write_manifest(s3_store, f"{s3_root}/train/", suffix=".png")
    ds = MapDataset.from_prefix(
        f"{s3_root}/train/", suffix=".png", store=s3_store, transform=lambda r: (int(r.key.split("/")[-2]), r.read())
    )
    assert len(ds) == 30 and ds[0] == (0, bytes([0, 0])) and ds[-1] == (2, bytes([2, 9]))
    loader = DataLoader(ds, batch_size=8, shuffle=True, num_workers=2, collate_fn=list, multiprocessing_context="fork")
    seen = sorted(item for batch in loader for item in batch)
    assert seen == sorted(ds[i] for i in range(30))


def test_a_batch_has_its_whole_concurrency_in_flight_after_a_listing(
    s3_server: LocalS3Server, s3_store: Store, s3_root: str
) -> None:
    """The first call on a Store (here the listing) must not size the connection pool for every later one:
    a pool of 16 once capped ``__getitems__`` at 16 GETs in flight whatever its ``concurrency``."""
    for n in range(40):
        s3_store.write_bytes(f"{s3_root}/items/{n:05d}.bin", bytes([n]))
    with FaultProxy(s3_server.endpoint_url, max_lifetime=60) as proxy:
        store = Store({**s3_server.storage_options, "endpoint_url": proxy.endpoint_url})
        ds = MapDataset.from_prefix(f"{s3_root}/items/", store=store, manifest=False, concurrency=32)
        proxy.set_rules([Rule("delay", seconds=0.5, methods=("GET",), path_contains="/items/0")])
        proxy.reset_counters()
        assert ds.__getitems__(list(range(40))) == [bytes([n]) for n in range(40)]
        assert proxy.peak_in_flight == 32, "every GET of the batch is answered late: all 32 allowed wait at once"


def test_missing_object_in_a_batch_names_it(s3_store: Store, s3_root: str) -> None:
    s3_store.write_bytes(f"{s3_root}/a.png", b"a")
    ds = MapDataset.from_objects([f"{s3_root}/a.png", f"{s3_root}/missing.png"], store=s3_store)
    with pytest.raises(sp.ObjectNotFound, match=r"missing\.png"):
        ds.__getitems__([0, 1])


def test_shard_samples_match_the_stream_and_a_rewrite_is_stale(s3_store: Store, s3_root: str) -> None:
    write_shards(f"{s3_root}/shards", shards=3, per_shard=5, store=s3_store)
    streamed = list(sp.webdataset(f"{s3_root}/shards/", store=s3_store))
    ds = MapDataset.from_shards(f"{s3_root}/shards/", store=s3_store)
    assert ds.__getitems__(list(range(len(ds)))) == streamed
    s3_store.write_bytes(f"{s3_root}/shards/shard-001.tar", b"")  # rewritten after indexing
    with pytest.raises(sp.StaleIndex, match=r"shard-001\.tar"):
        MapDataset.from_shards(f"{s3_root}/shards/", store=s3_store)


def test_folder_objects_are_not_items(s3_store: Store, s3_root: str) -> None:
    """Zero-byte keys ending in "/" (the AWS console's "Create folder") were listed as items that 404."""
    for key in ("objects/", "objects/3/"):
        s3_store.write_bytes(f"{s3_root}/{key}", b"")
    for n in range(2):
        s3_store.write_bytes(f"{s3_root}/objects/3/{n}.png", b"png %d" % n)
    ds = MapDataset.from_prefix(f"{s3_root}/objects/", store=s3_store)
    assert ds.__getitems__([0, 1]) == [b"png 0", b"png 1"] and len(ds) == 2


def test_read_only_credentials_get_an_index_in_memory(
    s3_server: LocalS3Server, s3_store: Store, s3_root: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Training often runs with read-only credentials: the index is built, kept, and not saved."""
    write_shards(f"{s3_root}/ro", shards=2, per_shard=3, store=s3_store)
    reader = Store(s3_server.readonly_storage_options)
    with caplog.at_level("WARNING", logger="s3pipes"):
        ds = MapDataset.from_shards(f"{s3_root}/ro/", store=reader)
    assert len(ds) == 6 and ds[4]["__key__"] == "sample0004"
    assert "index.s3pipes.json" in caplog.text and "kept in memory" in caplog.text
    assert not s3_store.exists(f"{s3_root}/ro/index.s3pipes.json")
