"""CheckpointStore against SeaweedFS: a real model's round trip, versioned buckets, named errors, SIGKILL mid-save.

The kill test runs ``_ckpt_killer.py`` (see its docstring) in a fresh process per round and
SIGKILLs it at seeded random moments; after every kill the run must load a complete,
correct step (or report that nothing was ever committed).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import fsspec
import pytest
import torch
from torch import nn

import s3pipes
from s3pipes import Store
from s3pipes.checkpoint import CheckpointNotFound, CheckpointStore
from s3pipes.server import LocalS3Server
from tests.integration._ckpt_killer import assert_state

pytestmark = pytest.mark.integration

KILLER = Path(__file__).with_name("_ckpt_killer.py")


def train_step(model: nn.Module, optim: torch.optim.Optimizer, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    inputs, targets = torch.randn(32, 8, generator=generator), torch.randn(32, 2, generator=generator)
    optim.zero_grad()
    torch.autograd.backward(nn.functional.mse_loss(model(inputs), targets))
    optim.step()


def model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def test_model_and_optimizer_round_trip_and_resume_identically(s3_server: LocalS3Server, s3_root: str) -> None:
    ckpt = CheckpointStore(f"{s3_root}/project/exp/run", keep_last=2, store=Store(s3_server.storage_options))
    model, optim = model_and_optimizer()
    embedding = torch.randn(3 << 20)  # 12 MiB: the payload is uploaded in several parts
    for epoch in range(1, 4):
        train_step(model, optim, seed=epoch)
        state = {"model": model.state_dict(), "optim": optim.state_dict(), "data": {"epoch": epoch}}
        url = ckpt.save({**state, "embedding": embedding}, step=epoch)
    assert url == f"{s3_root}/project/exp/run/step-000000003/state.pt"
    assert ckpt.steps() == [2, 3] and ckpt.latest_step() == 3

    restored, restored_optim = model_and_optimizer()
    loaded = CheckpointStore(ckpt.url, store=Store(s3_server.storage_options)).load(map_location="cpu")
    restored.load_state_dict(loaded["model"])
    restored_optim.load_state_dict(loaded["optim"])
    assert loaded["data"] == {"epoch": 3} and torch.equal(loaded["embedding"], embedding)
    train_step(model, optim, seed=4)
    train_step(restored, restored_optim, seed=4)
    for (name, a), (_, b) in zip(model.state_dict().items(), restored.state_dict().items(), strict=True):
        assert torch.equal(a, b), f"{name} differs after resuming"

    # Interop: the payload is a plain torch.save file, and a plain torch.save file loads.
    with fsspec.open(url, "rb", **s3_server.storage_options) as f:
        assert torch.load(f, weights_only=True)["data"] == {"epoch": 3}
    with fsspec.open(f"{ckpt.url}/plain.pt", "wb", **s3_server.storage_options) as f:
        torch.save({"w": torch.arange(5)}, f)
    assert torch.equal(ckpt.load(key="plain.pt")["w"], torch.arange(5))
    with ckpt.writer("extra.pt") as f:
        torch.save({"scale": torch.tensor(3.0)}, f)
    with fsspec.open(f"{ckpt.url}/extra.pt", "rb", **s3_server.storage_options) as f:
        assert torch.load(f, weights_only=True)["scale"].item() == 3.0


def test_versioned_bucket_keeps_every_save_of_a_fixed_key(s3_server: LocalS3Server, s3_store: Store) -> None:
    bucket = s3_server.create_bucket(f"ckpt-versions-{uuid.uuid4().hex[:8]}", versioned=True)
    ckpt = CheckpointStore(f"{bucket}/project/exp/run", store=s3_store)
    for epoch in range(3):
        ckpt.save({"epoch": epoch, "w": torch.full((16,), float(epoch))}, key="model.pt")
    versions = ckpt.versions("model.pt")
    assert [v.is_latest for v in versions] == [False, False, True]
    assert len({v.version_id for v in versions}) == 3 and all(v.url == f"{ckpt.url}/model.pt" for v in versions)
    for epoch, version in enumerate(versions):
        state = ckpt.load(key="model.pt", version_id=version.version_id)
        assert state["epoch"] == epoch and torch.equal(state["w"], torch.full((16,), float(epoch)))
    assert ckpt.load(key="model.pt")["epoch"] == 2
    assert ckpt.versions("other.pt") == []
    with pytest.raises(s3pipes.ObjectNotFound, match=r"model\.pt"):
        ckpt.load(key="model.pt", version_id="no-such-version")


def test_unversioned_bucket_lists_the_one_null_version(s3_store: Store, s3_root: str) -> None:
    ckpt = CheckpointStore(s3_root, store=s3_store)
    for epoch in range(2):
        ckpt.save({"epoch": epoch}, key="model.pt")
    [version] = ckpt.versions("model.pt")
    assert version.version_id == "null" and version.is_latest
    assert ckpt.load(key="model.pt", version_id="null")["epoch"] == 1


def test_writes_by_another_process_are_seen_after_a_listing(s3_server: LocalS3Server, s3_root: str) -> None:
    """s3fs caches listings; objects added or replaced since must not look missing or keep their old size."""
    reader = CheckpointStore(s3_root, store=Store(s3_server.storage_options))
    writer = CheckpointStore(s3_root, store=Store(s3_server.storage_options))  # another process, in effect
    writer.save({"step": 1}, step=1)
    writer.save({"v": torch.zeros(1)}, key="model.pt")
    assert reader.steps() == [1] and reader.load()["step"] == 1  # the reader has listed the run
    writer.save({"step": 2}, step=2)
    writer.save({"v": torch.zeros(1 << 16)}, key="model.pt")  # replaced by a larger object
    with writer.writer("extra.pt") as f:
        torch.save({"lr": 0.5}, f)
    with reader.reader("model.pt") as f:  # the reader's cached listing still has the old size
        assert torch.load(f, weights_only=True)["v"].numel() == 1 << 16
    with reader.reader("extra.pt") as f:  # ... and no extra.pt
        assert torch.load(f, weights_only=True) == {"lr": 0.5}
    assert reader.load(key="model.pt")["v"].numel() == 1 << 16
    assert reader.load()["step"] == 2 and reader.steps() == [1, 2] and reader.latest_step() == 2


def test_missing_bucket_is_named_by_every_call(s3_server: LocalS3Server, s3_store: Store) -> None:
    ckpt = CheckpointStore("s3://no-such-ckpt-bucket/project/run", store=s3_store)
    calls: dict[str, Callable[[], object]] = {
        "save": lambda: ckpt.save({"w": torch.ones(2)}, step=1),
        "save key": lambda: ckpt.save({"w": torch.ones(2)}, key="model.pt"),
        "load": ckpt.load,
        "steps": ckpt.steps,
        "versions": lambda: ckpt.versions("model.pt"),
    }
    for name, call in calls.items():
        with pytest.raises(s3pipes.BucketNotFound) as info:
            call()
        assert "s3://no-such-ckpt-bucket/project/run" in str(info.value), name
        assert s3_server.endpoint_url in str(info.value), name


def test_bad_secret_is_named_and_never_shown(s3_server: LocalS3Server, s3_store: Store, s3_root: str) -> None:
    CheckpointStore(s3_root, store=s3_store).save({"w": torch.ones(2)}, step=1)
    wrong = Store({**s3_server.storage_options, "secret": "not-the-real-secret"})
    ckpt = CheckpointStore(s3_root, store=wrong)
    for call in (ckpt.load, ckpt.steps, lambda: ckpt.save({"w": torch.ones(2)}, step=2)):
        with pytest.raises(s3pipes.SignatureMismatch) as info:
            call()
        assert isinstance(info.value, PermissionError) and s3_root in str(info.value)
        assert "not-the-real-secret" not in str(info.value)
    assert CheckpointStore(s3_root, store=s3_store).steps() == [1]


def test_missing_step_lists_the_committed_ones(s3_store: Store, s3_root: str) -> None:
    ckpt = CheckpointStore(s3_root, store=s3_store)
    with pytest.raises(CheckpointNotFound, match="no committed checkpoint in this run"):
        ckpt.load()
    for step in (4, 8):
        ckpt.save({"step": step}, step=step)
    with pytest.raises(FileNotFoundError, match=r"step 5 has no committed checkpoint.*Committed steps: 4, 8"):
        ckpt.load(step=5)


ROUNDS, BUDGET = 10, 50.0  # kill rounds at most, and seconds after which no new round starts


def test_sigkill_at_random_moments_never_yields_a_partial_checkpoint(
    s3_server: LocalS3Server, s3_store: Store, s3_root: str
) -> None:
    """Issue 5 item 1: kill a saving process at seeded random moments; every load is whole and right."""
    run = f"{s3_root}/killed/run"
    ckpt = CheckpointStore(run, store=s3_store)
    env = {**os.environ, **s3_server.env(), "S3PIPES_TEST_RUN": run, "OMP_NUM_THREADS": "1"}
    rng = random.Random(20240605)
    started, reported_saved, mid_save_kills, rounds = time.monotonic(), 0, 0, 0
    while rounds < ROUNDS and time.monotonic() - started < BUDGET:
        delay = rng.uniform(0.0, 0.3) if rounds == 0 else rng.uniform(0.0, 2.5)  # the first: before any commit
        with subprocess.Popen(
            [sys.executable, "-u", str(KILLER)], stdout=subprocess.PIPE, text=True, env=env, start_new_session=True
        ) as process:
            try:
                assert process.stdout is not None
                assert process.stdout.readline() == "ready\n", "the saver did not start"
                time.sleep(delay)
                process.send_signal(signal.SIGKILL)
                out = process.communicate(timeout=30)[0].split()
            finally:
                if process.poll() is None:
                    process.kill()
        assert process.returncode == -signal.SIGKILL
        rounds += 1
        lines = list(zip(out[::2], map(int, out[1::2]), strict=True))
        begun = max((step for word, step in lines if word == "begin"), default=None)
        reported_saved = max([reported_saved] + [step for word, step in lines if word == "saved"])
        mid_save_kills += bool(lines) and lines[-1][0] == "begin"
        print(f"round {rounds}: killed after {delay:.2f} s, last output {lines[-1:]}, load() ->", end=" ")

        try:
            state = ckpt.load()
        except CheckpointNotFound:
            assert reported_saved == 0, f"round {rounds}: step {reported_saved} was saved, yet load() finds none"
            print("no committed checkpoint")
            continue
        step = state["data"]["step"]
        print(f"step {step}")
        assert_state(state, step)
        assert step >= reported_saved, f"round {rounds}: loaded step {step} is older than saved {reported_saved}"
        assert begun is None or step <= begun
        committed = ckpt.steps()
        assert step in committed and ckpt.latest_step() == step
        assert len(committed) <= 4, f"retention (keep_last=3) left {committed}"
        for other in committed:
            assert_state(ckpt.load(step=other), other)
    assert rounds >= 5, f"only {rounds} kill rounds fit in {BUDGET} s"
    assert reported_saved > 0 and mid_save_kills > 0, (rounds, reported_saved, mid_save_kills)
