"""Sharded checkpoints against SeaweedFS: a real 2-rank gloo torchrun, then one process reads the steps.

The ranks run ``_dcp_worker.py`` (see its docstring); the run is its own session, killed as a
whole if it outlives :data:`TIMEOUT`, so a hang fails the test. The other tests run DCP in
the test process alone (no process group), as ``save_sharded`` allows.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

import s3pipes
from s3pipes import Store
from s3pipes.checkpoint import CheckpointStore, CorruptCheckpoint
from s3pipes.server import LocalS3Server
from tests.integration._dcp_worker import COLS, ROWS, full_state
from tests.integration.test_distributed import free_port

pytestmark = pytest.mark.integration

WORKER = Path(__file__).with_name("_dcp_worker.py")
RANKS = 2
TIMEOUT = 120.0


def torchrun(server: LocalS3Server, run: str, out: Path) -> subprocess.CompletedProcess[str]:
    """Run the worker on RANKS local ranks; kill the whole process tree after TIMEOUT seconds."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(RANKS),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(WORKER),
    ]  # fmt: skip
    env = {
        **os.environ,  # the clean_env fixture already removed the machine's AWS_* settings
        "AWS_ENDPOINT_URL": server.endpoint_url,
        "AWS_ACCESS_KEY_ID": server.key,
        "AWS_SECRET_ACCESS_KEY": server.secret,
        "S3PIPES_TEST_RUN": run,
        "S3PIPES_TEST_OUT": str(out),
        "GLOO_SOCKET_IFNAME": "lo",  # loopback only, whatever the host name resolves to
        "OMP_NUM_THREADS": "1",
    }
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # torchrun and its ranks
            stdout, stderr = process.communicate()
            pytest.fail(f"torchrun did not finish within {TIMEOUT:.0f} s (killed)\n{stdout}\n{stderr[-5000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def assert_whole(state: Any, step: int) -> None:
    expected = full_state(step)
    assert set(state) == {"model", "data"} and set(state["model"]) == {"sharded", "replicated"}
    assert torch.equal(state["model"]["sharded"], expected["model"]["sharded"])
    assert torch.equal(state["model"]["replicated"], expected["model"]["replicated"])
    assert state["data"] == expected["data"]


def relative(store: Store, run: str) -> list[str]:
    return [url[len(run) + 1 :] for url in store.list(run + "/")]


def test_two_ranks_save_and_load_sharded_steps_that_one_process_then_loads_whole(
    s3_server: LocalS3Server, s3_store: Store, s3_root: str, tmp_path: Path
) -> None:
    result = torchrun(s3_server, s3_root, tmp_path)
    assert result.returncode == 0, result.stderr[-5000:]
    for rank in range(RANKS):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["urls"] == [f"{s3_root}/step-00000000{step}/dcp" for step in (1, 2)]
        assert report["steps"] == [2], "keep_last=1: retention deleted step 1"
        assert report["loaded"] == 2
        assert report["local_shape"] == [ROWS // RANKS, COLS], "each rank holds its rows only"
        assert report["local_equal"] and report["full_equal"] and report["replicated_equal"], report
        assert report["data"] == {"epoch": 2, "order": "seed=0"}
        assert report["missing"].startswith("CheckpointNotFound: ") and "Committed steps: 2" in report["missing"]

    assert relative(s3_store, s3_root) == [
        "latest.json",
        "step-000000002/COMMITTED.json",
        "step-000000002/dcp/.metadata",
        "step-000000002/dcp/__0_0.distcp",
        "step-000000002/dcp/__1_0.distcp",
    ]
    marker = json.loads(s3_store.read_bytes(f"{s3_root}/step-000000002/COMMITTED.json"))
    assert (marker["kind"], marker["step"], marker["payload"], marker["ranks"]) == ("dcp", 2, "dcp", 2)
    for name, size in marker["files"].items():
        assert s3_store.info(f"{s3_root}/step-000000002/{name}")["size"] == size > 0, name
    # Truly sharded: torch's own reader (same store options) finds one chunk of rows per rank.
    reader = FsspecReader(f"{s3_root}/step-000000002/dcp", **s3_store.resolved_options(s3_root))
    chunks = reader.read_metadata().state_dict_metadata["model.sharded"].chunks  # type: ignore[union-attr]
    assert sorted(tuple(chunk.offsets) for chunk in chunks) == [(0, 0), (ROWS // RANKS, 0)]

    ckpt = CheckpointStore(s3_root, store=s3_store)  # this process has no process group
    assert ckpt.steps() == [2] and ckpt.latest_step() == 2
    assert_whole(ckpt.load(2), 2)
    assert_whole(ckpt.load(), 2)


def test_a_deleted_shard_file_is_named_and_load_falls_back(
    s3_store: Store, s3_root: str, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = CheckpointStore(s3_root, store=s3_store)
    for step in (1, 2):
        ckpt.save_sharded(full_state(step), step=step)
    shard = f"{s3_root}/step-000000002/dcp/__0_0.distcp"
    s3_store.delete(shard)
    with pytest.raises(CorruptCheckpoint, match="missing, but its marker lists it") as info:
        ckpt.load(2)
    assert shard in str(info.value)
    assert ckpt.steps() == [1] and ckpt.latest_step() == 1
    with caplog.at_level(logging.WARNING):
        assert_whole(ckpt.load(), 1)  # the pointer's step is corrupt: the next newest, with a warning
    assert "falling back" in caplog.text
    fresh = {"model": {"sharded": torch.zeros(ROWS, COLS), "replicated": torch.zeros(4)}}
    fresh["data"] = {"epoch": -1, "order": ""}  # dcp.load fills the keys it is given
    assert ckpt.load_sharded(fresh) == 1
    assert_whole(fresh, 1)
    with pytest.raises(CorruptCheckpoint, match=r"__0_0\.distcp"):
        ckpt.load_sharded(fresh, step=2)
    s3_store.delete(f"{s3_root}/step-000000001/COMMITTED.json")  # now the corrupt step is the only one
    with pytest.raises(CorruptCheckpoint, match=r"__0_0\.distcp"):
        ckpt.load()


def test_a_missing_bucket_and_a_wrong_secret_are_named(s3_server: LocalS3Server, s3_store: Store, s3_root: str) -> None:
    missing = CheckpointStore("s3://no-such-dcp-bucket/project/run", store=s3_store)
    for call in (lambda: missing.save_sharded({"w": torch.ones(2)}, step=1), lambda: missing.load_sharded({})):
        with pytest.raises(s3pipes.BucketNotFound) as info:
            call()
        assert "s3://no-such-dcp-bucket/project/run" in str(info.value)
        assert s3_server.endpoint_url in str(info.value)
    with pytest.raises(s3pipes.BucketNotFound):  # and saving did not create it (s3fs's makedirs would)
        s3_store.list("s3://no-such-dcp-bucket/")

    CheckpointStore(s3_root, store=s3_store).save_sharded({"w": torch.ones(2)}, step=1)
    wrong = CheckpointStore(s3_root, store=Store({**s3_server.storage_options, "secret": "not-the-real-secret"}))
    calls = (lambda: wrong.save_sharded({"w": torch.ones(2)}, step=2), lambda: wrong.load_sharded({}), wrong.load)
    for call in calls:
        with pytest.raises(s3pipes.SignatureMismatch) as info:
            call()
        assert s3_root in str(info.value) and "not-the-real-secret" not in str(info.value)
    assert CheckpointStore(s3_root, store=s3_store).steps() == [1]
