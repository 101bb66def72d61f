"""Sharded (DCP) steps of CheckpointStore in one process, without a process group, on file:// and memory://."""

from __future__ import annotations

import fractions
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException

import s3pipes
from s3pipes import Store
from s3pipes.checkpoint import CheckpointNotFound, CheckpointStore, CorruptCheckpoint, WeightsOnlyRefused, sharded


def state_for(step: int) -> dict[str, Any]:
    """A training state whose every value encodes ``step``; a list of tensors and plain values too."""
    return {
        "model": {"w": torch.full((4, 3), float(step)), "layers": [torch.arange(3) + step, torch.ones(2) * step]},
        "optim": {"param_groups": [{"lr": 0.1 * step, "betas": (0.9, 0.99)}]},
        "data": {"epoch": step, "order": "seed=0"},
    }


def zeroed() -> dict[str, Any]:
    """The structure of ``state_for``, with other values: what load_sharded fills in place."""
    return {
        "model": {"w": torch.zeros(4, 3), "layers": [torch.zeros(3, dtype=torch.int64), torch.zeros(2)]},
        "optim": {"param_groups": [{"lr": 0.0, "betas": (0.0, 0.0)}]},
        "data": {"epoch": -1, "order": ""},
    }


def assert_state(state: Any, step: int) -> None:
    expected = state_for(step)
    assert torch.equal(state["model"]["w"], expected["model"]["w"])
    assert len(state["model"]["layers"]) == 2
    for got, want in zip(state["model"]["layers"], expected["model"]["layers"], strict=True):
        assert torch.equal(got, want)
    assert state["optim"] == expected["optim"] and state["data"] == expected["data"]


@pytest.fixture(params=["file", "memory"])
def run(request: pytest.FixtureRequest, mem_root: str, tmp_path: Path) -> str:
    return f"file://{tmp_path}/project/run" if request.param == "file" else f"{mem_root}/project/run"


def objects(store: Store, run: str) -> list[str]:
    try:
        return [url[len(run) + 1 :] for url in store.list(run + "/")]
    except s3pipes.ObjectNotFound:
        return []


def test_round_trip_layout_marker_and_a_whole_load(run: str) -> None:
    store = Store()
    ckpt = CheckpointStore(run, store=store)
    assert ckpt.save_sharded(state_for(3), step=3) == f"{run}/step-000000003/dcp"
    assert objects(store, run) == [
        "latest.json",
        "step-000000003/COMMITTED.json",
        "step-000000003/dcp/.metadata",
        "step-000000003/dcp/__0_0.distcp",
    ]
    marker = json.loads(store.read_bytes(f"{run}/step-000000003/COMMITTED.json"))
    assert marker["kind"] == "dcp" and marker["payload"] == "dcp" and marker["step"] == 3 and marker["ranks"] == 1
    assert "sha256" not in marker, "an s3pipes without sharded steps must ignore this marker, not torch.load a dir"
    for name, size in marker["files"].items():
        assert store.info(f"{run}/step-000000003/{name}")["size"] == size > 0
    assert marker["size"] == sum(marker["files"].values()) and marker["torch"] == torch.__version__
    assert ckpt.steps() == [3] and ckpt.latest_step() == 3
    assert_state(ckpt.load(3), 3)
    assert_state(CheckpointStore(run, store=Store()).load(), 3)  # a fresh process's view
    assert_state(ckpt.load(3, map_location="cpu"), 3)
    with pytest.raises(ValueError, match=r"map_location=.*loads to one device"):
        ckpt.load(3, map_location={"cuda:0": "cpu"})


def test_load_sharded_fills_the_state_in_place_and_returns_the_step(run: str) -> None:
    ckpt = CheckpointStore(run, store=Store())
    for step in (1, 2):
        ckpt.save_sharded(state_for(step), step=step)
    state = zeroed()
    weights = state["model"]["w"]
    assert ckpt.load_sharded(state) == 2
    assert_state(state, 2)
    assert state["model"]["w"] is weights, "tensors are loaded into, not replaced"
    assert ckpt.load_sharded(state, step=1) == 1
    assert_state(state, 1)


def test_retention_counts_and_deletes_both_kinds_of_steps(run: str) -> None:
    store = Store()
    ckpt = CheckpointStore(run, keep_last=2, store=store)
    for step in range(1, 6):
        if step % 2:
            ckpt.save_sharded(state_for(step), step=step)
        else:
            ckpt.save(state_for(step), step=step)
    assert ckpt.steps() == [4, 5] and ckpt.latest_step() == 5
    assert [name for name in objects(store, run) if name.startswith("step-")] == [
        "step-000000004/COMMITTED.json",
        "step-000000004/state.pt",
        "step-000000005/COMMITTED.json",
        "step-000000005/dcp/.metadata",
        "step-000000005/dcp/__0_0.distcp",
    ]
    assert_state(ckpt.load(4), 4)
    assert_state(ckpt.load(), 5)
    ckpt.save(state_for(6), step=6)  # the torch.save step is now the latest; step 5 stays the latest sharded one
    state = zeroed()
    assert ckpt.steps() == [5, 6] and ckpt.load_sharded(state) == 5
    assert_state(state, 5)


def test_saving_a_sharded_step_again_replaces_whatever_was_there(run: str) -> None:
    store = Store()
    ckpt = CheckpointStore(run, store=store)
    ckpt.save(state_for(40), step=4)
    ckpt.save_sharded(state_for(41), step=4)
    ckpt.save_sharded(state_for(4), step=4)
    assert objects(store, run) == [
        "latest.json",
        "step-000000004/COMMITTED.json",
        "step-000000004/dcp/.metadata",
        "step-000000004/dcp/__0_0.distcp",
    ]
    assert_state(ckpt.load(4), 4)


def test_a_missing_or_resized_file_is_named_and_skipped(run: str, caplog: pytest.LogCaptureFixture) -> None:
    store = Store()
    ckpt = CheckpointStore(run, store=store)
    for step in (1, 2):
        ckpt.save_sharded(state_for(step), step=step)
    shard = f"{run}/step-000000002/dcp/__0_0.distcp"
    good = store.read_bytes(shard)
    store.write_bytes(shard, good[:-1])
    with pytest.raises(CorruptCheckpoint, match=f"{shard}: {len(good) - 1} bytes, but its marker recorded"):
        ckpt.load(2)
    store.delete(shard)
    with pytest.raises(CorruptCheckpoint, match="missing, but its marker lists it") as info:
        ckpt.load(2)
    assert shard in str(info.value) and isinstance(info.value, ValueError)
    assert ckpt.steps() == [1] and ckpt.latest_step() == 1
    assert_state(ckpt.load(), 1)
    assert "falling back" in caplog.text
    with pytest.raises(CorruptCheckpoint, match=r"__0_0\.distcp"):
        ckpt.load_sharded(zeroed(), step=2)
    state = zeroed()
    assert ckpt.load_sharded(state) == 1
    assert_state(state, 1)


def test_missing_steps_are_named_with_the_sharded_steps_there_are(run: str) -> None:
    ckpt = CheckpointStore(run, store=Store())
    with pytest.raises(CheckpointNotFound, match="no committed checkpoint"):
        ckpt.load_sharded(zeroed())
    ckpt.save_sharded(state_for(1), step=1)
    ckpt.save(state_for(2), step=2)
    with pytest.raises(CheckpointNotFound, match=r"step 7 has no committed checkpoint.*Committed steps: 1$") as info:
        ckpt.load_sharded(zeroed(), step=7)
    assert info.value.available == [1] and f"{run}/step-000000007" in str(info.value)
    with pytest.raises(s3pipes.ConfigError, match=r"step 2 was saved with save\(\).*load\(step=2\)"):
        ckpt.load_sharded(zeroed(), step=2)
    with pytest.raises(ValueError, match="step=-1 must be an int >= 0"):
        ckpt.load_sharded(zeroed(), step=-1)
    with pytest.raises(ValueError, match="step=-1 must be an int >= 0"):
        ckpt.save_sharded(state_for(1), step=-1)


def test_weights_only_covers_values_dcp_pickles(run: str) -> None:
    ckpt = CheckpointStore(run, store=Store())
    ckpt.save_sharded({"w": torch.ones(2), "ratio": fractions.Fraction(1, 3)}, step=1)
    with pytest.raises(WeightsOnlyRefused, match=r"dcp \(value 'ratio'\): torch.load\(weights_only=True\) refused"):
        ckpt.load(1)
    assert ckpt.load(1, weights_only=False)["ratio"] == fractions.Fraction(1, 3)
    with pytest.raises(WeightsOnlyRefused, match="'ratio'"):
        ckpt.load_sharded({"w": torch.zeros(2), "ratio": None})
    state: dict[str, Any] = {"w": torch.zeros(2), "ratio": None}
    assert ckpt.load_sharded(state, weights_only=False) == 1 and state["ratio"] == fractions.Fraction(1, 3)


class _Payload:
    """What a hostile .metadata could hold: unpickling it calls a function of its choosing."""

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (os.getpid, ())


def test_metadata_naming_other_objects_is_refused_and_unreadable_metadata_is_corrupt(run: str) -> None:
    store = Store()
    ckpt = CheckpointStore(run, store=store)
    ckpt.save_sharded(state_for(1), step=1)
    step_url, name = f"{run}/step-000000001", "dcp/.metadata"

    def replace_metadata(data: bytes) -> None:  # and keep the marker in step, as if DCP had written it
        store.write_bytes(f"{step_url}/{name}", data)
        marker = json.loads(store.read_bytes(f"{step_url}/COMMITTED.json"))
        marker["files"][name] = len(data)
        marker["size"] = sum(marker["files"].values())
        store.write_bytes(f"{step_url}/COMMITTED.json", json.dumps(marker).encode())

    replace_metadata(pickle.dumps(_Payload()))
    with pytest.raises(WeightsOnlyRefused, match=r"\.metadata: DCP's metadata names posix\.getpid") as info:
        ckpt.load(1)
    assert isinstance(info.value, pickle.UnpicklingError)
    with pytest.raises(WeightsOnlyRefused, match=r"posix\.getpid"):
        ckpt.load_sharded(zeroed())
    with pytest.raises(CorruptCheckpoint, match="holds a int, not DCP metadata"):  # it ran: trusted on request
        ckpt.load(1, weights_only=False)
    replace_metadata(b"not a pickle")
    with pytest.raises(CorruptCheckpoint, match=r"\.metadata: not readable as DCP metadata"):
        ckpt.load(1)


def test_dcp_failures_reach_the_caller_as_themselves(run: str) -> None:
    ckpt = CheckpointStore(run, store=Store())
    ckpt.save_sharded({"w": torch.ones(2)}, step=1)
    with pytest.raises(RuntimeError, match="Missing key in checkpoint state_dict: extra") as info:
        ckpt.load_sharded({"w": torch.zeros(2), "extra": torch.zeros(1)})  # a real failure inside dcp.load
    assert not isinstance(info.value, CheckpointException) and isinstance(info.value.__context__, CheckpointException)


def test_a_backend_error_wrapped_by_dcp_comes_out_translated_and_named(mem_root: str) -> None:
    url = f"{mem_root}/run/step-000000001/dcp"
    failure = FileNotFoundError(f"{url}/__0_0.distcp")
    expected = re.escape(f"{url} (endpoint memory): object does not exist")
    with pytest.raises(s3pipes.ObjectNotFound, match=expected) as info, sharded._dcp_call(Store(), url, no_dist=True):
        raise CheckpointException("read", {0: (failure, None)})  # type: ignore[dict-item]
    assert info.value.__cause__ is failure


def test_unwritten_files_are_not_committed(mem_root: str) -> None:
    """The check before the marker: every file DCP's metadata points into must be listed, long enough."""
    store = Store()
    ckpt = CheckpointStore(mem_root, store=store)
    ckpt.save_sharded(state_for(1), step=1)
    marker = json.loads(store.read_bytes(f"{mem_root}/step-000000001/COMMITTED.json"))
    metadata = sharded.open_step(store, ckpt.step_url(1), marker, weights_only=True)
    assert sharded.written_files(store, ckpt.step_url(1), metadata)["dcp/.metadata"] > 0
    shard = f"{mem_root}/step-000000001/dcp/__0_0.distcp"
    store.write_bytes(shard, store.read_bytes(shard)[:10])
    with pytest.raises(CorruptCheckpoint, match=r"__0_0\.distcp: DCP wrote \d+\+ bytes to it but it is listed with 10"):
        sharded.written_files(store, ckpt.step_url(1), metadata)
    store.delete(shard)
    with pytest.raises(CorruptCheckpoint, match=r"__0_0\.distcp: DCP wrote \d+\+ bytes to it but it is not listed"):
        sharded.written_files(store, ckpt.step_url(1), metadata)


@pytest.mark.parametrize(
    "change",
    [
        {"kind": "zarr"},
        {"payload": "elsewhere"},
        {"files": {"dcp/__0_0.distcp": 5}},  # no .metadata
        {"files": {"dcp/.metadata": 5, "../escape": 1}},
        {"size": 1},
    ],
)
def test_a_malformed_sharded_marker_leaves_its_step_uncommitted(mem_root: str, change: dict[str, Any]) -> None:
    store = Store()
    ckpt = CheckpointStore(mem_root, store=store)
    ckpt.save_sharded(state_for(1), step=1)
    url = f"{mem_root}/step-000000001/COMMITTED.json"
    store.write_bytes(url, json.dumps({**json.loads(store.read_bytes(url)), **change}).encode())
    assert ckpt.steps() == []
    with pytest.raises(CheckpointNotFound):
        ckpt.load(1)
