"""How fast s3pipes saves and loads a checkpoint, and what memory a load takes, against the usual ways.

Run from the repository root::

    python -m benchmarks.checkpoint [--mib 256] [--repeats 3] [--quick] [--json out.json]

The default (a 256 MiB state, 3 repeats of 5 clients x save + load) takes about 3
minutes on 2 cores; --quick (64 MiB, 1 repeat) about 30 s.

One embedded SeaweedFS (:class:`s3pipes.server.LocalS3Server`, 127.0.0.1 only), one
bucket. The state is ``{"model": {name: 4 MiB float32 noise tensor, ...}, "step": 1234}``
(built the same way in every process, so each load is checked tensor for tensor).
The clients, each saving to and loading from its own key:

- s3pipes: ``CheckpointStore(run).save(state, key=...)`` / ``.load(key=...)``;
- S3Checkpoint (s3torchconnector): ``torch.save`` into ``writer(url)``, ``torch.load`` from ``reader(url)``;
- s3fs: ``torch.save`` into ``fs.open(url, "wb")``, ``torch.load`` from ``fs.open(url, "rb")``;
- boto3: ``torch.save`` into a BytesIO then ``upload_fileobj``; ``download_fileobj`` into a
  BytesIO then ``torch.load`` (boto3's default transfer settings: 8 MiB parts, 10 threads);
- s3pipes transport only: the bytes of the same ``torch.save``, serialised before the clock
  starts, through s3pipes' parallel parts / ranged GETs, no torch inside the timing: what this
  server and transport can do at best, the ceiling of the rows above.

Every save or load runs in a fresh process (``benchmarks._ckpt_child``), so the peak RSS
of one operation is measured alone: the kernel's high-water mark is reset after the
set-up, and the peak over the RSS before the operation is reported as a multiple of the
state's size. Repeats go round the clients in turn, so a noisy moment on a shared machine
does not hit one client's every run; 64 MiB written first, untimed, let the server grow
its volumes before anyone is timed. MB/s is of the best repeat (state bytes / seconds).

CPU seconds, of the best repeat: the client's (the child, all threads, during the
operation) and SeaweedFS's (over the child's life; the server idles at ~0.002 s/s). The
client and the server share the machine's cores, so a save's wall time is at least
server CPU / cores even for a client that cost nothing: the report states that bound
for s3pipes' saves, in MB/s and as a multiple of boto3's save.

Targets (issue 5): s3pipes save >= 1.5x boto3 MB/s, load >= 1.2x boto3 MB/s, peak RSS
over the baseline on load <= 1.25x the state. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks._ckpt_child import CLIENTS
from benchmarks._cpu import server_cpu
from benchmarks._report import machine, versions
from s3pipes import Store
from s3pipes.server import LocalS3Server

MB = 10**6
OPERATIONS = ("save", "load")
TARGETS = (  # (operation, metric, target ratio of s3pipes to boto3; for RSS, a ceiling in state sizes)
    ("save", "mb_per_s", 1.5),
    ("load", "mb_per_s", 1.2),
)
LOAD_RSS_CEILING = 1.25


@dataclass
class Cell:
    """One client's repeats of one operation."""

    client: str
    operation: str
    seconds: list[float] = field(default_factory=list)
    rss_ratios: list[float] = field(default_factory=list)
    client_cpu: list[float] = field(default_factory=list)
    server_cpu: list[float | None] = field(default_factory=list)
    state_bytes: int = 0
    error: str | None = None

    @property
    def mb_per_s(self) -> float | None:
        return self.state_bytes / min(self.seconds) / MB if self.seconds else None

    @property
    def best(self) -> int | None:
        """Index of the fastest repeat."""
        return min(range(len(self.seconds)), key=self.seconds.__getitem__) if self.seconds else None

    def cpu_of(self, repeat: int | None) -> tuple[float, float | None] | None:
        """(client, server) CPU seconds of one repeat; None for none."""
        return None if repeat is None else (self.client_cpu[repeat], self.server_cpu[repeat])

    @property
    def rss_ratio(self) -> float | None:
        """The worst peak RSS over the baseline, in state sizes."""
        return max(self.rss_ratios) if self.rss_ratios else None


def run_child(server: LocalS3Server, client: str, operation: str, mib: int) -> dict[str, Any]:
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": server.endpoint_url,
        "AWS_ACCESS_KEY_ID": server.key,
        "AWS_SECRET_ACCESS_KEY": server.secret,
        "AWS_EC2_METADATA_DISABLED": "true",
        "OMP_NUM_THREADS": "1",
    }
    url = f"s3://ckpt/{client}/state.pt"
    command = [sys.executable, "-m", "benchmarks._ckpt_child", client, operation, url, str(mib)]
    served = server_cpu(server.pid)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    served_after = server_cpu(server.pid)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["server_cpu_seconds"] = None if served is None or served_after is None else served_after - served
    return result


def warm_up(server: LocalS3Server) -> None:
    """Write 64 MiB, untimed: SeaweedFS grows its volumes on a bucket's first writes (measured: the
    first client to save paid ~1 s more), which must not count against whichever client goes first."""
    store = Store({"endpoint_url": server.endpoint_url, "key": server.key, "secret": server.secret})
    for i in range(8):
        store.write_bytes(f"s3://ckpt/warm-up/{i}", os.urandom(8 << 20))


def measure(mib: int, repeats: int) -> list[Cell]:
    cells = {(client, op): Cell(client, op) for client in CLIENTS for op in OPERATIONS}
    with LocalS3Server() as server:
        server.create_bucket("ckpt")
        warm_up(server)
        for repeat in range(repeats):
            for client in CLIENTS:
                for op in OPERATIONS:  # a load reads what this client saved just before
                    cell = cells[client, op]
                    if cell.error is not None or (op == "load" and cells[client, "save"].error is not None):
                        continue
                    try:
                        result = run_child(server, client, op, mib)
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        cell.error = str(exc)[:200]
                        continue
                    cell.seconds.append(result["seconds"])
                    cell.state_bytes = result["bytes"]
                    cell.rss_ratios.append(result["rss_over_baseline"] / result["bytes"])
                    cell.client_cpu.append(result["cpu_seconds"])
                    cell.server_cpu.append(result["server_cpu_seconds"])
                    rate = result["bytes"] / result["seconds"] / MB
                    print(
                        f"[{repeat + 1}/{repeats}] {client:>12} {op}: {rate:6.0f} MB/s,"
                        f" peak RSS {cell.rss_ratios[-1]:.2f}x the state, CPU s {_cpu_text(cell.cpu_of(-1))}",
                        file=sys.stderr,
                        flush=True,
                    )
    return list(cells.values())


def _cpu_text(cpu: tuple[float, float | None] | None) -> str:
    if cpu is None:
        return "n/a"
    client, server = cpu
    return f"{client:.2f} + {server:.2f}" if server is not None else f"{client:.2f} + n/a"


def server_bound(cells: Sequence[Cell]) -> dict[str, Any] | None:
    """The fastest s3pipes save the server's CPU allows on these cores with a client that cost nothing.

    Its CPU over the fastest s3pipes save, spread perfectly over every core: a bound no client
    passes here. None where /proc could not be read.
    """
    by = {(c.client, c.operation): c for c in cells}
    ours, boto3 = by["s3pipes", "save"], by["boto3", "save"]
    cpu = ours.cpu_of(ours.best)
    if cpu is None or cpu[1] is None or not cpu[1]:
        return None
    cores = len(os.sched_getaffinity(0))
    mb_per_s = ours.state_bytes / (cpu[1] / cores) / MB
    theirs = boto3.mb_per_s
    return {"server_cpu_seconds": cpu[1], "cores": cores, "mb_per_s": mb_per_s,
            "times_boto3": mb_per_s / theirs if theirs else None}  # fmt: skip


def targets(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    by = {(c.client, c.operation): c for c in cells}
    rows = []
    for op, _metric, target in TARGETS:
        ours, theirs = by["s3pipes", op].mb_per_s, by["boto3", op].mb_per_s
        ratio = ours / theirs if ours and theirs else None
        rows.append({"name": f"s3pipes {op} MB/s / boto3 {op} MB/s", "value": ratio, "target": f">= {target}",
                     "met": ratio is not None and ratio >= target})  # fmt: skip
    rss = by["s3pipes", "load"].rss_ratio
    rows.append({"name": "s3pipes load: peak RSS over baseline / state size", "value": rss,
                 "target": f"<= {LOAD_RSS_CEILING}", "met": rss is not None and rss <= LOAD_RSS_CEILING})  # fmt: skip
    return rows


def markdown(cells: Sequence[Cell], settings: dict[str, Any], context: dict[str, Any]) -> str:
    m = context["machine"]
    lines = [
        f"Checkpoint save/load, {settings['mib']} MiB state, best of {settings['repeats']}"
        f" ({context['date']}; {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB; one local SeaweedFS):",
        "",
        "| client | save MB/s | load MB/s | save peak RSS / state | load peak RSS / state"
        " | save CPU s, client + server | load CPU s, client + server |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    by = {(c.client, c.operation): c for c in cells}

    def number(value: float | None, digits: int, error: str | None) -> str:
        return f"{value:.{digits}f}" if value is not None else f"failed: {error}"

    for client in CLIENTS:
        save, load = by[client, "save"], by[client, "load"]
        lines.append(
            f"| {client} | {number(save.mb_per_s, 0, save.error)} | {number(load.mb_per_s, 0, load.error)} "
            f"| {number(save.rss_ratio, 2, save.error)} | {number(load.rss_ratio, 2, load.error)} "
            f"| {_cpu_text(save.cpu_of(save.best))} | {_cpu_text(load.cpu_of(load.best))} |"
        )
    lines += ["", "| target | measured | aim | met |", "|---|---:|---|---|"]
    for row in targets(cells):
        value = f"{row['value']:.2f}" if row["value"] is not None else "n/a"
        lines.append(f"| {row['name']} | {value} | {row['target']} | {'yes' if row['met'] else 'no'} |")
    bound = server_bound(cells)
    if bound is not None:
        versus = f" = {bound['times_boto3']:.2f}x boto3's save" if bound["times_boto3"] else ""
        lines += [
            "",
            f"Server bound on saving: SeaweedFS spent {bound['server_cpu_seconds']:.2f} s of CPU on s3pipes'"
            f" fastest save; over {bound['cores']} cores, no client saves faster than {bound['mb_per_s']:.0f} MB/s"
            f" here{versus}.",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="state size in MiB (a multiple of 4)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="64 MiB, 1 repeat")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    settings = {"mib": 64, "repeats": 1} if args.quick else {"mib": args.mib, "repeats": args.repeats}
    cells = measure(settings["mib"], settings["repeats"])
    context = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat("T", "seconds"),
        "machine": machine(),
        "versions": versions(),
    }
    print(markdown(cells, settings, context))
    if args.json:
        document = {**context, "settings": settings, "cells": [asdict(c) for c in cells], "targets": targets(cells),
                    "server_bound": server_bound(cells)}  # fmt: skip
        with open(args.json, "w") as out:
            json.dump(document, out, indent=1)


if __name__ == "__main__":
    main()
