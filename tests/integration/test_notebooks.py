"""Issue 7 item 1: every notebook in ``notebooks/`` runs top to bottom from a clean kernel.

Each notebook starts its own embedded SeaweedFS and asserts what it shows, so a wrong
result fails its cell, and a failing cell fails the test with that cell's source and
error. A notebook must leave no ``weed`` behind, even when it fails: the kernel runs
with a marker in its environment, which every ``weed`` it starts inherits, and after
the kernel is shut down no process carrying the marker may be left. (A before/after
``pgrep -x weed`` would also count the servers of other test sessions on the machine.)
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from pathlib import Path

import nbclient
import nbformat
import pytest

pytestmark = pytest.mark.integration

NOTEBOOKS = sorted((Path(__file__).parents[2] / "notebooks").glob("*.ipynb"))
MARKER = "S3PIPES_NOTEBOOK_RUN"
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # IPython colours its tracebacks


def weed_processes(marker: str) -> list[int]:
    """PIDs of live ``weed`` processes whose environment has ``MARKER=marker``."""
    needle = f"{MARKER}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "weed":
                continue
            state = (entry / "stat").read_text().rsplit(") ", 1)[1].split()[0]
            if state != "Z" and needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


def failing_cell(nb: nbformat.NotebookNode) -> str:
    """The source and error of the first code cell with an error output."""
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                trace = ANSI.sub("", "\n".join(output.get("traceback", [])))
                return f"cell {index}:\n{cell.source}\n\n{output['ename']}: {output['evalue']}\n{trace}"
    return "(no cell recorded an error)"


def test_there_are_four_notebooks() -> None:
    assert [path.stem for path in NOTEBOOKS] == [
        "01_quickstart",
        "02_map_style",
        "03_checkpoint_resume",
        "04_convert",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs_from_a_clean_kernel(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = uuid.uuid4().hex
    monkeypatch.setenv(MARKER, marker)  # the kernel inherits it, and every weed the kernel starts
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError:
        pytest.fail(f"{path.name} failed in {failing_cell(nb)}", pytrace=False)
    finally:
        deadline = time.monotonic() + 10  # the kernel is gone: PR_SET_PDEATHSIG kills its weed
        while (left := weed_processes(marker)) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in left:
            os.kill(pid, signal.SIGKILL)  # ours (it carries our marker): do not leak it into the session
    assert not left, f"{path.name} left weed running: {left}"
