"""One rank of the ``torchrun`` in ``test_ckpt_sharded_s3.py``; torchrun starts it, pytest never runs it.

Each rank joins a gloo process group and a 1-D CPU DeviceMesh over all ranks, and holds
:func:`rank_state`: a DTensor split by rows (``Shard(0)``: each rank holds, and writes, its rows
only), a tensor every rank holds alike, and plain values. It saves steps 1 and 2 with
``save_sharded`` under ``keep_last=1``, loads the latest into a zeroed state with
``load_sharded``, then asks for step 1 (gone by retention). Each rank writes what it saw to
``$S3PIPES_TEST_OUT/rank<r>.json``.

Environment (set by the test for this process tree only):
    S3PIPES_TEST_RUN: the ``s3://`` run prefix.
    S3PIPES_TEST_OUT: the directory the ranks write their reports to.
    AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY: read by ``Store.from_env()``.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from s3pipes import Store
from s3pipes.checkpoint import CheckpointNotFound, CheckpointStore

RUN_VAR, OUT_VAR = "S3PIPES_TEST_RUN", "S3PIPES_TEST_OUT"
ROWS, COLS = 8, 3
GROUP_TIMEOUT = timedelta(seconds=60)  # a rank stuck in a collective fails well inside the test's timeout


def full_state(step: int) -> dict[str, Any]:
    """The whole state of ``step`` as one process holds it: what ``load(step)`` must return."""
    return {
        "model": {
            "sharded": torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS) + 100 * step,
            "replicated": torch.full((4,), float(step)),
        },
        "data": {"epoch": step, "order": "seed=0"},
    }


def rank_state(step: int, mesh: DeviceMesh) -> dict[str, Any]:
    """``full_state(step)`` with its big tensor sharded by rows over ``mesh``."""
    state = full_state(step)
    state["model"]["sharded"] = distribute_tensor(state["model"]["sharded"], mesh, [Shard(0)])
    return state


def zeroed_state(mesh: DeviceMesh) -> dict[str, Any]:
    return {
        "model": {
            "sharded": distribute_tensor(torch.zeros(ROWS, COLS), mesh, [Shard(0)]),
            "replicated": torch.zeros(4),
        },
        "data": {"epoch": -1, "order": ""},
    }


def main() -> None:
    dist.init_process_group("gloo", timeout=GROUP_TIMEOUT)
    try:
        rank = dist.get_rank()
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        ckpt = CheckpointStore(os.environ[RUN_VAR], keep_last=1, store=Store.from_env())
        urls = [ckpt.save_sharded(rank_state(step, mesh), step=step) for step in (1, 2)]
        steps = ckpt.steps()
        state = zeroed_state(mesh)
        loaded = ckpt.load_sharded(state)
        sharded = state["model"]["sharded"]
        expected = rank_state(2, mesh)["model"]["sharded"]
        assert isinstance(sharded, DTensor) and isinstance(expected, DTensor)
        try:
            ckpt.load_sharded(zeroed_state(mesh), step=1)
            missing = "no error"
        except CheckpointNotFound as exc:
            missing = f"{type(exc).__name__}: {exc}"
        report = {
            "urls": urls,
            "steps": steps,
            "loaded": loaded,
            "local_shape": list(sharded.to_local().shape),
            "local_equal": torch.equal(sharded.to_local(), expected.to_local()),
            "full_equal": torch.equal(sharded.full_tensor(), full_state(2)["model"]["sharded"]),
            "replicated_equal": torch.equal(state["model"]["replicated"], full_state(2)["model"]["replicated"]),
            "data": state["data"],
            "missing": missing,
        }
        Path(os.environ[OUT_VAR], f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
