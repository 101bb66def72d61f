"""CheckpointStore on memory:// and file://: layout, commit protocol, retention, fallback, raw access, errors."""

from __future__ import annotations

import fractions
import io
import json
import pickle
import zipfile
from pathlib import Path
from typing import IO, Any

import fsspec
import pytest
import torch

import s3pipes
from s3pipes import Store
from s3pipes.checkpoint import CheckpointNotFound, CheckpointStore, CorruptCheckpoint, WeightsOnlyRefused


def state_for(step: int) -> dict[str, Any]:
    """A small training state whose every tensor encodes ``step``."""
    return {
        "model": {"w": torch.full((4, 3), float(step)), "b": torch.arange(3) + step},
        "optim": {"state": {0: {"momentum": torch.full((3,), -float(step))}}, "param_groups": [{"lr": 0.1}]},
        "data": {"epoch": step, "offset": 7 * step, "order": "seed=0"},
    }


def assert_state(state: Any, step: int) -> None:
    assert torch.equal(state["model"]["w"], torch.full((4, 3), float(step)))
    assert torch.equal(state["model"]["b"], torch.arange(3) + step)
    assert torch.equal(state["optim"]["state"][0]["momentum"], torch.full((3,), -float(step)))
    assert state["data"] == {"epoch": step, "offset": 7 * step, "order": "seed=0"}


@pytest.fixture(params=["memory", "file"])
def run(request: pytest.FixtureRequest, mem_root: str, tmp_path: Path) -> str:
    """A run prefix on memory:// or on the local disk (whose writes go through a temp file and a rename)."""
    return f"{mem_root}/project/exp/run" if request.param == "memory" else f"file://{tmp_path}/project/exp/run"


def objects(store: Store, run: str) -> list[str]:
    """Every object under ``run``, relative to it."""
    try:
        return [url[len(run) + 1 :] for url in store.list(run + "/")]
    except s3pipes.ObjectNotFound:
        return []


def test_round_trip_layout_and_latest(run: str) -> None:
    store = Store()
    ckpt = CheckpointStore(run, store=store)
    url = ckpt.save(state_for(3), step=3)
    assert url == f"{run}/step-000000003/state.pt"
    ckpt.save(state_for(4), step=4)
    assert objects(store, run) == [
        "latest.json",
        "step-000000003/COMMITTED.json",
        "step-000000003/state.pt",
        "step-000000004/COMMITTED.json",
        "step-000000004/state.pt",
    ]
    marker = json.loads(store.read_bytes(f"{run}/step-000000004/COMMITTED.json"))
    assert marker["step"] == 4 and marker["payload"] == "state.pt" and len(marker["sha256"]) == 64
    assert marker["size"] == store.info(f"{run}/step-000000004/state.pt")["size"]
    assert marker["torch"] == torch.__version__
    assert ckpt.steps() == [3, 4] and ckpt.latest_step() == 4
    assert_state(ckpt.load(), 4)
    assert_state(ckpt.load(step=3, map_location="cpu"), 3)
    assert_state(CheckpointStore(run, store=Store()).load(), 4)  # a fresh process's view


def test_the_pointer_names_the_step_saved_last_not_the_highest(mem_root: str) -> None:
    ckpt = CheckpointStore(mem_root, store=Store())
    for step in (5, 1, 3):
        ckpt.save(state_for(step), step=step)
    assert ckpt.steps() == [1, 3, 5]
    assert ckpt.latest_step() == 3
    assert_state(ckpt.load(), 3)


def test_saving_a_step_again_replaces_it(mem_root: str) -> None:
    ckpt = CheckpointStore(mem_root, store=Store())
    ckpt.save(state_for(1), step=1)
    ckpt.save(state_for(9), step=1)
    assert ckpt.steps() == [1]
    assert_state(ckpt.load(step=1), 9)


def test_empty_run_says_so(run: str) -> None:
    ckpt = CheckpointStore(run, store=Store())
    assert ckpt.steps() == [] and ckpt.latest_step() is None
    with pytest.raises(CheckpointNotFound, match="no committed checkpoint in this run") as info:
        ckpt.load()
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, s3pipes.ObjectNotFound)
    assert run in str(info.value) and info.value.step is None and info.value.available == []


def test_missing_step_names_it_and_lists_the_committed_ones(mem_root: str) -> None:
    ckpt = CheckpointStore(mem_root, store=Store())
    for step in (1, 2):
        ckpt.save(state_for(step), step=step)
    with pytest.raises(FileNotFoundError, match=r"step 7 has no committed checkpoint.*Committed steps: 1, 2") as info:
        ckpt.load(step=7)
    assert isinstance(info.value, CheckpointNotFound) and info.value.available == [1, 2]
    assert f"{mem_root}/step-000000007" in str(info.value)
    again = pickle.loads(pickle.dumps(info.value))
    assert (type(again), str(again), again.step, again.available) == (CheckpointNotFound, str(info.value), 7, [1, 2])


def test_keep_last_deletes_older_steps_whole(run: str) -> None:
    store = Store()
    ckpt = CheckpointStore(run, keep_last=2, store=store)
    for step in range(5):
        ckpt.save(state_for(step), step=step)
    assert ckpt.steps() == [3, 4]
    assert [name for name in objects(store, run) if name.startswith("step-")] == [
        "step-000000003/COMMITTED.json",
        "step-000000003/state.pt",
        "step-000000004/COMMITTED.json",
        "step-000000004/state.pt",
    ]
    assert_state(ckpt.load(), 4)


def test_retention_keeps_the_step_just_saved_and_clears_killed_saves_below_it(mem_root: str) -> None:
    store = Store()
    ckpt = CheckpointStore(mem_root, keep_last=2, store=store)
    for step in (10, 11, 12):
        ckpt.save(state_for(step), step=step)
    store.write_bytes(f"{mem_root}/step-000000002/state.pt", b"half a payload")  # a killed save's leftover
    store.write_bytes(f"{mem_root}/step-000000020/state.pt", b"a save in progress")  # above: not ours to judge
    ckpt.save(state_for(5), step=5)  # e.g. resumed from an older step
    assert ckpt.steps() == [5, 11, 12] and ckpt.latest_step() == 5
    assert not store.exists(f"{mem_root}/step-000000002/state.pt")
    assert store.exists(f"{mem_root}/step-000000020/state.pt")


def test_load_falls_back_when_latest_points_to_an_uncommitted_step(mem_root: str) -> None:
    store = Store()
    ckpt = CheckpointStore(mem_root, store=store)
    for step in (1, 2):
        ckpt.save(state_for(step), step=step)
    # A save of step 3 killed after its payload: no marker. Point latest.json at it anyway.
    store.write_bytes(f"{mem_root}/step-000000003/state.pt", store.read_bytes(f"{mem_root}/step-000000002/state.pt"))
    latest = json.loads(store.read_bytes(f"{mem_root}/latest.json"))
    store.write_bytes(f"{mem_root}/latest.json", json.dumps({**latest, "step": 3}).encode())
    assert ckpt.steps() == [1, 2] and ckpt.latest_step() == 2
    assert_state(ckpt.load(), 2)
    with pytest.raises(CheckpointNotFound, match="step 3"):
        ckpt.load(step=3)


@pytest.mark.parametrize("latest", [None, b"{not json", b'{"step": "seven"}'])
def test_a_missing_or_unreadable_pointer_falls_back_to_the_highest_step(mem_root: str, latest: bytes | None) -> None:
    store = Store()
    ckpt = CheckpointStore(mem_root, store=store)
    for step in (2, 1):
        ckpt.save(state_for(step), step=step)
    if latest is None:
        store.delete(f"{mem_root}/latest.json")
    else:
        store.write_bytes(f"{mem_root}/latest.json", latest)
    assert ckpt.latest_step() == 2
    assert_state(ckpt.load(), 2)


def test_a_payload_unlike_its_marker_is_never_loaded(mem_root: str, caplog: pytest.LogCaptureFixture) -> None:
    store = Store()
    ckpt = CheckpointStore(mem_root, store=store)
    for step in (1, 2):
        ckpt.save(state_for(step), step=step)
    payload = f"{mem_root}/step-000000002/state.pt"
    good = store.read_bytes(payload)
    store.write_bytes(payload, good[:100] + bytes([good[100] ^ 1]) + good[101:])  # same size, one bit flipped
    with pytest.raises(CorruptCheckpoint, match="sha256") as info:
        ckpt.load(step=2)
    assert payload in str(info.value) and isinstance(info.value, ValueError)
    assert_state(ckpt.load(), 1)  # the latest is skipped, with a warning
    assert "falling back" in caplog.text
    store.write_bytes(payload, good[:-10])  # truncated: the marker's size no longer matches
    assert ckpt.steps() == [1]
    with pytest.raises(CorruptCheckpoint, match="bytes, but its marker recorded"):
        ckpt.load(step=2)


def test_when_every_committed_payload_is_corrupt_load_says_corrupt(mem_root: str) -> None:
    store = Store()
    ckpt = CheckpointStore(mem_root, store=store)
    ckpt.save(state_for(1), step=1)
    payload = f"{mem_root}/step-000000001/state.pt"
    store.write_bytes(payload, bytes(len(store.read_bytes(payload))))
    with pytest.raises(CorruptCheckpoint):
        ckpt.load()


class _Crash(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing on the way up handles it."""


class CrashingStore(Store):
    """A memory Store that dies at its ``crash_at``-th mutation (publish, write, delete) and stays dead."""

    def __init__(self, crash_at: int) -> None:
        super().__init__()
        self.crash_at, self.mutations = crash_at, 0

    def _mutate(self) -> None:
        self.mutations += 1
        if self.mutations >= self.crash_at:
            raise _Crash(f"killed at mutation {self.mutations}")

    def open(self, url: str, mode: str = "rb", **kwargs: Any) -> IO[bytes]:
        if mode == "wb":
            self._mutate()
        return super().open(url, mode, **kwargs)

    def write_bytes(self, url: str, data: bytes) -> None:
        self._mutate()
        super().write_bytes(url, data)

    def delete(self, url: str) -> None:
        self._mutate()
        super().delete(url)


def test_a_save_killed_between_any_two_writes_never_yields_a_partial_checkpoint(mem_root: str) -> None:
    """Every prefix of a save's writes (payload, marker, pointer, the replaced payload's delete, retention
    deletes) leaves a loadable run, and the step being replaced is never without a payload."""
    crash_at = 1
    for _ in range(100):
        run = f"{mem_root}/crash-{crash_at}"
        healthy = CheckpointStore(run, store=Store())
        for step in (1, 2, 3):
            healthy.save(state_for(step), step=step)
        healthy.save(state_for(40), step=4)
        dying = CheckpointStore(run, keep_last=2, store=CrashingStore(crash_at))
        try:
            dying.save(state_for(4), step=4)  # replaces a committed step, then retention deletes steps 1, 2
        except _Crash:
            crashed = True
        else:
            crashed = False
        state = healthy.load()
        step = state["data"]["epoch"]
        assert (step, healthy.latest_step()) in ((40, 4), (4, 4)), f"crash at {crash_at}: step {step}"
        assert_state(state, step)
        for committed in healthy.steps():
            assert healthy.load(step=committed)["data"]["epoch"] in (committed, 40)
        if not crashed:
            assert crash_at == 9, "payload, marker, pointer, replaced payload deleted, 2 markers and 2 payloads deleted"
            assert healthy.steps() == [3, 4] and step == 4
            return
        crash_at += 1
    pytest.fail("the save never completed")


def test_a_failed_save_of_a_committed_step_leaves_it_as_it_was(mem_root: str) -> None:
    ckpt = CheckpointStore(mem_root, keep_last=1, store=Store())
    ckpt.save(state_for(7), step=7)
    with pytest.raises(Exception, match="lambda"):
        ckpt.save({**state_for(70), "fn": lambda: None}, step=7)  # torch.save cannot pickle it
    assert ckpt.steps() == [7] and ckpt.uncommitted() == {}
    assert_state(ckpt.load(), 7)
    ckpt.save(state_for(70), step=7)  # replaced: the new payload beside the old, which goes after the marker
    assert_state(ckpt.load(), 70)
    assert list(ckpt.markers()) == [7] and len(Store().list(f"{mem_root}/step-000000007/")) == 2


def test_raw_writer_and_reader_interoperate_with_plain_fsspec(run: str) -> None:
    ckpt = CheckpointStore(run, store=Store())
    with ckpt.writer("extra/scaler.pt") as f:
        torch.save({"scale": torch.tensor(2.0**16)}, f)
    with ckpt.reader("extra/scaler.pt") as f:
        assert torch.equal(torch.load(f, weights_only=True)["scale"], torch.tensor(2.0**16))
    with fsspec.open(f"{run}/extra/scaler.pt", "rb") as f:  # no s3pipes on the reading side
        assert torch.load(f, weights_only=True)["scale"].item() == 2.0**16
    with fsspec.open(f"{run}/plain.pt", "wb") as f:  # no s3pipes on the writing side
        torch.save(state_for(8), f)
    assert_state(CheckpointStore.load_url(f"{run}/plain.pt", store=Store()), 8)
    assert_state(ckpt.load(key="plain.pt"), 8)
    assert ckpt.steps() == []  # raw objects are not steps


def test_raw_writer_publishes_nothing_when_the_block_raises(mem_root: str) -> None:
    store = Store()
    ckpt = CheckpointStore(mem_root, store=store)
    with pytest.raises(RuntimeError, match="interrupted"), ckpt.writer("extra.pt") as f:
        f.write(b"partial")
        raise RuntimeError("interrupted")
    assert not store.exists(f"{mem_root}/extra.pt")


def test_fixed_key_saves_replace_one_object_without_steps(mem_root: str) -> None:
    ckpt = CheckpointStore(mem_root, store=Store())
    for epoch in range(3):
        assert ckpt.save(state_for(epoch), key="model.pt") == f"{mem_root}/model.pt"
    assert_state(ckpt.load(key="model.pt"), 2)
    assert ckpt.steps() == []
    with pytest.raises(CheckpointNotFound, match=r"load\(key=\.\.\.\)"):
        ckpt.load()
    with pytest.raises(s3pipes.ConfigError, match="S3"):
        ckpt.versions("model.pt")


def test_weights_only_refuses_pickled_objects_by_default(mem_root: str) -> None:
    ckpt = CheckpointStore(mem_root, store=Store())
    ckpt.save({"w": torch.ones(2), "ratio": fractions.Fraction(1, 3)}, step=1)
    with pytest.raises(WeightsOnlyRefused, match="weights_only=False") as info:
        ckpt.load()
    assert f"{mem_root}/step-000000001/state.pt" in str(info.value)
    assert "Fraction" in str(info.value)
    assert isinstance(info.value, pickle.UnpicklingError) and isinstance(info.value, s3pipes.DataError)
    assert ckpt.load(weights_only=False)["ratio"] == fractions.Fraction(1, 3)


def test_an_object_that_is_not_a_checkpoint_is_named(mem_root: str) -> None:
    store = Store()
    store.write_bytes(f"{mem_root}/notes.txt", b"PK\x03\x04 this is not a zip archive at all" * 10)
    with pytest.raises(CorruptCheckpoint, match=r"not a readable torch\.save file") as info:
        CheckpointStore(mem_root, store=store).load(key="notes.txt")
    assert f"{mem_root}/notes.txt" in str(info.value)
    with pytest.raises(s3pipes.ObjectNotFound, match=r"missing\.pt"):
        CheckpointStore.load_url(f"{mem_root}/missing.pt", store=store)


def _zip_of_text() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("hello.txt", "hi")
    return buffer.getvalue()


@pytest.mark.parametrize("weights_only", [True, False])
@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"my training notes\n", id="text"),
        pytest.param(b'{"lr": 0.1}', id="json"),
        pytest.param(bytes(range(256)) * 16, id="binary"),
        pytest.param(pickle.dumps({"a": 1}), id="plain-pickle"),
        pytest.param(_zip_of_text(), id="other-zip"),
    ],
)
def test_a_file_that_is_no_torch_save_is_corrupt_whatever_weights_only(
    mem_root: str, body: bytes, weights_only: bool
) -> None:
    """Not a WeightsOnlyRefused (which advises weights_only=False) nor torch's own KeyError or
    RuntimeError: the file is simply not a checkpoint."""
    store = Store()
    store.write_bytes(f"{mem_root}/file.pt", body)
    with pytest.raises(CorruptCheckpoint, match=r"not a (readable )?torch\.save file") as info:
        CheckpointStore(mem_root, store=store).load(key="file.pt", weights_only=weights_only)
    assert f"{mem_root}/file.pt" in str(info.value)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's, about weights-only loading of it
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_legacy_torch_save_file_of_any_pickle_protocol_is_a_checkpoint(mem_root: str, protocol: int) -> None:
    store = Store()
    with store.open(f"{mem_root}/legacy.pt", "wb") as f:
        torch.save({"w": torch.ones(2), "ratio": fractions.Fraction(1, 3)}, f,
                   _use_new_zipfile_serialization=False, pickle_protocol=protocol)  # fmt: skip
    ckpt = CheckpointStore(mem_root, store=store)
    with pytest.raises(WeightsOnlyRefused):
        ckpt.load(key="legacy.pt")
    assert ckpt.load(key="legacy.pt", weights_only=False)["ratio"] == fractions.Fraction(1, 3)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.save({}), "exactly one of step= or key="),
        (lambda c: c.save({}, step=1, key="m.pt"), "exactly one of step= or key="),
        (lambda c: c.save({}, step=-1), "step=-1"),
        (lambda c: c.save({}, step=True), "step=True"),
        (lambda c: c.load(step=1, key="m.pt"), "not both"),
        (lambda c: c.load(version_id="abc"), "needs key="),
        (lambda c: c.writer("../outside.pt"), "relative object name"),
        (lambda c: c.writer("/abs.pt"), "relative object name"),
        (lambda c: c.writer(""), "relative object name"),
        (lambda c: c.writer("latest.json"), "reserved"),
        (lambda c: c.reader("step-000000001/state.pt"), "reserved"),
    ],
)
def test_arguments_are_checked_and_named(mem_root: str, call: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(CheckpointStore(mem_root, store=Store()))


@pytest.mark.parametrize("keep_last", [0, -1, True, 2.5])
def test_keep_last_must_be_a_positive_int(keep_last: Any) -> None:
    with pytest.raises(ValueError, match="keep_last="):
        CheckpointStore("memory://b/run", keep_last=keep_last, store=Store())


def test_default_store_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    ckpt = CheckpointStore("s3://ckpts/project/experiment/run/")
    assert ckpt.url == "s3://ckpts/project/experiment/run"
    assert ckpt.store.endpoint(ckpt.url) == "http://127.0.0.1:9"
    assert repr(ckpt) == "CheckpointStore('s3://ckpts/project/experiment/run', keep_last=None)"
