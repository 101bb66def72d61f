"""transfer.py against SeaweedFS: parallel multipart uploads and windowed downloads, atomicity, named errors.

Sizes: 5 MiB parts (S3's minimum) and 1 MiB download blocks, so a ~20 MiB state crosses
several parts and many blocks. Open multipart uploads are listed with the store's own
s3fs client (``list_multipart_uploads``): a failed save must leave none behind.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, cast

import pytest
import torch

import s3pipes
from s3pipes import Store
from s3pipes.checkpoint import CheckpointStore, CorruptCheckpoint
from s3pipes.server import LocalS3Server
from s3pipes.transfer import open_download, open_upload

pytestmark = pytest.mark.integration

PART = 5 << 20  # S3's smallest part
BLOCK = 1 << 20
WRONG_SECRET = "not-the-secret-of-this-server"


@pytest.fixture(params=["fast", "botocore"])
def store(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, s3_server: LocalS3Server
) -> Store:
    """A Store on each upload/download path: explicit credentials take the aiohttp path of ``_fastget``;
    credentials from a profile (botocore's chain) take s3fs/aiobotocore (``_BotocoreParts``, ``_cat_file``)."""
    if request.param == "fast":
        chosen = Store(s3_server.storage_options)
    else:
        credentials = tmp_path / "credentials"
        credentials.write_text(
            f"[default]\naws_access_key_id = {s3_server.key}\naws_secret_access_key = {s3_server.secret}\n"
        )
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
        chosen = Store({"endpoint_url": s3_server.endpoint_url})
    # the one private look: that the parameter really selects the path it names
    assert (chosen._fast_getter("s3://bucket/key") is not None) == (request.param == "fast")
    return chosen


class SaveFailed(Exception):
    """What a test raises to make a save fail."""


def big_state(seed: int = 0, tensors: int = 5) -> dict[str, Any]:
    """``tensors`` x 4 MiB of float32 (default ~20 MiB: four full 5 MiB parts and a short one), plus small values."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, Any] = {f"layer{i}": torch.randn(1 << 20, generator=generator) for i in range(tensors)}
    state["step"] = torch.tensor(seed)
    state["meta"] = {"seed": seed, "name": "big"}
    return state


def assert_same(loaded: dict[str, Any], expected: dict[str, Any]) -> None:
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(loaded[key], value), key
        else:
            assert loaded[key] == value, key


def serialized(state: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def bucket_and_key(url: str) -> tuple[str, str]:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    return bucket, key


def open_uploads(store: Store, url: str) -> list[str]:
    """Keys of the multipart uploads still open under ``url``'s prefix, as the store lists them."""
    fs, _ = store.resolve(url)
    bucket, key = bucket_and_key(url)
    reply = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key)
    return [upload["Key"] for upload in reply.get("Uploads", [])]


def download(store: Store, url: str) -> tuple[Any, str | None]:
    with open_download(store, url, sha256=True, block_size=BLOCK) as reader:
        return torch.load(cast(IO[bytes], reader), weights_only=True), reader.finish()


# -- round trips ----------------------------------------------------------------------------------


def test_a_multipart_upload_downloads_equal(store: Store, s3_root: str) -> None:
    url, state = f"{s3_root}/state.pt", big_state()
    with open_upload(store, url, part_size=PART, in_flight=2) as file:
        torch.save(state, file)
        assert not store.exists(url), "nothing is visible before the close"
        assert open_uploads(store, url) == [bucket_and_key(url)[1]], "the parts go up while torch.save writes"
    expected = serialized(state)
    info = store.info(url)
    assert info["size"] == len(expected) and info["ETag"].strip('"').endswith(f"-{-(-len(expected) // PART)}")
    loaded, digest = download(store, url)
    assert_same(loaded, state)
    assert digest == hashlib.sha256(expected).hexdigest() == hashlib.sha256(store.read_bytes(url)).hexdigest()
    assert open_uploads(store, url) == []


@pytest.mark.parametrize("size", [0, 1, PART - 1, PART, PART + 1, 2 * PART])
def test_raw_bytes_round_trip_at_part_boundaries(store: Store, s3_root: str, size: int) -> None:
    """0 bytes and less than a part: one PUT; exactly n parts: no empty last part (S3 would refuse it)."""
    url, data = f"{s3_root}/raw-{size}.bin", bytes(range(251)) * (size // 251) + bytes(size % 251)
    with open_upload(store, url, part_size=PART, in_flight=2) as file:
        for start in range(0, size, 3 << 20):  # writes that do not line up with the parts
            assert file.write(data[start : start + (3 << 20)]) == len(data[start : start + (3 << 20)])
    assert store.read_bytes(url) == data
    etag = store.info(url)["ETag"].strip('"')
    assert ("-" in etag) == (size >= PART), f"{etag=}: multipart exactly when a whole part was written"
    with open_download(store, url, sha256=True, block_size=BLOCK) as reader:
        assert reader.read() == data
        assert reader.finish() == hashlib.sha256(data).hexdigest()


def test_a_small_state_is_one_put_and_downloads_equal(s3_store: Store, s3_root: str) -> None:
    url, state = f"{s3_root}/small.pt", {"w": torch.arange(1000), "lr": 0.1}
    with open_upload(s3_store, url, part_size=PART, in_flight=2) as file:
        torch.save(state, file)
        assert open_uploads(s3_store, url) == [], "less than a part: no multipart upload at all"
    assert "-" not in s3_store.info(url)["ETag"]
    loaded, digest = download(s3_store, url)
    assert_same(loaded, state)
    assert digest == hashlib.sha256(serialized(state)).hexdigest()


def test_checkpoint_store_round_trip_of_a_20_mib_state(s3_server: LocalS3Server, s3_store: Store, s3_root: str) -> None:
    ckpt, state = CheckpointStore(s3_root, store=s3_store), big_state(seed=1)
    url = ckpt.save(state, step=1)
    assert s3_store.info(url)["size"] == len(serialized(state))
    assert_same(CheckpointStore(s3_root, store=Store(s3_server.storage_options)).load(step=1), state)
    assert open_uploads(s3_store, s3_root) == []


# -- failures publish nothing ---------------------------------------------------------------------


class FailAfter:
    """A file that passes writes to ``file`` until ``limit`` bytes went through, then raises (a full disk, say).

    ``before_failing`` runs just before it raises (to look at the store at that moment).
    """

    def __init__(self, file: Any, limit: int, before_failing: Callable[[], None]) -> None:
        self.file, self.limit, self.written, self.before_failing = file, limit, 0, before_failing

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        if self.written + size > self.limit:
            self.before_failing()
            raise SaveFailed(f"failed after {self.written} bytes")
        self.written += size
        return int(self.file.write(data))

    def flush(self) -> None:
        self.file.flush()


@pytest.mark.parametrize("replacing", [False, True], ids=["new", "replacing"])
@pytest.mark.parametrize("failure", ["writer", "after-save"])
def test_a_failed_upload_publishes_nothing_and_aborts(
    store: Store, s3_root: str, failure: str, replacing: bool
) -> None:
    url = f"{s3_root}/state.pt"
    old = {"w": torch.arange(10)}
    if replacing:
        with open_upload(store, url, part_size=PART, in_flight=2) as file:
            torch.save(old, file)

    def assert_upload_open() -> None:
        assert open_uploads(store, url) == [bucket_and_key(url)[1]], "parts were going up when the save failed"

    with pytest.raises(Exception) as info, open_upload(store, url, part_size=PART, in_flight=2) as file:
        if failure == "writer":  # 3 parts sent, the 4th filling
            failing = cast(IO[bytes], FailAfter(file, 3 * PART + 123, before_failing=assert_upload_open))
            torch.save(big_state(tensors=4), failing)
        else:
            torch.save(big_state(tensors=4), file)  # everything written; the close never comes
            assert_upload_open()
            raise SaveFailed("the training step crashed")
    assert isinstance(info.value, SaveFailed) or isinstance(info.value.__context__, SaveFailed), info.value
    assert open_uploads(store, url) == [], "the failed upload was aborted"
    if replacing:
        assert_same(download(store, url)[0], old)
    else:
        assert not store.exists(url)


def test_a_save_whose_pickling_fails_publishes_nothing(s3_store: Store, s3_root: str) -> None:
    class Unpicklable:
        def __reduce__(self) -> Any:
            raise SaveFailed("cannot pickle this")

    ckpt = CheckpointStore(s3_root, store=s3_store)
    ckpt.save({"w": torch.arange(10)}, key="model.pt")
    with pytest.raises(SaveFailed):
        ckpt.save({"big": big_state(tensors=3), "bad": Unpicklable()}, key="model.pt")
    with pytest.raises(SaveFailed):
        ckpt.save({"big": big_state(tensors=3), "bad": Unpicklable()}, step=1)
    assert torch.equal(ckpt.load(key="model.pt")["w"], torch.arange(10)), "the old object is intact"
    assert ckpt.steps() == [] and not s3_store.exists(ckpt.step_url(1) + "/state.pt")
    assert open_uploads(s3_store, s3_root) == []


def test_a_payload_replaced_behind_the_markers_back_is_corrupt(s3_store: Store, s3_root: str) -> None:
    ckpt = CheckpointStore(s3_root, store=s3_store)
    url = ckpt.save(big_state(seed=1, tensors=3), step=1)
    original = s3_store.read_bytes(url)
    other = serialized(big_state(seed=2, tensors=3))  # same shapes, other values
    assert len(other) == len(original) and other != original
    for replacement in (other, original[:-5_000_000] + b"\x01" + original[-4_999_999:]):  # a whole save; one byte
        s3_store.write_bytes(url, replacement)
        with pytest.raises(CorruptCheckpoint, match="sha256") as info:
            ckpt.load(step=1)
        assert url in str(info.value)
    s3_store.write_bytes(url, original)
    assert_same(ckpt.load(step=1), big_state(seed=1, tensors=3))


# -- named errors ---------------------------------------------------------------------------------


def test_missing_bucket_on_upload_is_named_at_the_first_request(s3_store: Store, s3_server: LocalS3Server) -> None:
    """Less than a part: the PUT at close fails. More: the first part's request, inside write, fails."""
    url = "s3://no-such-bucket-for-transfer/run/state.pt"
    file = open_upload(s3_store, url, part_size=PART, in_flight=2)
    assert file.write(b"x" * (PART - 1)) == PART - 1  # buffered: no request yet
    with pytest.raises(s3pipes.BucketNotFound, match=url):
        file.close()
    with pytest.raises(s3pipes.BucketNotFound, match=url), open_upload(s3_store, url, part_size=PART) as file:
        file.write(b"x" * PART)
        raise AssertionError("the write of a whole part did not fail")

    ckpt = CheckpointStore("s3://no-such-bucket-for-transfer/run", store=s3_store)
    calls: dict[str, Callable[[], object]] = {
        "save step": lambda: ckpt.save(big_state(tensors=3), step=1),  # the marker's GET, before any byte is sent
        "save small key": lambda: ckpt.save({"w": torch.ones(2)}, key="model.pt"),  # the PUT at close
        "save big key": lambda: ckpt.save(big_state(tensors=3), key="model.pt"),  # the first part, in write
        "load": lambda: ckpt.load(step=1),
        "load key": lambda: ckpt.load(key="model.pt"),
    }
    for name, call in calls.items():
        with pytest.raises(s3pipes.BucketNotFound) as info:
            call()
        assert ckpt.url in str(info.value) and s3_server.endpoint_url in str(info.value), name


def test_a_store_error_during_save_keeps_its_backend_cause(s3_store: Store) -> None:
    """House rule 5: translated errors are raised ``from`` the backend's (here botocore's NoSuchBucket)."""
    ckpt = CheckpointStore("s3://no-such-bucket-for-transfer/run", store=s3_store)
    for state in ({"w": torch.ones(2)}, big_state(tensors=3)):  # failing at close; failing inside write
        with pytest.raises(s3pipes.BucketNotFound) as info:
            ckpt.save(state, key="model.pt")
        assert info.value.__cause__ is not None and "NoSuchBucket" in repr(info.value.__cause__), (
            f"{len(serialized(state))} bytes: cause {info.value.__cause__!r}"
        )


@pytest.mark.parametrize("size", ["small", "big"])
def test_the_read_only_identity_cannot_save_and_can_load(
    s3_server: LocalS3Server, s3_store: Store, s3_root: str, size: str
) -> None:
    state = {"w": torch.ones(2)} if size == "small" else big_state(tensors=3)
    CheckpointStore(s3_root, store=s3_store).save(state, step=1)
    reader = CheckpointStore(s3_root, store=Store(s3_server.readonly_storage_options))
    saves: list[Callable[[], object]] = [lambda: reader.save(state, step=2), lambda: reader.save(state, key="model.pt")]
    for call in saves:
        with pytest.raises(s3pipes.AccessDenied) as info:
            call()
        assert s3_root in str(info.value) and s3_server.readonly_secret not in str(info.value)
    assert_same(reader.load(step=1), state)
    assert reader.steps() == [1] and not s3_store.exists(f"{s3_root}/model.pt")
    assert open_uploads(s3_store, s3_root) == []


@pytest.mark.parametrize("size", ["small", "big"])
def test_a_wrong_secret_is_named_on_save_and_load_and_never_shown(
    s3_server: LocalS3Server, s3_store: Store, s3_root: str, size: str
) -> None:
    state = {"w": torch.ones(2)} if size == "small" else big_state(tensors=3)
    good = CheckpointStore(s3_root, store=s3_store)
    good.save(state, step=1)
    good.save(state, key="model.pt")
    wrong = Store({**s3_server.storage_options, "secret": WRONG_SECRET})
    ckpt = CheckpointStore(s3_root, store=wrong)
    calls: dict[str, Callable[[], object]] = {
        "save step": lambda: ckpt.save(state, step=2),
        "save key": lambda: ckpt.save(state, key="other.pt"),
        "load step": lambda: ckpt.load(step=1),
        "load key": lambda: ckpt.load(key="model.pt"),
        "upload": lambda: upload_bytes(wrong, f"{s3_root}/raw.pt", serialized(state)),  # write or close raises
    }
    for name, call in calls.items():
        with pytest.raises(s3pipes.SignatureMismatch) as info:
            call()
        text = f"{info.value} {info.value!r} {info.value.__cause__!r}"
        assert s3_root in str(info.value) and WRONG_SECRET not in text and s3_server.secret not in text, name
    assert (
        good.steps() == [1] and not s3_store.exists(f"{s3_root}/other.pt") and not s3_store.exists(f"{s3_root}/raw.pt")
    )


def upload(store: Store, url: str, state: object) -> None:
    with open_upload(store, url, part_size=PART, in_flight=2) as file:
        torch.save(state, file)


def upload_bytes(store: Store, url: str, data: bytes) -> None:
    """Without torch.save, which replaces an error raised by write with its own RuntimeError."""
    with open_upload(store, url, part_size=PART, in_flight=2) as file:
        file.write(data)


def test_a_wrong_secret_fails_the_windowed_gets_and_the_reader_keeps_the_error(
    s3_server: LocalS3Server, s3_store: Store, s3_root: str
) -> None:
    """With the size known (a marker records it) no HEAD runs first: the ranged GETs themselves are refused."""
    url = f"{s3_root}/state.pt"
    upload(s3_store, url, big_state(tensors=3))
    wrong = Store({**s3_server.storage_options, "secret": WRONG_SECRET})
    with open_download(wrong, url, size=s3_store.info(url)["size"], block_size=BLOCK) as reader:
        with pytest.raises(s3pipes.SignatureMismatch) as info:
            reader.read(10)
        assert reader.error is info.value and url in str(info.value) and WRONG_SECRET not in str(info.value)
        reader.seek(-10, io.SEEK_END)  # a side read, outside the window
        with pytest.raises(s3pipes.SignatureMismatch):
            reader.read(10)


def test_an_object_deleted_while_downloading_is_named(s3_store: Store, s3_root: str) -> None:
    url = f"{s3_root}/state.pt"
    upload(s3_store, url, big_state(tensors=3))
    with open_download(s3_store, url, block_size=BLOCK, in_flight=2) as reader:
        assert len(reader.read(BLOCK)) == BLOCK  # block 0 read, blocks 1 and 2 requested (and maybe received)
        s3_store.delete(url)
        reader.seek(8 * BLOCK)  # beyond the window: a GET now
        with pytest.raises(s3pipes.ObjectNotFound, match=url):
            reader.read(10)
