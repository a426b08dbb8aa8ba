"""generated/ must match what protos/ generates now."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "generate_protos.py"),
            "--out",
            tmp_path,
        ],
        check=True,
        capture_output=True,
    )
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(
        p.relative_to(ROOT / "generated")
        for p in (ROOT / "generated").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    assert fresh == committed, "generated/ is stale: run `make generate`"
    stale = [p for p in fresh if not filecmp.cmp(tmp_path / p, ROOT / "generated" / p)]
    assert not stale, f"generated/ is stale ({stale}): run `make generate`"


def test_buf_lint_passes() -> None:
    buf = Path(sys.executable).parent / "buf"
    result = subprocess.run([buf, "lint"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
