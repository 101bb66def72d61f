"""A real 2-process torchrun (gloo, CPU) over SeaweedFS: ranks x DataLoader workers split the shards.

The ranks run ``_ddp_worker.py`` (see its docstring for what each rank does). Each run is
its own session, killed as a whole if it outlives :data:`TIMEOUT`: a hang fails the test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from s3pipes import Store
from s3pipes.server import LocalS3Server
from tests.contract import assert_disjoint_cover
from tests.unit.test_pipe import write_shards

pytestmark = pytest.mark.integration

WORKER = Path(__file__).with_name("_ddp_worker.py")
RANKS, WORKERS = 2, 2  # WORKERS must match the DataLoader in _ddp_worker.py
TIMEOUT = 180.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def torchrun(server: LocalS3Server, prefix: str, out: Path) -> subprocess.CompletedProcess[str]:
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
        "S3PIPES_TEST_PREFIX": prefix,
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
            os.killpg(process.pid, signal.SIGKILL)  # torchrun, its ranks and their DataLoader workers
            stdout, stderr = process.communicate()
            pytest.fail(f"torchrun did not finish within {TIMEOUT:.0f} s (killed)\n{stdout}\n{stderr[-5000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_two_ranks_with_two_workers_each_stream_every_sample_once(
    s3_server: LocalS3Server, s3_store: Store, s3_root: str, tmp_path: Path
) -> None:
    shards, per_shard = 8, 5  # 2 shards for each of the 4 consumers
    write_shards(s3_root, shards=shards, per_shard=per_shard, store=s3_store)
    out = tmp_path / "keys.json"
    result = torchrun(s3_server, f"{s3_root}/", out)
    assert result.returncode == 0, result.stderr[-5000:]
    parts = json.loads(out.read_text())
    assert len(parts) == RANKS
    assert all(parts), f"a rank got no samples: {[len(p) for p in parts]}"
    assert_disjoint_cover(parts, [f"sample{n:04d}" for n in range(shards * per_shard)])
    # Whole shards go to each consumer: every rank's share is a multiple of a shard.
    assert all(len(part) % per_shard == 0 for part in parts), [len(p) for p in parts]


def test_fewer_shards_than_consumers_fails_every_rank_fast(
    s3_server: LocalS3Server, s3_store: Store, s3_root: str, tmp_path: Path
) -> None:
    write_shards(s3_root, shards=3, per_shard=2, store=s3_store)
    out = tmp_path / "keys.json"
    result = torchrun(s3_server, f"{s3_root}/", out)
    assert result.returncode != 0, result.stderr[-5000:]
    for rank in range(RANKS):
        pattern = (
            rf"rank {rank} raised TooFewShards: .*3 shard\(s\) for 2 rank\(s\) x 2 DataLoader worker\(s\) = 4 consumers"
        )
        assert re.search(pattern, result.stderr), f"rank {rank} did not report TooFewShards:\n{result.stderr[-5000:]}"
    assert not out.exists()
