"""The configuration reference in the docs is the one generated from Settings."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT
from tracking_grpc.config import Settings

SCRIPT = ROOT / "scripts" / "config_reference.py"
BEGIN, END = "<!-- config:begin -->", "<!-- config:end -->"
DOCS = [ROOT / "README.md", ROOT / "docs" / "configuration.md"]


def reference(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(SCRIPT), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_the_docs_table_is_up_to_date():
    documents = [d for d in DOCS if d.exists() and BEGIN in d.read_text()]
    assert documents, f"no document has the {BEGIN} marker"
    for document in documents:
        done = reference("--check", str(document))
        assert done.returncode == 0, done.stderr


def test_every_setting_is_listed_with_its_variable():
    table = reference().stdout
    for name in Settings.names():
        assert f"| `{name}` | `TRACKING_{name.upper()}` |" in table


def test_a_stale_table_is_caught(tmp_path):
    stale = tmp_path / "stale.md"
    table = reference().stdout.replace("| `log_level` |", "| `log_lvl` |")
    stale.write_text(f"# x\n{BEGIN}\n{table}{END}\n")
    assert reference("--check", str(stale)).returncode == 1
    assert reference("--write", str(stale)).returncode == 0
    assert reference("--check", str(stale)).returncode == 0
