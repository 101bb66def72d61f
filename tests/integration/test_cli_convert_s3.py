"""``s3pipes convert`` / ``verify`` against SeaweedFS, configured like a user would: ``AWS_*`` variables."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

import s3pipes as sp
from s3pipes import Store
from s3pipes.cli import main
from s3pipes.server import LocalS3Server

pytestmark = pytest.mark.integration


def png(label: int, i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (label * 25, i, 255 - i)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_convert_then_verify_on_s3(
    s3_server: LocalS3Server,
    s3_store: Store,
    s3_root: str,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    expected = {f"{i % 10}/{i:04d}": (i % 10, png(i % 10, i)) for i in range(100)}
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: s3_store.write_bytes(f"{s3_root}/raw/{k}.png", expected[k][1]), expected))
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)

    argv = ["convert", f"{s3_root}/raw/", f"{s3_root}/shards/", "--suffix", ".png", "--maxcount", "30"]
    code = main([*argv, "--label-from-path", "1", "--workers", "2", "--no-progress"])
    out, err = capfd.readouterr()  # fd level: the worker processes too
    assert (code, err) == (0, ""), out
    assert "wrote 4 shards, 100 samples" in out

    verify = subprocess.run(
        [sys.executable, "-m", "s3pipes.cli", "verify", f"{s3_root}/shards/"],
        capture_output=True,
        text=True,
        env={**os.environ, **s3_server.env()},
        timeout=120,
    )
    assert (verify.returncode, verify.stderr) == (0, "")
    assert verify.stdout.startswith("OK: 4 shards, 100 samples, ") and f"under {s3_root}/shards/" in verify.stdout

    pipe = sp.list_prefix(f"{s3_root}/shards/", suffix=".tar", store=s3_store).open_object().untar().group_by_key()
    got = {s["__key__"]: (int(s["cls"]), s["png"]) for s in pipe}
    assert got == expected
    decoded = next(iter(sp.webdataset(f"{s3_root}/shards/", store=s3_store).decode("pil")))
    assert decoded["png"].size == (4, 4) and decoded["cls"] == 0

    for text in (out, err, verify.stdout, verify.stderr):
        assert s3_server.secret not in text


@pytest.fixture
def scheduler() -> Iterator[str]:
    """The address of a 2-process LocalCluster, as ``--dask`` takes it."""
    from distributed import LocalCluster

    with warnings.catch_warnings():
        # The scheduler serves its health routes on 8787 when free, else elsewhere with this warning.
        warnings.filterwarnings("ignore", message="Port 8787 is already in use", category=UserWarning)
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    try:
        yield str(cluster.scheduler_address)
    finally:
        cluster.close()


def test_dask_writes_what_one_process_writes(
    scheduler: str, s3_server: LocalS3Server, s3_store: Store, s3_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(20):
        s3_store.write_bytes(f"{s3_root}/raw/{i % 2}/{i:04d}.png", png(i % 2, i))
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    common = ["--suffix", ".png", "--maxcount", "6", "--label-from-path", "1", "--no-progress"]
    assert main(["convert", f"{s3_root}/raw/", f"{s3_root}/serial/", *common]) == 0
    assert main(["convert", f"{s3_root}/raw/", f"{s3_root}/dask/", *common, "--dask", scheduler]) == 0
    assert main(["verify", f"{s3_root}/dask/"]) == 0
    serial, dask = s3_store.list(f"{s3_root}/serial/", suffix=".tar"), s3_store.list(f"{s3_root}/dask/", suffix=".tar")
    assert len(serial) == len(dask) == 4
    assert s3_store.read_ranges(serial) == s3_store.read_ranges(dask)
