"""Shared fixtures.

- ``clean_env`` (autouse): no AWS_* variable, no AWS config file and no instance-metadata
  lookup leaks in from the machine running the tests.
- ``mem_root``: a fresh ``memory://`` prefix per test.
- ``s3_server``: one embedded SeaweedFS for the whole session (integration tests).
- ``s3_root``: a fresh prefix per test in the session's bucket, as an ``s3://`` URL.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import fsspec
import pytest

from s3pipes import Store
from s3pipes.server import LocalS3Server

_STARTED_PIDS: list[int] = []


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_") or name.startswith("FSSPEC_S3"):
            monkeypatch.delenv(name)
    nowhere = str(tmp_path_factory.getbasetemp() / "no-aws-config")
    monkeypatch.setenv("AWS_CONFIG_FILE", nowhere)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", nowhere)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask 169.254.169.254


@pytest.fixture
def mem_root() -> Iterator[str]:
    root = f"memory://test-{uuid.uuid4().hex[:12]}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[LocalS3Server]:
    with LocalS3Server() as server:
        assert server.pid is not None
        _STARTED_PIDS.append(server.pid)
        yield server


@pytest.fixture(scope="session")
def s3_bucket(s3_server: LocalS3Server) -> str:
    """One bucket for the session: SeaweedFS grows 7 volumes per bucket (~0.4 s), too slow per test."""
    return s3_server.create_bucket("tests")


@pytest.fixture
def s3_root(s3_bucket: str) -> str:
    """A fresh prefix per test, in the session's bucket, as an ``s3://`` URL without trailing slash."""
    return f"{s3_bucket}/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def s3_store(s3_server: LocalS3Server) -> Store:
    return Store(s3_server.storage_options)


@pytest.fixture
def track_pid() -> object:
    """Record a weed PID a test started, so the session checks it is gone at the end."""
    return _STARTED_PIDS.append


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    leaked = [pid for pid in _STARTED_PIDS if _alive(pid)]
    if leaked:
        print(f"\nERROR: weed processes started by the tests are still running: {leaked}")
        session.exitstatus = 1
