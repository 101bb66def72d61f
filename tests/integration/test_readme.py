"""The README's quick start runs as written, against its own embedded server."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"


def quick_start() -> str:
    section = README.read_text().split("## Quick start", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "the Quick start section has no python block"
    return match.group(1)


def test_the_quick_start_is_ten_lines_and_streams_every_sample(tmp_path: Path) -> None:
    code = quick_start()
    assert len(code.strip().splitlines()) <= 10
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    first, *_, last = done.stdout.strip().splitlines()
    assert first == "Preview of 3 items" and last.split()[-1] == "300", done.stdout
