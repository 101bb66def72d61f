"""Previews: Pipe.peek / MapDataset.peek, their text and HTML, repr(pipe), and Pipe.stats()."""

from __future__ import annotations

import base64
import functools
import io
import json
import math
import re
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset
from PIL import Image
from torch.utils.data import DataLoader

import s3pipes as sp
from s3pipes import Store
from s3pipes.preview import Preview, describe
from tests.contract import comparable
from tests.unit.test_pipe import PER_SHARD, SHARDS, png, write_shards

SAMPLES = SHARDS * PER_SHARD
MEMBERS = SAMPLES * 3  # png, cls, json


@pytest.fixture
def shards(tmp_path: Path) -> str:
    root = f"file://{tmp_path}"
    write_shards(root)
    return root


def keys(items: Any) -> list[str]:
    return [item["__key__"] for item in items]


def first_keys(n: int) -> list[str]:
    return [f"sample{i:04d}" for i in range(n)]


def images_in(html_text: str) -> list[Image.Image]:
    """The images inlined as data URIs."""
    return [
        Image.open(io.BytesIO(base64.b64decode(data)))
        for data in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html_text)
    ]


# -- Pipe.peek ------------------------------------------------------------------------------


def test_peek_gives_the_first_n_samples_in_order_with_raw_bytes(shards: str) -> None:
    pipe = sp.webdataset(f"{shards}/")
    preview = pipe.peek(4)
    assert isinstance(preview, Preview) and len(preview) == 4
    assert keys(preview) == first_keys(4)
    assert preview[0]["png"] == png(0) and preview[3]["cls"] == b"0" and preview[-1]["__key__"] == "sample0003"
    assert comparable(list(preview)) == comparable(list(pipe)[:4])
    assert keys(preview[1:3]) == first_keys(3)[1:]
    assert keys(sp.webdataset(f"{shards}/").peek()) == first_keys(5), "the default is 5"


def test_peek_after_decode(shards: str) -> None:
    pil = sp.webdataset(f"{shards}/").decode("pil").peek(2)
    assert isinstance(pil[0]["png"], Image.Image) and pil[0]["png"].size == (4, 4)
    assert pil[1]["cls"] == 1 and pil[1]["json"] == {"n": 1}
    tensors = sp.webdataset(f"{shards}/").decode("torch", workers=2).peek(3)
    assert keys(tensors) == first_keys(3)
    assert tensors[2]["png"].shape == (3, 4, 4) and tensors[2]["png"].dtype == torch.uint8


def test_peek_follows_the_shard_order_of_the_epoch(shards: str) -> None:
    pipe = sp.webdataset(f"{shards}/", shuffle_seed=3)
    pipe.set_epoch(2)
    assert keys(pipe.peek(PER_SHARD + 2)) == keys(pipe)[: PER_SHARD + 2]


def test_peek_does_not_move_the_pipe(shards: str) -> None:
    expected = keys(sp.webdataset(f"{shards}/"))
    pipe = sp.webdataset(f"{shards}/")
    pipe.peek(3)
    assert keys(pipe) == expected, "iterating after peek starts from the start"

    iterator = iter(pipe)
    taken = [next(iterator)["__key__"] for _ in range(PER_SHARD + 2)]
    state = pipe.state_dict()
    assert keys(pipe.peek(PER_SHARD + 4)) == expected[: PER_SHARD + 4]
    assert pipe.state_dict() == state
    assert taken + keys(iterator) == expected, "a live iterator goes on where it was"

    resumed = sp.webdataset(f"{shards}/")
    resumed.load_state_dict(state)
    assert keys(resumed.peek(2)) == expected[:2], "peek starts at the start, not at a loaded state"
    assert keys(resumed) == expected[PER_SHARD + 2 :], "and leaves the loaded state for the next iter()"


def test_peek_closes_what_it_opened(shards: str) -> None:
    def ours() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith(("s3pipes-fetch", "s3pipes-map"))}

    before = ours()
    preview = sp.webdataset(f"{shards}/").decode("pil", workers=2).peek(PER_SHARD + 1)  # stops inside shard 1
    assert len(preview) == PER_SHARD + 1
    deadline = time.monotonic() + 5
    while ours() - before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not ours() - before, "peek left threads running"


def test_peek_never_saves_a_checkpoint(shards: str, mem_root: str) -> None:
    ckpt = sp.CheckpointStore(f"{mem_root}/run", store=Store())
    pipe = sp.webdataset(f"{shards}/").checkpoint(ckpt, every=1)
    assert keys(pipe.peek(3)) == first_keys(3)
    assert ckpt.steps() == []


def test_peek_counts(shards: str) -> None:
    pipe = sp.webdataset(f"{shards}/")
    assert len(pipe.peek(0)) == 0 and repr(pipe.peek(0)) == "Preview of 0 items\n#"
    assert len(pipe.peek(SAMPLES + 10)) == SAMPLES
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=r"peek\(\): n=.* must be a non-negative int"):
            pipe.peek(bad)  # type: ignore[arg-type]


# -- MapDataset.peek ------------------------------------------------------------------------


def test_map_dataset_peek_gives_items_0_to_n(shards: str) -> None:
    ds: sp.MapDataset[dict[str, Any]] = sp.MapDataset.from_shards(f"{shards}/", store=Store())
    preview = ds.peek(3)
    assert keys(preview) == first_keys(3) and preview[2]["png"] == png(2)
    assert len(ds.peek(SAMPLES + 1)) == SAMPLES
    with pytest.raises(ValueError, match="non-negative"):
        ds.peek(-2)


def test_map_dataset_peek_with_a_transform(shards: str, tmp_path: Path) -> None:
    ds = sp.MapDataset.from_shards(f"{shards}/", store=Store(), transform=sp.Decoder(image="torch"))
    assert torch.is_tensor(image := ds.peek(1)[0]["png"]) and image.shape == (3, 4, 4)
    for i in range(3):
        (tmp_path / "objects").mkdir(exist_ok=True)
        (tmp_path / "objects" / f"{i}.png").write_bytes(png(i))
    objects: sp.MapDataset[bytes] = sp.MapDataset.from_prefix(f"file://{tmp_path}/objects/", store=Store())
    text = repr(objects.peek(2))
    assert text.splitlines() == ["Preview of 2 items", "#  item", f"0  {len(png(0))} B", f"1  {len(png(1))} B"]


# -- the text table -------------------------------------------------------------------------


def test_text_table_has_a_row_per_sample_with_key_and_fields(shards: str) -> None:
    lines = repr(sp.webdataset(f"{shards}/").peek(3)).splitlines()
    assert lines[0] == "Preview of 3 items"
    assert lines[1].split() == ["#", "key", "cls", "json", "png"]  # in member order
    assert len(lines) == 2 + 3
    assert lines[2].split()[:2] == ["0", "sample0000"]
    assert f"{len(png(0))} B" in lines[2] and "1 B b'0'" in lines[2] and "b'{\"n\": 0}'" in lines[2]


def test_text_table_describes_decoded_values(shards: str) -> None:
    text = repr(sp.webdataset(f"{shards}/").decode("pil").peek(2))
    assert "4x4 RGB" in text and "{'n': 1}" in text
    text = repr(sp.webdataset(f"{shards}/").decode("torch").peek(2))
    assert "tensor 3x4x4 uint8" in text
    text = repr(sp.webdataset(f"{shards}/").decode("numpy").peek(2))
    assert "array 4x4x3 uint8" in text


def test_items_that_are_not_dicts(shards: str) -> None:
    pipe = sp.webdataset(f"{shards}/").decode("torch")
    lines = repr(pipe.map(lambda s: (s["__key__"], s["png"], s["cls"])).peek(2)).splitlines()
    assert lines[1].split() == ["#", "[0]", "[1]", "[2]"]
    assert lines[2].split() == ["0", "'sample0000'", "tensor", "3x4x4", "uint8", "0"]
    batches = repr(pipe.map(lambda s: s["cls"]).batch(4).peek(2)).splitlines()
    assert batches[1:] == ["#  item", "0  tensor 4 int64", "1  tensor 4 int64"]
    members = repr(sp.from_urls(f"{shards}/shard-000.tar").open_object().untar().peek(1)).splitlines()
    assert members[1].split() == ["#", "url", "name", "data", "offset"]
    assert "'sample0000.cls'  1 B b'0'  0" in members[2]
    urls = repr(sp.from_urls(f"{shards}/shard-{{000..001}}.tar").peek()).splitlines()
    assert urls[1:] == [
        "#  item",
        f"0  {describe(f'{shards}/shard-000.tar')}",
        f"1  {describe(f'{shards}/shard-001.tar')}",
    ]


def test_descriptions_are_short() -> None:
    assert describe("x" * 100) == "'" + "x" * 28 + "..."
    assert describe(bytes(3 << 20)) == "3.0 MiB"
    assert describe(torch.tensor(7)) == "tensor(7, int64)"
    assert describe(np.float32(0.5)) == "np.float32(0.5)"
    assert describe(2 / 3) == "0.6667"
    assert describe(list(range(100))).startswith("list[100] [0, 1, 2")
    assert len(describe({"k": "v" * 100})) == 32
    assert describe("line one\nline two") == "'line one\\nline two'"


# -- the HTML table -------------------------------------------------------------------------


def test_html_has_thumbnails_for_image_bytes_pil_images_and_tensors(shards: str) -> None:
    pipe = sp.webdataset(f"{shards}/")
    for variant in (pipe, pipe.decode("pil"), pipe.decode("torch"), pipe.decode("torch_float"), pipe.decode("numpy")):
        html_text = variant.peek(2)._repr_html_()
        thumbnails = images_in(html_text)
        assert len(thumbnails) == 2, variant
        assert thumbnails[0].size == (4, 4) and thumbnails[0].mode == "RGB"
        assert "<td>sample0000</td>" not in html_text  # the key cell carries the shard URL as a title
        assert f'title="{shards}/shard-000.tar">sample0000</td>' in html_text
    original = np.asarray(Image.open(io.BytesIO(png(0))))
    assert (np.asarray(images_in(pipe.decode("torch").peek(1)._repr_html_())[0]) == original).all()


def test_html_thumbnails_are_small_and_never_fail() -> None:
    big = io.BytesIO()
    Image.new("RGB", (640, 320), "red").save(big, "JPEG")
    items = [
        {"__key__": "big", "jpg": big.getvalue(), "seg.png": b"not an image", "bin": png(0)},
        {"__key__": "mask", "png": Image.new("P", (8, 8)), "gray.png": torch.zeros(1, 5, 5)},
    ]
    html_text = Preview(items)._repr_html_()
    thumbnails = images_in(html_text)
    assert [t.size for t in thumbnails] == [(96, 48), (8, 8), (5, 5)]
    assert 'width="96" height="48"' in html_text
    mine = Image.new("RGBA", (300, 200))
    assert [t.size for t in images_in(Preview([{"png": mine}])._repr_html_())] == [(96, 64)]
    assert mine.size == (300, 200), "the sample's own image is not resized"


def test_html_escapes_keys_fields_values_and_urls() -> None:
    evil = "<script>alert(1)</script>"
    items = [{"__key__": evil, "__url__": f'memory://b/"{evil}.tar', f"{evil}.txt": evil, "cls": b"<b>"}]
    html_text = Preview(items)._repr_html_()
    assert "<script>" not in html_text and "<b>" not in html_text
    assert html_text.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 3
    assert "&quot;" in html_text, "the URL in the title attribute is escaped too"


def test_html_escapes_a_key_read_from_a_shard(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/evil.tar"
    with Store().open(url, "wb") as f, webdataset.TarWriter(f) as writer:
        writer.write({"__key__": "<script>alert(1)</script>", "txt": b"hi"})
    preview = sp.webdataset(url).peek(1)
    assert preview[0]["__key__"] == "<script>alert(1)</script>"
    assert "<script>" not in preview._repr_html_() and "&lt;script&gt;" in preview._repr_html_()


# -- repr(pipe) -----------------------------------------------------------------------------


def normalize(sample: dict[str, Any]) -> dict[str, Any]:
    return sample


def test_repr_has_a_line_per_stage_with_its_arguments(shards: str) -> None:
    pipe = (
        sp.webdataset(f"{shards}/", shuffle_seed=3)
        .decode("torch", workers=2)
        .map(normalize)
        .filter(lambda s: True)
        .shuffle(8, seed=1)
        .batch(4, drop_last=True)
    )
    lines = repr(pipe).splitlines()
    assert lines[0] == "Pipe(5 shards, seed=3, epoch=0)"
    assert lines[1] == (
        f"  urls: {shards}/shard-000.tar, {shards}/shard-001.tar, {shards}/shard-002.tar, ... (5 in all)"
    )
    assert lines[2:] == [
        "  .open_object(block_size=8388608, ahead=4)",
        "  .untar()",
        "  .group_by_key()",
        "  .decode(image='torch', handlers=[], max_image_pixels=89478485, workers=2)",
        "  .map(fn=normalize)",
        "  .filter(predicate=<lambda>)",
        "  .shuffle(buffer_size=8, seed=1)",
        "  .batch(batch_size=4, collate=default_collate, drop_last=True)",
    ]
    assert repr(sp.from_urls(f"{shards}/shard-000.tar")).splitlines()[1] == f"  urls: {shards}/shard-000.tar"


def test_repr_shows_no_secret() -> None:
    store = Store({"key": "AKIDEXAMPLE", "secret": "hunter2-secret", "endpoint_url": "http://127.0.0.1:9"})
    pipe = sp.from_urls("s3://bucket/train/shard-{000..009}.tar", store=store).open_object()
    pipe = pipe.map(functools.partial(normalize), workers=0).filter(functools.partial(bool, "hunter2-secret"))
    text = repr(pipe)
    assert "hunter2-secret" not in text and "AKIDEXAMPLE" not in text
    assert "  store: Store(s3: endpoint=http://127.0.0.1:9, key=AKID***, secret=***)" in text.splitlines()
    assert "s3://bucket/train/shard-000.tar" in text and "(10 in all)" in text
    signed = sp.from_urls(
        ["https://user:pa55word@host/a.tar?X-Amz-Signature=deadbeef", "https://host/b.tar"], store=Store()
    )
    text = repr(signed)
    assert "deadbeef" not in text and "pa55word" not in text
    assert "  urls: https://***@host/a.tar?***, https://host/b.tar" in text


# -- stats ----------------------------------------------------------------------------------


def stage_counts(pipe: sp.Pipe[Any]) -> dict[str, int]:
    return {row["stage"]: row["items"] for row in pipe.stats().to_dict()["stages"]}


def test_stats_count_shards_members_and_samples_after_a_full_pass(shards: str, tmp_path: Path) -> None:
    pipe = sp.webdataset(f"{shards}/").decode("pil").batch(4, collate=None)
    assert len(list(pipe)) == math.ceil(SAMPLES / 4)
    stats = pipe.stats()
    assert stats.status == "finished" and stats.wall_s > 0
    assert stage_counts(pipe) == {
        "shards": SHARDS,
        "open_object": SHARDS,
        "untar": MEMBERS,
        "group_by_key": SAMPLES,
        "decode": SAMPLES,
        "batch": math.ceil(SAMPLES / 4),
    }
    rows = {row.stage: row for row in stats.stages}
    assert rows["open_object"].nbytes == sum(p.stat().st_size for p in tmp_path.glob("shard-*.tar"))
    payload = 0
    for path in tmp_path.glob("shard-*.tar"):
        with tarfile.open(path) as tar:
            payload += sum(member.size for member in tar.getmembers())
    assert rows["untar"].nbytes == payload
    assert rows["group_by_key"].nbytes is None and rows["group_by_key"].bytes_per_s is None
    assert all(row.items_per_s > 0 for row in stats.stages)
    assert rows["open_object"].bytes_per_s and rows["untar"].bytes_per_s and rows["untar"].bytes_per_s > 0
    assert stats.wall_s == pipe.stats().wall_s, "a finished pass keeps its wall time"


def test_stats_before_during_and_after(shards: str) -> None:
    pipe = sp.webdataset(f"{shards}/").map(lambda s: s["__key__"])
    before = pipe.stats()
    assert before.status == "not started" and [row.items for row in before.stages] == [0] * 5
    iterator = iter(pipe)
    for _ in range(PER_SHARD + 3):
        next(iterator)
    during = pipe.stats()
    assert during.status == "running"
    assert stage_counts(pipe)["map"] == stage_counts(pipe)["group_by_key"] == PER_SHARD + 3
    assert stage_counts(pipe)["shards"] == 3, "the second shard is read, the third opened ahead"
    assert stage_counts(pipe)["open_object"] == 2
    pipe.peek(4)
    assert stage_counts(pipe)["map"] == PER_SHARD + 3, "peek runs on its own stages"
    list(iterator)
    assert pipe.stats().status == "finished" and stage_counts(pipe)["map"] == SAMPLES
    list(pipe)
    assert stage_counts(pipe)["map"] == SAMPLES, "each pass counts from 0"


def test_stats_count_from_a_resume(shards: str) -> None:
    pipe = sp.webdataset(f"{shards}/")
    iterator = iter(pipe)
    for _ in range(10):
        next(iterator)
    resumed = sp.webdataset(f"{shards}/")
    resumed.load_state_dict(pipe.state_dict())
    assert len(list(resumed)) == SAMPLES - 10
    assert stage_counts(resumed)["group_by_key"] == SAMPLES - 10


def test_stats_through_a_single_process_dataloader(shards: str) -> None:
    pipe = sp.webdataset(f"{shards}/").decode("torch").map(lambda s: s["png"]).batch(5)
    batches = list(DataLoader(pipe, batch_size=None, num_workers=0))
    assert len(batches) == SAMPLES // 5
    assert stage_counts(pipe)["batch"] == SAMPLES // 5 and stage_counts(pipe)["untar"] == MEMBERS


def test_stats_show_as_text_html_and_json(shards: str) -> None:
    pipe = sp.webdataset(f"{shards}/")
    list(pipe)
    stats = pipe.stats()
    lines = repr(stats).splitlines()
    assert re.fullmatch(r"PipeStats\(finished, \d+\.\d{3} s wall, this process only\)", lines[0])
    assert lines[1].split() == ["stage", "items", "items/s", "bytes", "bytes/s"]
    assert [line.split()[:2] for line in lines[2:]] == [
        ["shards", str(SHARDS)],
        ["open_object", str(SHARDS)],
        ["untar", str(MEMBERS)],
        ["group_by_key", str(SAMPLES)],
    ]
    assert re.search(r"untar +105 +[\d,.]+ +\d+\.\d KiB +[\d.]+ [KMG]?i?B/s", repr(stats))
    html_text = stats._repr_html_()
    assert html_text.startswith('<table class="s3pipes-stats">') and "<td>group_by_key</td>" in html_text
    assert json.loads(json.dumps(stats.to_dict()))["stages"][2]["items"] == MEMBERS


def test_stats_count_this_passs_skips_where_a_stage_skips(shards: str) -> None:
    def class_zero_is_bad(data: bytes) -> int:
        if data == b"0":
            raise ValueError("class 0 is rejected by the test")
        return int(data)

    def make() -> sp.Pipe[Any]:
        return sp.webdataset(f"{shards}/", on_error="skip").decode(handlers={"cls": class_zero_is_bad}, on_error="skip")

    pipe = make()
    kept = list(pipe)
    stats = pipe.stats()
    rows = {row.stage: row for row in stats.stages}
    rejected = SAMPLES - len(kept)
    assert rejected > 0 and pipe.skipped()["count"] == rejected
    assert (rows["decode"].skipped, rows["untar"].skipped, rows["group_by_key"].skipped) == (rejected, 0, 0)
    assert rows["open_object"].skipped is None and rows["shards"].skipped is None
    lines = repr(stats).splitlines()
    assert lines[1].split()[-1] == "skipped" and lines[-1].split()[-1] == str(rejected)

    resumed = make()
    resumed.load_state_dict(pipe.state_dict())
    assert list(resumed) == [] and resumed.stats().stages[-1].skipped == 0, "a resumed pass counts its own skips"
    assert resumed.skipped()["count"] == rejected, "the totals come with the state"
