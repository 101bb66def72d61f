"""Streaming a shard holds a bounded window of it, not the shard: peak RSS does not grow with shard size.

One 1 GiB shard (256 members of 4 MiB of random bytes; writing it to the embedded
SeaweedFS took 16-22 s on a 2-CPU machine) is streamed by ``s3pipes.webdataset`` in a
fresh Python process, so the peak RSS belongs to that stream alone.

The bound on the growth of peak RSS across the stream, from the design:

- the object stream (``ObjectStream``): ranged GETs of ``DEFAULT_BLOCK_SIZE`` (8 MiB), the
  block being read plus ``DEFAULT_AHEAD`` (4) being fetched ahead: 5 blocks (``OpenObject``
  opens the next shard's stream ahead too, but its blocks come only within that window of 4);
- the largest sample (4 MiB): ``Untar`` hands ``GroupByKey`` a batch of at most 1 MiB of
  members, or one larger member (here each batch is one 4 MiB member);
- a fixed 64 MiB of slack for the allocator, the HTTP client's buffers, the tar reader's
  read chunk and the copies made while a member is joined from it.

Total: 5 x 8 + 4 + 64 = 108 MiB, about a tenth of the shard. The baseline is taken after the
store's client has been built (``store.info``), so the one-off cost of connecting is not
counted as streaming.

Peak RSS is read as ``VmHWM`` from ``/proc/self/status``, reset to the current RSS just
before streaming, not as ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries the parent's
peak across fork and exec into ``ru_maxrss`` (measured: a child of an 800 MiB process
starts at ``ru_maxrss`` = 811 MiB), so in a child of pytest, which has just written 1 GiB,
it hides any growth. ``ru_maxrss`` is still reported in the failure message.

The stream runs twice, with the same bound:

- ``fixed-mmap-threshold``: glibc's mmap threshold pinned at its initial 128 KiB
  (``MALLOC_MMAP_THRESHOLD_``), so every block and member buffer goes back to the OS when
  freed and RSS follows the bytes s3pipes holds.
- ``glibc-default``: what a user gets. glibc raises its mmap threshold after the first
  large free, so later blocks come from the heap, whose freed space is reused imperfectly.
  Measured with 8 MiB blocks: 62 MiB growth over the 1 GiB shard with 4 ahead, either way
  (45 MiB with 2 ahead), since the blocks are received into buffers the stream reuses (66 MiB
  with 2 ahead when each block was fresh memory; with fsspec's read-ahead file and 16 MiB
  blocks, which this stream replaced, 110-138 MiB).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import numpy as np
import pytest
import webdataset

from s3pipes import Store
from s3pipes.server import LocalS3Server
from s3pipes.stages.open import DEFAULT_AHEAD, DEFAULT_BLOCK_SIZE

pytestmark = pytest.mark.integration

MiB = 1 << 20
MEMBER_SIZE = 4 * MiB
MEMBERS = 256  # 1 GiB of member data
SLACK = 64 * MiB
BOUND = (DEFAULT_AHEAD + 1) * DEFAULT_BLOCK_SIZE + MEMBER_SIZE + SLACK

STREAM_SCRIPT = textwrap.dedent(
    """
    import contextlib, json, resource, sys
    import s3pipes
    from s3pipes import Store

    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    url = sys.argv[1]
    store = Store.from_env()
    size = store.info(url)["size"]  # builds the S3 client before the baseline
    with contextlib.suppress(OSError):  # reset VmHWM to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    before = status("VmRSS")
    samples = payload = largest = 0
    for sample in s3pipes.webdataset(url, store=store):
        samples += 1
        payload += len(sample["bin"])
        largest = max(largest, len(sample["bin"]))
        del sample
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"size": size, "samples": samples, "payload": payload, "largest": largest,
                      "before": before, "after": status("VmHWM"), "ru_maxrss": maxrss}))
    """
)


def write_big_shard(store: Store, url: str) -> None:
    """MEMBERS members of MEMBER_SIZE random bytes (incompressible, each different, cheap to make)."""
    rng = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))
    with store.open(url, "wb") as f, webdataset.TarWriter(f) as writer:
        for i in range(MEMBERS):
            writer.write({"__key__": f"sample{i:04d}", "bin": rng.bytes(MEMBER_SIZE)})


@pytest.fixture(scope="module")
def big_shard(s3_server: LocalS3Server, s3_bucket: str) -> Iterator[str]:
    """The 1 GiB shard, written once for this module and deleted after it."""
    store = Store(s3_server.storage_options)
    url = f"{s3_bucket}/streaming-memory-{os.urandom(6).hex()}/big-000.tar"
    write_big_shard(store, url)
    yield url
    store.delete(url)


@pytest.mark.parametrize(
    "malloc_env",
    [
        pytest.param({"MALLOC_MMAP_THRESHOLD_": str(128 << 10)}, id="fixed-mmap-threshold"),
        pytest.param({}, id="glibc-default"),
    ],
)
def test_peak_rss_growth_is_bounded_by_the_stream_window(
    s3_server: LocalS3Server, big_shard: str, malloc_env: dict[str, str]
) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")},
        **malloc_env,  # the clean_env fixture already removed the machine's AWS_* settings
        "AWS_ENDPOINT_URL": s3_server.endpoint_url,
        "AWS_ACCESS_KEY_ID": s3_server.key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret,
    }
    result = subprocess.run(
        [sys.executable, "-c", STREAM_SCRIPT, big_shard], capture_output=True, text=True, env=env, timeout=240
    )
    assert result.returncode == 0, result.stderr[-5000:]
    report = json.loads(result.stdout)
    assert report["samples"] == MEMBERS
    assert report["payload"] == MEMBERS * MEMBER_SIZE
    assert report["largest"] == MEMBER_SIZE
    assert report["size"] > report["payload"]  # the whole shard went through, headers and all
    growth = report["after"] - report["before"]
    assert growth < BOUND, (
        f"peak RSS grew by {growth / MiB:.1f} MiB while streaming a {report['size'] / MiB:.0f} MiB shard "
        f"(from {report['before'] / MiB:.1f} MiB to {report['after'] / MiB:.1f} MiB; "
        f"ru_maxrss {report['ru_maxrss'] / MiB:.1f} MiB); the design bound is {BOUND / MiB:.0f} MiB"
    )
