"""``s3pipes head`` and ``ckpt ls`` against SeaweedFS, configured like a user would: ``AWS_*`` variables."""

from __future__ import annotations

import io

import pytest
import torch
import webdataset as wds

from s3pipes import Store
from s3pipes.checkpoint import CheckpointStore
from s3pipes.cli import main
from s3pipes.server import LocalS3Server

pytestmark = pytest.mark.integration


def test_head_and_ckpt_ls_on_s3(
    s3_server: LocalS3Server,
    s3_store: Store,
    s3_root: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for shard in range(2):
        buffer = io.BytesIO()
        with wds.TarWriter(buffer) as tar:
            for i in range(3):
                tar.write({"__key__": f"s{shard}-{i}", "cls": str(i).encode(), "txt": b"a cat"})
        s3_store.write_bytes(f"{s3_root}/shards/shard-{shard}.tar", buffer.getvalue())
    ckpt = CheckpointStore(f"{s3_root}/run", store=s3_store)
    for step in (1, 2):
        ckpt.save({"w": torch.full((4,), float(step))}, step=step)
    env = s3_server.env()
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, env[name])

    assert main(["head", f"{s3_root}/shards/", "-n", "4", "--decode"]) == 0
    head_out, head_err = capsys.readouterr()
    assert main(["ckpt", "ls", f"{s3_root}/run"]) == 0
    ls_out, ls_err = capsys.readouterr()
    assert main(["ckpt", "show", f"{s3_root}/run", "--step", "7"]) == 1
    fail_out, fail_err = capsys.readouterr()

    assert (head_err, ls_err, fail_out) == ("", "", "")
    assert head_out.splitlines()[0] == "Preview of 4 items"
    assert [line.split()[1] for line in head_out.splitlines()[2:]] == ["s0-0", "s0-1", "s0-2", "s1-0"]
    assert "'a cat'" in head_out  # decoded text
    lines = ls_out.splitlines()
    assert [line.split()[:2] for line in lines[1:]] == [["1", "torch.save"], ["2", "torch.save"]]
    assert lines[2].endswith("latest") and not lines[1].endswith("latest")
    assert (
        fail_err.startswith("s3pipes ckpt: error: ")
        and fail_err.count("\n") == 1
        and "Committed steps: 1, 2" in fail_err
    )
    secret = env["AWS_SECRET_ACCESS_KEY"]
    assert all(secret not in text for text in (head_out, ls_out, fail_err))
