"""Bar charts of benchmark results: ``python -m benchmarks.plot RESULT.json [...] --out chart.png``.

Each RESULT.json is what a benchmark wrote with ``--json`` (``benchmarks.streaming``,
``.mapstyle``, ``.checkpoint``, ``.convert``); the kind is recognised from its content. One
panel per chart: the metric the benchmark's targets compare, one bar per reader or client,
s3pipes' bars darker, the machine and date in the title. Needs matplotlib (the ``plot``
extra: ``pip install 's3pipes[plot]'``); ``s3pipes bench NAME --plot out.png`` runs a benchmark
and draws its chart.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Chart:
    """What one panel shows: bars (label, value), what the values are, and a title."""

    title: str
    metric: str
    bars: list[tuple[str, float]]


def charts(result: Mapping[str, Any]) -> list[Chart]:
    """The panels of one benchmark's JSON result (ValueError if it is none of ours)."""
    when = f"{str(result.get('date', ''))[:10]}, {result.get('machine', {}).get('cores', '?')} cores"
    if "rows" in result and "dataset" in result:  # streaming
        bars = [(r["name"], r["samples_per_s"]) for r in result["rows"] if r.get("samples_per_s")]
        return [Chart(f"Streaming WebDataset shards ({when})", "samples/s", bars)]
    if "random_access" in result:  # mapstyle
        bars = [
            (f"{r['name']}, {r['workers']} workers", r["objects_per_s"])
            for r in result["random_access"]
            if r.get("objects_per_s")
        ]
        return [Chart(f"Map-style random reads of small objects ({when})", "objects/s", bars)]
    if "cells" in result:  # checkpoint
        out = []
        for operation in ("save", "load"):
            cells = [c for c in result["cells"] if c["operation"] == operation and c["seconds"]]
            bars = [(c["client"], c["state_bytes"] / min(c["seconds"]) / 1e6) for c in cells]
            out.append(Chart(f"Checkpoint {operation}, {result['settings']['mib']} MiB state ({when})", "MB/s", bars))
        return out
    if "rows" in result:  # convert
        bars = [(r["name"], r["samples"] / r["seconds"]) for r in result["rows"] if r.get("seconds") and not r["error"]]
        return [Chart(f"Conversion of small objects into shards ({when})", "samples/s", bars)]
    raise ValueError("not the JSON of one of benchmarks/ (streaming, mapstyle, checkpoint, convert)")


def draw(panels: Sequence[Chart], out: str | Path) -> None:
    """Write ``panels`` as one PNG (or any format matplotlib knows from the suffix)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display here or in CI
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("plotting needs matplotlib: pip install 's3pipes[plot]'") from exc
    height = sum(1 + 0.35 * len(panel.bars) for panel in panels)
    figure, axes = plt.subplots(len(panels), 1, figsize=(9, max(height, 2.5)), squeeze=False)
    for axis, panel in zip(axes[:, 0], panels, strict=True):
        labels = [label for label, _ in panel.bars][::-1]
        values = [value for _, value in panel.bars][::-1]
        colours = ["#1f4e79" if label.startswith("s3pipes") else "#9db4c8" for label in labels]
        axis.barh(labels, values, color=colours)
        for y, value in enumerate(values):
            axis.text(value, y, f" {value:,.0f}", va="center", fontsize=8)
        axis.set_xlabel(panel.metric)
        axis.set_title(panel.title, fontsize=10)
        axis.margins(x=0.15)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("results", nargs="+", help="JSON files written by the benchmarks' --json")
    parser.add_argument("--out", required=True, help="the image to write, e.g. chart.png")
    args = parser.parse_args(argv)
    panels = [chart for path in args.results for chart in charts(json.loads(Path(path).read_text()))]
    draw(panels, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
