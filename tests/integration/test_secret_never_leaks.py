"""No secret ever shows (issue 8, item 4): not the real one, not a wrong one a user typed.

Extends ``test_store_errors.py::test_secret_never_printed`` (reprs, one wrong key, ``ls``) to every
cheap error path, through the library and the CLI, and to everything a user may print or log:
``str``/``repr`` of the error and the whole ``traceback.format_exception`` (causes included),
``repr`` of stores, pipes and checkpoint stores, ``to_spec()``, ``state_dict()``, DEBUG logs of
every logger (botocore, s3fs, aiohttp included) and the CLI's stdout/stderr.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator

import pytest
import torch

import s3pipes as sp
from s3pipes import MapDataset, Store
from s3pipes.checkpoint import CheckpointStore
from s3pipes.server import LocalS3Server
from tests.integration.test_store_errors import closed_port
from tests.unit.test_pipe import write_shards

pytestmark = pytest.mark.integration

WRONG_SECRET = "wrong-" + secrets.token_urlsafe(18)  # what a user mistyped: must not show either


def texts_of(exc: BaseException) -> list[str]:
    """Everything an error shows: str, repr, its attributes and the full traceback with causes."""
    texts = [str(exc), repr(exc), repr(vars(exc)), "".join(traceback.format_exception(exc))]
    for linked in (exc.__cause__, exc.__context__):
        if linked is not None:
            texts += [str(linked), repr(linked)]
    return texts


def failures(calls: dict[str, Callable[[], object]]) -> Iterator[tuple[str, BaseException]]:
    for name, call in calls.items():
        try:
            call()
        except Exception as exc:  # every error path: the class is tested elsewhere, here only what it shows
            yield name, exc
        else:
            pytest.fail(f"{name}: no error")


def leaks(texts: dict[str, str], *needles: str) -> list[str]:
    return [f"{what} shows {needle[:6]}..." for what, text in texts.items() for needle in needles if needle in text]


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)  # the root logger: botocore, s3fs, aiohttp, fsspec, s3pipes
    for name in ("botocore", "s3fs", "aiohttp", "aiobotocore", "fsspec", "urllib3", "s3pipes"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


@pytest.mark.timeout(90)
def test_library_errors_objects_and_debug_logs_never_show_a_secret(
    s3_server: LocalS3Server, s3_store: Store, s3_root: str, debug_logs: pytest.LogCaptureFixture
) -> None:
    secret, readonly_secret = s3_server.secret, s3_server.readonly_secret
    options = s3_server.storage_options
    write_shards(s3_root, shards=2, per_shard=3, store=s3_store)
    s3_store.write_bytes(f"{s3_root}/bad/shard-000.tar", b"not a tar archive at all " * 100)
    s3_store.write_bytes(f"{s3_root}/items/0.bin", b"item")
    run = CheckpointStore(f"{s3_root}/run", store=s3_store)
    run.save({"step": 1, "w": torch.zeros(4)}, step=1)
    s3_store.write_bytes(f"{s3_root}/broken/step-000002/garbage.pt", b"garbage")

    wrong = Store({**options, "secret": WRONG_SECRET})
    reader = Store(s3_server.readonly_storage_options)
    port = closed_port()
    nowhere = Store({**options, "endpoint_url": f"http://127.0.0.1:{port}"}, connect_timeout=1, read_timeout=1)
    userinfo = Store({"endpoint_url": f"http://{s3_server.key}:{secret}@127.0.0.1:{port}"}, connect_timeout=1)
    calls: dict[str, Callable[[], object]] = {
        "missing bucket: read": lambda: s3_store.read_bytes("s3://no-such-bucket-leaks/x.bin"),
        "missing bucket: list": lambda: s3_store.list("s3://no-such-bucket-leaks/"),
        "missing bucket: pipe": lambda: sp.webdataset("s3://no-such-bucket-leaks/", store=s3_store),
        "missing key: read": lambda: s3_store.read_bytes(f"{s3_root}/missing.bin"),
        "missing key: ranges": lambda: s3_store.read_ranges([f"{s3_root}/missing.bin"]),
        "missing key: pipe": lambda: list(sp.webdataset(f"{s3_root}/missing.tar", store=s3_store)),
        "wrong secret: read": lambda: wrong.read_bytes(f"{s3_root}/items/0.bin"),
        "wrong secret: list": lambda: wrong.list(f"{s3_root}/"),
        "wrong secret: ranges": lambda: wrong.read_ranges([f"{s3_root}/items/0.bin"]),
        "wrong secret: write": lambda: wrong.write_bytes(f"{s3_root}/w.bin", b"x"),
        "wrong secret: map": lambda: MapDataset.from_prefix(f"{s3_root}/items/", store=wrong),
        "wrong secret: ckpt": lambda: CheckpointStore(f"{s3_root}/run", store=wrong).load(),
        "read-only: write": lambda: reader.write_bytes(f"{s3_root}/ro.bin", b"x"),
        "read-only: ckpt save": lambda: CheckpointStore(f"{s3_root}/ro", store=reader).save({"a": 1}, step=1),
        "unreachable: read": lambda: nowhere.read_bytes(f"{s3_root}/items/0.bin"),
        "unreachable: list": lambda: nowhere.list(f"{s3_root}/"),
        "unreachable: userinfo": lambda: userinfo.read_bytes(f"{s3_root}/items/0.bin"),
        "corrupt shard": lambda: list(sp.webdataset(f"{s3_root}/bad/", store=s3_store)),
        "no checkpoint": lambda: CheckpointStore(f"{s3_root}/empty", store=s3_store).load(),
        "missing step": lambda: run.load(7),
    }
    # Credentials in the endpoint URL work (s3fs/botocore's path too) and never reach a log.
    host = options["endpoint_url"].split("://", 1)[1]
    in_url = Store({"endpoint_url": f"http://{s3_server.key}:{secret}@{host}"})
    in_url.write_bytes(f"{s3_root}/in-url.bin", b"x")
    with in_url.open(f"{s3_root}/in-url.bin") as file:
        assert file.read() == b"x"
    texts: dict[str, str] = {"repr(credentials-in-url store)": repr(in_url)}
    for name, exc in failures(calls):
        for n, text in enumerate(texts_of(exc)):
            texts[f"{name} [{n}]"] = text

    pipe = sp.webdataset(f"{s3_root}/", shuffle_seed=1, suffix=".tar", store=s3_store).map(len)
    it = iter(pipe)
    next(it)
    texts |= {
        "repr(store)": repr(s3_store) + str(s3_store),
        "repr(wrong store)": repr(wrong) + str(wrong),
        "repr(read-only store)": repr(reader),
        "repr(userinfo store)": repr(userinfo),
        "repr(pipe)": repr(pipe),
        "pipe.to_spec()": json.dumps(pipe.to_spec()),
        "pipe.to_yaml()": pipe.to_yaml(),
        "pipe.state_dict()": json.dumps(pipe.state_dict()),
        "iterator.state_dict()": json.dumps(it.state_dict()),  # type: ignore[attr-defined]
        "repr(map dataset)": repr(MapDataset.from_prefix(f"{s3_root}/items/", store=s3_store, manifest=False)),
        "repr(checkpoint store)": repr(run) + repr(CheckpointStore(f"{s3_root}/run", store=wrong)),
        "checkpoint describe": json.dumps(run.describe()) + json.dumps(run.markers()),
        "repr(server)": repr(s3_server),
    }
    texts["DEBUG logs"] = debug_logs.text
    assert len(debug_logs.text) > 1000, "DEBUG logging was captured"
    assert leaks(texts, secret, readonly_secret, WRONG_SECRET) == []


def cli(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "s3pipes", *argv], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.timeout(90)
def test_cli_output_never_shows_a_secret(s3_server: LocalS3Server, s3_store: Store, s3_root: str) -> None:
    write_shards(s3_root, shards=1, per_shard=3, store=s3_store)
    s3_store.write_bytes(f"{s3_root}/bad/shard-000.tar", b"not a tar archive at all " * 100)
    CheckpointStore(f"{s3_root}/run", store=s3_store).save({"step": 1}, step=1)
    base = {**os.environ, **s3_server.env()}
    wrong = {**base, "AWS_SECRET_ACCESS_KEY": WRONG_SECRET}
    readonly = {**base, "AWS_ACCESS_KEY_ID": s3_server.readonly_key, "AWS_SECRET_ACCESS_KEY": s3_server.readonly_secret}
    nowhere = {**base, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed_port()}"}
    runs = {
        "ls ok": (base, ["ls", f"{s3_root}/"], 0),
        "head ok": (base, ["head", f"{s3_root}/shard-000.tar", "-n", "1"], 0),
        "ckpt ls ok": (base, ["ckpt", "ls", f"{s3_root}/run"], 0),
        "ckpt show ok": (base, ["ckpt", "show", f"{s3_root}/run"], 0),
        "ls missing bucket": (base, ["ls", "s3://no-such-bucket-leaks/"], 1),
        "head missing key": (base, ["head", f"{s3_root}/missing.tar"], 1),
        "ckpt ls missing bucket": (base, ["ckpt", "ls", "s3://no-such-bucket-leaks/run"], 1),
        "ls wrong secret": (wrong, ["ls", f"{s3_root}/"], 1),
        "head wrong secret": (wrong, ["head", f"{s3_root}/shard-000.tar"], 1),
        "ckpt ls wrong secret": (wrong, ["ckpt", "ls", f"{s3_root}/run"], 1),
        "index read-only": (readonly, ["index", f"{s3_root}/"], 1),
        "ls unreachable": (nowhere, ["ls", f"{s3_root}/"], 1),
        "head corrupt shard": (base, ["head", f"{s3_root}/bad/shard-000.tar"], 1),
    }
    texts: dict[str, str] = {}
    statuses = {}
    for name, (env, argv, status) in runs.items():
        result = cli(env, *argv)
        texts[f"{name}: stdout"], texts[f"{name}: stderr"] = result.stdout, result.stderr
        if result.returncode != status:
            statuses[name] = (result.returncode, result.stderr[-500:])
    assert leaks(texts, s3_server.secret, s3_server.readonly_secret, WRONG_SECRET) == []
    assert statuses == {}, "unexpected exit statuses (the outputs were checked all the same)"
