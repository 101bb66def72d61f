"""GroupByKey: the position after an error inside a sample, and sources other than Untar."""

from __future__ import annotations

import io
import tarfile
from types import SimpleNamespace

import pytest
from torchdata.nodes import IterableWrapper

import s3pipes
from s3pipes import Store
from s3pipes.stages import OpenObject, Untar
from s3pipes.stages.group import GroupByKey, split_key
from tests.contract import assert_resumes

URL = "memory://unit-group/shard-0.tar"


def fields(sample: dict[str, object]) -> list[str]:
    return sorted(name for name in sample if not name.startswith("__"))


def test_the_state_after_a_store_error_inside_a_sample_resumes_the_whole_sample(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, buffer = Store(), io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in ("k0.a", "k0.b", "k1.a", "k1.b"):  # headers at 0, 1024, 2048, 3072
            info = tarfile.TarInfo(name)
            info.size = 512
            tar.addfile(info, io.BytesIO(bytes(512)))
    store.write_bytes(URL, buffer.getvalue())
    real, failing = store.read_bytes, [True]

    def flaky(url: str, start: int | None = None, end: int | None = None) -> bytes:
        if failing[0] and start is not None and end is not None and start <= 3072 < end:  # k1.b's block
            raise s3pipes.StoreError(url, "memory", "injected")
        return real(url, start, end)

    monkeypatch.setattr(store, "read_bytes", flaky)

    def pipe() -> GroupByKey:
        return GroupByKey(Untar(OpenObject(IterableWrapper([URL]), store, block_size=1024)))

    node = pipe()
    node.reset()
    assert next(node)["__key__"] == "k0"
    with pytest.raises(s3pipes.StoreError, match="injected"):
        next(node)  # k1.a was taken, then k1.b's block failed
    failing[0] = False
    resumed = pipe()
    resumed.reset(node.state_dict())
    assert [(sample["__key__"], fields(sample)) for sample in resumed] == [("k1", ["a", "b"])]


def test_members_with_the_attributes_of_a_tar_member_are_grouped() -> None:
    items = [
        SimpleNamespace(url="u", name="k.a", data=b"1", offset=0),
        SimpleNamespace(url="u", name="k.b", data=b"2", offset=512),
    ]
    node = GroupByKey(IterableWrapper(items))
    node.reset()
    assert list(node) == [{"__key__": "k", "__url__": "u", "a": b"1", "b": b"2"}]


WIDE = "memory://unit-group-wide"


def wide_shard(shard: int) -> bytes:
    """Samples with more members than a batch of ``Untar.next_batch``, and names that only look alike."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, payload: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        for i in range(12):
            key = f"s{shard}/k{i:03d}"
            for field in range(45 if i % 3 == 0 else 2):
                add(f"{key}.f{field:02d}.bin", f"{key}:{field}".encode())
            if i == 4:
                add(f"{key}.x/y.png", b"another key")  # starts with "k004." but its key is "k004.x/y"
                add(f"{key}.x/y.cls", b"1")
            if i == 7:
                add("README", b"names no field")
                directory = tarfile.TarInfo(f"s{shard}/dir")
                directory.type = tarfile.DIRTYPE
                tar.addfile(directory)
    return buffer.getvalue()


def grouped_as_the_rule_says(data: bytes, url: str) -> list[dict[str, object]]:
    samples: list[dict[str, object]] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        for info in tar:
            parts = split_key(info.name) if info.isfile() else None
            if parts is None:
                continue
            extracted = tar.extractfile(info)
            assert extracted is not None
            if not samples or samples[-1]["__key__"] != parts[0]:
                samples.append({"__key__": parts[0], "__url__": url})
            samples[-1][parts[1]] = extracted.read()
    return samples


def test_samples_wider_than_a_batch_and_lookalike_names_group_by_the_key_rule() -> None:
    store = Store()
    urls = [f"{WIDE}/shard-{shard}.tar" for shard in range(2)]
    for shard, url in enumerate(urls):
        store.write_bytes(url, wide_shard(shard))
    node = GroupByKey(Untar(OpenObject(IterableWrapper(urls), store, block_size=4096)))
    node.reset()
    expected = [sample for shard, url in enumerate(urls) for sample in grouped_as_the_rule_says(wide_shard(shard), url)]
    assert list(node) == expected
    assert [len(sample) for sample in expected[:2]] == [47, 4]  # 45 fields and 2, each with __key__ and __url__
    assert_resumes(lambda: s3pipes.webdataset(f"{WIDE}/").map(lambda s: (s["__key__"], sorted(s))))


def test_a_member_naming_no_field_inside_a_sample_is_skipped_on_the_batched_path() -> None:
    """As webdataset does: ``a.jpg, README, a.cls`` is one sample, and resumes as one."""
    store, buffer = Store(), io.BytesIO()
    names = ["z.jpg", "a.jpg", "README", "a.cls", "b.jpg", "dir/", "b.cls", "c.jpg"]
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    store.write_bytes(f"{WIDE}-nofield/shard.tar", buffer.getvalue())
    pipe = s3pipes.webdataset(f"{WIDE}-nofield/").map(lambda s: (s["__key__"], fields(s)))
    assert list(pipe) == [("z", ["jpg"]), ("a", ["cls", "jpg"]), ("b", ["cls", "jpg"]), ("c", ["jpg"])]
    assert_resumes(lambda: s3pipes.webdataset(f"{WIDE}-nofield/").map(lambda s: (s["__key__"], fields(s))))
