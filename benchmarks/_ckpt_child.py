"""One checkpoint save or load by one client, in a process of its own, timed, with its peak RSS.

Run by :mod:`benchmarks.checkpoint`, never by hand::

    python -m benchmarks._ckpt_child <client> <save|load> <s3 url> <MiB>

The endpoint and keys come from the environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``). Prints one JSON line: seconds, bytes (of the tensors in the state),
rss_over_baseline, cpu_seconds (this process, all threads, during the operation).

Peak RSS: after the imports and the set-up (for a save: the state dict, built in memory), the
kernel's high-water mark is reset (``5`` to ``/proc/self/clear_refs``); ``VmHWM`` after the
operation minus ``VmRSS`` before it is what the operation itself held at its worst, the
loaded state included.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

TENSOR_MIB = 4


def state_dict(mib: int) -> dict[str, Any]:
    """``mib`` MiB of float32 noise in 4 MiB tensors (incompressible, like trained weights), plus a step."""
    generator = torch.Generator().manual_seed(0)
    numel = TENSOR_MIB * (1 << 20) // 4
    tensors = {f"layer{i}.weight": torch.randn(numel, generator=generator) for i in range(mib // TENSOR_MIB)}
    return {"model": tensors, "step": 1234}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _split(url: str) -> tuple[str, str]:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    return bucket, key


def _s3pipes(op: str, url: str) -> Callable[[Any], Any]:
    import s3pipes

    run, _, name = url.rpartition("/")
    store = s3pipes.CheckpointStore(run)
    store.store.exists(url)  # build the clients now, as the others do in their set-up (boto3.client, ...)
    if op == "save":
        return lambda state: store.save(state, key=name)
    return lambda _: store.load(key=name)


def _s3checkpoint(op: str, url: str) -> Callable[[Any], Any]:
    from s3torchconnector import S3Checkpoint, S3ClientConfig

    checkpoint = S3Checkpoint(
        region="us-east-1",
        endpoint=os.environ["AWS_ENDPOINT_URL"],
        s3client_config=S3ClientConfig(force_path_style=True),
    )

    def save(state: Any) -> None:
        with checkpoint.writer(url) as file:
            torch.save(state, file)

    def load(_: Any) -> Any:
        with checkpoint.reader(url) as file:
            return torch.load(file, weights_only=True)

    return save if op == "save" else load


def _s3fs(op: str, url: str) -> Callable[[Any], Any]:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"])

    def save(state: Any) -> None:
        with fs.open(url, "wb") as file:
            torch.save(state, file)

    def load(_: Any) -> Any:
        with fs.open(url, "rb") as file:
            return torch.load(file, weights_only=True)

    return save if op == "save" else load


def _boto3(op: str, url: str) -> Callable[[Any], Any]:
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
    bucket, key = _split(url)

    def save(state: Any) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        client.upload_fileobj(buffer, bucket, key)

    def load(_: Any) -> Any:
        buffer = io.BytesIO()
        client.download_fileobj(bucket, key, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=True)

    return save if op == "save" else load


def _transport(op: str, url: str) -> Callable[[Any], Any]:
    """s3pipes' parallel parts and ranged GETs alone, moving the bytes of a torch.save of the state:
    what store and transport do without serialising (a ceiling for the rows above). The state is
    serialised before the clock starts; a load returns bytes, unpickled after it stops."""
    import s3pipes
    from s3pipes.transfer import open_download, open_upload

    store = s3pipes.Store.from_env()
    store.exists(url)

    def save(state: Any) -> None:
        with open_upload(store, url) as file:
            file.write(state)

    def load(_: Any) -> bytearray:
        with open_download(store, url) as file:
            target = bytearray(store.info(url)["size"])
            file.readinto(target)
        return target

    return save if op == "save" else load


TRANSPORT = "s3pipes transport only"
CLIENTS = {"s3pipes": _s3pipes, "S3Checkpoint": _s3checkpoint, "s3fs": _s3fs, "boto3": _boto3, TRANSPORT: _transport}


def main(client: str, op: str, url: str, mib: int) -> None:
    torch.set_num_threads(1)
    run = CLIENTS[client](op, url)
    state: Any = state_dict(mib) if op == "save" else None
    if client == TRANSPORT and state is not None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        state = buffer.getbuffer()
    baseline = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    cpu, started = time.process_time(), time.perf_counter()
    loaded = run(state)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    peak = _status("VmHWM")
    if op == "load":
        if isinstance(loaded, bytearray):
            loaded = torch.load(io.BytesIO(loaded), weights_only=True)
        expected = state_dict(mib)
        ok = loaded["step"] == expected["step"] and all(
            torch.equal(loaded["model"][name], tensor) for name, tensor in expected["model"].items()
        )
        if not ok:
            raise SystemExit(f"{client} loaded something else than what was saved to {url}")
    size = mib << 20
    print(json.dumps({"seconds": seconds, "bytes": size, "rss_over_baseline": peak - baseline, "cpu_seconds": cpu}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
