"""convert() and ShardWriter against SeaweedFS: readable shards, atomic writes, a real kill, Dask, errors.

One module-scoped source set (300 tiny real PNGs under ``<root>/raw/<label>/<id>.png``) and
one serial reference conversion of it are shared by the tests; every conversion is
compared byte for byte with the reference, and every test checks that the source objects
are unchanged (ETag, size and bytes). The kill test runs ``_convert_job.py`` (see its
docstring) in a subprocess and SIGKILLs it once its first unit record appears.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import fsspec
import numpy as np
import pytest
import webdataset
from PIL import Image

import s3pipes as sp
from s3pipes import Store
from s3pipes.convert import RECORDS
from s3pipes.server import LocalS3Server
from s3pipes.writer import MANIFEST_NAME, ShardWriter, read_manifest
from tests.integration._convert_job import LABELS, MAXCOUNT, PngSource

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
JOB = Path(__file__).with_name("_convert_job.py")
PER_LABEL = 100  # 300 inputs: 10 units of MAXCOUNT=30
PATTERN = "train-{shard:06d}.tar"
UNITS = len(LABELS) * PER_LABEL // MAXCOUNT
Reference = tuple[sp.ConvertResult, dict[str, bytes]]  # an uninterrupted serial run: its result, its output


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class Raw:
    """The source objects: their prefix, and each one's (ETag, size, bytes) when they were written."""

    prefix: str
    before: dict[str, tuple[str, int, bytes]]

    def expected(self) -> dict[str, tuple[bytes, int]]:
        """``{key: (png bytes, label index)}`` of every sample a conversion must write."""
        return {
            url[len(self.prefix) + 1 : -len(".png")]: (data, LABELS.index(url[len(self.prefix) + 1 :].split("/")[0]))
            for url, (_, _, data) in self.before.items()
        }


def source_state(store: Store, prefix: str) -> dict[str, tuple[str, int, bytes]]:
    infos = store.list_info(f"{prefix}/")
    contents = store.read_ranges(list(infos))
    return {
        url: (str(info["ETag"]), int(info["size"]), data)
        for (url, info), data in zip(infos.items(), contents, strict=True)
    }


def output(store: Store, prefix: str) -> dict[str, bytes]:
    """``{name: bytes}`` of the shards and the manifest under ``prefix`` (unit records left out)."""
    urls = [url for url in store.list(f"{prefix}/") if f"/{RECORDS}/" not in url]
    return {url[len(prefix) + 1 :]: data for url, data in zip(urls, store.read_ranges(urls), strict=True)}


@pytest.fixture(scope="module")
def store(s3_server: LocalS3Server) -> Store:
    return Store(s3_server.storage_options)


@pytest.fixture(scope="module")
def raw(store: Store, s3_bucket: str) -> Raw:
    prefix = f"{s3_bucket}/{uuid.uuid4().hex[:12]}/raw"
    fs, _ = store.resolve(prefix)
    objects = {
        f"{prefix}/{label}/{i:04d}.png": png(n * PER_LABEL + i)
        for n, label in enumerate(LABELS)
        for i in range(PER_LABEL)
    }
    fs.pipe({store.resolve(url)[1]: data for url, data in objects.items()})
    before = source_state(store, prefix)
    assert {url: data for url, (_, _, data) in before.items()} == objects
    return Raw(prefix, before)


@pytest.fixture(scope="module")
def reference(store: Store, raw: Raw) -> Reference:
    """An uninterrupted serial conversion of ``raw``: its result and its output."""
    prefix = raw.prefix.removesuffix("/raw") + "/reference"
    result = sp.convert(
        PngSource(raw.prefix, store), f"{prefix}/{PATTERN}", f"{raw.prefix}/", maxcount=MAXCOUNT, store=store
    )
    written = output(store, prefix)
    assert sorted(written) == [MANIFEST_NAME] + [f"train-{n:06d}.tar" for n in range(UNITS)]
    assert source_state(store, raw.prefix) == raw.before
    return result, written


def samples_of(pipe: Any) -> dict[str, tuple[bytes, int]]:
    """``{key: (png, label)}``, asserting that no key comes twice."""
    found: dict[str, tuple[bytes, int]] = {}
    for sample in pipe:
        assert sample["__key__"] not in found, f"{sample['__key__']} read twice"
        found[sample["__key__"]] = (sample["png"], int(sample["cls"]))
    return found


# -- the shards: three readers -------------------------------------------------------------


def test_shards_are_read_whole_by_webdataset(
    s3_server: LocalS3Server, monkeypatch: pytest.MonkeyPatch, raw: Raw, reference: Reference
) -> None:
    result, _ = reference
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3_server.storage_options)

    def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kwargs: Any) -> IO[bytes]:
        return fs.open(url, mode)  # type: ignore[no-any-return]

    monkeypatch.setitem(webdataset.gopen_schemes, "s3", gopen_s3)  # webdataset's s3:// opener: this server
    urls = [result.manifest.replace(MANIFEST_NAME, shard.name) for shard in result.shards]
    dataset = webdataset.WebDataset(urls, shardshuffle=False, handler=webdataset.reraise_exception, empty_check=False)
    assert samples_of(dataset) == raw.expected()
    decoded = next(iter(dataset.decode("pil")))
    assert decoded["png"].size == (4, 4)


def test_shards_are_listed_by_tar(tmp_path: Path, store: Store, raw: Raw, reference: Reference) -> None:
    result, written = reference
    names: list[str] = []
    for shard in result.shards:
        local = tmp_path / shard.name
        local.write_bytes(written[shard.name])
        listing = subprocess.run(["tar", "-tf", str(local)], capture_output=True, text=True, check=True)
        assert listing.stderr == ""
        names += listing.stdout.split()
    keys = sorted(raw.expected())
    assert names == [f"{key}.{ext}" for key in keys for ext in ("cls", "png")]


def test_shards_are_read_by_our_pipeline_and_match_the_manifest(store: Store, raw: Raw, reference: Reference) -> None:
    result, written = reference
    prefix = result.manifest.removesuffix(f"/{MANIFEST_NAME}")
    assert samples_of(sp.webdataset(f"{prefix}/", store=store)) == raw.expected()
    pipe = sp.list_prefix(f"{prefix}/", suffix=".tar", store=store).open_object().untar().group_by_key()
    assert samples_of(pipe) == raw.expected()
    manifest = read_manifest(store, result.manifest)
    assert manifest["samples"] == len(raw.before) and manifest["skipped"] == []
    keys = sorted(raw.expected())
    for n, entry in enumerate(manifest["shards"]):
        assert entry["bytes"] == len(written[entry["name"]]) == store.info(f"{prefix}/{entry['name']}")["size"]
        assert (entry["samples"], entry["first_key"], entry["last_key"]) == (
            MAXCOUNT,
            keys[n * MAXCOUNT],
            keys[n * MAXCOUNT + MAXCOUNT - 1],
        )
    for key, (data, _) in list(raw.expected().items())[:3]:
        assert Image.open(io.BytesIO(data)).size == (4, 4), key


# -- atomic writes ----------------------------------------------------------------------------


def _open_files() -> set[str]:
    """The regular files this process holds open."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/") and not target.startswith(("/dev/", "/proc/")):
            found.add(target)
    return found


def _uploads(s3_server: LocalS3Server, bucket: str, key: str) -> list[str]:
    """Upload ids of the multipart uploads in progress for ``key``."""
    reply = s3_server.client().list_multipart_uploads(Bucket=bucket, Prefix=key)
    return [upload["UploadId"] for upload in reply.get("Uploads", []) if upload["Key"] == key]


def test_a_shard_streams_as_a_multipart_upload_and_appears_only_when_complete(
    s3_server: LocalS3Server, s3_store: Store, s3_root: str
) -> None:
    """Mid-write (one 8 MiB part already uploaded), the final key does not exist and no local file is open."""
    bucket, _, key_prefix = s3_root.removeprefix("s3://").partition("/")
    files_before = _open_files()
    rng = np.random.default_rng(0)
    blob = [rng.bytes(1 << 20) for _ in range(12)]
    writer = ShardWriter(f"{s3_root}/big/{PATTERN}", maxsize=10 << 20, store=s3_store)
    with writer:
        for i in range(10):
            writer.write({"__key__": f"s{i:02d}", "bin": blob[i]})
        url = writer.url
        assert url == f"{s3_root}/big/train-000000.tar"
        key = url.removeprefix(f"s3://{bucket}/")
        assert not s3_store.exists(url), "a shard is visible before it is complete"
        assert len(_uploads(s3_server, bucket, key)) == 1, "no multipart upload in progress mid-write"
        assert _open_files() <= files_before, f"local files opened while writing: {_open_files() - files_before}"
        writer.write({"__key__": "s10", "bin": blob[10]})  # the first shard is full: published, the next opens
        assert s3_store.exists(url)
        assert not s3_store.exists(writer.url)
    assert [(s.name, s.samples) for s in writer.shards] == [("train-000000.tar", 10), ("train-000001.tar", 1)]
    assert _uploads(s3_server, bucket, key) == []
    for shard in writer.shards:
        data = s3_store.read_bytes(f"{s3_root}/big/{shard.name}")
        assert len(data) == shard.bytes
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            assert [m.name for m in tar.getmembers()][:1] == [f"{shard.first_key}.bin"]
    # a failure mid-shard: nothing of it is published and its upload is aborted
    with (
        pytest.raises(RuntimeError, match="source failed"),
        ShardWriter(f"{s3_root}/failed/{PATTERN}", store=s3_store) as failing,
    ):
        for i in range(10):
            failing.write({"__key__": f"s{i:02d}", "bin": blob[i]})
        raise RuntimeError("source failed")
    assert s3_store.list_info(f"{s3_root}/failed/") == {}
    assert _uploads(s3_server, bucket, f"{key_prefix}/failed/train-000000.tar") == []


# -- resume after a real kill -----------------------------------------------------------------


def test_a_killed_conversion_resumes_to_the_uninterrupted_output(
    s3_server: LocalS3Server, store: Store, s3_root: str, raw: Raw, reference: Reference
) -> None:
    dst = f"{s3_root}/killed/{PATTERN}"
    records = f"{s3_root}/killed/{RECORDS}/"
    env = {
        **os.environ,
        **s3_server.env(),
        "S3PIPES_TEST_RAW": raw.prefix,
        "S3PIPES_TEST_DST": dst,
        "S3PIPES_TEST_DELAY": "0.01",  # 300 samples: 3 s of sleeping, 0.3 s per unit
        "OMP_NUM_THREADS": "1",
    }
    with subprocess.Popen(
        [sys.executable, "-u", str(JOB)], stdout=subprocess.PIPE, text=True, env=env, start_new_session=True
    ) as process:
        try:
            assert process.stdout is not None
            assert process.stdout.readline() == "ready\n", "the conversion did not start"
            deadline = time.monotonic() + 30
            while not store.list_info(records) and time.monotonic() < deadline:
                time.sleep(0.02)
            process.send_signal(signal.SIGKILL)
            rest = process.communicate(timeout=30)[0]
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == -signal.SIGKILL
    assert "done" not in rest, "the conversion finished before it was killed: make it slower"
    finished = len(store.list_info(records))
    assert 1 <= finished < UNITS, finished
    assert not store.exists(f"{s3_root}/killed/{MANIFEST_NAME}"), "a manifest was written before the last unit"

    result = sp.convert(PngSource(raw.prefix, store), dst, f"{raw.prefix}/", maxcount=MAXCOUNT, store=store)
    assert finished <= result.resumed < UNITS
    assert result.shards == reference[0].shards
    assert output(store, f"{s3_root}/killed") == reference[1]
    assert source_state(store, raw.prefix) == raw.before


# -- Dask -------------------------------------------------------------------------------------


def _children() -> dict[int, str]:
    """``{pid: command line}`` of this process's living children."""
    found = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                state, ppid = stat.read().rsplit(") ", 1)[1].split()[:2]
            with open(f"/proc/{entry}/cmdline") as cmdline:
                command = cmdline.read().replace("\0", " ")
        except (OSError, IndexError, ValueError):
            continue
        if int(ppid) == os.getpid() and state != "Z":
            found[int(entry)] = command
    return found


@pytest.fixture(scope="module")
def dask_client() -> Iterator[Any]:
    """A 2-worker LocalCluster (processes) for the module; it leaves no process behind."""
    from distributed import Client, LocalCluster

    before = _children()
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        # Workers are spawned with this sys.path; they import tests.integration._convert_job to unpickle PngSource.
        patch.syspath_prepend(str(REPO))
        # Without a dashboard the scheduler still serves its health routes, on 8787 when free, else on
        # another port with this warning (another cluster on the machine): harmless here.
        warnings.filterwarnings("ignore", message="Port 8787 is already in use", category=UserWarning)
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    workers: list[int] = []
    try:
        client = Client(cluster)
        try:
            workers = sorted(client.run(os.getpid).values())
            assert len(workers) == 2 and os.getpid() not in workers
            assert set(workers) <= set(_children()), "the workers are not processes of their own"
            yield client
        finally:
            client.close()
    finally:
        cluster.close()
    # multiprocessing's resource tracker stays for the life of this process, whoever started it
    deadline = time.monotonic() + 10
    while True:
        left = {pid: cmd for pid, cmd in _children().items() if pid not in before and "resource_tracker" not in cmd}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not left, f"processes left behind by the Dask cluster: {left}"


def test_a_dask_cluster_writes_what_the_serial_run_writes(
    dask_client: Any, store: Store, s3_root: str, raw: Raw, reference: Reference
) -> None:
    result = sp.convert(
        PngSource(raw.prefix, store),
        f"{s3_root}/dask/{PATTERN}",
        f"{raw.prefix}/",
        maxcount=MAXCOUNT,
        store=store,
        executor=dask_client.get_executor(),
    )
    assert (result.resumed, result.skipped) == (0, [])
    assert result.shards == reference[0].shards
    assert output(store, f"{s3_root}/dask") == reference[1]
    assert source_state(store, raw.prefix) == raw.before


# -- errors -----------------------------------------------------------------------------------


def test_a_missing_destination_bucket_is_named_and_nothing_is_written(
    s3_server: LocalS3Server, store: Store, raw: Raw
) -> None:
    bucket = f"missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(sp.BucketNotFound, match=bucket):
        sp.convert(
            PngSource(raw.prefix, store),
            f"s3://{bucket}/shards/{PATTERN}",
            f"{raw.prefix}/",
            maxcount=MAXCOUNT,
            store=store,
        )
    assert bucket not in [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]
    assert source_state(store, raw.prefix) == raw.before


def test_an_unreadable_object_is_skipped_and_listed_or_raised_naming_it(store: Store, s3_root: str, raw: Raw) -> None:
    inputs = sorted(raw.before)[:40]
    gone = f"{raw.prefix}/ant/0010x.png"  # listed, then deleted before it was read
    corrupt = inputs[25]
    source = PngSource(raw.prefix, store, fail_on=frozenset({corrupt}))
    result = sp.convert(
        source, f"{s3_root}/skip/{PATTERN}", [*inputs, gone], maxcount=MAXCOUNT, store=store, on_error="skip"
    )
    manifest = read_manifest(store, result.manifest)
    assert [item["source"] for item in manifest["skipped"]] == [gone, corrupt]
    assert manifest["skipped"] == result.skipped
    assert "object does not exist" in result.skipped[0]["error"]
    assert "is not a PNG" in result.skipped[1]["error"]
    expected = {key: value for key, value in raw.expected().items() if f"{raw.prefix}/{key}.png" in inputs}
    del expected[corrupt[len(raw.prefix) + 1 : -len(".png")]]
    assert samples_of(sp.webdataset(f"{s3_root}/skip/", store=store)) == expected
    assert manifest["samples"] == result.samples == 39

    with pytest.raises(sp.ObjectNotFound, match=gone.removeprefix("s3://")):
        sp.convert(source, f"{s3_root}/raise/{PATTERN}", [*inputs[:5], gone], store=store)
    with pytest.raises(sp.SourceError, match="is not a PNG") as caught:
        sp.convert(source, f"{s3_root}/raise2/{PATTERN}", inputs, store=store)
    assert caught.value.url == corrupt
    assert not store.exists(f"{s3_root}/raise/{MANIFEST_NAME}")
    assert not store.exists(f"{s3_root}/raise2/{MANIFEST_NAME}")
    assert source_state(store, raw.prefix) == raw.before
