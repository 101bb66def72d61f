"""Corrupt data on file:// shards: raise by default naming where; on_error="skip" skips, counts, keeps it in state."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset
from PIL import Image

import s3pipes as sp
from s3pipes import Store
from s3pipes.errors import CorruptShard, DecodeError, DuplicateField, ObjectNotFound
from s3pipes.spec import from_spec
from tests.contract import assert_resumes, run

SHARDS, PER_SHARD = 3, 6
BAD_PNG, BAD_JSON = "sample0003", "sample0014"  # in shard 0 and shard 2


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def all_keys() -> list[str]:
    return [f"sample{n:04d}" for n in range(SHARDS * PER_SHARD)]


@pytest.fixture
def root(tmp_path: Path) -> str:
    root = f"file://{tmp_path}"
    store = Store()
    for s in range(SHARDS):
        with store.open(f"{root}/shard-{s:03d}.tar", "wb") as f, webdataset.TarWriter(f) as writer:
            for i in range(PER_SHARD):
                n = s * PER_SHARD + i
                key = f"sample{n:04d}"
                image = b"not a png at all" if key == BAD_PNG else png(n)
                text = b'{"n": ' if key == BAD_JSON else b'{"n": %d}' % n
                writer.write({"__key__": key, "png": image, "cls": str(n % 3).encode(), "json": text})
    return root


def members(url: str) -> list[Any]:
    """The members of an intact shard, with their header offsets."""
    return list(sp.from_urls(url, store=Store()).open_object().untar())


def first_member_of(url: str, key: str) -> Any:
    return next(m for m in members(url) if m.name.startswith(key + "."))


def rewrite(url: str, edit: Any) -> None:
    path = Path(url.removeprefix("file://"))
    path.write_bytes(edit(path.read_bytes()))


@pytest.fixture
def truncated(root: str) -> tuple[str, Any]:
    """Shard 1 cut inside the PNG data of sample0009 (its 4th sample; its cls and json members come first)."""
    url = f"{root}/shard-001.tar"
    member = next(m for m in members(url) if m.name == "sample0009.png")
    rewrite(url, lambda data: data[: member.offset + 1536 + 10])  # past its pax + ustar headers, mid-data
    return url, member


@pytest.fixture
def garbage(root: str) -> tuple[str, Any]:
    """Shard 1 with the first header of sample0009 overwritten by garbage."""
    url = f"{root}/shard-001.tar"
    member = first_member_of(url, "sample0009")
    rewrite(url, lambda data: data[: member.offset] + b"\xff" * 512 + data[member.offset + 512 :])
    return url, member


def good_keys(*, lost: set[str] | frozenset[str] = frozenset()) -> list[str]:
    return [key for key in all_keys() if key not in lost]


LOST_IN_SHARD_1 = {f"sample{n:04d}" for n in range(9, 12)}


# -- the default: raise, naming the shard, the member and the byte offset ------------------------------------


def test_truncated_shard_raises_naming_url_member_and_offset(truncated: tuple[str, Any], root: str) -> None:
    url, member = truncated
    with pytest.raises(CorruptShard) as info:
        list(sp.webdataset(f"{root}/"))
    error = info.value
    assert (error.url, error.member, error.offset) == (url, member.name, member.offset)
    assert url in str(error) and member.name in str(error) and f"byte offset {member.offset}" in str(error)
    assert "truncated" in str(error)


def test_garbage_header_raises_naming_url_and_offset(garbage: tuple[str, Any], root: str) -> None:
    url, member = garbage
    with pytest.raises(CorruptShard) as info:
        list(sp.webdataset(f"{root}/"))
    assert (info.value.url, info.value.offset) == (url, member.offset)
    assert f"byte offset {member.offset}" in str(info.value) and "checksum" in str(info.value)


def test_after_corrupt_shard_every_next_raises_it_again_and_the_state_stays_there(
    garbage: tuple[str, Any], root: str
) -> None:
    pipe = sp.webdataset(f"{root}/")
    iterator = iter(pipe)
    seen = []
    with pytest.raises(CorruptShard) as first:
        while True:
            seen.append(next(iterator)["__key__"])
    state = pipe.state_dict()
    for _ in range(2):  # not the next shard's samples, nor the partial sample before the corrupt header
        with pytest.raises(CorruptShard) as again:
            next(iterator)
        assert again.value is first.value
        assert pipe.state_dict() == state
    assert seen == all_keys()[:8]  # sample0008 was being built when the header after it failed
    resumed = sp.webdataset(f"{root}/")
    resumed.load_state_dict(json.loads(json.dumps(state)))
    with pytest.raises(CorruptShard) as on_resume:
        list(resumed)
    assert on_resume.value.offset == first.value.offset


@pytest.mark.parametrize(("key", "field", "shard"), [(BAD_PNG, "png", 0), (BAD_JSON, "json", 2)])
def test_undecodable_field_raises_naming_sample_shard_and_field(root: str, key: str, field: str, shard: int) -> None:
    pipe = sp.webdataset(f"{root}/").decode("pil")
    if key == BAD_JSON:  # get past the bad PNG first
        pipe = sp.webdataset(f"{root}/").decode("pil", handlers={"png": bytes})
    with pytest.raises(DecodeError) as info:
        list(pipe)
    error = info.value
    assert (error.key, error.field, error.url) == (key, field, f"{root}/shard-{shard:03d}.tar")
    member = next(m for m in members(error.url) if m.name == f"{key}.{field}")
    assert (error.member, error.offset) == (member.name, member.offset)
    assert key in str(error) and repr(field) in str(error) and error.url in str(error)
    assert f"member {member.name!r}, byte offset {member.offset}:" in str(error)


def test_invalid_policy_is_refused(root: str) -> None:
    with pytest.raises(ValueError, match="on_error='ignore'"):
        sp.webdataset(f"{root}/", on_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="raise, skip"):
        sp.webdataset(f"{root}/").decode(on_error="warn")  # type: ignore[arg-type]


# -- on_error="skip" ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("corruption", ["truncated", "garbage"])
def test_skip_corrupt_shard_yields_every_good_sample_once(
    request: pytest.FixtureRequest, corruption: str, root: str
) -> None:
    url, member = request.getfixturevalue(corruption)
    pipe = sp.webdataset(f"{root}/", on_error="skip")
    assert [s["__key__"] for s in pipe] == good_keys(lost=LOST_IN_SHARD_1)
    skipped = pipe.skipped()
    assert skipped["count"] == 1 and skipped["by_stage"] == {"untar": 1}
    [entry] = skipped["entries"]
    assert (entry["stage"], entry["url"], entry["offset"], entry["key"]) == ("untar", url, member.offset, "")
    assert entry["member"] == (member.name if corruption == "truncated" else "")
    assert url in entry["error"]


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_undecodable_samples_counts_and_records_their_keys(root: str, workers: int) -> None:
    pipe = sp.webdataset(f"{root}/").decode("pil", workers=workers, on_error="skip")
    samples = list(pipe)
    assert [s["__key__"] for s in samples] == good_keys(lost={BAD_PNG, BAD_JSON})
    assert all(isinstance(s["png"], Image.Image) and isinstance(s["json"], dict) for s in samples)
    skipped = pipe.skipped()
    assert (skipped["count"], skipped["by_stage"]) == (2, {"decode": 2})
    assert [(e["key"], e["member"], e["url"][-13:]) for e in skipped["entries"]] == [
        (BAD_PNG, f"{BAD_PNG}.png", "shard-000.tar"),
        (BAD_JSON, f"{BAD_JSON}.json", "shard-002.tar"),
    ]
    for entry in skipped["entries"]:
        [member] = [m for m in members(entry["url"]) if m.name == entry["member"]]
        assert entry["offset"] == member.offset


def test_store_errors_still_raise_with_skip(root: str) -> None:
    pipe = sp.webdataset([f"{root}/shard-000.tar", f"{root}/missing.tar"], on_error="skip")
    with pytest.raises(ObjectNotFound, match=r"^stage open_object: .*missing\.tar") as caught:
        list(pipe.decode(on_error="skip"))
    assert caught.value.stage == "open_object"


def where(report: dict[str, Any]) -> dict[str, Any]:
    """The report without the error texts (Pillow's names a BytesIO by its address)."""
    entries = [{k: v for k, v in entry.items() if k != "error"} for entry in report["entries"]]
    return {**report, "entries": entries}


def both(root: str, workers: int = 0) -> sp.Pipe[Any]:
    return sp.webdataset(f"{root}/", on_error="skip").decode("numpy", workers=workers, on_error="skip")


def test_skips_survive_a_state_dict_round_trip(truncated: tuple[str, Any], root: str) -> None:
    pipe = both(root)
    keys = [s["__key__"] for s in pipe]
    assert keys == good_keys(lost=LOST_IN_SHARD_1 | {BAD_PNG, BAD_JSON})
    report = pipe.skipped()
    assert (report["count"], report["by_stage"]) == (3, {"untar": 1, "decode": 2})
    state = json.loads(json.dumps(pipe.state_dict()))
    resumed = both(root)
    resumed.load_state_dict(state)
    assert resumed.skipped() == report  # before iterating: read from the loaded state
    assert list(resumed) == []
    assert resumed.skipped() == report  # the end-of-epoch position re-skips nothing


@pytest.mark.parametrize(("corruption", "workers"), [("truncated", 0), ("garbage", 0), ("truncated", 2)])
def test_resume_mid_epoch_is_exact_and_counts_each_skip_once(
    request: pytest.FixtureRequest, corruption: str, workers: int, root: str
) -> None:
    request.getfixturevalue(corruption)
    expected = run(both(root, workers))
    assert len(expected) == SHARDS * PER_SHARD - len(LOST_IN_SHARD_1) - 2
    total = both(root, workers)
    list(total)
    final = where(total.skipped())
    pipe = both(root, workers)
    items = iter(pipe)
    for k in range(len(expected) + 1):
        state = json.loads(json.dumps(pipe.state_dict()))
        before = pipe.skipped()
        resumed = both(root, workers)
        resumed.load_state_dict(state)
        assert resumed.skipped() == before
        assert run(resumed) == expected[k:], f"resume after {k} items"
        assert where(resumed.skipped()) == final, f"resume after {k} items counted skips differently"
        if k < len(expected):
            next(items)


def test_resume_harness_with_skips(truncated: tuple[str, Any], root: str) -> None:
    assert_resumes(lambda: sp.webdataset(f"{root}/", shuffle_seed=3, on_error="skip").decode(on_error="skip"))


def test_skip_entries_are_bounded_but_counted(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from s3pipes.stages.base import SkipLog

    monkeypatch.setattr(SkipLog, "LIMIT", 1)
    pipe = sp.webdataset(f"{root}/").decode(on_error="skip")
    list(pipe)
    report = pipe.skipped()
    assert report["count"] == 2 and [e["key"] for e in report["entries"]] == [BAD_JSON]


def test_spec_keeps_the_policy(root: str) -> None:
    pipe = both(root)
    spec = pipe.to_spec()
    assert {"stage": "untar", "on_error": "skip"} in spec["stages"]
    assert spec["stages"][-1]["on_error"] == "skip"
    assert from_spec(spec, store=Store()).to_spec() == spec
    assert pipe.spec_fingerprint() != sp.webdataset(f"{root}/").decode("numpy").spec_fingerprint()


def test_map_style_decode_errors_name_the_same_member_and_offset(root: str) -> None:
    streamed = sp.webdataset(f"{root}/").decode("pil")
    with pytest.raises(DecodeError) as from_stream:
        list(streamed)
    ds = sp.MapDataset.from_shards(f"{root}/", transform=sp.Decoder("pil"))
    index = [sample["__key__"] for sample in sp.MapDataset.from_shards(f"{root}/")].index(BAD_PNG)
    with pytest.raises(DecodeError) as from_index:
        ds[index]
    expected = (from_stream.value.url, from_stream.value.member, from_stream.value.offset)
    assert (from_index.value.url, from_index.value.member, from_index.value.offset) == expected
    [member] = [m for m in members(expected[0]) if m.name == f"{BAD_PNG}.png"]
    assert expected[1:] == (member.name, member.offset)


def test_samples_stay_plain_dicts_that_torch_loads_with_weights_only(root: str) -> None:
    sample = next(iter(sp.webdataset(f"{root}/")))
    assert type(sample) is dict
    buffer = io.BytesIO()
    torch.save({"buffered": [sample]}, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True) == {"buffered": [sample]}


@pytest.mark.parametrize("workers", [0, 2])
def test_decode_after_other_stages_still_names_the_member_and_offset(root: str, workers: int) -> None:
    pipe = sp.webdataset(f"{root}/").filter(bool).shuffle(4, seed=1).decode("pil", workers=workers)
    with pytest.raises(DecodeError) as info:
        list(pipe)
    error = info.value
    assert (error.key, error.field) in {(BAD_PNG, "png"), (BAD_JSON, "json")}
    [member] = [m for m in members(error.url) if m.name == f"{error.key}.{error.field}"]
    assert (error.member, error.offset) == (member.name, member.offset), str(error)


# -- a field repeated within one sample ---------------------------------------------------------------------


@pytest.fixture
def duplicated(root: str) -> tuple[str, Any]:
    """Shard 1 rewritten with a second ``sample0008.cls`` member right after the first."""
    url = f"{root}/shard-001.tar"
    kept = members(url)
    path = Path(url.removeprefix("file://"))
    with path.open("wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for member in kept:
            copies = 2 if member.name == "sample0008.cls" else 1
            for _ in range(copies):
                info = tarfile.TarInfo(member.name)
                info.size = len(member.data)
                tar.addfile(info, io.BytesIO(member.data))
    [second] = [m for m in members(url) if m.name == "sample0008.cls"][1:]
    return url, second


def test_repeated_field_raises_naming_shard_member_and_offset(duplicated: tuple[str, Any], root: str) -> None:
    url, second = duplicated
    with pytest.raises(DuplicateField) as info:
        list(sp.webdataset(f"{root}/"))
    assert (info.value.url, info.value.member, info.value.offset) == (url, "sample0008.cls", second.offset)
    assert f"{url}, member 'sample0008.cls', byte offset {second.offset}: " in str(info.value)


def test_skip_drops_the_sample_with_a_repeated_field_and_keeps_count(duplicated: tuple[str, Any], root: str) -> None:
    url, second = duplicated
    pipe = both(root)
    keys = [s["__key__"] for s in pipe]
    assert keys == good_keys(lost={"sample0008", BAD_PNG, BAD_JSON})
    report = pipe.skipped()
    assert (report["count"], report["by_stage"]) == (3, {"group_by_key": 1, "decode": 2})
    [entry] = [e for e in report["entries"] if e["stage"] == "group_by_key"]
    assert (entry["url"], entry["member"], entry["offset"]) == (url, "sample0008.cls", second.offset)
    assert {"stage": "group_by_key", "on_error": "skip"} in pipe.to_spec()["stages"]


def test_resume_harness_with_a_repeated_field(duplicated: tuple[str, Any], root: str) -> None:
    assert_resumes(lambda: sp.webdataset(f"{root}/", shuffle_seed=3, on_error="skip").decode(on_error="skip"))


def test_the_state_after_a_repeated_field_raises_resumes_at_that_sample(duplicated: tuple[str, Any], root: str) -> None:
    url, second = duplicated
    pipe = sp.webdataset(f"{root}/")
    iterator = iter(pipe)
    with pytest.raises(DuplicateField):
        while True:
            next(iterator)
    resumed = sp.webdataset(f"{root}/")
    resumed.load_state_dict(pipe.state_dict())
    with pytest.raises(DuplicateField) as info:  # the same sample, whole, raises again
        next(iter(resumed))
    assert (info.value.url, info.value.member, info.value.offset) == (url, "sample0008.cls", second.offset)
