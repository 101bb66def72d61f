"""sync_checkpoints / watch_checkpoints against SeaweedFS: round trip, named errors, watch mode."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import s3pipes
from s3pipes import Store
from s3pipes.checkpoint.sync import SyncResult, sync_checkpoints, watch_checkpoints
from s3pipes.server import LocalS3Server

pytestmark = pytest.mark.integration


def local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_round_trip_restore_and_nothing_to_upload_after(s3_store: Store, s3_root: str, tmp_path: Path) -> None:
    url, local = f"{s3_root}/job/checkpoints", tmp_path / "training"
    files = {
        "step-1/model.pt": os.urandom(12 << 20),  # several multipart parts
        "step-1/optim.pt": os.urandom(1000),
        "latest": b"step-1",
        "empty": b"",
    }
    for rel, data in files.items():
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(data)

    first = sync_checkpoints(local, url, store=s3_store, progress=False)

    assert (first.uploaded, first.uploaded_bytes) == (4, sum(map(len, files.values())))
    assert sorted(s3_store.list(url + "/")) == sorted(f"{url}/{rel}" for rel in files)
    # A new job on another machine: restore into an empty directory.
    fresh = tmp_path / "restored"
    restored = sync_checkpoints(fresh, url, store=s3_store, progress=False)
    assert (restored.restored, restored.uploaded, restored.unchanged) == (4, 0, 4)
    assert local_files(fresh) == files
    # Later starts (no memory of these passes) find nothing to upload, on either side:
    # S3 keeps whole seconds, so a file uploaded within the second it was written still counts as unchanged.
    assert sync_checkpoints(fresh, url, store=s3_store, progress=False) == SyncResult(unchanged=4)
    assert sync_checkpoints(local, url, store=s3_store, progress=False) == SyncResult(unchanged=4)


@pytest.mark.parametrize("newer", ["directory", "object"])
def test_a_name_both_object_and_directory_in_the_store_restores_the_newer(
    s3_store: Store, s3_root: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, newer: str
) -> None:
    """A file synced, then replaced by a directory of the same name (or the reverse): the bucket
    keeps both (sync never deletes); a restore takes the newer one instead of failing forever."""
    url = f"{s3_root}/job/checkpoints"
    writes = [("ckpt", b"a file"), ("ckpt/model.pt", b"a directory's file")]
    for rel, data in writes if newer == "directory" else writes[::-1]:
        s3_store.write_bytes(f"{url}/{rel}", data)
        time.sleep(1.1)  # S3 keeps whole seconds
    local = tmp_path / "restarted"
    with caplog.at_level("WARNING", logger="s3pipes"):
        result = sync_checkpoints(local, url, store=s3_store, progress=False)
    expected = {"ckpt/model.pt": b"a directory's file"} if newer == "directory" else {"ckpt": b"a file"}
    assert result.restored == 1 and local_files(local) == expected
    assert f"{url}/ckpt is both an object and a directory" in caplog.text and f"the newer {newer}" in caplog.text
    assert sync_checkpoints(local, url, store=s3_store, progress=False).restored == 0, "the restore finished"


@pytest.mark.parametrize("local_state", ["empty", "non-empty"])
def test_missing_bucket_is_named(s3_store: Store, tmp_path: Path, local_state: str) -> None:
    url = "s3://no-such-bucket-for-sync/run/checkpoints"
    if local_state == "non-empty":
        (tmp_path / "a.pt").write_bytes(b"a")
    with pytest.raises(s3pipes.BucketNotFound, match=re.escape("s3://no-such-bucket-for-sync")) as info:
        sync_checkpoints(tmp_path, url, store=s3_store, progress=False)
    assert isinstance(info.value, FileNotFoundError)


def test_watch_uploads_over_s3(s3_store: Store, s3_root: str, tmp_path: Path) -> None:
    url, local = f"{s3_root}/watched", tmp_path / "local"
    with watch_checkpoints(local, url, store=s3_store, interval=0.1, progress=False) as watcher:
        (local / "step-1.pt").write_bytes(b"one" * 1000)
        wait_for(lambda: s3_store.exists(f"{url}/step-1.pt"))
        (local / "step-1.pt").write_bytes(b"ONE" * 1000)  # rewritten in place: uploaded again
        wait_for(lambda: s3_store.read_bytes(f"{url}/step-1.pt") == b"ONE" * 1000)
        (local / "sub").mkdir()
        (local / "sub" / "step-2.pt").write_bytes(b"two")  # the final pass takes it
    assert watcher.result.uploaded == 3
    assert s3_store.read_bytes(f"{url}/sub/step-2.pt") == b"two"


def test_watch_with_a_read_only_identity_raises_access_denied_on_stop(
    s3_server: LocalS3Server, s3_root: str, tmp_path: Path
) -> None:
    url, local = f"{s3_root}/readonly", tmp_path / "local"
    store = Store(s3_server.readonly_storage_options)
    watcher = watch_checkpoints(local, url, store=store, interval=0.1, progress=False)  # listing is allowed
    (local / "step-1.pt").write_bytes(b"one")
    wait_for(lambda: not watcher.running)
    with pytest.raises(s3pipes.AccessDenied, match=re.escape(f"{url}/step-1.pt")) as info:
        watcher.stop()
    assert s3_server.readonly_secret not in str(info.value)
