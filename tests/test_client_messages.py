"""Client-side conversions: trace rows to Fix messages, positions to output lines."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from tracking.v1 import common_pb2

from tracking_grpc.client.messages import position_json, position_line, trace_fixes
from tracking_grpc.client.watch import parse_box, parse_circle
from tracking_grpc.traces import build_trace


def test_trace_fixes_set_only_present_optional_fields():
    trace = build_trace(
        np.array(["a", "a"], dtype=object),
        np.array([2_000, 1_000]),
        [1.0, 2.0],
        [3.0, 4.0],
        speed_mps=np.array([np.nan, 5.0]),
    )
    first, second = trace_fixes(trace, np.array([11, 12]))
    assert (first.seq, first.time_ms, first.lat, first.speed_mps) == (1, 11, 2.0, 5.0)
    assert not second.HasField("speed_mps") and not second.HasField("accuracy_m")


def test_position_line_and_json():
    position = common_pb2.Position(
        device_id="bus-7", seq=3, time_ms=1_769_443_022_500, lat=53.4, lon=-2.9,
        speed_mps=10.0,
    )  # fmt: skip
    assert position_line(position).startswith("2026-01-26T15:57:02.500Z  bus-7")
    assert "36.0 km/h" in position_line(position)
    record = json.loads(position_json(position, snapshot=True))
    assert record["speed_mps"] == 10.0 and record["snapshot"] is True
    assert "accuracy_m" not in record


def test_area_flags():
    assert parse_box("40.5,-74.3,40.9,-73.7").box.west == -74.3
    assert parse_circle("60.17,24.94,500").circle.radius_m == 500.0


@pytest.mark.parametrize(
    "text", ["1,2,3", "a,b,c,d", ""], ids=["three", "words", "empty"]
)
def test_bad_box_is_a_usage_error(text):
    with pytest.raises(argparse.ArgumentTypeError, match="S,W,N,E"):
        parse_box(text)
