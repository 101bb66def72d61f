"""ObjectStream: ranged, prefetching reads give exactly the object's bytes, from any position."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import s3pipes
from s3pipes import Store
from s3pipes.stages import ObjectStream

DATA = bytes(range(256)) * 1000  # 256,000 bytes


@pytest.fixture
def url(tmp_path: Path) -> str:
    url = f"file://{tmp_path}/object.bin"
    Store().write_bytes(url, DATA)
    return url


@pytest.mark.parametrize("block_size", [1000, 4096, 1 << 20])
@pytest.mark.parametrize("read_size", [1, 513, 4096, 100_000])
def test_reads_return_the_object_in_order(url: str, block_size: int, read_size: int) -> None:
    with ObjectStream(url, Store(), block_size=block_size) as stream:
        chunks = iter(lambda: stream.read(read_size), b"")
        assert b"".join(chunks) == DATA
        assert stream.tell() == len(DATA)


def test_seek_before_and_after_reading(url: str) -> None:
    with ObjectStream(url, Store(), block_size=4096) as stream:
        stream.seek(100_000)
        assert stream.read(10) == DATA[100_000:100_010]
        stream.seek(5)  # backwards: a new ranged read
        assert stream.read(3) == DATA[5:8]
        stream.seek(-4, 2)
        assert stream.read() == DATA[-4:]
        assert stream.read(10) == b""


def test_empty_object(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/empty"
    Store().write_bytes(url, b"")
    assert ObjectStream(url, Store()).read() == b""


def test_missing_object_names_it(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/missing.tar"
    with pytest.raises(s3pipes.ObjectNotFound, match=r"missing\.tar"):
        ObjectStream(url, Store()).read(10)


def test_close_stops_the_fetch_thread(url: str) -> None:
    before = set(threading.enumerate())
    stream = ObjectStream(url, Store(), block_size=1000)
    stream.read(10)
    started = [t for t in set(threading.enumerate()) - before if t.name.startswith("s3pipes-fetch")]
    assert started, "a block is fetched ahead on a thread"
    stream.close()
    stream.close()  # idempotent
    for thread in started:
        thread.join(timeout=5)
    assert not any(thread.is_alive() for thread in started)
