"""benchmarks.plot: every benchmark's JSON becomes its panels, and a PNG is drawn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.plot import charts, draw, main

MACHINE = {"cores": 2}


def test_streaming_panel_has_a_bar_per_reader_that_ran() -> None:
    result = {"date": "2026-11-21T00:00", "machine": MACHINE, "dataset": {}, "rows": [
        {"name": "s3pipes raw", "samples_per_s": 12556.0}, {"name": "webdataset", "samples_per_s": 3694.0},
        {"name": "s3torchconnector", "samples_per_s": None, "error": "not installed"}]}  # fmt: skip
    (panel,) = charts(result)
    assert panel.metric == "samples/s"
    assert panel.bars == [("s3pipes raw", 12556.0), ("webdataset", 3694.0)]
    assert "2026-11-21, 2 cores" in panel.title


def test_checkpoint_gives_a_save_and_a_load_panel_in_mb_per_s() -> None:
    cells = [
        {"client": "s3pipes", "operation": "save", "seconds": [2.0, 1.0], "state_bytes": 100_000_000},
        {"client": "s3pipes", "operation": "load", "seconds": [0.5], "state_bytes": 100_000_000},
        {"client": "boto3", "operation": "load", "seconds": [], "state_bytes": 0, "error": "failed"},
    ]
    save, load = charts({"date": "", "machine": MACHINE, "settings": {"mib": 256}, "cells": cells})
    assert save.bars == [("s3pipes", 100.0)] and load.bars == [("s3pipes", 200.0)]
    assert "256 MiB" in save.title and save.metric == "MB/s"


def test_mapstyle_and_convert_panels() -> None:
    mapstyle = {"date": "", "machine": MACHINE, "random_access": [
        {"name": "s3pipes", "workers": 0, "objects_per_s": 1709.0},
        {"name": "naive", "workers": 2, "objects_per_s": None}]}  # fmt: skip
    assert charts(mapstyle)[0].bars == [("s3pipes, 0 workers", 1709.0)]
    convert = {"date": "", "machine": MACHINE, "rows": [
        {"name": "serial", "seconds": 2.0, "samples": 3000, "error": None},
        {"name": "Dask", "seconds": 1.0, "samples": 3000, "error": "shards differ from the serial run's"}]}  # fmt: skip
    assert charts(convert)[0].bars == [("serial", 1500.0)]


def test_a_json_of_something_else_is_refused() -> None:
    with pytest.raises(ValueError, match="not the JSON of one of benchmarks"):
        charts({"hello": 1})


def test_main_draws_one_png_from_several_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    first = tmp_path / "convert.json"
    first.write_text(json.dumps({"date": "", "machine": MACHINE, "rows": [
        {"name": "serial", "seconds": 2.0, "samples": 3000, "error": None}]}))  # fmt: skip
    second = tmp_path / "streaming.json"
    second.write_text(json.dumps({"date": "", "machine": MACHINE, "dataset": {}, "rows": [
        {"name": "s3pipes raw", "samples_per_s": 10.0}]}))  # fmt: skip
    out = tmp_path / "chart.png"
    main([str(first), str(second), "--out", str(out)])
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and out.stat().st_size > 5_000
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    draw(charts(json.loads(first.read_text())), tmp_path / "one.svg")  # any format matplotlib knows by suffix
    assert (tmp_path / "one.svg").read_text().lstrip().startswith("<?xml")
