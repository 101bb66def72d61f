"""``s3pipes convert`` and ``s3pipes verify``: file:// and memory://, through ``main([...])``."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import s3pipes as sp
from s3pipes import Store
from s3pipes.cli import _size, main
from s3pipes.convert import ObjectSamples, convert
from s3pipes.stages._tarparse import TarReader
from s3pipes.writer import MANIFEST_NAME

LABELS, PER_LABEL = (0, 1, 2), 5


@pytest.fixture(params=["file", "memory"])
def root(request: pytest.FixtureRequest, tmp_path: Path, mem_root: str) -> str:
    return f"file://{tmp_path}" if request.param == "file" else mem_root


def write_raw(src: str, labels: tuple[int, ...] = LABELS, per_label: int = PER_LABEL) -> dict[str, tuple[int, bytes]]:
    """``<src>/<label>/<id>.png`` objects; ``{key: (label, bytes)}``."""
    store, expected = Store(), {}
    for label in labels:
        for i in range(per_label):
            data = f"png-{label}-{i:04d}".encode()
            store.write_bytes(f"{src}/{label}/{i:03d}.png", data)
            expected[f"{label}/{i:03d}"] = (label, data)
    return expected


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def read_back(dst: str) -> dict[str, tuple[int, bytes]]:
    return {s["__key__"]: (int(s["cls"]), s["png"]) for s in sp.webdataset(f"{dst}/", store=Store())}


def convert_args(root: str, *extra: str) -> list[str]:
    return ["convert", f"{root}/raw/", f"{root}/shards/", "--suffix", ".png", "--no-progress", *extra]


# -- convert -------------------------------------------------------------------------------------


def test_convert_then_verify(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    expected = write_raw(f"{root}/raw")
    code, out, err = run(capsys, *convert_args(root, "--maxcount", "4", "--label-from-path", "1"))
    assert (code, err) == (0, "")
    assert "wrote 4 shards, 15 samples" in out and "0 skipped" in out and f"{root}/shards/{MANIFEST_NAME}" in out
    assert Store().list(f"{root}/shards/", suffix=".tar")[-1] == f"{root}/shards/shard-000003.tar"
    assert read_back(f"{root}/shards") == expected

    code, out, err = run(capsys, "verify", f"{root}/shards/")
    assert (code, err) == (0, "")
    assert out == f"OK: 4 shards, 15 samples, {sum_bytes(f'{root}/shards') / 1e6:,.1f} MB under {root}/shards/\n"


def sum_bytes(prefix: str) -> int:
    return sum(int(info["size"]) for info in Store().list_info(f"{prefix}/", suffix=".tar").values())


def test_a_rerun_resumes_and_writes_the_same_shards(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    write_raw(f"{root}/raw")
    argv = convert_args(root, "--maxcount", "4", "--pattern", "train-{shard:03d}.tar")
    assert run(capsys, *argv)[0] == 0
    store = Store()
    before = {url: store.read_bytes(url) for url in store.list(f"{root}/shards/", suffix=".tar")}
    assert sorted(before)[0].endswith("/shards/train-000.tar")
    assert store.list(f"{root}/shards/.s3pipes-convert/")  # one record per finished unit
    code, out, _ = run(capsys, *argv)
    assert code == 0 and "4 shards from an earlier run" in out
    assert {url: store.read_bytes(url) for url in store.list(f"{root}/shards/", suffix=".tar")} == before


def test_workers_write_the_same_shards_as_one_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = f"file://{tmp_path}"
    write_raw(f"{root}/raw")
    limits = ["--maxcount", "4", "--label-from-path", "1"]
    assert run(capsys, "convert", f"{root}/raw/", f"{root}/serial/", "--no-progress", *limits)[0] == 0
    code, out, err = run(capsys, "convert", f"{root}/raw/", f"{root}/pool/", "--workers", "2", "--no-progress", *limits)
    assert (code, err) == (0, ""), out
    for name in ("shard-000000.tar", "shard-000003.tar", MANIFEST_NAME):
        serial, pooled = (tmp_path / "serial" / name).read_bytes(), (tmp_path / "pool" / name).read_bytes()
        if name == MANIFEST_NAME:
            serial, pooled = json.loads(serial)["shards"], json.loads(pooled)["shards"]
        assert serial == pooled


def test_maxsize_limits_source_bytes_per_shard(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    write_raw(f"{root}/raw")  # 10-byte objects
    code, out, _ = run(capsys, *convert_args(root, "--maxsize", "0.025KB"))
    assert code == 0 and "wrote 8 shards, 15 samples" in out  # two objects (20 B) per shard


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("256MB", 256_000_000), ("1GiB", 1 << 30), ("1.5 kb", 1500), ("64MiB", 64 << 20)],
)
def test_maxsize_units(text: str, size: int) -> None:
    assert _size(text) == size


def test_label_from_path_counts_directories_from_one(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    expected = {f"train/{key}": value for key, value in write_raw(f"{root}/raw/train", labels=(7, 12)).items()}
    code, _, err = run(capsys, *convert_args(root, "--label-from-path", "2"))
    assert (code, err) == (0, "")
    assert read_back(f"{root}/shards") == expected


@pytest.mark.parametrize(
    ("k", "detail"),
    [
        ("1", "path component 1 is 'train', not an integer label (label_from_path=1)"),
        ("3", "has 2 directories under the prefix: no label at label_from_path=3"),
    ],
)
def test_a_label_that_is_not_there_is_one_line_naming_the_object(
    root: str, k: str, detail: str, capsys: pytest.CaptureFixture[str]
) -> None:
    write_raw(f"{root}/raw/train", labels=(7,))
    code, out, err = run(capsys, *convert_args(root, "--label-from-path", k))
    assert (code, out) == (1, "")
    assert err == f"s3pipes convert: error: {root}/raw/train/7/000.png: {detail}\n"
    assert not Store().exists(f"{root}/shards/{MANIFEST_NAME}")


def test_a_non_integer_label_is_skipped_with_on_error_skip(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    expected = write_raw(f"{root}/raw")
    Store().write_bytes(f"{root}/raw/cat/000.png", b"meow")
    code, out, err = run(capsys, *convert_args(root, "--label-from-path", "1", "--on-error", "skip"))
    assert (code, err) == (0, "")
    assert f"skipped {root}/raw/cat/000.png: path component 1 is 'cat', not an integer label" in out
    assert "15 samples" in out and "1 skipped" in out
    assert read_back(f"{root}/shards") == expected
    code, out, _ = run(capsys, "verify", f"{root}/shards")
    assert code == 0 and "1 source inputs skipped at conversion" in out


def test_a_missing_source_prefix_is_one_line(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "convert", f"{root}/nothing/", f"{root}/shards/", "--no-progress")
    assert (code, out) == (1, "")
    assert err.startswith(f"s3pipes convert: error: {root}/nothing/") and err.count("\n") == 1


def test_objects_sharing_a_key_make_one_sample(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    store = Store()
    store.write_bytes(f"{root}/raw/a/x.png", b"image")
    store.write_bytes(f"{root}/raw/a/x.seg.png", b"mask")
    store.write_bytes(f"{root}/raw/a/x.json", b"{}")
    store.write_bytes(f"{root}/raw/a/y.png", b"other")
    assert run(capsys, "convert", f"{root}/raw", f"{root}/shards", "--no-progress")[0] == 0
    samples = [{k: v for k, v in s.items() if k != "__url__"} for s in sp.webdataset(f"{root}/shards/", store=store)]
    assert samples == [
        {"__key__": "a/x", "png": b"image", "seg.png": b"mask", "json": b"{}"},
        {"__key__": "a/y", "png": b"other"},
    ]


def test_an_object_without_extension_is_named(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    write_raw(f"{root}/raw")
    Store().write_bytes(f"{root}/raw/README", b"about")
    code, _, err = run(capsys, "convert", f"{root}/raw", f"{root}/shards", "--no-progress")
    assert code == 1
    assert err == f"s3pipes convert: error: {root}/raw/README: has no extension to name its field " + (
        "(select objects with suffix=, e.g. '.png')\n"
    )


def test_object_samples_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match=r"label_from_path=0 must be >= 1"):
        ObjectSamples("memory://raw/", label_from_path=0)
    with pytest.raises(sp.SourceError, match=r"memory://elsewhere/a\.png: is not under prefix='memory://raw/'"):
        list(ObjectSamples("memory://raw/", store=Store())(["memory://elsewhere/a.png"]))


def test_the_error_line_is_all_a_terminal_sees(tmp_path: Path) -> None:
    """No library warning (a unit retried input by input) reaches stderr: logging is not pytest's here."""
    root = f"file://{tmp_path}"
    write_raw(f"{root}/raw/train", labels=(7,))
    argv = [*convert_args(root, "--label-from-path", "1", "--maxcount", "2"), "--workers", "1"]
    result = subprocess.run([sys.executable, "-m", "s3pipes.cli", *argv], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"s3pipes convert: error: {root}/raw/train/7/000.png: path component 1 is 'train', " + (
        "not an integer label (label_from_path=1)\n"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--pattern", "train.tar"], "must contain {shard}"),
        (["--pattern", "sub/train-{shard}.tar"], "without '/'"),
        (["--maxsize", "lots"], "'lots' is not a size"),
        (["--maxcount", "0"], "'0' is not a positive integer"),
        (["--label-from-path", "0"], "'0' is not a positive integer"),
        (["--workers", "2", "--dask", "tcp://127.0.0.1:1"], "not allowed with argument"),
        (["--on-error", "ignore"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["convert", "memory://a/", "memory://b/", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


# -- verify --------------------------------------------------------------------------------------


@pytest.fixture
def shards(root: str) -> str:
    """Three shards of five samples under ``<root>/shards``, as ``convert`` writes them."""
    write_raw(f"{root}/raw")
    store = Store()
    source = ObjectSamples(f"{root}/raw/", label_from_path=1, store=store)
    convert(source, f"{root}/shards/shard-{{shard:06d}}.tar", f"{root}/raw/", maxcount=5, store=store)
    return f"{root}/shards"


def verify(capsys: pytest.CaptureFixture[str], shards: str, *extra: str) -> tuple[int, list[str]]:
    code, out, err = run(capsys, "verify", f"{shards}/", *extra)
    assert err == "", "problems are output lines, not errors"
    return code, out.splitlines()


def edit_manifest(shards: str, edit: Callable[[dict[str, Any]], None]) -> None:
    store, url = Store(), f"{shards}/{MANIFEST_NAME}"
    document = json.loads(store.read_bytes(url))
    edit(document)
    store.write_bytes(url, json.dumps(document).encode())


def test_verify_a_good_conversion(shards: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = verify(capsys, shards)
    assert code == 0 and len(lines) == 1 and lines[0].startswith("OK: 3 shards, 15 samples, ")


def test_a_shard_missing_from_the_manifest(shards: str, capsys: pytest.CaptureFixture[str]) -> None:
    store = Store()
    store.write_bytes(f"{shards}/shard-000007.tar", store.read_bytes(f"{shards}/shard-000000.tar"))
    code, lines = verify(capsys, shards)
    assert code == 1
    assert lines[:-1] == [
        f"{shards}/shard-000007.tar: in the store but not in the manifest",
        f"{shards}/shard-000007.tar: 5 duplicate keys, also in shard-000000.tar (first: '0/000')",
        f"{shards}/{MANIFEST_NAME}: total samples is 15, the shards hold 20",
    ]
    assert lines[-1].startswith("3 problems: 4 shards, 20 samples")


def test_a_shard_missing_from_the_store(shards: str, capsys: pytest.CaptureFixture[str]) -> None:
    Store().delete(f"{shards}/shard-000001.tar")
    code, lines = verify(capsys, shards)
    assert code == 1
    assert lines[:-1] == [
        f"{shards}/shard-000001.tar: in the manifest but not in the store",
        f"{shards}/{MANIFEST_NAME}: total samples is 15, the shards hold 10",
    ]
    assert lines[-1].startswith("2 problems: 2 shards, 10 samples")


def test_a_count_that_does_not_match_the_manifest(shards: str, capsys: pytest.CaptureFixture[str]) -> None:
    def edit(document: dict[str, Any]) -> None:
        document["shards"][1]["samples"] = 4
        document["shards"][2]["last_key"] = "2/999"

    edit_manifest(shards, edit)
    code, lines = verify(capsys, shards)
    assert code == 1
    assert lines[:-1] == [
        f"{shards}/shard-000001.tar: 5 samples, the manifest says 4",
        f"{shards}/shard-000002.tar: last_key is '2/004', the manifest says '2/999'",
        f"{shards}/{MANIFEST_NAME}: total samples is 15, its shards add up to 14",
    ]


def test_a_truncated_shard_is_a_line_naming_it(shards: str, capsys: pytest.CaptureFixture[str]) -> None:
    store, url = Store(), f"{shards}/shard-000002.tar"
    whole = store.read_bytes(url)
    offsets = member_offsets(whole)
    store.write_bytes(url, whole[: offsets[4] + 100])  # inside the first header of the third sample
    code, lines = verify(capsys, shards)
    assert code == 1
    assert len(lines) == 3
    assert lines[0] == (
        f"{url}: unreadable tar data: truncated tar header (100 of 512 bytes) at byte offset {offsets[4]}, "
        "after 1 samples read"  # the second sample was pending: grouping reads one member ahead
    )
    assert lines[1] == f"{url}: {offsets[4] + 100:,} bytes in the store, the manifest says {len(whole)}"
    assert lines[-1].startswith("2 problems: 3 shards, 11 samples")


def member_offsets(shard: bytes) -> list[int]:
    reader = TarReader(io.BytesIO(shard).read)
    return [member.offset for member in iter(reader.next, None)]


def test_a_shard_cut_between_samples_is_caught_by_the_manifest(shards: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A tar cut at a member boundary reads as a shorter, valid tar: the manifest's numbers catch it."""
    store, url = Store(), f"{shards}/shard-000000.tar"
    whole = store.read_bytes(url)
    offsets = member_offsets(whole)  # two members per sample: cls, png
    store.write_bytes(url, whole[: offsets[4]])
    code, lines = verify(capsys, shards)
    assert code == 1
    assert lines[:-1] == [
        f"{url}: {offsets[4]:,} bytes in the store, the manifest says {len(whole)}",
        f"{url}: 2 samples, the manifest says 5",
        f"{url}: last_key is '0/001', the manifest says '0/004'",
        f"{shards}/{MANIFEST_NAME}: total samples is 15, the shards hold 12",
    ]


def test_no_manifest(shards: str, capsys: pytest.CaptureFixture[str]) -> None:
    Store().delete(f"{shards}/{MANIFEST_NAME}")
    code, lines = verify(capsys, shards)
    assert code == 1
    assert lines[0] == f"{shards}/{MANIFEST_NAME}: no manifest (it is written last: was the conversion interrupted?)"
    assert lines[1].startswith("1 problem: 3 shards, 15 samples")


def test_a_manifest_elsewhere(shards: str, root: str, capsys: pytest.CaptureFixture[str]) -> None:
    store = Store()
    store.write_bytes(f"{root}/elsewhere.json", store.read_bytes(f"{shards}/{MANIFEST_NAME}"))
    store.delete(f"{shards}/{MANIFEST_NAME}")
    code, lines = verify(capsys, shards, "--manifest", f"{root}/elsewhere.json")
    assert code == 0 and lines[0].startswith("OK: 3 shards")


def test_verify_a_missing_prefix_is_one_error_line(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "verify", f"{root}/nothing/")
    assert (code, out) == (1, "")
    assert err.startswith(f"s3pipes verify: error: {root}/nothing") and err.count("\n") == 1


def test_braces_in_the_destination_are_part_of_its_name(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    """S3 keys may hold { and }: DST was taken for a format string (KeyError 'v2', a traceback)."""
    expected = write_raw(f"{root}/raw")
    argv = ["convert", f"{root}/raw/", f"{root}/out{{v2}}/", "--suffix", ".png", "--label-from-path", "1"]
    code, out, err = run(capsys, *argv, "--no-progress")
    assert (code, err) == (0, "") and f"{root}/out{{v2}}/{MANIFEST_NAME}" in out
    assert read_back(f"{root}/out{{v2}}") == expected
