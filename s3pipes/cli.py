"""The ``s3pipes`` command: argparse over library calls, no logic of its own.

Exit codes: 0 success, 1 a failure (one readable line on stderr), 2 a usage error.
Configuration comes from the same places as in the library: ``AWS_*`` variables,
and a ``.env`` file when ``--env-file`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from s3pipes.errors import ConfigError, S3PipesError
from s3pipes.store import Store

if TYPE_CHECKING:
    from s3pipes.checkpoint import CheckpointStore

__all__ = ["main"]


def _store(args: argparse.Namespace) -> Store:
    return Store.from_env(env_file=args.env_file)


def _cmd_ls(args: argparse.Namespace) -> int:
    store = _store(args)
    for url in store.list(args.url, suffix=args.suffix):
        print(url)
    return 0


def _cmd_head(args: argparse.Namespace) -> int:
    import s3pipes as sp

    if args.spec is not None:
        pipe: Any = sp.from_spec(args.spec, store=_store(args))
    else:
        # a prefix ends in "/"; a shard, a list or a brace pattern names .tar files; anything else is a prefix
        url = args.url
        url = url if url.endswith("/") or url.endswith(args.suffix) or "{" in url else url + "/"
        pipe = sp.webdataset(url, suffix=args.suffix, store=_store(args))
    preview = pipe.decode(args.decode).peek(args.n) if args.decode else pipe.peek(args.n)
    print(preview)
    return 0


def _checkpoints(args: argparse.Namespace) -> CheckpointStore:
    from s3pipes.checkpoint import CheckpointStore

    try:
        return CheckpointStore(args.url, store=_store(args))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _kind(marker: dict[str, Any]) -> str:
    return "dcp" if marker.get("kind") == "dcp" else "torch.save"


def _created(marker: dict[str, Any]) -> str:
    created = marker.get("created")
    if not isinstance(created, (int, float)):
        return "?"
    return datetime.fromtimestamp(created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _bytes(size: int) -> str:
    """``812 B``, ``1.9 kB``, ``12.3 MB``, ``1.5 GB`` (powers of 1000, as convert reports sizes)."""
    if size < 1000:
        return f"{size} B"
    exponent = min(len(str(size)) - 1, 12) // 3  # 1 kB .. 4 TB
    return f"{size / 1000**exponent:,.1f} {('kB', 'MB', 'GB', 'TB')[exponent - 1]}"


def _cmd_ckpt_ls(args: argparse.Namespace) -> int:
    from s3pipes.errors import CheckpointNotFound

    ckpt = _checkpoints(args)
    markers, leftovers = ckpt.markers(), ckpt.uncommitted()
    if not markers and not leftovers:
        raise CheckpointNotFound(ckpt.url, ckpt.store.endpoint(ckpt.url), None, [])
    latest = ckpt.latest_step() if markers else None
    rows = [["step", "kind", "size", "created (UTC)", ""]]
    for step, marker in markers.items():
        size, mark = _bytes(int(marker["size"])), "latest" if step == latest else ""
        rows.append([str(step), _kind(marker), size, _created(marker), mark])
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        cells = (
            cell.rjust(width) if i in (0, 2) else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        print("  ".join(cells).rstrip())
    for step, files in leftovers.items():
        print(
            f"uncommitted step {step}: {len(files)} file{'' if len(files) == 1 else 's'}, "
            f"{_bytes(sum(files.values()))} (an interrupted save; the next save's retention deletes it)"
        )
    return 0


def _cmd_ckpt_show(args: argparse.Namespace) -> int:
    ckpt = _checkpoints(args)
    marker = ckpt.marker(args.step)
    step = int(marker["step"])
    print(f"step {step} of {ckpt.url}: {_kind(marker)}, {_bytes(int(marker['size']))}, created {_created(marker)}")
    print(json.dumps(marker, indent=2, sort_keys=True))
    if marker.get("kind") == "dcp":
        files: dict[str, int] = marker.get("files", {})
        print(f"files ({len(files)}):")
        width = max(map(len, files), default=0)
        for name, size in sorted(files.items()):
            print(f"  {name.ljust(width)}  {size:,} B")
    else:
        described = ckpt.describe(step)
        print(f"state ({len(described)} key{'' if len(described) == 1 else 's'}, loaded with weights_only=True):")
        width = max(map(len, described), default=0)
        for key, text in described.items():
            print(f"  {key.ljust(width)}  {text}")
    return 0


BENCHMARKS = ("streaming", "mapstyle", "checkpoint", "convert")


def _benchmarks_root(name: str) -> Path:
    """The directory holding the ``benchmarks`` package (the repository clone): the working directory first."""
    for root in (Path.cwd(), *(Path(entry) for entry in sys.path if entry)):
        if (root / "benchmarks" / "__init__.py").is_file() and (root / "benchmarks" / f"{name}.py").is_file():
            return root
    raise ConfigError(
        f"benchmarks.{name} cannot be imported: the benchmarks are not installed with the library; "
        "run `s3pipes bench` from a clone of the s3pipes repository (its root directory)"
    )


def _cmd_bench(args: argparse.Namespace) -> int:
    root = _benchmarks_root(args.name)
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), *([path] if path else [])])}
    extra = list(args.extra)
    with tempfile.TemporaryDirectory(prefix="s3pipes-bench-") as scratch:
        results = os.path.join(scratch, "results.json")
        if args.plot:
            extra += ["--json", results]
        argv = [sys.executable, "-m", f"benchmarks.{args.name}", *(["--quick"] if args.quick else []), *extra]
        code = subprocess.run(argv, env=env, check=False).returncode
        if code != 0 or not args.plot:
            return code
        plot = [sys.executable, "-m", "benchmarks.plot", results, "--out", args.plot]
        return subprocess.run(plot, env=env, check=False).returncode


def _cmd_index(args: argparse.Namespace) -> int:
    from s3pipes.index import build_shard_index, write_manifest

    store = _store(args)
    if args.shards:
        index = build_shard_index(store, args.url, suffix=args.suffix or ".tar")
        print(f"indexed {len(index.samples)} samples in {len(index.shards)} shards under {args.url}")
    else:
        url = write_manifest(store, args.url, suffix=args.suffix)
        print(f"wrote {url}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from s3pipes.server import LocalS3Server

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with LocalS3Server(args.data_dir) as server:
        for bucket in args.bucket:
            server.create_bucket(bucket, versioned=args.versioned)
        print("# SeaweedFS S3 is running; point s3pipes, boto3 or the AWS CLI at it with:")
        for name, value in server.env().items():
            print(f"export {name}={value}")
        if args.bucket:
            print(f"# buckets: {', '.join(args.bucket)}{' (versioned)' if args.versioned else ''}")
        print("# Ctrl-C stops the server" + ("" if args.data_dir else " and deletes its data"), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from s3pipes.convert import ObjectSamples, convert

    store = _store(args)
    source = ObjectSamples(args.src, label_from_path=args.label_from_path, store=store)
    directory = args.dst.rstrip("/").replace("{", "{{").replace("}", "}}")  # braces in DST are part of its name
    pattern = f"{directory}/{args.pattern}"
    with _quiet_convert_log(), _executor(args) as executor:
        result = convert(
            source,
            pattern,
            args.src,
            suffix=args.suffix,
            maxcount=args.maxcount,
            maxsize=args.maxsize,
            executor=executor,
            on_error=args.on_error,
            store=store,
            progress=args.progress,
        )
    for item in result.skipped:
        print(f"skipped {item['source']}: {item['error'].removeprefix(item['source'] + ': ')}")
    rate = result.samples / result.seconds if result.seconds > 0 else 0.0
    print(
        f"wrote {len(result.shards)} shards, {result.samples:,} samples, {result.bytes / 1e6:,.1f} MB "
        f"in {result.seconds:.1f} s ({rate:,.0f} samples/s); {len(result.skipped)} skipped; "
        f"{result.resumed} shards from an earlier run; manifest {result.manifest}"
    )
    return 0


_CONVERT_LOG = "s3pipes.convert"


def _silence_convert_log() -> None:
    """Keep convert's warnings (unit retried, input skipped) off stderr: the command reports them once."""
    logging.getLogger(_CONVERT_LOG).addHandler(logging.NullHandler())


@contextlib.contextmanager
def _quiet_convert_log() -> Iterator[None]:
    """:func:`_silence_convert_log` for the duration of the command (``main`` may run in a test process)."""
    handler = logging.NullHandler()
    logger = logging.getLogger(_CONVERT_LOG)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


@contextlib.contextmanager
def _executor(args: argparse.Namespace) -> Iterator[Executor | None]:
    if args.dask:
        try:
            from distributed import Client
        except ImportError:
            raise ConfigError("--dask needs dask.distributed: pip install 's3pipes[dask]'") from None
        try:
            client = Client(args.dask)  # type: ignore[no-untyped-call]  # distributed is partly annotated
        except OSError as exc:
            raise ConfigError(f"--dask {args.dask}: no Dask scheduler answered ({exc})") from exc
        with client:
            yield client.get_executor()  # type: ignore[no-untyped-call]
    elif args.workers:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: listing SRC on S3 has started fsspec's I/O-loop thread, and a forked
        # child inherits that loop and its locks mid-use (Python >= 3.12 warns on such a fork).
        # A spawned worker imports torch once (~1-2 s) and then runs many units.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.workers, mp_context=context, initializer=_silence_convert_log) as pool:
            yield pool
    else:
        yield None


def _cmd_verify(args: argparse.Namespace) -> int:
    from s3pipes.verify import verify_shards

    report = verify_shards(_store(args), args.url, manifest=args.manifest)
    for problem in report.problems:
        print(problem)
    print(report)
    return 0 if report.ok else 1


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def _size(text: str) -> int:
    """``"256MB"`` -> 256_000_000, ``"1GiB"`` -> 2**30, ``"4096"`` -> 4096 (bytes)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", text)
    unit = _SIZE_UNITS.get(match.group(2).lower()) if match else None
    size = round(float(match.group(1)) * unit) if match and unit else 0
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: bytes, or a number with KB/MB/GB/KiB/MiB/GiB")
    return size


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _step(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a step number (an integer >= 0)")
    return value


def _shard_pattern(text: str) -> str:
    from s3pipes.writer import check_pattern

    if "/" in text:
        raise argparse.ArgumentTypeError(f"{text!r}: a file name, without '/' (shards go directly under DST)")
    try:
        return check_pattern(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="s3pipes",
        description="Composable PyTorch data pipelines over object storage.",
        epilog=(
            "Examples:\n  s3pipes ls s3://bucket/shards/\n  s3pipes head s3://bucket/shards/ -n 3\n"
            "  s3pipes ckpt ls s3://ckpts/run\n  s3pipes COMMAND --help\n\n"
            "Exit status: 0 ok, 1 a failure (one line on stderr), 2 a usage error."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--env-file", help="read AWS_* settings from this .env file (process environment wins)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ls = commands.add_parser(
        "ls",
        help="list objects under a prefix",
        description="List objects under a prefix, sorted.",
        epilog="Examples:\n  s3pipes ls s3://bucket/train/ --suffix .tar\n  s3pipes --env-file .env ls s3://bucket/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ls.add_argument("url")
    ls.add_argument("--suffix", default="", help="only names ending in this")
    ls.set_defaults(run=_cmd_ls)

    head = commands.add_parser(
        "head",
        help="print the first samples of a tar shard or of the shards under a prefix",
        description=(
            "Print the first N samples of a WebDataset tar shard, or of the shards under a prefix (read in "
            "sorted order), as a table: one row per sample, its __key__ and a short description of each field "
            "(bytes: size; decoded images: WxH mode; tensors: shape and dtype). URL is a prefix when it ends "
            "in '/' or does not end in --suffix; shard lists like shard-{000..009}.tar expand."
        ),
        epilog=(
            "Examples:\n"
            "  s3pipes head s3://shards/mnist/shard-000000.tar\n"
            "  s3pipes head s3://shards/mnist/ -n 10 --decode\n"
            "  s3pipes head 's3://shards/imgs/shard-{000000..000003}.tar' --decode numpy\n"
            "  s3pipes head --spec pipeline.yaml -n 3     # a pipeline saved with pipe.to_yaml()"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = head.add_mutually_exclusive_group(required=True)
    source.add_argument("url", metavar="URL", nargs="?", help="a shard, a brace pattern of shards, or a prefix")
    source.add_argument("--spec", metavar="YAML", help="instead of URL: run this pipeline spec (YAML or JSON file)")
    head.add_argument("-n", type=_positive, default=5, help="samples to show (default: 5)")
    head.add_argument(
        "--decode",
        nargs="?",
        const="pil",
        choices=("pil", "numpy", "torch", "torch_float"),
        help="decode the fields by extension first; images as this (default when given: pil)",
    )
    head.add_argument("--suffix", default=".tar", help="shard names end in this (default: .tar)")
    head.set_defaults(run=_cmd_head)

    index = commands.add_parser(
        "index",
        help="write a manifest (objects) or a sample index (tar shards) under a prefix",
        description=(
            "Write manifest.s3pipes.json (every object's key, size, ETag) or, with --shards, "
            "index.s3pipes.json (every sample's byte range in every shard), so that a MapDataset "
            "opens with one GET instead of a listing or a scan."
        ),
        epilog=(
            "Examples:\n  s3pipes index s3://mnist/train/ --suffix .png\n  s3pipes index s3://bucket/shards/ --shards"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    index.add_argument("url")
    index.add_argument("--suffix", default="", help="only objects ending in this (shards: default .tar)")
    index.add_argument("--shards", action="store_true", help="index the samples inside tar shards")
    index.set_defaults(run=_cmd_index)

    convert = commands.add_parser(
        "convert",
        help="convert one-object-per-sample data into WebDataset tar shards (parallel, resumable)",
        description=(
            "Convert the objects under SRC into WebDataset tar shards under DST, plus their manifest "
            "shards.s3pipes.json (written last). Each object becomes a sample: __key__ is its path under "
            "SRC without extensions, its extension (png, seg.png, ...) the field holding its bytes; objects "
            "sharing a key (x.png, x.json) make one sample. Resumable: each finished shard leaves a record "
            "under DST/.s3pipes-convert/, and a rerun with the same arguments skips those shards."
        ),
        epilog=(
            "Examples:\n"
            "  s3pipes convert s3://raw/mnist/train/ s3://shards/mnist/ --suffix .png --label-from-path 1\n"
            "  s3pipes convert s3://raw/imgs/ s3://shards/imgs/ --maxsize 1GiB --workers 8 --on-error skip\n"
            "  s3pipes convert s3://raw/imgs/ s3://shards/imgs/ --dask tcp://scheduler:8786"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument("src", metavar="SRC", help="prefix of the source objects")
    convert.add_argument("dst", metavar="DST", help="prefix the shards and manifest are written under")
    convert.add_argument("--suffix", default="", help="only objects ending in this, e.g. .png (default: all)")
    convert.add_argument(
        "--pattern",
        type=_shard_pattern,
        default="shard-{shard:06d}.tar",
        help="shard file names, with a {shard} field (default: shard-{shard:06d}.tar)",
    )
    convert.add_argument(
        "--maxcount", type=_positive, default=10_000, help="source objects per shard, at most (default: 10000)"
    )
    convert.add_argument(
        "--maxsize",
        type=_size,
        default=256 << 20,
        help="source bytes per shard, at most: 256MB (10^6), 1GiB (2^30), or bytes (default: 256MiB)",
    )
    convert.add_argument(
        "--label-from-path",
        type=_positive,
        metavar="K",
        help="add an int 'cls' from the K-th directory under SRC, counting from 1 (1: SRC/<label>/<id>.png)",
    )
    parallel = convert.add_mutually_exclusive_group()
    parallel.add_argument("--workers", type=_positive, metavar="N", help="convert on N processes (default: here)")
    parallel.add_argument("--dask", metavar="SCHEDULER_ADDRESS", help="convert on this Dask cluster")
    convert.add_argument(
        "--on-error",
        choices=("raise", "skip"),
        default="raise",
        help="a source object that cannot be read or converted: stop naming it (raise, default) or "
        "leave it out, listed in the manifest (skip)",
    )
    convert.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars on stderr (default: only when it is a terminal)",
    )
    convert.set_defaults(run=_cmd_convert)

    verify = commands.add_parser(
        "verify",
        help="read every shard under a prefix and check it against shards.s3pipes.json",
        description=(
            "Read every .tar shard directly under URL (every member, every sample) and check it against "
            "the manifest: each shard is in it and vice versa, sample count, size, first and last key match, "
            "no key is in two shards, the totals add up. One line per problem, then a summary; "
            "exit status 1 if there was any problem."
        ),
        epilog=(
            "Examples:\n"
            "  s3pipes verify s3://shards/mnist/\n"
            "  s3pipes verify s3://shards/mnist/ --manifest s3://shards/mnist.json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument("url", metavar="URL", help="prefix of the shards")
    verify.add_argument("--manifest", help="the manifest's URL (default: URL/shards.s3pipes.json)")
    verify.set_defaults(run=_cmd_verify)

    serve = commands.add_parser(
        "serve",
        help="run the embedded local S3 server (SeaweedFS) until Ctrl-C",
        description="Run SeaweedFS's S3 gateway on 127.0.0.1 with generated credentials and print them.",
        epilog=(
            "Examples:\n  s3pipes serve --bucket data --bucket ckpts --versioned\n  s3pipes serve --data-dir ./s3-data"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--bucket", action="append", default=[], help="create this bucket (repeatable)")
    serve.add_argument("--versioned", action="store_true", help="turn on versioning for the created buckets")
    serve.add_argument("--data-dir", help="keep data here (default: a temporary dir deleted on exit)")
    serve.set_defaults(run=_cmd_serve)

    ckpt = commands.add_parser(
        "ckpt",
        help="list the steps of a checkpoint run, or show one",
        description="Look at a run written by CheckpointStore: its committed steps, or one step's marker and state.",
        epilog=(
            "Examples:\n"
            "  s3pipes ckpt ls s3://ckpts/project/run\n"
            "  s3pipes ckpt show s3://ckpts/project/run --step 1000"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ckpt_commands = ckpt.add_subparsers(dest="ckpt_command", required=True, metavar="{ls,show}")
    ckpt_ls = ckpt_commands.add_parser(
        "ls",
        help="one line per committed step",
        description=(
            "One line per committed step: step, kind (torch.save or dcp), size, creation time (UTC) and a "
            "'latest' mark on the step load() picks; then the uncommitted leftovers of interrupted saves."
        ),
        epilog="Examples:\n  s3pipes ckpt ls s3://ckpts/project/run\n  s3pipes ckpt ls file:///tmp/ckpts/run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ckpt_ls.add_argument("url", metavar="URL", help="the run prefix, as given to CheckpointStore")
    ckpt_ls.set_defaults(run=_cmd_ckpt_ls)
    ckpt_show = ckpt_commands.add_parser(
        "show",
        help="the marker of one step, and its state's top-level keys",
        description=(
            "Print the marker of a step (default: the latest), then, for a torch.save step, each top-level "
            "key of its state with a short description of the value (the payload is read whole and loaded "
            "with weights_only=True), or, for a dcp step, its files."
        ),
        epilog=(
            "Examples:\n"
            "  s3pipes ckpt show s3://ckpts/project/run\n"
            "  s3pipes ckpt show s3://ckpts/project/run --step 1000"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ckpt_show.add_argument("url", metavar="URL", help="the run prefix, as given to CheckpointStore")
    ckpt_show.add_argument("--step", type=_step, help="a committed step (default: the latest)")
    ckpt_show.set_defaults(run=_cmd_ckpt_show)

    bench = commands.add_parser(
        "bench",
        usage="s3pipes bench [-h] [--quick] [--plot PNG] NAME [-- ARG ...]",
        help="run one of the repository's benchmarks (from a clone of the repository)",
        description=(
            "Run python -m benchmarks.NAME with this Python, passing --quick and the arguments after '--' "
            "through; the exit status is the benchmark's. The benchmarks are not installed with the "
            "library: run this from a clone of the repository."
        ),
        epilog=(
            "Examples:\n"
            "  s3pipes bench streaming --quick\n"
            "  s3pipes bench checkpoint -- --mib 64 --repeats 1\n"
            "  s3pipes bench mapstyle -- --help\n"
            "  s3pipes bench convert --quick --plot convert.png   # needs matplotlib: s3pipes[plot]"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("name", choices=BENCHMARKS, metavar="NAME", help=f"one of: {', '.join(BENCHMARKS)}")
    bench.add_argument("--quick", action="store_true", help="a small run, to check that it all works")
    bench.add_argument("--plot", metavar="PNG", help="also draw the results as a bar chart (needs matplotlib)")
    bench.set_defaults(run=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    parser = _parser()
    words = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in words:  # what follows is the benchmark's (argparse's own "--" handling varies by version)
        cut = words.index("--")
        words, extra = words[:cut], words[cut + 1 :]
    args = parser.parse_args(words)
    if extra and args.command != "bench":
        parser.error(f"'-- {' '.join(extra)}': arguments after '--' are for `s3pipes bench` only")
    args.extra = extra
    try:
        return int(args.run(args))
    except S3PipesError as exc:
        print(f"s3pipes {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
