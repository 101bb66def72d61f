"""Nothing hangs (issue 8, item 2): stalled servers time out, workers and threads end, Ctrl-C exits.

- A server that stops answering (a :class:`tests.faultproxy.FaultProxy` ``stall`` of 30 s, before
  the response head or mid-body) makes every read path fail within about ``read_timeout``, with
  an endpoint error that names the object (and, in a pipeline, the stage).
- DataLoader workers (``fork`` and ``spawn``) stream every sample once and leave no process and
  no ``s3pipes-*`` thread behind.
- SIGINT (Ctrl-C) mid-epoch ends a DataLoader(num_workers=2) process and its whole process group.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import pickle
import selectors
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import s3pipes as sp
from s3pipes import MapDataset, Store, errors
from s3pipes.checkpoint import CheckpointStore
from s3pipes.server import LocalS3Server
from tests.contract import assert_disjoint_cover
from tests.faultproxy import FaultProxy, Rule
from tests.unit.test_pipe import write_shards

pytestmark = pytest.mark.integration

READ_TIMEOUT = 2.0
DEADLINE = READ_TIMEOUT * 2 + 2  # seconds: a stalled read must fail within this
STALL = 30.0  # seconds the proxy stays silent: far beyond DEADLINE
GRACE = 5.0  # seconds for workers and threads to go away after a loop ends


@pytest.fixture
def proxy(s3_server: LocalS3Server) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.endpoint_url, max_requests=2_000, max_lifetime=60) as proxy:
        yield proxy


def stalled_store(server: LocalS3Server, proxy: FaultProxy) -> Store:
    return Store({**server.storage_options, "endpoint_url": proxy.endpoint_url}, connect_timeout=2, read_timeout=2)


STALLS = {
    "before-head": lambda target: Rule("stall", seconds=STALL, methods=("GET", "HEAD"), path_contains=target),
    "mid-body": lambda target: Rule("stall", seconds=STALL, after_bytes=1_000, path_contains=target),
}


def assert_fails_fast(call: Callable[[], object], *names: str) -> BaseException:
    """``call`` raises an endpoint (timeout) error within DEADLINE that names each of ``names``."""
    started = time.monotonic()
    with pytest.raises(Exception) as caught:  # the class is asserted below, with the time
        call()
    elapsed = time.monotonic() - started
    exc = caught.value
    problems = [
        *([] if elapsed < DEADLINE else [f"took {elapsed:.1f} s (read_timeout={READ_TIMEOUT:g} s)"]),
        *([] if isinstance(exc, errors.StoreTimeout) else [f"{type(exc).__name__} is not a StoreTimeout"]),
        *([f"{name!r} is not named" for name in names if name not in str(exc)]),
    ]
    assert problems == [], f"{type(exc).__name__}: {exc}"
    return exc


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", sorted(STALLS))
def test_read_bytes_of_a_stalled_object_times_out(
    s3_server: LocalS3Server, s3_store: Store, s3_root: str, proxy: FaultProxy, where: str
) -> None:
    url = f"{s3_root}/stalled.bin"
    s3_store.write_bytes(url, os.urandom(256 << 10))
    proxy.set_rules([STALLS[where]("stalled")])
    store = stalled_store(s3_server, proxy)
    assert_fails_fast(lambda: store.read_bytes(url), url)
    assert proxy.faults["stall"] >= 1, proxy


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", sorted(STALLS))
def test_streaming_pipeline_over_a_stalled_shard_times_out(
    s3_server: LocalS3Server, s3_store: Store, s3_root: str, proxy: FaultProxy, where: str
) -> None:
    urls = write_shards(s3_root, shards=1, per_shard=20, store=s3_store)
    pipe = sp.webdataset(f"{s3_root}/", store=stalled_store(s3_server, proxy))  # lists now, fault-free
    proxy.set_rules([STALLS[where](".tar")])
    exc = assert_fails_fast(lambda: list(pipe), urls[0], "stage open_object")
    assert isinstance(exc, errors.StoreError) and exc.stage == "open_object"
    assert proxy.faults["stall"] >= 1, proxy


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", sorted(STALLS))
def test_map_dataset_item_of_a_stalled_object_times_out(
    s3_server: LocalS3Server, s3_store: Store, s3_root: str, proxy: FaultProxy, where: str
) -> None:
    url = f"{s3_root}/items/0000.bin"
    s3_store.write_bytes(url, os.urandom(64 << 10))
    ds = MapDataset.from_prefix(f"{s3_root}/items/", store=stalled_store(s3_server, proxy), manifest=False)
    proxy.set_rules([STALLS[where]("items/")])
    assert_fails_fast(lambda: ds[0], url)
    assert proxy.faults["stall"] >= 1, proxy


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", sorted(STALLS))
def test_checkpoint_load_from_a_stalled_store_times_out(
    s3_server: LocalS3Server, s3_store: Store, s3_root: str, proxy: FaultProxy, where: str
) -> None:
    run = f"{s3_root}/run"
    CheckpointStore(run, store=s3_store).save({"step": 1, "w": torch.zeros(1 << 16)}, step=1)
    ckpt = CheckpointStore(run, store=stalled_store(s3_server, proxy))
    proxy.set_rules([STALLS[where]("/run/")])
    assert_fails_fast(ckpt.load, run)  # names an object of the run (which one depends on where it stalled)
    assert proxy.faults["stall"] >= 1, proxy


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """An endpoint that accepts connections and never answers (not even ``100 Continue``)."""
    import socket

    server, held = socket.create_server(("127.0.0.1", 0)), []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(server.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()
    for conn in held:
        conn.close()


@pytest.mark.timeout(60)
def test_writes_to_a_store_that_never_answers_time_out(silent_endpoint: str) -> None:
    """botocore asks a PUT for ``100 Continue`` and aiohttp waited for it with no timeout: a
    write_bytes (a checkpoint's marker, a manifest) hung forever, whatever the read timeout."""
    store = Store({"endpoint_url": silent_endpoint, "key": "k", "secret": "s"}, connect_timeout=2, read_timeout=2)
    assert_fails_fast(lambda: store.write_bytes("s3://data/marker.json", b"{}"), "s3://data/marker.json")
    assert_fails_fast(lambda: CheckpointStore("s3://data/run", store=store).save({"w": 1}, step=1), "s3://data/run")
    started = time.monotonic()  # through s3fs (botocore retries a stall: 3 attempts)
    with pytest.raises(errors.StoreTimeout, match=r"x\.bin"), store.open("s3://data/x.bin", "wb") as file:
        file.write(b"x")
    assert time.monotonic() - started < 3 * READ_TIMEOUT + 10


# -- DataLoader workers ----------------------------------------------------------------------


def children(pid: int) -> set[int]:
    """Live (non-zombie) child processes of ``pid``, from /proc."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found |= {int(child) for child in (task / "children").read_text().split()}
        except FileNotFoundError:
            continue
    return {child for child in found if state_of(child) not in (None, "Z") and not resource_tracker(child)}


def resource_tracker(pid: int) -> bool:
    """multiprocessing's resource tracker: started by the first spawn, it lives as long as this process."""
    try:
        return b"resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False


def state_of(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return None


def s3pipes_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("s3pipes"))


def wait_until(condition: Callable[[], bool], seconds: float = GRACE) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.timeout(90)
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_stream_once_and_leave_nothing_behind(s3_store: Store, s3_root: str, context: str) -> None:
    write_shards(s3_root, shards=6, per_shard=5, store=s3_store)
    before = children(os.getpid())  # the session's SeaweedFS is one of them
    threads_before = set(s3pipes_threads())  # an earlier test's process-wide pool (s3pipes-read) is not this one's
    pipe = sp.webdataset(f"{s3_root}/", shuffle_seed=0, store=s3_store)
    clone = pickle.loads(pickle.dumps(pipe))  # spawn pickles the dataset into each worker
    assert clone.urls == pipe.urls
    loader = DataLoader(pipe, batch_size=None, num_workers=2, multiprocessing_context=context)
    got = [sample["__key__"] for sample in loader]
    assert_disjoint_cover([got], [f"sample{n:04d}" for n in range(30)])
    del loader
    gc.collect()
    assert wait_until(lambda: not multiprocessing.active_children()), multiprocessing.active_children()
    assert wait_until(lambda: children(os.getpid()) <= before), children(os.getpid()) - before
    assert wait_until(lambda: set(s3pipes_threads()) <= threads_before), set(s3pipes_threads()) - threads_before


def collect_garbage(worker: int) -> None:
    gc.collect()


class Cycle:
    """An object in a reference cycle: freed only by the cycle collector."""

    def __init__(self, store: Store) -> None:
        self.store, self.me = store, self


def note_pid(path: Path) -> None:
    with path.open("a") as f:
        f.write(f"{os.getpid()}\n")


@pytest.mark.timeout(90)
def test_forked_workers_do_not_inherit_half_closed_clients(
    s3_server: LocalS3Server, s3_store: Store, s3_root: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Stores left in a cycle by earlier work are collected in the parent before the fork, not in each worker.

    Collected in a worker, each inherited client's finalizer waited 2 s for the copy of the parent's
    event loop, which no thread runs there (9 s for these 20 samples), or logged loop errors.
    """
    urls = write_shards(s3_root, shards=4, per_shard=5, store=s3_store)
    pipe = sp.webdataset(f"{s3_root}/", store=s3_store)
    loader = DataLoader(
        pipe, batch_size=None, num_workers=2, multiprocessing_context="fork", worker_init_fn=collect_garbage
    )
    collected_in = tmp_path / "collected-in"
    gc.disable()  # no automatic collection before the fork: the cycles reach it, as in a busy process
    try:
        for _ in range(3):
            used = Store(s3_server.storage_options)
            used.read_bytes(urls[0])  # the fast path's aiohttp session
            used.filesystem(urls[0]).ls(s3_root)  # an s3fs client
            weakref.finalize(used, note_pid, collected_in)
            Cycle(used)
        del used
        samples = iter(loader)  # forks the workers; each then collects the garbage it inherited
    finally:
        gc.enable()
    got = [sample["__key__"] for sample in samples]
    assert sorted(got) == [f"sample{n:04d}" for n in range(20)]
    assert collected_in.read_text().split() == [str(os.getpid())] * 3, "collected in a worker"
    err = capfd.readouterr().err
    assert "different loop" not in err and "Unclosed" not in err and "never retrieved" not in err, err


# -- Ctrl-C ----------------------------------------------------------------------------------

CTRL_C_JOB = textwrap.dedent(
    """
    import signal, sys, time
    from torch.utils.data import DataLoader
    import s3pipes as sp

    # Python's own handler, as under a terminal: a test run started in the background by a
    # non-interactive shell inherits SIGINT ignored, and Python then leaves it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def slow(sample):
        time.sleep(0.1)
        return sample["__key__"]

    if __name__ == "__main__":
        pipe = sp.webdataset(sys.argv[1], store=sp.Store.from_env()).map(slow)
        loader = DataLoader(pipe, batch_size=None, num_workers=2, multiprocessing_context="fork")
        try:
            for key in loader:
                print("got", key, flush=True)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            raise
        print("finished", flush=True)
    """
)


def group_members(pgid: int) -> list[int]:
    """Live processes whose process group is ``pgid``, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(") ", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if fields[0] != "Z" and int(fields[2]) == pgid:
                members.append(int(entry.name))
    return members


def first_line(proc: subprocess.Popen[str], prefix: str, seconds: float) -> str | None:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if selector.select(max(deadline - time.monotonic(), 0)):
                line = proc.stdout.readline()
                if not line or line.startswith(prefix):
                    return line or None
    return None


@pytest.mark.timeout(90)
@pytest.mark.parametrize("target", ["group", "main"])
def test_ctrl_c_mid_epoch_exits_and_leaves_no_process(
    s3_server: LocalS3Server, s3_store: Store, s3_root: str, target: str, tmp_path: Path
) -> None:
    """``group``: SIGINT to the whole process group, as a terminal's Ctrl-C; ``main``: to the parent only."""
    write_shards(s3_root, shards=8, per_shard=10, store=s3_store)  # 80 samples, 0.1 s each over 2 workers
    job = tmp_path / "ctrl_c_job.py"
    job.write_text(CTRL_C_JOB)
    proc = subprocess.Popen(
        [sys.executable, str(job), f"{s3_root}/"],
        env={**os.environ, **s3_server.env()},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    pgid = proc.pid
    try:
        assert first_line(proc, "got", 60) is not None, "no sample within 60 s"
        if target == "group":
            os.killpg(pgid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 15 s after SIGINT; group members: {group_members(pgid)}")
        took = time.monotonic() - sent
        assert "finished" not in out, "SIGINT came after the epoch: give the job more samples"
        assert proc.returncode == -signal.SIGINT, (proc.returncode, err[-2000:])
        assert "KeyboardInterrupt" in err or "interrupted" in out, err[-2000:]
        assert took < 5, f"exited {took:.1f} s after SIGINT"
        assert wait_until(lambda: not group_members(pgid), 3), f"left behind: {group_members(pgid)}"
        with pytest.raises(ProcessLookupError):
            os.killpg(pgid, 0)
    finally:
        for pid in group_members(pgid):  # only processes of the group this test started
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
