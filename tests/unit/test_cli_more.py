"""``s3pipes head``, ``ckpt ls|show``, ``bench`` and every ``--help``, on file:// and memory:// through ``main()``."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

import s3pipes as sp
from s3pipes import Store
from s3pipes.checkpoint import CheckpointStore
from s3pipes.cli import main

REPO = Path(__file__).resolve().parents[2]
COMMANDS = [["ls"], ["head"], ["index"], ["convert"], ["verify"], ["serve"], ["ckpt"], ["ckpt", "ls"], ["ckpt", "show"]]


@pytest.fixture(params=["file", "memory"])
def root(request: pytest.FixtureRequest, tmp_path: Path, mem_root: str) -> str:
    return f"file://{tmp_path}" if request.param == "file" else mem_root


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def usage(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int | str | None, str, str]:
    """The exit code argparse leaves with (``--help``, usage errors), and the output."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(prefix: str, shards: int = 2, per_shard: int = 4) -> None:
    for shard in range(shards):
        buffer = io.BytesIO()
        with wds.TarWriter(buffer) as tar:
            for i in range(per_shard):
                tar.write({"__key__": f"s{shard}-{i}", "png": png(4, 3), "cls": str(i).encode()})
        Store().write_bytes(f"{prefix}/shard-{shard:04d}.tar", buffer.getvalue())


def table_keys(out: str) -> list[str]:
    """The key column of a Preview table printed by ``head``."""
    lines = out.splitlines()
    return [line.split()[1] for line in lines[2:]]


# -- head ----------------------------------------------------------------------------------------


def test_head_of_a_shard(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    write_shards(f"{root}/shards")
    code, out, err = run(capsys, "head", f"{root}/shards/shard-0001.tar", "-n", "3")
    assert (code, err) == (0, "")
    assert out.splitlines()[:2] == ["Preview of 3 items", "#  key   cls       png"]
    assert table_keys(out) == ["s1-0", "s1-1", "s1-2"]
    assert "1 B b'0'" in out and "B" in out.splitlines()[2].split()[-1]


def test_head_of_a_prefix_reads_across_shards_and_decodes(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    write_shards(f"{root}/shards")
    for url in (f"{root}/shards/", f"{root}/shards"):  # with or without the trailing slash
        code, out, err = run(capsys, "head", url, "-n", "6", "--decode")
        assert (code, err) == (0, "")
        assert out.startswith("Preview of 6 items\n")
        assert table_keys(out) == ["s0-0", "s0-1", "s0-2", "s0-3", "s1-0", "s1-1"]
        assert out.count("4x3 RGB") == 6  # the decoded PIL images, by size and mode
    code, out, _ = run(capsys, "head", f"{root}/shards/")
    assert code == 0 and len(table_keys(out)) == 5  # -n defaults to 5


def test_head_of_a_missing_prefix_or_shard_is_one_line(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    for url in (f"{root}/nothing/", f"{root}/nothing/shard-0.tar"):
        code, out, err = run(capsys, "head", url)
        assert (code, out) == (1, "")
        assert err.startswith("s3pipes head: error: ") and err.count("\n") == 1 and "nothing" in err


def test_head_runs_a_pipeline_spec(root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_shards(f"{root}/shards")
    pipe = sp.webdataset(f"{root}/shards/", shuffle_seed=3, store=Store()).decode()
    spec = tmp_path / "pipeline.yaml"
    spec.write_text(pipe.to_yaml())
    code, out, err = run(capsys, "head", "--spec", str(spec), "-n", "4")
    assert (code, err) == (0, "")
    assert table_keys(out) == [sample["__key__"] for sample in pipe.peek(4)]  # the spec's order: shard seed 3
    assert out.count("4x3 RGB") == 4  # its decode stage ran


def test_head_takes_a_url_or_a_spec_not_both_nor_neither(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert usage(capsys, "head")[0] == 2
    assert usage(capsys, "head", f"{root}/shards/", "--spec", "p.yaml")[0] == 2


# -- ckpt ----------------------------------------------------------------------------------------


@pytest.fixture
def run_url(root: str) -> str:
    ckpt = CheckpointStore(f"{root}/run", store=Store())
    model = {"w": torch.zeros(2, 3), "b": torch.ones(3)}
    ckpt.save({"model": model, "optim": {"state": {}, "param_groups": [{"lr": 0.1}]}, "epoch": 3}, step=10)
    ckpt.save({"model": model, "epoch": 4}, step=20)
    ckpt.save_sharded({"w": torch.ones(2)}, step=30)
    ckpt.store.write_bytes(ckpt.step_url(40) + "/state.pt", b"half a payload")  # a killed save
    return ckpt.url


def test_ckpt_ls(run_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "ckpt", "ls", run_url)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["step", "kind", "size", "created", "(UTC)"]
    assert [line.split()[:2] for line in lines[1:4]] == [["10", "torch.save"], ["20", "torch.save"], ["30", "dcp"]]
    assert [line.endswith("latest") for line in lines[1:4]] == [False, False, True]
    assert lines[1].split()[4].endswith("Z") and lines[1].split()[3] == "kB"  # ISO time in UTC; size with a unit
    assert lines[4].startswith("uncommitted step 40: 1 file, 14 B")


def test_ckpt_ls_marks_the_pointer_not_the_highest_step(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = CheckpointStore(f"{root}/run", store=Store())
    ckpt.save({"epoch": 2}, step=2)
    ckpt.save({"epoch": 1}, step=1)  # latest.json now points at step 1
    _, out, _ = run(capsys, "ckpt", "ls", ckpt.url)
    assert [line.endswith("latest") for line in out.splitlines()[1:]] == [True, False]


def test_ckpt_show_a_torch_save_step(run_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "ckpt", "show", run_url, "--step", "10")
    assert (code, err) == (0, "")
    assert out.startswith(f"step 10 of {run_url}: torch.save, ")
    assert '"sha256": ' in out and '"step": 10' in out  # the marker, as JSON
    state = out[out.index("state (") :].splitlines()
    assert state[0] == "state (3 keys, loaded with weights_only=True):"
    assert [line.split()[0] for line in state[1:]] == ["model", "optim", "epoch"]
    assert "dict of 2 entries: 2 tensors, 9 values" in state[1] and state[3].split() == ["epoch", "3"]


def test_ckpt_show_defaults_to_the_latest_and_lists_dcp_files(run_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "ckpt", "show", run_url)
    assert (code, err) == (0, "")
    assert out.startswith(f"step 30 of {run_url}: dcp, ") and '"kind": "dcp"' in out
    files = out[out.index("files (") :].splitlines()
    assert files[0] == "files (2):" and [line.split()[0] for line in files[1:]] == ["dcp/.metadata", "dcp/__0_0.distcp"]


def test_ckpt_failures_are_one_line(run_url: str, root: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "ckpt", "show", run_url, "--step", "11")
    assert (code, out) == (1, "")
    assert err.startswith("s3pipes ckpt: error: ") and err.count("\n") == 1
    assert "step 11 has no committed checkpoint" in err and "Committed steps: 10, 20, 30" in err
    for argv in (["ckpt", "ls", f"{root}/no-run"], ["ckpt", "show", f"{root}/no-run"]):
        code, out, err = run(capsys, *argv)
        assert (code, out) == (1, "")
        assert err.startswith("s3pipes ckpt: error: ") and err.count("\n") == 1 and "no committed checkpoint" in err


# -- usage, help, bench --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["head"],
        ["head", "memory://x/", "-n", "0"],
        ["head", "memory://x/", "--decode", "jpeg"],
        ["ckpt"],
        ["ckpt", "rm", "memory://x/run"],
        ["ckpt", "show", "memory://x/run", "--step", "-1"],
        ["ckpt", "show", "memory://x/run", "--step", "latest"],
        ["bench"],
        ["bench", "nonsense"],
        ["ls", "memory://x/", "--", "extra"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = usage(capsys, *argv)
    assert (code, out) == (2, "")
    assert "usage: s3pipes" in err and "error: " in err.splitlines()[-1]


@pytest.mark.parametrize("command", [[], *COMMANDS, ["bench"]], ids=lambda c: " ".join(c) or "s3pipes")
def test_every_help_has_examples(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = usage(capsys, *command, "--help")
    assert code == 0
    examples = out[out.index("Examples:\n") :].splitlines()[1:]
    assert examples and examples[0].startswith(f"  s3pipes {command[0] if command else ''}".rstrip())


def test_bench_outside_a_clone_is_one_line(tmp_path: Path) -> None:
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-m", "s3pipes.cli", "bench", "streaming", "--quick"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.startswith("s3pipes bench: error: benchmarks.streaming cannot be imported")
    assert "clone" in done.stderr and done.stderr.count("\n") == 1


def test_bench_passes_quick_and_the_arguments_after_dashes(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(REPO)
    # --help after "--" reaches the benchmark's own parser: it prints its usage and runs nothing
    assert main(["bench", "checkpoint", "--quick", "--", "--help"]) == 0
    out, _ = capfd.readouterr()
    assert "--mib MIB" in out and "--quick" in out
    assert main(["bench", "checkpoint", "--", "--no-such-option"]) == 2  # the benchmark's exit code
    _, err = capfd.readouterr()
    assert "unrecognized arguments: --no-such-option" in err


def test_a_missing_env_file_is_one_line_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """dotenv reads a missing file as empty: the error was 'no credentials found', about AWS."""
    assert main(["--env-file", str(tmp_path / "creds.env"), "ls", "s3://bucket/"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"env_file '{tmp_path / 'creds.env'}': no such file" in err
