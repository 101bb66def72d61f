"""Looking at a pipeline: ``peek()`` previews, the ``repr`` of a Pipe, and ``Pipe.stats()``.

- :class:`Preview`: the first items of a Pipe or MapDataset, as a sequence, shown as a
  compact text table in a terminal and as an HTML table with image thumbnails in a notebook.
- :func:`describe_pipe`: the text behind ``repr(pipe)``: the shards, then one line per
  stage with its arguments; URLs lose their user info and query strings, and the store's
  secrets are redacted from the whole text.
- :class:`PipeStats`: per-stage item (and byte) counts and rates of the pass a Pipe ran
  in this process, read from the counters every stage keeps (``Stage.items_out``).

Nothing here runs on the hot path: the only per-item cost of stats is the stages' own
counter increments.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Generic, overload
from urllib.parse import urlsplit

import numpy as np
import torch
from PIL import Image
from torchdata.nodes import BaseNode

from s3pipes._types import T
from s3pipes._units import human_bytes
from s3pipes.decode import _IMAGE_EXTENSIONS, _IMAGE_FORMATS, DEFAULT_MAX_IMAGE_PIXELS, Decoder
from s3pipes.stages.shards import ShardPlan
from s3pipes.store import Store

__all__ = ["PipeStats", "Preview", "StageStats", "describe", "describe_pipe", "peek_count", "step_label"]

THUMBNAIL_SIZE = 96
"""Thumbnails fit in a square of this many pixels."""

_CELL_WIDTH = 32  # characters of a text table cell, at most
_ARG_WIDTH = 60  # characters of one argument in repr(pipe), at most
_URLS_SHOWN = 3  # shard URLs listed in repr(pipe)
_MAX_TUPLE_COLUMNS = 8  # a longer tuple or list is one column, not one per element
_META_FIELDS = ("__key__", "__url__")


def _truncate(text: str, width: int = _CELL_WIDTH) -> str:
    text = " ".join(text.split())  # one line
    return text if len(text) <= width else text[: width - 3] + "..."


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def _layout(title: str, cells: list[list[str]], *, numbers_right: bool = False) -> str:
    """``title`` over a text table (the first row is the header); columns after the first right-aligned if asked."""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]

    def cell(i: int, text: str) -> str:
        return text.rjust(widths[i]) if numbers_right and i else text.ljust(widths[i])

    return "\n".join([title, *("  ".join(cell(i, text) for i, text in enumerate(row)).rstrip() for row in cells)])


def describe(value: object) -> str:
    """A short, one-line description of a field value (at most 32 characters).

    Example:
        >>> describe(b"\\x89PNG" + bytes(71)), describe(b"7"), describe(torch.zeros(3, 4, 4, dtype=torch.uint8))
        ('75 B', "1 B b'7'", 'tensor 3x4x4 uint8')
        >>> describe(Image.new("RGB", (8, 6))), describe(12), describe("a " * 40)
        ('8x6 RGB', '12', "'a a a a a a a a a a a a a a ...")
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        text = human_bytes(len(data))
        if len(data) <= 16 and data.isascii() and data.decode("ascii").isprintable():
            text += f" {data!r}"
    elif isinstance(value, Image.Image):
        text = f"{value.width}x{value.height} {value.mode}"
    elif isinstance(value, (torch.Tensor, np.ndarray)):
        kind, dtype = type(value).__name__.lower().removeprefix("nd"), str(value.dtype).removeprefix("torch.")
        text = f"{kind}({value.item()!r}, {dtype})" if value.ndim == 0 else f"{kind} {_shape(value.shape)} {dtype}"
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (list, tuple)) and value:
        text = f"{type(value).__name__}[{len(value)}] {value!r}"
    else:
        text = repr(value)
    return _truncate(text)


# -- thumbnails -----------------------------------------------------------------------------


def _is_image_field(field: str) -> bool:
    return field.rpartition(".")[2].lower() in _IMAGE_EXTENSIONS


def _as_image(field: str, value: object) -> Image.Image | None:
    """An image to thumbnail, or None: PIL images, and image bytes/arrays under an image extension."""
    if isinstance(value, Image.Image):
        return value
    if not _is_image_field(field):
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        with warnings.catch_warnings():  # too-large images are refused below, not warned about
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(bytes(value)), formats=_IMAGE_FORMATS)
        if im.width * im.height > DEFAULT_MAX_IMAGE_PIXELS:
            return None
        im.draft("RGB", (THUMBNAIL_SIZE, THUMBNAIL_SIZE))  # JPEG: decode at a reduced scale
        return im
    if isinstance(value, torch.Tensor):
        if value.dim() != 3 or value.shape[0] not in (1, 3, 4):
            return None
        value = value.detach().cpu().permute(1, 2, 0).numpy()  # CxHxW -> HxWxC
    if not isinstance(value, np.ndarray) or value.ndim not in (2, 3) or (value.ndim == 3 and value.shape[2] > 4):
        return None
    array = value if value.dtype == np.uint8 else (np.clip(value, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(array[:, :, 0] if array.ndim == 3 and array.shape[2] == 1 else array)


def _thumbnail(field: str, value: object) -> str | None:
    """An ``<img>`` with the image as an inline base64 PNG, fitted into THUMBNAIL_SIZE; None if not an image."""
    try:
        image = _as_image(field, value)
        if image is None:
            return None
        with image.copy() if image is value else image as thumb:  # never resize the caller's image
            thumb.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
            shown = thumb
            if thumb.mode not in ("1", "L", "LA", "RGB", "RGBA"):
                shown = thumb.convert("RGBA" if "A" in thumb.mode or thumb.mode == "P" else "RGB")
            buffer = io.BytesIO()
            shown.save(buffer, "PNG")
            width, height = thumb.size
    except Exception:  # not decodable: the text description stays
        return None
    scale = THUMBNAIL_SIZE / max(width, height)  # small images are shown enlarged, pixelated
    width, height = max(1, round(width * scale)), max(1, round(height * scale))
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (
        f'<img src="data:image/png;base64,{data}" width="{width}" height="{height}" '
        f'style="image-rendering: pixelated" alt="{html.escape(field)}">'
    )


# -- previews -------------------------------------------------------------------------------


def _key_and_fields(item: object) -> tuple[object, list[tuple[str, object]]]:
    """``(key or None, [(field, value), ...])`` of one item, for display."""
    if isinstance(item, Mapping):
        fields = [(str(name), value) for name, value in item.items() if name not in _META_FIELDS]
        return item.get("__key__"), fields
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return None, [(f.name, getattr(item, f.name)) for f in dataclasses.fields(item)]
    if isinstance(item, tuple) and hasattr(item, "_fields"):  # a NamedTuple, like a tar member
        return None, list(zip(item._fields, item, strict=True))
    if isinstance(item, (tuple, list)) and 0 < len(item) <= _MAX_TUPLE_COLUMNS:  # a collated batch is a list
        return None, [(f"[{i}]", value) for i, value in enumerate(item)]
    return None, [("item", item)]


def peek_count(n: int) -> int:
    """``n`` checked as the argument of ``peek(n)``.

    Raises:
        ValueError: ``n`` is not a non-negative int.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"peek(): {n=} must be a non-negative int (the number of items to show)")
    return n


class Preview(Sequence[T], Generic[T]):
    """The first items of a pipeline: a sequence (index it, ``len()``, iterate) that shows itself.

    ``repr()`` is a compact text table, one row per item: its index, its ``__key__`` and
    a short description of each field (bytes: size; tensors and arrays: shape and dtype;
    PIL images: ``WxH mode``; small values: the value; all truncated). In a notebook,
    ``_repr_html_`` shows the same as an HTML table, with a thumbnail for every PIL image
    and every image-extension field holding image bytes or an image-shaped tensor/array
    (decoded with the same format allow-list and pixel limit as :class:`~s3pipes.Decoder`).
    Items that are not dicts show one column per tuple element or (NamedTuple or dataclass) field, or one
    ``item`` column.

    Example:
        >>> Preview([{"__key__": "k0", "cls": 3, "txt": "a cat"}, {"__key__": "k1", "cls": 5}])
        Preview of 2 items
        #  key  cls  txt
        0  k0   3    'a cat'
        1  k1   5
        >>> Preview([("a", 1), ("b", 2)])[1]
        ('b', 2)
    """

    def __init__(self, items: Sequence[T]) -> None:
        self._items: list[T] = list(items)

    @classmethod
    def from_node(cls, node: BaseNode[T], n: int) -> Preview[T]:
        """The first ``n`` items of ``node`` after a ``reset()``; then every stage with a ``shutdown()`` is shut down.

        The stage chain is followed through each stage's ``source``; ``node`` is spent afterwards.
        """
        n = peek_count(n)
        items: list[T] = []
        try:
            if n:
                node.reset()
                for item in node:
                    items.append(item)
                    if len(items) == n:
                        break
        finally:
            stage: object = node
            while stage is not None:
                shutdown = getattr(stage, "shutdown", None)
                if callable(shutdown):
                    shutdown()
                stage = getattr(stage, "source", None)
        return cls(items)

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> Preview[T]: ...

    def __getitem__(self, index: int | slice) -> T | Preview[T]:
        if isinstance(index, slice):
            return Preview(self._items[index])
        return self._items[index]

    def __iter__(self) -> Iterator[T]:
        return iter(self._items)

    def _table(self) -> tuple[list[str], list[tuple[int, object, object, dict[str, object]]]]:
        """Column names (fields, in order of first appearance) and rows ``(index, key, url, {field: value})``."""
        columns: dict[str, None] = {}
        rows = []
        for index, item in enumerate(self._items):
            key, fields = _key_and_fields(item)
            for name, _ in fields:
                columns.setdefault(name)
            url = item.get("__url__") if isinstance(item, Mapping) else None
            rows.append((index, key, url, dict(fields)))
        return list(columns), rows

    def __repr__(self) -> str:
        columns, rows = self._table()
        has_key = any(key is not None for _, key, _, _ in rows)
        header = ["#", *(["key"] if has_key else []), *columns]
        cells = [header]
        for index, key, _, fields in rows:
            key_cell = [_truncate(str(key)) if key is not None else ""] if has_key else []
            cells.append([str(index), *key_cell, *(describe(fields[c]) if c in fields else "" for c in columns)])
        return _layout(self._title(), cells)

    def _title(self) -> str:
        return f"Preview of {len(self._items)} item{'' if len(self._items) == 1 else 's'}"

    def _repr_html_(self) -> str:
        columns, rows = self._table()
        has_key = any(key is not None for _, key, _, _ in rows)
        esc = html.escape
        header = "".join(f"<th>{esc(name)}</th>" for name in ["#", *(["key"] if has_key else []), *columns])
        body = []
        for index, key, url, fields in rows:
            cells = [f"<td>{index}</td>"]
            if has_key:
                title = f' title="{esc(str(url))}"' if url is not None else ""
                cells.append(f"<td{title}>{esc(_truncate(str(key), 80)) if key is not None else ''}</td>")
            for column in columns:
                if column not in fields:
                    cells.append("<td></td>")
                    continue
                text = esc(describe(fields[column]))
                image = _thumbnail(column, fields[column])
                cells.append(f"<td>{image}<br><small>{text}</small></td>" if image else f"<td>{text}</td>")
            body.append(f"<tr>{''.join(cells)}</tr>")
        return (
            f'<table class="s3pipes-preview"><caption>{self._title()}</caption>'
            f"<thead><tr>{header}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        )


# -- repr(pipe) -----------------------------------------------------------------------------


def _safe_url(url: str) -> str:
    """``url`` without user info or query string (presigned URLs carry credentials there)."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        parts = parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2])
    if parts.query:
        parts = parts._replace(query="***")
    return parts.geturl()


def _argument(value: object) -> str:
    """Functions and classes by qualified name (lambdas as ``<lambda>``), anything else by its repr."""
    name = getattr(value, "__qualname__", None) if callable(value) else None
    if isinstance(name, str):
        return "<lambda>" if getattr(value, "__name__", None) == "<lambda>" else name
    return _truncate(repr(value), _ARG_WIDTH)


def step_label(method: str, kwargs: Mapping[str, Any]) -> str:
    """The name a step is shown by: its Pipe method, except ``decode`` for a map of a Decoder."""
    return "decode" if method == "map" and isinstance(kwargs.get("fn"), Decoder) else method


def _step_line(method: str, kwargs: Mapping[str, Any]) -> str:
    label = step_label(method, kwargs)
    if label == "decode":  # .decode(image=..., ...) rather than .map(fn=Decoder(image=..., ...))
        config = repr(kwargs["fn"]).removeprefix("Decoder(").removesuffix(")")
        rest = ", ".join(f"{k}={_argument(v)}" for k, v in kwargs.items() if k != "fn")
        return f"  .decode({config}{', ' + rest if rest else ''})"
    return f"  .{label}({', '.join(f'{k}={_argument(v)}' for k, v in kwargs.items())})"


def describe_pipe(plan: ShardPlan, store: Store, steps: Sequence[tuple[str, Mapping[str, Any]]], *, epoch: int) -> str:
    """The text of ``repr(pipe)``: the shard plan, the first URLs, the store (for s3 URLs), one line per stage.

    Example:
        >>> plan = ShardPlan(tuple(f"s3://b/shard-{i}.tar?X-Amz-Signature=abc{i}" for i in range(5)), seed=1)
        >>> store = Store({"key": "AKIDEXAMPLE", "secret": "hunter2-secret"})
        >>> print(describe_pipe(plan, store, [("open_object", {}), ("map", {"fn": str.upper})], epoch=0))
        Pipe(5 shards, seed=1, epoch=0)
          urls: s3://b/shard-0.tar?***, s3://b/shard-1.tar?***, s3://b/shard-2.tar?***, ... (5 in all)
          store: Store(s3: key=AKID***, secret=***)
          .open_object()
          .map(fn=str.upper)
    """
    urls = plan.urls
    split = "" if plan.split else ", split=False"
    lines = [f"Pipe({len(urls)} shards, seed={plan.seed}, epoch={epoch}{split})"]
    shown = ", ".join(_safe_url(url) for url in urls[:_URLS_SHOWN])
    lines.append(f"  urls: {shown}{f', ... ({len(urls)} in all)' if len(urls) > _URLS_SHOWN else ''}")
    if any(url.startswith(("s3://", "s3a://")) for url in urls):
        lines.append(f"  store: {store!r}")
    lines += [_step_line(method, kwargs) for method, kwargs in steps]
    return store.redact("\n".join(lines))


# -- stats ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StageStats:
    """One stage's counts over a pass: items returned (and bytes, for stages that move bytes), and rates.

    ``skipped``: items the stage dropped under ``on_error="skip"`` in this pass (None for a
    stage without that policy); ``Pipe.skipped()`` has the totals since the epoch began, and what.
    """

    stage: str
    items: int
    items_per_s: float
    nbytes: int | None = None
    bytes_per_s: float | None = None
    skipped: int | None = None


@dataclasses.dataclass(frozen=True, repr=False)
class PipeStats:
    """What each stage of a Pipe returned in the pass that ran (or runs) in this process.

    ``status`` is ``"not started"``, ``"running"`` or ``"finished"``; ``wall_s`` is the
    time from ``iter(pipe)`` to the end of the pass (or to now, while it runs). Rates are
    counts over ``wall_s``: delivered throughput, including the time the consumer spent
    between items, not each stage's capacity. Counts start at 0 at ``iter()`` and again
    after ``load_state_dict()`` (they are not part of the state; the skip counts of
    ``Pipe.skipped()`` are).
    """

    status: str
    wall_s: float
    stages: tuple[StageStats, ...]

    @classmethod
    def collect(
        cls, labels: Sequence[str], node: BaseNode[Any] | None, started: float, finished: float | None
    ) -> PipeStats:
        """Read the counters of the stage chain ending at ``node`` (None: no pass yet), labelled source first."""
        if node is None:
            return cls("not started", 0.0, tuple(StageStats(label, 0, 0.0) for label in labels))
        chain: list[object] = []
        stage: object = node
        while stage is not None:
            chain.append(stage)
            stage = getattr(stage, "source", None)
        chain.reverse()
        if len(chain) != len(labels):
            labels = [type(stage).__name__ for stage in chain]
        wall = (finished if finished is not None else time.perf_counter()) - started
        per_s = 1.0 / wall if wall > 0 else 0.0
        rows = []
        for label, stage in zip(labels, chain, strict=True):
            items, nbytes = int(getattr(stage, "items_out", 0)), getattr(stage, "bytes_out", None)
            moved, rate = (None, None) if nbytes is None else (int(nbytes), nbytes * per_s)
            skips = getattr(stage, "skips", None) if getattr(stage, "on_error", None) == "skip" else None
            skipped = None if skips is None else int(skips.count - skips.loaded)
            rows.append(StageStats(label, items, items * per_s, moved, rate, skipped))
        return cls("finished" if finished is not None else "running", wall, tuple(rows))

    def to_dict(self) -> dict[str, Any]:
        """``{"status", "wall_s", "stages": [...]}``, one dict of :class:`StageStats`' fields per stage."""
        return {"status": self.status, "wall_s": self.wall_s, "stages": [dataclasses.asdict(s) for s in self.stages]}

    def _cells(self) -> list[list[str]]:
        skipping = any(s.skipped is not None for s in self.stages)  # the column only where a stage skips
        rows = [["stage", "items", "items/s", "bytes", "bytes/s", *(["skipped"] if skipping else [])]]
        for s in self.stages:
            moved = (
                (human_bytes(s.nbytes), f"{human_bytes(round(s.bytes_per_s or 0))}/s")
                if s.nbytes is not None
                else ("-", "-")
            )
            skipped = [("-" if s.skipped is None else str(s.skipped))] if skipping else []
            rows.append([s.stage, str(s.items), f"{s.items_per_s:,.1f}", *moved, *skipped])
        return rows

    def _title(self) -> str:
        return f"PipeStats({self.status}, {self.wall_s:.3f} s wall, this process only)"

    def __repr__(self) -> str:
        return _layout(self._title(), self._cells(), numbers_right=True)

    def _repr_html_(self) -> str:
        header, *rows = self._cells()
        head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
        return (
            f'<table class="s3pipes-stats"><caption>{html.escape(self._title())}</caption>'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        )
