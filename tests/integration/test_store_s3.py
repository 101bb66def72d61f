"""The Store against real S3 (SeaweedFS): round trips, atomic writes, fork safety."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from s3pipes import Store

pytestmark = pytest.mark.integration


def test_round_trip_and_sorted_listing(s3_store: Store, s3_root: str) -> None:
    for name in ("train/b.tar", "train/a.tar", "train/sub/c.tar", "train/readme.txt", "val/x.tar"):
        s3_store.write_bytes(f"{s3_root}/{name}", name.encode())
    assert s3_store.list(f"{s3_root}/train/", suffix=".tar") == [
        f"{s3_root}/train/a.tar",
        f"{s3_root}/train/b.tar",
        f"{s3_root}/train/sub/c.tar",
    ]
    assert s3_store.read_bytes(f"{s3_root}/train/sub/c.tar", 6, 9) == b"sub"
    assert s3_store.info(f"{s3_root}/val/x.tar")["size"] == len(b"val/x.tar")


def test_empty_prefix_in_existing_bucket_lists_nothing(s3_store: Store, s3_root: str) -> None:
    assert s3_store.list(f"{s3_root}/nothing-here/") == []


def test_large_write_is_published_only_on_clean_close(s3_server: object, s3_store: Store, s3_root: str) -> None:
    url = f"{s3_root}/big.bin"
    part = 5 << 20  # S3's smallest part: several parts per object
    payload = bytes(range(256)) * (24 * 1024 * 4)  # 24 MiB
    with s3_store.open(url, "wb", block_size=part) as f:
        f.write(payload)
    assert s3_store.info(url)["size"] == len(payload)
    with pytest.raises(RuntimeError, match="interrupted"), s3_store.open(url, "wb", block_size=part) as f:
        f.write(b"x" * (12 << 20))  # two parts uploaded before the failure
        raise RuntimeError("interrupted")
    assert s3_store.read_bytes(url, 0, 1024) == payload[:1024], "the earlier object is untouched"
    assert s3_store.info(url)["size"] == len(payload)
    bucket, _, key = url.removeprefix("s3://").partition("/")
    uploads = s3_server.client().list_multipart_uploads(Bucket=bucket, Prefix=key).get("Uploads", [])  # type: ignore[attr-defined]
    assert uploads == [], "the failed upload was aborted, not left behind"


def _list_in_child(store: Store, prefix: str, queue: multiprocessing.Queue[object]) -> None:
    queue.put(store.list(prefix))


def test_store_used_before_fork_works_in_forked_child(s3_store: Store, s3_root: str) -> None:
    """s3fs clients hang after fork (s3fs#914); the Store builds a fresh one per process."""
    s3_store.write_bytes(f"{s3_root}/a.bin", b"1")
    assert s3_store.list(s3_root) == [f"{s3_root}/a.bin"]  # parent's client and loop are live now
    context = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[object] = context.Queue()
    child = context.Process(target=_list_in_child, args=(s3_store, s3_root, queue))
    child.start()
    try:
        assert queue.get(timeout=30) == [f"{s3_root}/a.bin"]
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
    # The child must not have closed connections the parent still pools (it did: the
    # parent's next request hung for the whole read timeout).
    started = time.monotonic()
    assert s3_store.list(s3_root) == [f"{s3_root}/a.bin"]
    assert time.monotonic() - started < 5


def test_reads_after_a_listing_see_objects_changed_since(s3_server: object, s3_store: Store, s3_root: str) -> None:
    """s3fs's listing cache made a replaced object keep its old size (and a new one look missing)."""
    s3_store.write_bytes(f"{s3_root}/a.bin", b"short")
    assert s3_store.list(s3_root) == [f"{s3_root}/a.bin"]
    other = Store(s3_server.storage_options)  # type: ignore[attr-defined]
    other.write_bytes(f"{s3_root}/a.bin", b"a longer replacement")
    other.write_bytes(f"{s3_root}/b.bin", b"new")
    assert s3_store.read_bytes(f"{s3_root}/a.bin") == b"a longer replacement"
    assert s3_store.info(f"{s3_root}/a.bin")["size"] == 20
    assert s3_store.exists(f"{s3_root}/b.bin")


def test_listing_pages_and_subprefixes_are_complete(s3_server: object, s3_store: Store, s3_root: str) -> None:
    """More than one listing page (1000 keys) in a sub-prefix, several sub-prefixes, files at the top."""
    from concurrent.futures import ThreadPoolExecutor

    names = [f"a/{i:05d}.bin" for i in range(1100)] + [f"b/c/{i}.bin" for i in range(5)] + ["top.bin", "z.txt"]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda name: s3_store.write_bytes(f"{s3_root}/{name}", b"x"), names))
    listed = s3_store.list_info(f"{s3_root}/", suffix=".bin")
    assert list(listed) == sorted(f"{s3_root}/{name}" for name in names if name.endswith(".bin"))
    assert all(info["size"] == 1 and info["ETag"] for info in listed.values())
