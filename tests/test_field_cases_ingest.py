"""Field cases about ingest, replayed through a real Track stream.

Each case's fixes are sent one batch per fix in arrival order. The server's clock is
now, so every fix time of a case moves by one offset: now minus the case's last
receive time (or last fix time where it gives none). Spacing is kept, and each fix
stays as far ahead of or behind the server clock as the case had it (within the few
minutes that the case's own receive times span).
"""

from __future__ import annotations

import math
from datetime import datetime

import pytest
from tracking.v1 import track_pb2

from tests.server_fixtures import fix, now_ms, track_session
from tracking_grpc.core.geodesy import path_length_m

INGEST_CASES = ["C12", "C14", "C15", "C17", "C23"]


def parse_ms(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


def number(value: object) -> float:
    return float(value) if value is not None else math.nan  # "NaN", "Infinity" too


def shifted_fixes(case: dict) -> list:
    received = [parse_ms(f.get("received_at", f["ts"])) for f in case["fixes"]]
    offset = now_ms() - max(received)
    fixes = []
    for f in case["fixes"]:
        extra = {}
        if f.get("accuracy_m") is not None:
            extra["accuracy_m"] = f["accuracy_m"]
        fixes.append(
            fix(
                f["seq"],
                number(f["lat"]),
                number(f["lon"]),
                parse_ms(f["ts"]) + offset,
                **extra,
            )
        )
    return fixes


async def replay_case(stub, case: dict) -> list[track_pb2.Ack]:
    fixes = shifted_fixes(case)
    _, acks = await track_session(stub, "dev-A", [[f] for f in fixes])
    return acks


def tolerance(case: dict) -> float:
    text = case["expected"].get("tolerance", "1 %")
    return float(text.split("%")[0]) / 100


@pytest.mark.parametrize("case_id", INGEST_CASES)
async def test_field_case_live_position_and_history(stub, server, field_cases, case_id):
    case = field_cases[case_id]
    expected = case["expected"]
    acks = await replay_case(stub, case)

    rejected = sorted(r.seq for a in acks for r in a.rejections)
    assert rejected == sorted(expected.get("rejected_seqs", []) + _rejected_alt(case))

    reply = await stub.GetLastPositions(
        track_pb2.GetLastPositionsRequest(device_ids=["dev-A"])
    )
    if "last_position_seq" in expected:
        assert reply.positions[0].seq == expected["last_position_seq"]

    history = await server.app.history.history("default", "dev-A", 0, 2**62)
    if "history_order_seq" in expected:
        assert history.seq.tolist() == expected["history_order_seq"]
    if "distance_m" in expected:
        assert path_length_m(history.lat, history.lon) == pytest.approx(
            expected["distance_m"], rel=tolerance(case)
        )


def _rejected_alt(case: dict) -> list[int]:
    """C15 allows rejecting seq 2 (1024 weeks old) or correcting it: we reject."""
    return [2] if case["id"] == "C15" else []


async def test_c23_resends_are_acked_as_duplicates(stub, server, field_cases) -> None:
    case = field_cases["C23"]
    acks = await replay_case(stub, case)
    duplicate_seqs = [
        f["seq"] for f, a in zip(case["fixes"], acks, strict=True) if a.duplicates
    ]
    stored = await server.app.history.count("default", "dev-A")
    bounds = case["expected"]["stored_fix_count"]
    assert bounds["min"] <= stored <= bounds["max"]
    assert set(case["expected"]["ignored_duplicate_seqs"]) <= set(duplicate_seqs)
    assert all(
        a.acked_seq == f["seq"] for f, a in zip(case["fixes"], acks, strict=True)
    )
