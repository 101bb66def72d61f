"""The ``s3pipes`` command: argparse over library calls, no logic of its own.

Exit codes: 0 success, 1 a failure (one readable line on stderr), 2 a usage error.
Configuration comes from the same places as in the library: ``AWS_*`` variables,
and a ``.env`` file when ``--env-file`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor

from s3pipes.errors import ConfigError, S3PipesError
from s3pipes.store import Store

__all__ = ["main"]


def _store(args: argparse.Namespace) -> Store:
    return Store.from_env(env_file=args.env_file)


def _cmd_ls(args: argparse.Namespace) -> int:
    store = _store(args)
    for url in store.list(args.url, suffix=args.suffix):
        print(url)
    return 0


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
    pattern = f"{args.dst.rstrip('/')}/{args.pattern}"
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
        prog="s3pipes", description="Composable PyTorch data pipelines over object storage."
    )
    parser.add_argument("--env-file", help="read AWS_* settings from this .env file (process environment wins)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ls = commands.add_parser(
        "ls",
        help="list objects under a prefix",
        description="List objects under a prefix, sorted.",
        epilog="example: s3pipes ls s3://bucket/train/ --suffix .tar",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ls.add_argument("url")
    ls.add_argument("--suffix", default="", help="only names ending in this")
    ls.set_defaults(run=_cmd_ls)

    index = commands.add_parser(
        "index",
        help="write a manifest (objects) or a sample index (tar shards) under a prefix",
        description=(
            "Write manifest.s3pipes.json (every object's key, size, ETag) or, with --shards, "
            "index.s3pipes.json (every sample's byte range in every shard), so that a MapDataset "
            "opens with one GET instead of a listing or a scan."
        ),
        epilog=(
            "examples:\n  s3pipes index s3://mnist/train/ --suffix .png\n  s3pipes index s3://bucket/shards/ --shards"
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
            "examples:\n"
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
        epilog="example: s3pipes verify s3://shards/mnist/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument("url", metavar="URL", help="prefix of the shards")
    verify.add_argument("--manifest", help="the manifest's URL (default: URL/shards.s3pipes.json)")
    verify.set_defaults(run=_cmd_verify)

    serve = commands.add_parser(
        "serve",
        help="run the embedded local S3 server (SeaweedFS) until Ctrl-C",
        description="Run SeaweedFS's S3 gateway on 127.0.0.1 with generated credentials and print them.",
        epilog="example: s3pipes serve --bucket data --bucket ckpts --versioned",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--bucket", action="append", default=[], help="create this bucket (repeatable)")
    serve.add_argument("--versioned", action="store_true", help="turn on versioning for the created buckets")
    serve.add_argument("--data-dir", help="keep data here (default: a temporary dir deleted on exit)")
    serve.set_defaults(run=_cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except S3PipesError as exc:
        print(f"s3pipes {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
