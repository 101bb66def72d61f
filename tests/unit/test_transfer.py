"""transfer.py without a server: ParallelReader over an in-memory fetch, open_download/open_upload off S3.

``Source`` is a tiny real ``fetch(start, end)``: it serves slices of a bytes object as
futures, already completed or completed later by a worker thread, and counts the chunks
it handed out that are still alive (weak references): that count is the reader's memory.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import random
import threading
import weakref
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, cast

import pytest
import torch

import s3pipes
from s3pipes import Store
from s3pipes.checkpoint import CheckpointStore, CorruptCheckpoint
from s3pipes.transfer import ParallelReader, open_download, open_upload

KIB = 1 << 10
BLOCK, WINDOW, SIDE_CACHE = KIB, 3, 2  # small blocks so that every test crosses many of them
URL = "memory://transfer-tests/object.bin"
SIZES = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 7 * BLOCK + 123, 600 * KIB + 17]  # the last: more than two side reads
MODES = ["done", "thread", "mixed"]


class _Chunk(bytearray):
    """A chunk the Source hands out; a bytearray subclass so that it can be weakly referenced."""


class Source:
    """``fetch(start, end)`` over ``data``: futures done at once, done by a worker thread later, or alternating.

    Attributes:
        requests: every ``(start, end)`` asked for, in order.
        peak_blocks / peak_sides: the most block-sized / larger chunks alive at once (counted as
            each chunk is made, so including the one just made).
    """

    def __init__(self, data: bytes, pool: ThreadPoolExecutor, *, mode: str = "done") -> None:
        self.data, self.mode, self.pool = data, mode, pool
        self.requests: list[tuple[int, int]] = []
        self.faults: dict[int, Any] = {}  # request index -> bytes to return instead, or an exception to raise
        self._lock = threading.Lock()
        self._alive: dict[int, bool] = {}  # chunk serial -> is it block-sized
        self._serial = itertools.count()
        self.peak_blocks = self.peak_sides = 0

    def fetch(self, start: int, end: int) -> Future[Any]:
        index = len(self.requests)
        self.requests.append((start, end))
        in_thread = self.mode == "thread" or (self.mode == "mixed" and index % 2)
        if in_thread:
            return self.pool.submit(self._chunk, index, start, end)
        future: Future[Any] = Future()
        try:
            future.set_result(self._chunk(index, start, end))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def _chunk(self, index: int, start: int, end: int) -> _Chunk:
        fault = self.faults.get(index)
        if isinstance(fault, Exception):
            raise fault
        chunk = _Chunk(self.data[start:end] if fault is None else fault)
        serial, is_block = next(self._serial), end - start <= BLOCK
        with self._lock:
            self._alive[serial] = is_block
            self.peak_blocks = max(self.peak_blocks, self.alive_blocks)
            self.peak_sides = max(self.peak_sides, self.alive_sides)
        weakref.finalize(chunk, self._dead, serial)
        return chunk

    def _dead(self, serial: int) -> None:
        with self._lock:
            del self._alive[serial]

    @property
    def alive_blocks(self) -> int:
        return sum(self._alive.values())

    @property
    def alive_sides(self) -> int:
        return len(self._alive) - self.alive_blocks

    def reader(self, *, sha256: bool = False, url: str = URL) -> ParallelReader:
        return ParallelReader(
            Store(), url, self.fetch, len(self.data), sha256=sha256, block_size=BLOCK, in_flight=WINDOW
        )


@pytest.fixture(scope="module")
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2, thread_name_prefix="test-source") as executor:
        yield executor


def payload(size: int) -> bytes:
    return random.Random(size).randbytes(size)


def assert_memory_bounded(source: Source) -> None:
    """The reader holds at most the window and the side cache (checked for "done" sources only).

    At rest: ``WINDOW`` blocks and ``SIDE_CACHE`` side chunks. While the next block is being
    requested, the block just dropped is still referred to by the reader's locals: one more
    at the peak. With worker threads, a worker may still hold a chunk for an instant after
    completing its future, so the counts are exact only when every future is done at once.
    """
    if source.mode != "done":
        return
    assert source.alive_blocks <= WINDOW and source.alive_sides <= SIDE_CACHE, (source.alive_blocks, source.alive_sides)
    assert source.peak_blocks <= WINDOW + 1 and source.peak_sides <= SIDE_CACHE + 1, (
        source.peak_blocks,
        source.peak_sides,
    )


# -- reading --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES)
def test_sequential_reads_of_odd_sizes_return_the_object(pool: ThreadPoolExecutor, size: int, mode: str) -> None:
    data = payload(size)
    source = Source(data, pool, mode=mode)
    with source.reader() as reader:
        pieces, sizes = [], itertools.cycle([1, 7, BLOCK - 1, 3 * BLOCK + 5, BLOCK, 2])
        while piece := reader.read(next(sizes)):
            pieces.append(piece)
            assert reader.tell() == sum(map(len, pieces))
            assert_memory_bounded(source)
        assert b"".join(pieces) == data
        assert reader.read(5) == b"" and reader.tell() == size
    blocks = [(start, min(start + BLOCK, size)) for start in range(0, size, BLOCK)]
    assert source.requests == blocks, "a sequential read fetches every block once, in order, and nothing else"


@pytest.mark.parametrize("mode", MODES)
def test_readinto_spanning_blocks_fills_the_whole_buffer(pool: ThreadPoolExecutor, mode: str) -> None:
    data = payload(20 * BLOCK)
    with Source(data, pool, mode=mode).reader() as reader:
        reader.seek(BLOCK // 2)
        buffer = bytearray(5 * BLOCK + 3)  # more blocks than the window holds
        assert reader.readinto(buffer) == len(buffer)
        assert buffer == data[BLOCK // 2 : BLOCK // 2 + len(buffer)]
        reader.seek(-100, io.SEEK_END)
        tail = memoryview(bytearray(300))
        assert reader.readinto(tail) == 100, "only the end of the object stops a read short"
        assert tail[:100] == data[-100:]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [1, BLOCK + 1, 7 * BLOCK + 123, 600 * KIB + 17])
def test_random_seeks_and_reads_return_the_slices(pool: ThreadPoolExecutor, size: int, mode: str) -> None:
    data = payload(size)
    source = Source(data, pool, mode=mode)
    rng = random.Random(f"{size}-{mode}")
    with source.reader() as reader:
        for _ in range(300):
            kind = rng.random()
            if kind < 0.2:
                position = reader.seek(-rng.randint(0, min(size, 3 * BLOCK)), io.SEEK_END)  # near the end
            elif kind < 0.35:
                position = reader.seek(-rng.randint(0, reader.tell()), io.SEEK_CUR)  # backward
            elif kind < 0.45:
                position = reader.seek(rng.randint(0, 2 * BLOCK), io.SEEK_CUR)  # forward, maybe past the end
            else:
                position = reader.seek(rng.randint(0, size))
            assert reader.tell() == position
            count = rng.choice([0, 1, rng.randint(1, BLOCK), rng.randint(BLOCK, 4 * BLOCK)])
            assert reader.read(count) == data[position : position + count], (position, count)
            assert_memory_bounded(source)


def test_seek_before_the_start_is_refused(pool: ThreadPoolExecutor) -> None:
    with Source(payload(10), pool).reader() as reader:
        reader.seek(4)
        with pytest.raises(ValueError, match=r"negative seek position -1 in memory://transfer-tests/object\.bin"):
            reader.seek(-5, io.SEEK_CUR)
        assert reader.tell() == 4 and reader.read(2) == payload(10)[4:6]


def test_a_closed_reader_refuses_reads_like_a_file(pool: ThreadPoolExecutor) -> None:
    reader = Source(payload(4 * BLOCK), pool).reader()
    assert reader.read(3) == payload(4 * BLOCK)[:3]
    reader.close()
    reader.close()  # idempotent
    assert reader.closed
    with pytest.raises(ValueError, match="closed"):
        reader.read(3)


def test_an_invalid_whence_is_a_value_error(pool: ThreadPoolExecutor) -> None:
    with Source(payload(10), pool).reader() as reader, pytest.raises(ValueError, match="whence"):
        reader.seek(0, 7)


def test_the_whole_window_is_requested_at_once_and_refilled_as_blocks_are_passed(pool: ThreadPoolExecutor) -> None:
    data = payload(10 * BLOCK)
    source = Source(data, pool)
    with source.reader() as reader:
        assert source.requests == [(0, BLOCK), (BLOCK, 2 * BLOCK), (2 * BLOCK, 3 * BLOCK)]
        reader.read(BLOCK)  # still in block 0: nothing dropped
        assert len(source.requests) == WINDOW
        reader.read(1)  # into block 1: block 0 dropped, block 3 requested
        assert source.requests[-1] == (3 * BLOCK, 4 * BLOCK) and source.alive_blocks == WINDOW


# -- the digest -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("reading", ["everything", "nothing", "tail", "random"])
def test_finish_digests_the_whole_object_whatever_was_read(
    pool: ThreadPoolExecutor, size: int, mode: str, reading: str
) -> None:
    data = payload(size)
    source = Source(data, pool, mode=mode)
    with source.reader(sha256=True) as reader:
        if reading == "everything":
            assert reader.read() == data
        elif reading == "tail":
            reader.seek(-min(size, 100), io.SEEK_END)
            assert reader.read() == data[size - min(size, 100) :]
        elif reading == "random":
            rng = random.Random(size)
            for _ in range(20):
                position, count = reader.seek(rng.randint(0, size)), rng.randint(0, 2 * BLOCK)
                assert reader.read(count) == data[position : position + count]
        assert reader.finish() == hashlib.sha256(data).hexdigest()
        assert_memory_bounded(source)
        assert reader.finish() == hashlib.sha256(data).hexdigest(), "finish is idempotent"
    window_requests = [r for r in source.requests if r[1] - r[0] <= BLOCK]
    assert sorted(set(window_requests)) == [(s, min(s + BLOCK, size)) for s in range(0, size, BLOCK)]
    assert len(window_requests) == len(set(window_requests)), "the window fetches each block once"


def test_finish_without_sha256_returns_none(pool: ThreadPoolExecutor) -> None:
    with Source(payload(3 * BLOCK), pool).reader() as reader:
        assert reader.finish() is None


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("returned", [BLOCK - 1, 0, BLOCK + 1])
def test_a_fetch_of_the_wrong_length_is_a_corrupt_checkpoint(
    pool: ThreadPoolExecutor, mode: str, returned: int
) -> None:
    data = payload(8 * BLOCK)
    source = Source(data, pool, mode=mode)
    source.faults[1] = b"x" * returned  # block 1 comes back the wrong length
    with source.reader(sha256=True) as reader:
        assert reader.read(BLOCK) == data[:BLOCK]
        with pytest.raises(CorruptCheckpoint) as info:
            reader.read(BLOCK)
        assert URL in str(info.value) and f"came back {returned} long" in str(info.value)
        assert info.value.url == URL and reader.error is info.value


def test_a_short_block_fails_finish_too(pool: ThreadPoolExecutor) -> None:
    """Unread blocks are checked as well: a digest never covers a short object."""
    source = Source(payload(8 * BLOCK), pool)
    source.faults[2] = b"short"
    with source.reader(sha256=True) as reader, pytest.raises(CorruptCheckpoint, match="came back 5 long") as info:
        reader.finish()
    assert reader.error is info.value


def test_a_short_side_read_is_a_corrupt_checkpoint(pool: ThreadPoolExecutor) -> None:
    source = Source(payload(600 * KIB), pool)
    source.faults[WINDOW] = b"short"  # the first request after the window: the side read of the tail
    with source.reader() as reader:
        reader.seek(-10, io.SEEK_END)
        with pytest.raises(CorruptCheckpoint, match=r"memory://transfer-tests/object\.bin: changed while being read"):
            reader.read(10)
        assert source.requests[WINDOW][1] == 600 * KIB and isinstance(reader.error, CorruptCheckpoint)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (FileNotFoundError("transfer-tests/object.bin"), s3pipes.ObjectNotFound),
        (PermissionError("denied"), s3pipes.AccessDenied),
        (ConnectionResetError("reset by peer"), s3pipes.ConnectionDropped),
        (RuntimeError("boom"), s3pipes.StoreRequestError),
    ],
    ids=["not-found", "permission", "reset", "other"],
)
def test_a_failed_fetch_raises_the_translated_error(
    pool: ThreadPoolExecutor, mode: str, raised: Exception, expected: type[Exception]
) -> None:
    source = Source(payload(8 * BLOCK), pool, mode=mode)
    source.faults[1] = raised
    with source.reader() as reader:
        reader.read(BLOCK)
        with pytest.raises(expected) as info:
            reader.read(1)
        assert URL in str(info.value) and info.value.__cause__ is raised and reader.error is info.value


def test_an_s3pipes_error_from_a_fetch_passes_through_unchanged(pool: ThreadPoolExecutor) -> None:
    source = Source(payload(4 * BLOCK), pool)
    original = s3pipes.CredentialsMissing(URL, "memory", "no credentials")
    source.faults[0] = original
    with source.reader() as reader, pytest.raises(s3pipes.CredentialsMissing) as info:
        reader.read(1)
    assert info.value is original and reader.error is original


def test_torch_load_keeps_the_store_error_on_the_reader(pool: ThreadPoolExecutor) -> None:
    """torch replaces what readinto raises by an error of its own; the reader keeps the original (core re-raises it)."""
    buffer = io.BytesIO()
    torch.save({"w": torch.arange(4096)}, buffer)
    source = Source(buffer.getvalue(), pool)
    source.faults[2] = FileNotFoundError("gone")
    with source.reader() as reader, pytest.raises(Exception) as info:
        torch.load(cast(IO[bytes], reader), weights_only=True)
    assert isinstance(reader.error, s3pipes.ObjectNotFound) and URL in str(reader.error), info.value


class VanishingStore(Store):
    """A Store whose objects are deleted (as by another process) once ``reads`` ranged reads were served."""

    def __init__(self, reads: int) -> None:
        super().__init__()
        self._left, self._counting = reads, threading.Lock()

    def read_bytes(self, url: str, start: int | None = None, end: int | None = None) -> bytes:
        with self._counting:
            self._left -= 1
            if self._left == -1:
                self.delete(url)
        return super().read_bytes(url, start, end)


def test_load_url_raises_the_store_error_not_torchs(mem_root: str) -> None:
    url = f"{mem_root}/state.pt"
    store = VanishingStore(reads=1)
    with open_upload(store, url) as file:
        torch.save({"w": torch.arange(3 << 20)}, file)  # 24 MiB: more than one 8 MiB block
    with pytest.raises(s3pipes.ObjectNotFound) as info:
        CheckpointStore.load_url(url, store=store)
    assert url in str(info.value)


def test_load_url_keeps_the_backend_cause_of_the_store_error(mem_root: str) -> None:
    """House rule 5: the translated error is raised ``from`` the backend's (here fsspec's FileNotFoundError)."""
    url = f"{mem_root}/state.pt"
    store = VanishingStore(reads=1)
    with open_upload(store, url) as file:
        torch.save({"w": torch.arange(3 << 20)}, file)
    with pytest.raises(s3pipes.ObjectNotFound) as info:
        CheckpointStore.load_url(url, store=store)
    assert isinstance(info.value.__cause__, FileNotFoundError), f"cause: {info.value.__cause__!r}"


# -- torch.load -----------------------------------------------------------------------------------


def training_state() -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    return {
        "model": {
            "embedding": torch.randn(300, 64, generator=generator),  # 75 KiB: many blocks
            "bias": torch.arange(17, dtype=torch.int64),
            "half": torch.randn(33, 5, generator=generator).half(),
            "mask": torch.rand(1001, generator=generator) > 0.5,
        },
        "optim": {"state": {0: {"step": torch.tensor(12.0), "exp_avg": torch.randn(4096, generator=generator)}}},
        "empty": torch.empty(0),
        "view": torch.arange(100.0)[10:20],  # a view: saved with its whole storage
        "data": {"epoch": 3, "order": "seed=0"},
    }


def assert_same(loaded: Any, expected: Any) -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(loaded, torch.Tensor) and loaded.dtype == expected.dtype and torch.equal(loaded, expected)
    elif isinstance(expected, dict):
        assert loaded.keys() == expected.keys()
        for key, value in expected.items():
            assert_same(loaded[key], value)
    else:
        assert loaded == expected


@pytest.mark.parametrize("mode", MODES)
def test_torch_load_over_a_parallel_reader_returns_equal_tensors(pool: ThreadPoolExecutor, mode: str) -> None:
    state = training_state()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    source = Source(data, pool, mode=mode)
    with source.reader(sha256=True) as reader:
        assert_same(torch.load(cast(IO[bytes], reader), weights_only=True), state)
        assert reader.finish() == hashlib.sha256(data).hexdigest()
    assert len(data) > 90 * BLOCK and len(source.requests) > 90
    assert_memory_bounded(source)


# -- open_download / open_upload off S3 (the thread-pool path) ------------------------------------


@pytest.fixture(params=["memory", "file"])
def root(request: pytest.FixtureRequest, mem_root: str, tmp_path: Path) -> str:
    return mem_root if request.param == "memory" else f"file://{tmp_path}"


def test_open_download_reads_memory_and_file_urls(root: str) -> None:
    store, url, state = Store(), f"{root}/dir/state.pt", training_state()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    store.write_bytes(url, buffer.getvalue())
    with open_download(store, url, sha256=True, block_size=4 * KIB, in_flight=2) as reader:  # size from a HEAD
        assert_same(torch.load(cast(IO[bytes], reader), weights_only=True), state)
        assert reader.finish() == hashlib.sha256(buffer.getvalue()).hexdigest()
    with open_download(store, url, size=len(buffer.getvalue()), block_size=KIB) as reader:
        reader.seek(-64, io.SEEK_END)
        assert reader.read() == buffer.getvalue()[-64:]


def test_open_download_of_a_missing_object_names_it(root: str) -> None:
    url = f"{root}/no/such/state.pt"
    with pytest.raises(s3pipes.ObjectNotFound, match=url.replace(".", r"\.")):
        open_download(Store(), url)


def test_open_download_of_an_object_deleted_after_open_names_it(root: str) -> None:
    store, url = Store(), f"{root}/state.pt"
    store.write_bytes(url, payload(10 * KIB))
    with open_download(store, url, block_size=KIB, in_flight=2) as reader:
        store.delete(url)
        reader.seek(5 * KIB)  # beyond the window: a GET now, of an object that is gone
        with pytest.raises(s3pipes.ObjectNotFound) as info:
            reader.read(10)
    assert url in str(info.value) and reader.error is info.value


def test_open_upload_publishes_on_close_and_discards_on_error(root: str) -> None:
    store, url = Store(), f"{root}/dir/upload.pt"
    with open_upload(store, url) as file:
        torch.save({"v": torch.arange(10)}, file)
    assert torch.equal(CheckpointStore.load_url(url, store=store)["v"], torch.arange(10))
    with pytest.raises(RuntimeError, match="crashed"), open_upload(store, url) as file:
        torch.save({"v": torch.zeros(99)}, file)
        raise RuntimeError("training crashed")
    assert torch.equal(CheckpointStore.load_url(url, store=store)["v"], torch.arange(10)), "the old object stays"


# -- CheckpointStore on file:// still verifies the payload -----------------------------------------


@pytest.fixture
def saved(tmp_path: Path) -> tuple[CheckpointStore, Path, bytes]:
    ckpt = CheckpointStore(f"file://{tmp_path}/run", store=Store())
    url = ckpt.save(training_state(), step=1)
    assert_same(ckpt.load(step=1), training_state())
    path = Path(url.removeprefix("file://"))
    return ckpt, path, path.read_bytes()


def flip_positions(size: int) -> list[int]:
    """The first and last bytes, the zip directory near the end, and a seeded sample of the rest."""
    rng = random.Random(size)
    return sorted({0, 1, size // 2, size - 1, size - 22, size - 40, *rng.sample(range(size), 40)})


def test_a_flipped_byte_torch_cannot_notice_is_caught_by_the_digest(saved: tuple[CheckpointStore, Path, bytes]) -> None:
    """A byte inside a tensor's data: torch.load succeeds with a wrong value; only the sha256 tells."""
    ckpt, path, original = saved
    embedding = training_state()["model"]["embedding"].numpy().tobytes()
    position = original.index(embedding) + len(embedding) // 2
    damaged = bytearray(original)
    damaged[position] ^= 0x01
    path.write_bytes(damaged)
    with pytest.raises(CorruptCheckpoint, match="sha256 differs from the one its marker recorded"):
        ckpt.load(step=1)
    with pytest.raises(CorruptCheckpoint, match="sha256"):
        ckpt.load()  # the latest: no older step to fall back to, the corruption is reported


def test_a_payload_with_one_flipped_byte_is_a_corrupt_checkpoint(saved: tuple[CheckpointStore, Path, bytes]) -> None:
    """Whatever torch makes of the damaged bytes (loads wrong values, or fails), load reports the sha256."""
    ckpt, path, original = saved
    escaped: dict[int, str] = {}
    for position in flip_positions(len(original)):
        damaged = bytearray(original)
        damaged[position] ^= 0x01
        path.write_bytes(damaged)
        try:
            ckpt.load(step=1)
        except CorruptCheckpoint as exc:
            assert "sha256" in str(exc) and str(path) in str(exc), (position, exc)
        except Exception as exc:  # collected, to list every escape at once
            escaped[position] = f"{type(exc).__name__}: {str(exc)[:80]}"
        else:
            escaped[position] = "loaded without error"
    assert not escaped, f"flipped bytes not reported as CorruptCheckpoint: {escaped}"


def test_a_truncated_payload_is_a_corrupt_checkpoint(saved: tuple[CheckpointStore, Path, bytes]) -> None:
    ckpt, path, original = saved
    for keep in (0, 1, len(original) // 2, len(original) - 1):
        path.write_bytes(original[:keep])
        with pytest.raises(CorruptCheckpoint, match=rf"{keep} bytes, but its marker recorded {len(original)}"):
            ckpt.load(step=1)
    path.write_bytes(original)
    assert_same(ckpt.load(step=1), training_state())


def test_the_thread_mode_completes_futures_later() -> None:
    """The Source's thread mode hands out futures a worker completes afterwards (the mode tests rely on it)."""
    gate = threading.Event()
    with ThreadPoolExecutor(1) as one_worker:
        blocked = one_worker.submit(gate.wait)
        source = Source(payload(4 * BLOCK), one_worker, mode="thread")
        future = source.fetch(0, BLOCK)
        assert not future.done()
        gate.set()
        assert blocked.result() and bytes(future.result()) == payload(4 * BLOCK)[:BLOCK]
