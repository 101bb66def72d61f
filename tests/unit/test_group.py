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
from s3pipes.stages.group import GroupByKey

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
