"""CheckpointSink / Pipe.checkpoint on file:// shards and a memory:// run: when it saves, what, and exact resume."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from torch.utils.data import DataLoader
from torchdata.nodes import IterableWrapper

import s3pipes as sp
from s3pipes import Store
from s3pipes.checkpoint import CheckpointStore
from s3pipes.errors import ConfigError
from s3pipes.stages.sink import CheckpointSink
from tests.contract import assert_resumes
from tests.unit.test_pipe import PER_SHARD, SHARDS, write_shards

ITEMS = SHARDS * PER_SHARD  # 35 per epoch
EVERY = 10


@pytest.fixture
def shards(tmp_path: Path) -> str:
    root = f"file://{tmp_path}/shards"  # file://, not memory:// (see test_pipe.shards)
    write_shards(root)
    return root


def ckpt_store(mem_root: str, name: str = "run") -> CheckpointStore:
    return CheckpointStore(f"{mem_root}/{name}", store=Store())


def key_pipe(shards: str, ckpt: CheckpointStore, state: Callable[[], dict[str, Any]] | None = None) -> sp.Pipe[str]:
    """Shuffled shards, a seeded shuffle buffer (its contents are in the state), keys out."""
    pipe = sp.webdataset(f"{shards}/", shuffle_seed=1).map(lambda s: s["__key__"]).shuffle(8, seed=3)
    return pipe.checkpoint(ckpt, every=EVERY, state=state)


def train(pipe: sp.Pipe[str], epochs: range, seen: list[str]) -> None:
    for epoch in epochs:
        pipe.set_epoch(epoch)
        for key in pipe:
            seen.append(key)


def test_saves_every_n_items_and_at_epoch_end_with_steps_counted_across_epochs(shards: str, mem_root: str) -> None:
    ckpt = ckpt_store(mem_root)
    seen: list[str] = []
    positions: dict[int, dict[str, Any]] = {}
    pipe = key_pipe(shards, ckpt, state=lambda: {"trained": len(seen)})
    for epoch in range(2):
        pipe.set_epoch(epoch)
        for key in pipe:
            seen.append(key)  # "training" on the item; the save for it comes at the next request
            positions[len(seen)] = json.loads(json.dumps(pipe.state_dict()))
    assert len(seen) == 2 * ITEMS
    assert ckpt.steps() == [10, 20, 30, 35, 40, 50, 60, 70]
    for step in ckpt.steps():
        saved = ckpt.load(step=step)
        assert saved["trained"] == step, "the save came before the loop finished with the item"
        assert saved["data"] == {**positions[step], **({"ended": True} if step % ITEMS == 0 else {})}, (
            f"step {step}: not the position right after item {step} (ended at the epoch's end)"
        )
        assert saved["data"]["node"][CheckpointSink.STEP_KEY] == step
    assert ckpt.load(step=35)["data"]["epoch"] == 0 and ckpt.load(step=40)["data"]["epoch"] == 1


def test_every_saved_position_resumes_exactly_the_rest_and_the_same_saves(shards: str, mem_root: str) -> None:
    first = ckpt_store(mem_root, "first")
    everything: list[str] = []
    train(key_pipe(shards, first), range(2), everything)
    assert sorted(everything[:ITEMS]) == sorted(everything[ITEMS:]) and everything[:ITEMS] != everything[ITEMS:]
    for step in first.steps():
        data = first.load(step=step)["data"]
        again = ckpt_store(mem_root, f"again-{step}")
        resumed = key_pipe(shards, again)
        resumed.load_state_dict(data)
        rest: list[str] = []
        train(resumed, range(data["epoch"], 2), rest)
        assert rest == everything[step:], f"resume from step {step}"
        later = [s for s in first.steps() if s > step]
        assert again.steps() == later, f"resume from step {step} saved other steps"
        for s in later:
            assert again.load(step=s)["data"] == first.load(step=s)["data"]


def test_the_pipe_state_resumes_after_every_item(shards: str, mem_root: str) -> None:
    ckpt = ckpt_store(mem_root)
    assert_resumes(lambda: key_pipe(shards, ckpt))


def test_counts_batches_after_batch_and_saves_through_a_main_process_dataloader(shards: str, mem_root: str) -> None:
    ckpt = ckpt_store(mem_root)
    pipe = sp.webdataset(f"{shards}/").map(lambda s: s["__key__"]).batch(4, collate=None).checkpoint(ckpt, every=3)
    batches = list(DataLoader(pipe, batch_size=None, num_workers=0))
    assert len(batches) == 9 and ckpt.steps() == [3, 6, 9]
    resumed = sp.webdataset(f"{shards}/").map(lambda s: s["__key__"]).batch(4, collate=None)
    resumed = resumed.checkpoint(ckpt_store(mem_root, "other"), every=3)
    resumed.load_state_dict(ckpt.load(step=6)["data"])
    assert list(resumed) == batches[6:]


def test_steps_go_on_from_an_epoch_end_state_however_the_next_epoch_is_set(shards: str, mem_root: str) -> None:
    """Resuming from the epoch-end save straight into the next epoch: set_epoch before or after
    load_state_dict (StatefulDataLoader loads at iter()), the saves go on at the same steps."""
    first = ckpt_store(mem_root, "first")
    train(key_pipe(shards, first), range(2), [])
    end_of_epoch_0 = first.load(step=ITEMS)["data"]
    for order in ("load, then set_epoch", "set_epoch, then load"):
        again = ckpt_store(mem_root, order.replace(", ", "-"))
        resumed = key_pipe(shards, again)
        if order == "load, then set_epoch":
            resumed.load_state_dict(end_of_epoch_0)
            resumed.set_epoch(1)
        else:
            resumed.set_epoch(1)
            resumed.load_state_dict(end_of_epoch_0)
        assert len(list(resumed)) == ITEMS, order
        assert again.steps() == [s for s in first.steps() if s > ITEMS], order


def test_warns_once_when_load_would_refuse_the_position_and_not_otherwise(shards: str, mem_root: str) -> None:
    """A shuffle buffer after decode("pil") keeps PIL images in the state: weights_only=True
    refuses them, so the user hears it at the first save, not at the resume after a crash."""
    decoded = sp.webdataset(f"{shards}/").decode("pil").shuffle(4, seed=0)
    ckpt = ckpt_store(mem_root, "pil")
    with pytest.warns(UserWarning, match=r"weights_only=True will refuse.*PngImageFile.*shuffle before decoding") as w:
        list(decoded.checkpoint(ckpt, every=EVERY))
    assert len(w) == 1 and len(ckpt.steps()) == 4
    with pytest.raises(sp.WeightsOnlyRefused):
        ckpt.load(step=EVERY)  # mid-epoch: images in the buffer
    assert ckpt.load(step=EVERY, weights_only=False)["data"]["node"]["step"] == EVERY
    raw = ckpt_store(mem_root, "raw")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(sp.webdataset(f"{shards}/").shuffle(4, seed=0).decode("pil").checkpoint(raw, every=EVERY))
    assert raw.load()["data"]["node"]["step"] == ITEMS


def test_a_failed_save_loses_no_item_and_is_made_on_the_next_request(
    shards: str, mem_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    everything: list[str] = []
    train(key_pipe(shards, ckpt_store(mem_root, "uninterrupted")), range(1), everything)
    ckpt = ckpt_store(mem_root)
    real, calls = ckpt.save, [0]

    def flaky(state: Any, **kwargs: Any) -> str:
        calls[0] += 1
        if calls[0] == 2:
            raise sp.StoreError(ckpt.url, "memory", "injected")
        return real(state, **kwargs)

    monkeypatch.setattr(ckpt, "save", flaky)
    pipe, got = key_pipe(shards, ckpt), []
    items = iter(pipe)
    with pytest.raises(sp.StoreError, match="injected"):
        got.extend(items)
    assert len(got) == 2 * EVERY and ckpt.steps() == [EVERY]
    after_failure = pipe.state_dict()
    assert got + list(items) == everything, "going on retries the save and yields the item pulled before it"
    assert ckpt.steps() == [10, 20, 30, 35]
    resumed = key_pipe(shards, ckpt_store(mem_root, "resumed"))
    resumed.load_state_dict(after_failure)
    assert got + list(resumed) == everything, "the state after the failure is the position before that item"


def test_no_save_without_new_items(mem_root: str) -> None:
    ckpt = ckpt_store(mem_root)
    sink = CheckpointSink(IterableWrapper(range(4)), ckpt, every=2)
    assert list(sink) == [0, 1, 2, 3] and ckpt.steps() == [2, 4]  # the epoch end is step 4: one save
    with pytest.raises(StopIteration):
        next(sink)
    sink.reset(sink.state_dict())
    assert list(sink) == [] and ckpt.steps() == [2, 4]


def test_must_be_the_last_stage(shards: str, mem_root: str) -> None:
    pipe = sp.webdataset(f"{shards}/").checkpoint(ckpt_store(mem_root), every=5)
    with pytest.raises(ValueError, match=r"checkpoint\(\) must be the last stage: add \.map\(\) before it"):
        pipe.map(len)
    with pytest.raises(ValueError, match=r"batch\(\) before it"):
        pipe.batch(2)
    assert "  .checkpoint(store=CheckpointStore(" in repr(pipe)


@pytest.mark.parametrize("every", [0, -1, 2.0, True])
def test_every_must_be_a_positive_int(mem_root: str, every: Any) -> None:
    with pytest.raises(ValueError, match=r"every=.* must be a positive int"):
        CheckpointSink(IterableWrapper(range(3)), ckpt_store(mem_root), every=every)


def test_state_may_not_claim_the_data_key(mem_root: str) -> None:
    sink = CheckpointSink(IterableWrapper(range(3)), ckpt_store(mem_root), every=1, state=lambda: {"data": 1})
    next(sink)
    with pytest.raises(ValueError, match="'data' key"):
        next(sink)


def test_refuses_to_run_in_a_dataloader_worker(shards: str, mem_root: str) -> None:
    pipe = sp.webdataset(f"{shards}/").checkpoint(ckpt_store(mem_root), every=5)
    loader = DataLoader(pipe, batch_size=None, num_workers=1, multiprocessing_context="fork")
    with pytest.raises(ConfigError, match=r"DataLoader worker.*num_workers=0"):
        next(iter(loader))
