"""The repository passes its own lint and type checks (see `make lint`).

ruff and mypy run as the venv's programs, from the repository root, so that they read
their settings from pyproject.toml; buf lint is checked in test_generated.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MAX_COLUMNS = 88


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(["ruff", "check", "."], id="ruff-check"),
        pytest.param(["ruff", "format", "--check", "."], id="ruff-format"),
        # pyproject.toml's [tool.mypy] files: tracking_grpc and bench/
        pytest.param(["mypy"], id="mypy"),
    ],
)
def test_tool_reports_nothing(command: list[str]) -> None:
    program = BIN / command[0]
    assert program.exists(), f"{program} missing: run `make venv`"
    result = subprocess.run(
        [str(program), *command[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_python_line_is_wider_than_88_columns() -> None:
    """ruff's E501 lets lines ending in a pragma comment run long; this does not."""
    files = subprocess.run(
        ["git", "ls-files", "*.py", "*.pyi"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    wide = [
        f"{name}:{number}: {len(line)} columns"
        for name in files
        if not name.startswith("generated/") and (ROOT / name).exists()
        for number, line in enumerate((ROOT / name).read_text().splitlines(), 1)
        if len(line) > MAX_COLUMNS
    ]
    assert not wide, "\n".join(wide)
