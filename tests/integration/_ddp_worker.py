"""One rank of the ``torchrun`` run in ``test_distributed.py``; torchrun starts it, pytest never runs it.

Each rank joins a gloo process group, streams ``s3pipes.webdataset(prefix, shuffle_seed=0)``
through a ``DataLoader(num_workers=2)`` (fork), collects every ``__key__`` and
``all_gather_object``s the lists; rank 0 writes them to ``$S3PIPES_TEST_OUT`` as JSON
(one list per rank, in rank order).

Environment (set by the test for this process tree only):
    S3PIPES_TEST_PREFIX: the ``s3://.../`` prefix to stream.
    S3PIPES_TEST_OUT: where rank 0 writes the gathered keys.
    AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY: read by ``Store.from_env()``.

A rank whose pipeline raises ``TooFewShards`` prints ``rank <r> raised TooFewShards: <message>``
on stderr, waits at a barrier and re-raises. The barrier makes the test see every rank's
own failure: torchrun stops the other ranks at the first failed one, so without it a
rank could be stopped before it raised. A rank that did not fail would never reach the
barrier, and the run would not end cleanly.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
from torch.utils.data import DataLoader

import s3pipes
from s3pipes import Store
from s3pipes.stages import TooFewShards

PREFIX_VAR, OUT_VAR = "S3PIPES_TEST_PREFIX", "S3PIPES_TEST_OUT"
GROUP_TIMEOUT = timedelta(seconds=60)  # a rank stuck in a collective fails well inside the test's timeout


def stream_keys(prefix: str, rank: int) -> list[str]:
    pipe = s3pipes.webdataset(prefix, shuffle_seed=0, store=Store.from_env())
    loader = DataLoader(pipe, batch_size=None, num_workers=2, multiprocessing_context="fork")
    try:
        return [sample["__key__"] for sample in loader]
    except TooFewShards as exc:
        # DataLoader re-raises a worker's error with the worker's traceback as the message; its
        # last line is the original "...TooFewShards: <message>". One line: ranks share stderr.
        print(f"rank {rank} raised TooFewShards: {str(exc).strip().splitlines()[-1]}", file=sys.stderr, flush=True)
        dist.barrier()
        raise


def main() -> None:
    dist.init_process_group("gloo", timeout=GROUP_TIMEOUT)
    try:
        rank = dist.get_rank()
        keys = stream_keys(os.environ[PREFIX_VAR], rank)
        gathered: list[list[str] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, keys)
        if rank == 0:
            Path(os.environ[OUT_VAR]).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
