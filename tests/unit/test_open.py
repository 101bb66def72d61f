"""ObjectStream: ranged, prefetching reads give exactly the object's bytes, from any position."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from torchdata.nodes import IterableWrapper

import s3pipes
from s3pipes import Store
from s3pipes._memory import anonymous_buffer
from s3pipes.stages import ObjectStream, OpenObject

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


def test_a_failed_block_is_fetched_again_by_the_next_read(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store()
    real = store.read_bytes
    failures = {2000: 1}  # the block at 2000 fails once

    def flaky(u: str, start: int | None = None, end: int | None = None) -> bytes:
        if failures.get(start or 0):
            failures[start or 0] -= 1
            raise s3pipes.StoreError(u, "file", "injected")
        return real(u, start, end)

    monkeypatch.setattr(store, "read_bytes", flaky)
    with ObjectStream(url, store, block_size=1000) as stream:
        assert stream.read(2000) == DATA[:2000]
        with pytest.raises(s3pipes.StoreError, match="injected"):
            stream.read(1000)
        assert stream.read(1000) == DATA[2000:3000], "not the block that was fetched after the failed one"
        assert stream.read() == DATA[3000:]


def test_open_object_opens_ahead_only_when_asked(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    prefetched: list[str] = []
    monkeypatch.setattr(ObjectStream, "prefetch", lambda self, blocks=None: prefetched.append(self.url))
    urls = [url, url + "?2", url + "?3"]
    plain = OpenObject(IterableWrapper(urls), Store())
    assert [stream.url for stream in plain] == urls and prefetched == []
    ahead = OpenObject(IterableWrapper(urls), Store(), open_ahead=True)
    first = next(ahead)
    assert first.url == url and prefetched == [urls[1]]
    assert [stream.url for stream in ahead] == urls[1:]


def test_the_next_stream_gets_only_the_fetches_the_current_one_no_longer_needs(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fetched: list[tuple[str, int]] = []
    real_fetch = ObjectStream._fetch

    def logged(self: ObjectStream, start: int) -> object:
        fetched.append((self.url.rsplit("/")[-1], start))
        return real_fetch(self, start)

    monkeypatch.setattr(ObjectStream, "_fetch", logged)
    other = f"file://{tmp_path}/other.bin"
    Store().write_bytes(other, DATA[::-1])
    block = len(DATA) // 4  # four blocks an object, two ahead
    node = OpenObject(IterableWrapper([url, other]), Store(), block_size=block, ahead=2, open_ahead=True)
    first = next(node)
    after_each_read = []
    for n in range(4):
        assert first.read(block) == DATA[n * block : (n + 1) * block]
        after_each_read.append(list(fetched))
        fetched.clear()
    first.close()
    assert next(node).read() == DATA[::-1]
    this, that = [("object.bin", n * block) for n in range(4)], [("other.bin", n * block) for n in range(4)]
    assert after_each_read == [this[:3], this[3:], that[:1], that[1:2]], "no more than two blocks ahead in all"
    assert fetched == that[2:]


def test_a_failure_while_opening_ahead_loses_no_stream(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: ObjectStream, blocks: int | None = None) -> None:
        raise RuntimeError("not a store error")

    monkeypatch.setattr(ObjectStream, "prefetch", broken)
    urls = [url, url + "?2", url + "?3"]
    node = OpenObject(IterableWrapper(urls), Store(), open_ahead=True)
    assert [stream.url for stream in node] == urls


def test_buffers_are_private_to_a_process() -> None:
    buffer = anonymous_buffer(4096)
    pid = os.fork()
    if pid == 0:  # the child writes its copy, then leaves at once
        buffer[:5] = b"CHILD"
        os._exit(0)
    os.waitpid(pid, 0)
    assert buffer[:5] == bytes(5)
