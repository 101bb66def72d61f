"""The ``s3pipes`` command: argparse over library calls, no logic of its own.

Exit codes: 0 success, 1 a failure (one readable line on stderr), 2 a usage error.
Configuration comes from the same places as in the library: ``AWS_*`` variables,
and a ``.env`` file when ``--env-file`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Sequence

from s3pipes.errors import S3PipesError
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
