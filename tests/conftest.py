"""Shared fixtures: paths to the real data, and the rule for missing services.

Tests that need PostgreSQL or Redis skip with a clear message when the service is not
reachable, except when TRACKING_REQUIRE_SERVICES is set (as .ci/run does): then a
missing service fails the test instead, so CI can never pass by skipping them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("TRACKING_SHARED_DIR", ROOT.parent / "shared"))
TRACES = SHARED / "data" / "traces"
NETWORK = SHARED / "data" / "network"
FIELD_CASES = SHARED / "cases" / "field_cases.json"


def require_service(name: str, reason: str) -> None:
    """Skip (or, under TRACKING_REQUIRE_SERVICES, fail) for a missing service."""
    message = f"{name} unavailable: {reason}"
    if os.environ.get("TRACKING_REQUIRE_SERVICES"):
        pytest.fail(message)
    pytest.skip(message)


def require_shared(path: Path) -> Path:
    """The shared data file, or a skip when it is absent on this machine."""
    if not path.exists():
        if os.environ.get("TRACKING_REQUIRE_SERVICES"):
            pytest.fail(f"shared data missing: {path}")
        pytest.skip(f"shared data missing: {path} (set TRACKING_SHARED_DIR)")
    return path


@pytest.fixture(scope="session")
def field_cases() -> dict[str, dict]:
    import json

    data = json.loads(require_shared(FIELD_CASES).read_text())
    return {case["id"]: case for case in data["cases"]}


pytest_plugins = ["tests.server_fixtures", "tests.backends"]
