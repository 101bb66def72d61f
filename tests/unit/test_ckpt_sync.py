"""sync_checkpoints / watch_checkpoints against memory:// and file:// stores and a tmp_path directory."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest

from s3pipes import Store, errors
from s3pipes.checkpoint.sync import CheckpointWatcher, SyncResult, _syncer, sync_checkpoints, watch_checkpoints

FILES = {"model.pt": b"weights" * 100, "sub/optim.pt": b"moments", "sub/deeper/rng.bin": b"\x00\x01\x02"}
SIZE = sum(map(len, FILES.values()))  # 710


class HookStore(Store):
    """A real Store that calls ``hook(url, mode)`` before opening an object: the training job acting meanwhile."""

    def __init__(self, hook: Callable[[str, str], None]) -> None:
        super().__init__()
        self.hook = hook

    def open(self, url: str, mode: str = "rb", **kwargs: Any) -> IO[bytes]:
        self.hook(url, mode)
        return super().open(url, mode, **kwargs)


@pytest.fixture(params=["memory", "file"])
def remote(request: pytest.FixtureRequest, mem_root: str, tmp_path: Path) -> str:
    return f"{mem_root}/run/ckpt" if request.param == "memory" else f"file://{tmp_path}/remote/run/ckpt"


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def remote_files(store: Store, url: str) -> dict[str, bytes]:
    try:
        urls = store.list(url + "/")
    except errors.ObjectNotFound:
        return {}
    return {u[len(url) + 1 :]: store.read_bytes(u) for u in urls}


def local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def sync(local: Path, url: str, store: Store | None = None, **kwargs: Any) -> SyncResult:
    return sync_checkpoints(local, url, store=store or Store(), progress=False, **kwargs)


# -- restore ----------------------------------------------------------------------------------------


def test_restore_into_missing_dir_keeps_names_bytes_and_mtimes(remote: str, tmp_path: Path) -> None:
    store = Store()
    for rel, data in FILES.items():
        store.write_bytes(f"{remote}/{rel}", data)
    local = tmp_path / "local" / "checkpoints"  # does not exist yet

    result = sync(local, remote)

    assert local_files(local) == FILES  # no marker, no temporary file left
    assert (result.restored, result.restored_bytes, result.uploaded) == (3, SIZE, 0)
    assert repr(result) == "SyncResult(restored=3 (710 B), uploaded=0 (0 B), unchanged=3, skipped=0)"
    # A later start (no memory of this one) sees the restored files as unchanged.
    assert sync(local, remote) == SyncResult(unchanged=3)


def test_restore_into_empty_dir_then_new_files_are_uploaded(remote: str, tmp_path: Path) -> None:
    store = Store()
    store.write_bytes(f"{remote}/step-1.pt", b"one")
    local = tmp_path / "local"
    (local / "empty-subdir").mkdir(parents=True)  # directories without files count as empty

    assert sync(local, remote).restored == 1
    (local / "step-2.pt").write_bytes(b"two")
    assert sync(local, remote) == SyncResult(uploaded=1, uploaded_bytes=3, unchanged=1)
    assert remote_files(store, remote) == {"step-1.pt": b"one", "step-2.pt": b"two"}


def test_no_restore_into_a_non_empty_dir(remote: str, tmp_path: Path) -> None:
    store = Store()
    store.write_bytes(f"{remote}/old.pt", b"old")
    local = tmp_path / "local"
    write_files(local, {"mine.pt": b"mine"})

    result = sync(local, remote)

    assert local_files(local) == {"mine.pt": b"mine"}
    assert (result.restored, result.uploaded) == (0, 1)
    assert remote_files(store, remote) == {"mine.pt": b"mine", "old.pt": b"old"}  # never deletes remotely


def test_a_restore_interrupted_by_an_error_is_finished_by_the_next_start(mem_root: str, tmp_path: Path) -> None:
    url, local = f"{mem_root}/ckpt", tmp_path / "local"
    for rel, data in FILES.items():
        Store().write_bytes(f"{url}/{rel}", data)

    def drop(target: str, mode: str) -> None:
        if target.endswith("optim.pt"):
            raise errors.ConnectionDropped(target, "memory", "connection reset by peer")

    with pytest.raises(errors.ConnectionDropped, match=r"optim\.pt"):
        sync(local, url, HookStore(drop), workers=1)
    assert local_files(local).keys() == {"model.pt", "sub/deeper/rng.bin", ".s3pipes-restore-incomplete"}

    result = sync(local, url)  # not empty, but the marker says the restore did not finish

    assert (result.restored, result.uploaded, result.unchanged) == (1, 0, 3)
    assert local_files(local) == FILES


# -- upload -----------------------------------------------------------------------------------------


def test_uploads_new_and_changed_files_only(remote: str, tmp_path: Path) -> None:
    store, local = Store(), tmp_path / "local"
    write_files(local, FILES)
    assert sync(local, remote) == SyncResult(uploaded=3, uploaded_bytes=SIZE)
    assert remote_files(store, remote) == FILES
    assert sync(local, remote) == SyncResult(unchanged=3)

    (local / "model.pt").write_bytes(b"new weights")  # changed size
    now = time.time_ns()
    os.utime(local / "sub/optim.pt", ns=(now, now))  # same size, newer than its object: touched or rewritten
    (local / "sub/new.pt").write_bytes(b"new")

    result = sync(local, remote)

    assert (result.uploaded, result.unchanged) == (3, 1)
    assert remote_files(store, remote) == {**FILES, "model.pt": b"new weights", "sub/new.pt": b"new"}
    assert sync(local, remote) == SyncResult(unchanged=4)


def test_excluded_files_are_neither_uploaded_nor_restored(mem_root: str, tmp_path: Path) -> None:
    store, url, local = Store(), f"{mem_root}/ckpt", tmp_path / "local"
    write_files(local, {"a.pt": b"a", "a.pt.tmp": b"half", "logs/events.log": b"log", "b.pt~": b"backup"})

    result = sync(local, url, exclude=("*.tmp", "logs/*", "*~"))

    assert result.uploaded == 1 and remote_files(store, url) == {"a.pt": b"a"}
    store.write_bytes(f"{url}/c.tmp", b"tmp")
    fresh = tmp_path / "fresh"
    assert sync(fresh, url).restored == 1 and local_files(fresh) == {"a.pt": b"a"}
    assert sync(tmp_path / "default", url).restored == 1  # the default excludes *.tmp too


def test_a_file_deleted_before_its_upload_is_skipped(mem_root: str, tmp_path: Path, caplog: Any) -> None:
    url, local = f"{mem_root}/ckpt", tmp_path / "local"
    write_files(local, {"a.pt": b"a", "b.pt": b"b"})

    def retention(target: str, mode: str) -> None:  # the job deletes an old checkpoint meanwhile
        if mode == "wb" and target.endswith("a.pt"):
            (local / "b.pt").unlink()

    with caplog.at_level(logging.INFO, logger="s3pipes.checkpoint.sync"):
        result = sync(local, url, HookStore(retention), workers=1)

    assert (result.uploaded, result.skipped) == (1, 1)
    assert remote_files(Store(), url) == {"a.pt": b"a"}
    assert any("skipped" in r.getMessage() and "b.pt" in r.getMessage() for r in caplog.records)


def test_store_errors_name_the_url(tmp_path: Path) -> None:
    local = tmp_path / "local"
    write_files(local, {"sub/a.pt": b"a"})
    (tmp_path / "remote").mkdir()
    (tmp_path / "remote" / "sub").write_bytes(b"a file where the prefix needs a directory")
    url = f"file://{tmp_path}/remote"

    with pytest.raises(errors.StoreRequestError, match=re.escape(f"{url}/sub/a.pt")):
        sync(local, url)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"url": "s3://"}, "url="),
        ({"url": ""}, "url="),
        ({"exclude": "*.tmp"}, "exclude="),
        ({"workers": 0}, "workers="),
        ({"interval": 0}, "interval="),
    ],
)
def test_invalid_arguments_are_named(mem_root: str, tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"url": mem_root, "store": Store(), "progress": False, **kwargs}
    with pytest.raises(ValueError, match=message):
        watch_checkpoints(tmp_path, **arguments)
    file = tmp_path / "file"
    file.write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="file"):
        sync(file, mem_root)


# -- watch ------------------------------------------------------------------------------------------


def test_watch_uploads_a_new_file_and_stop_runs_a_final_pass(remote: str, tmp_path: Path) -> None:
    store, local = Store(), tmp_path / "local"
    write_files(local, {"step-0.pt": b"zero"})

    with watch_checkpoints(local, remote, store=store, interval=0.1, progress=False) as watcher:
        assert watcher.running and watcher.result == SyncResult(uploaded=1, uploaded_bytes=4)
        (local / "step-1.pt").write_bytes(b"one")
        wait_for(lambda: "step-1.pt" in remote_files(store, remote))
        (local / "step-2.pt").write_bytes(b"two")  # no time to settle: the final pass takes it

    assert not watcher.running
    assert remote_files(store, remote) == {"step-0.pt": b"zero", "step-1.pt": b"one", "step-2.pt": b"two"}
    assert watcher.stop() == watcher.result  # idempotent
    assert (watcher.result.uploaded, watcher.result.uploaded_bytes) == (3, 10)
    assert "stopped" in repr(watcher)


def test_a_growing_file_is_uploaded_once_stable_and_again_if_it_changed_during_upload(
    mem_root: str, tmp_path: Path
) -> None:
    url, local = f"{mem_root}/ckpt", tmp_path / "local"
    local.mkdir()
    grow_during_upload = [True]

    def writer_still_busy(target: str, mode: str) -> None:
        if mode == "wb" and grow_during_upload.pop() if grow_during_upload else False:
            with open(local / "big.pt", "ab") as f:
                f.write(b"-tail")

    syncer = _syncer(local, url, HookStore(writer_still_busy), (), False, 2)
    syncer.final_pass(syncer.list_remote())  # the watcher's first pass
    path = local / "big.pt"

    path.write_bytes(b"part1")
    assert syncer.upload_pass(settle=True).result.uploaded == 0  # first look
    with open(path, "ab") as f:
        f.write(b"part2")
    assert syncer.upload_pass(settle=True).result.uploaded == 0  # grew since
    assert remote_files(Store(), url) == {}
    outcome = syncer.upload_pass(settle=True)  # same twice: uploaded; the writer appends meanwhile
    assert outcome.result.uploaded == 1 and outcome.changed == ["big.pt"]
    assert syncer.upload_pass(settle=True).result.uploaded == 0  # changed since the look before the upload
    assert syncer.upload_pass(settle=True).result.uploaded == 1
    assert remote_files(Store(), url) == {"big.pt": b"part1part2-tail"}
    assert syncer.upload_pass(settle=True).result == SyncResult(unchanged=1)


def test_an_error_in_the_watcher_is_raised_by_stop(tmp_path: Path, caplog: Any) -> None:
    local, url = tmp_path / "local", f"file://{tmp_path}/remote"
    watcher = watch_checkpoints(local, url, store=Store(), interval=0.1, progress=False)
    (tmp_path / "remote" / "sub").parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "remote" / "sub").write_bytes(b"a file where the upload needs a directory")
    write_files(local, {"sub/a.pt": b"a"})

    wait_for(lambda: not watcher.running)

    assert any("stop() raises this" in r.getMessage() for r in caplog.records)
    for _ in range(2):  # stop() is idempotent: the same error each time
        with pytest.raises(errors.StoreRequestError, match=re.escape(f"{url}/sub/a.pt")):
            watcher.stop()
    with pytest.raises(errors.StoreRequestError), watcher:
        pass


def test_the_watcher_retries_when_the_store_drops_the_connection(mem_root: str, tmp_path: Path, caplog: Any) -> None:
    url, local = f"{mem_root}/ckpt", tmp_path / "local"
    failures = [1]

    def flaky(target: str, mode: str) -> None:
        if mode == "wb" and failures:
            failures.pop()
            raise errors.ConnectionDropped(target, "memory", "connection reset by peer")

    with CheckpointWatcher(local, url, store=HookStore(flaky), interval=0.1, progress=False) as watcher:
        (local / "a.pt").write_bytes(b"a")
        wait_for(lambda: "a.pt" in remote_files(Store(), url))
        assert watcher.running
    assert watcher.result.uploaded == 1
    assert any("will retry" in r.getMessage() for r in caplog.records)


def test_leaving_with_an_exception_still_uploads_and_keeps_the_exception(mem_root: str, tmp_path: Path) -> None:
    url, local = f"{mem_root}/ckpt", tmp_path / "local"
    with (
        pytest.raises(RuntimeError, match="training crashed"),
        watch_checkpoints(local, url, store=Store(), interval=60, progress=False),
    ):
        (local / "last.pt").write_bytes(b"last")
        raise RuntimeError("training crashed")
    assert remote_files(Store(), url) == {"last.pt": b"last"}


def test_progress_shows_a_bytes_bar_on_stderr(
    mem_root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    local = tmp_path / "local"
    write_files(local, {"a.pt": b"x" * 3000})
    sync_checkpoints(local, f"{mem_root}/ckpt", store=Store(), progress=True)
    err = capsys.readouterr().err
    assert f"upload {mem_root}/ckpt" in err and "2.93k/2.93k" in err
    sync_checkpoints(local, f"{mem_root}/ckpt", store=Store(), progress=True)
    assert capsys.readouterr().err == ""  # nothing to transfer: no bar
