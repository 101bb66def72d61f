"""ObjectStream and OpenObject on SeaweedFS: blocks received into reused buffers, the next shard opened ahead."""

from __future__ import annotations

import os
import time

import pytest

import s3pipes as sp
from s3pipes import Store
from s3pipes.server import LocalS3Server
from s3pipes.stages.open import ObjectStream
from tests.faultproxy import FaultProxy
from tests.unit.test_pipe import write_shards

pytestmark = pytest.mark.integration

BLOCK = 64 << 10


@pytest.fixture
def object_url(s3_store: Store, s3_root: str) -> tuple[str, bytes]:
    data = os.urandom(7 * BLOCK + 12_345)  # a short last block
    url = f"{s3_root}/stream/object.bin"
    s3_store.write_bytes(url, data)
    return url, data


@pytest.mark.parametrize("read_size", [1000, BLOCK, 3 * BLOCK + 7])
def test_views_copied_before_the_next_read_and_reads_kept_give_the_object(
    s3_store: Store, object_url: tuple[str, bytes], read_size: int
) -> None:
    url, data = object_url
    assert s3_store._fast_getter(url) is not None, "the path whose buffers are reused"
    with ObjectStream(url, s3_store, block_size=BLOCK) as stream:
        copied = b"".join(bytes(view) for view in iter(lambda: stream.read_view(read_size), b""))
    assert copied == data
    with ObjectStream(url, s3_store, block_size=BLOCK) as stream:
        kept = list(iter(lambda: stream.read(read_size), b""))  # read() results stay as they were
    assert b"".join(kept) == data


def test_seeks_between_reads_of_reused_buffers(s3_store: Store, object_url: tuple[str, bytes]) -> None:
    url, data = object_url
    with ObjectStream(url, s3_store, block_size=BLOCK) as stream:
        stream.seek(2 * BLOCK - 10)
        assert stream.read(20) == data[2 * BLOCK - 10 : 2 * BLOCK + 10]
        stream.seek(100)  # backwards, out of the blocks held: the blocks ahead are dropped
        assert stream.read(BLOCK) == data[100 : BLOCK + 100]
        stream.seek(BLOCK + 100)  # forwards, past what was fetched ahead
        assert stream.read() == data[BLOCK + 100 :]


def test_the_next_shard_is_fetched_while_the_current_one_is_read(
    s3_server: LocalS3Server, s3_store: Store, s3_root: str
) -> None:
    urls = write_shards(s3_root, shards=3, per_shard=4, store=s3_store)
    with FaultProxy(s3_server.endpoint_url, seed=1) as proxy:
        store = Store({**s3_server.storage_options, "endpoint_url": proxy.endpoint_url})
        iterator = iter(sp.from_urls(urls, store=store).open_object().untar().group_by_key())
        assert next(iterator)["__key__"] == "sample0000"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any("shard-001" in t for m, t, _ in proxy.log if m == "GET"):
            time.sleep(0.01)
        assert any("shard-001" in target for method, target, _ in proxy.log if method == "GET")
        assert not any("shard-002" in target for _, target, _ in proxy.log), "one shard ahead, not more"
        assert [s["__key__"] for s in iterator] == [f"sample{n:04d}" for n in range(1, 12)]


def test_a_missing_shard_looked_up_ahead_is_named_when_its_turn_comes(s3_store: Store, s3_root: str) -> None:
    urls = write_shards(s3_root, shards=3, per_shard=4, store=s3_store)
    kept = s3_store.read_bytes(urls[1])
    s3_store.delete(urls[1])
    pipe = sp.webdataset(urls, store=s3_store)
    seen = []
    with pytest.raises(sp.ObjectNotFound, match="shard-001") as info:  # its HEAD failed on the event loop
        seen.extend(sample["__key__"] for sample in pipe)
    assert info.value.stage == "open_object"
    assert seen == [f"sample{n:04d}" for n in range(4)], "all of shard-000 (its last sample too), nothing after"
    s3_store.write_bytes(urls[1], kept)  # back: the position after the error resumes with it
    resumed = sp.webdataset(urls, store=s3_store)
    resumed.load_state_dict(pipe.state_dict())
    assert [sample["__key__"] for sample in resumed] == [f"sample{n:04d}" for n in range(4, 12)]


def test_a_missing_shard_looked_up_ahead_costs_one_classifying_request(
    s3_server: LocalS3Server, s3_store: Store, s3_root: str
) -> None:
    urls = write_shards(s3_root, shards=3, per_shard=4, store=s3_store)
    s3_store.delete(urls[1])
    with FaultProxy(s3_server.endpoint_url, seed=1) as proxy:
        store = Store({**s3_server.storage_options, "endpoint_url": proxy.endpoint_url})
        # every block of shard-000 asked for at once: each of its reads then offers shard-001 fetches
        pipe = sp.from_urls(urls, store=store).open_object(block_size=1024, ahead=16).untar().group_by_key()
        with pytest.raises(sp.ObjectNotFound, match="shard-001"):
            list(pipe)
        probes = [target for method, target, _ in proxy.log if method == "GET" and "list-type=2" in target]
    assert len(probes) == 1, f"the HEAD's failure was translated (and the bucket listed) {len(probes)} times"
