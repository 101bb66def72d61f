"""The embedded SeaweedFS: enforces credentials, versioning works, and no process outlives its owner."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import s3pipes
from s3pipes import Store
from s3pipes.server import LocalS3Server

pytestmark = pytest.mark.integration


def gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().split(") ")[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_credentials_are_enforced(s3_server: LocalS3Server, s3_root: str) -> None:
    Store(s3_server.storage_options).write_bytes(f"{s3_root}/x", b"1")
    with pytest.raises(s3pipes.CredentialsRejected):
        Store({**s3_server.storage_options, "secret": "guess"}).read_bytes(f"{s3_root}/x")


def test_missing_bucket_is_not_created_on_write(s3_server: LocalS3Server) -> None:
    store = Store(s3_server.storage_options)
    with pytest.raises(s3pipes.BucketNotFound):
        store.write_bytes("s3://never-created/x", b"1")
    assert "never-created" not in [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]


def test_versioned_bucket_keeps_every_version(s3_server: LocalS3Server) -> None:
    url = s3_server.create_bucket("versioned-test", versioned=True)
    store = Store(s3_server.storage_options)
    for epoch in range(3):
        store.write_bytes(f"{url}/model.pt", f"epoch {epoch}".encode())
    versions = s3_server.client().list_object_versions(Bucket="versioned-test", Prefix="model.pt")["Versions"]
    assert len(versions) == 3
    assert store.read_bytes(f"{url}/model.pt") == b"epoch 2"


def test_stop_kills_the_process_and_removes_the_data_dir_even_on_error(track_pid: Callable[[int], None]) -> None:
    server = LocalS3Server()
    with pytest.raises(RuntimeError, match="test body failed"), server:
        assert server.pid is not None and server.log_path is not None
        pid, data_dir = server.pid, server.log_path.parent
        track_pid(pid)
        raise RuntimeError("test body failed")
    assert gone(pid)
    assert not data_dir.exists()
    server.stop()  # idempotent


ORPHAN_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from s3pipes.server import LocalS3Server
    server = LocalS3Server().start()
    print(server.pid, server.log_path.parent, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no __exit__, no atexit: the owner just dies
    """
)


def test_weed_dies_with_a_killed_owner(track_pid: Callable[[int], None]) -> None:
    result = subprocess.run([sys.executable, "-c", ORPHAN_SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    pid, data_dir = int(result.stdout.split()[0]), Path(result.stdout.split()[1])
    track_pid(pid)
    try:
        assert gone(pid), f"weed {pid} outlived the process that started it"
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)  # its owner died before it could


def test_serve_prints_exports_and_stops_on_ctrl_c(tmp_path: Path, track_pid: Callable[[int], None]) -> None:
    command = [sys.executable, "-m", "s3pipes.cli", "serve", "--bucket", "demo", "--data-dir", str(tmp_path / "d")]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            lines = [process.stdout.readline() for _ in range(6)]
            exports = dict(line[len("export ") :].strip().split("=", 1) for line in lines if line.startswith("export "))
            assert set(exports) >= {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
            store = Store(
                {
                    "endpoint_url": exports["AWS_ENDPOINT_URL"],
                    "key": exports["AWS_ACCESS_KEY_ID"],
                    "secret": exports["AWS_SECRET_ACCESS_KEY"],
                }
            )
            store.write_bytes("s3://demo/hello.txt", b"hi")
            assert store.read_bytes("s3://demo/hello.txt") == b"hi"
            weed = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == process.pid]
            for pid in weed:
                track_pid(pid)
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=30) == 0
            assert weed and all(gone(pid) for pid in weed)
        finally:
            if process.poll() is None:
                process.kill()


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().split(") ")[1].split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return -1


def test_create_bucket_errors_are_translated(s3_server: LocalS3Server) -> None:
    with pytest.raises(s3pipes.InvalidURL, match="s3://ab"):
        s3_server.create_bucket("ab")  # too short for S3
