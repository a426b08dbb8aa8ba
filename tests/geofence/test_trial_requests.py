"""Geofence requests a new user's trial sent, against a real server on port 0: each
answer names the field and the reason."""

from __future__ import annotations

import json

import grpc
import pytest
from tracking.v1 import geofence_pb2, geofence_pb2_grpc

from tests.server_fixtures import now_ms, violation

WHOLE_WORLD = "POLYGON((-180 -90, 180 -90, 180 90, -180 90, -180 -90))"


@pytest.fixture
def fences(channel) -> geofence_pb2_grpc.GeofenceStub:
    return geofence_pb2_grpc.GeofenceStub(channel)


def wkt_fence(fence_id: str, wkt: str, **extra) -> geofence_pb2.Fence:
    shape = geofence_pb2.FenceShape(wkt=wkt)
    return geofence_pb2.Fence(fence_id=fence_id, shape=shape, **extra)


async def refused(call) -> tuple[str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return violation(caught.value)


async def test_a_whole_world_fence_says_why(fences) -> None:
    """Its ±180 edges are one meridian: the answer says so, not "0.06 m²"."""
    request = geofence_pb2.CreateFenceRequest(fence=wkt_fence("world", WHOLE_WORLD))
    field, reason = await refused(fences.CreateFence(request))
    assert field == "fence.shape.wkt[0]"
    assert "spans all 360° of longitude" in reason
    assert "cannot cover the whole world or both poles" in reason


SQUARE_WKT = "POLYGON((2 48, 3 48, 3 49, 2 49, 2 48))"


@pytest.mark.parametrize(
    ("metadata", "words"),
    [
        pytest.param(
            {"note": "x" * 1_000_000},
            "the value of key 'note' has 1000000 characters; at most 1024",
            id="value-of-a-megabyte",
        ),
        pytest.param(
            {"k" * 65: "v"},
            f"key {'k' * 64!r}… (65 characters): a key is 1 to 64 printable",
            id="key-too-long",
        ),
        pytest.param({"": "v"}, "key '' (0 characters)", id="empty-key"),
        pytest.param({"a\x00b": "v"}, "printable characters", id="key-with-nul"),
    ],
)
async def test_fence_metadata_is_bounded(fences, metadata, words) -> None:
    fence = wkt_fence("meta", SQUARE_WKT, metadata=metadata)
    request = geofence_pb2.CreateFenceRequest(fence=fence)
    field, reason = await refused(fences.CreateFence(request))
    assert field == "fence.metadata"
    assert words in reason


async def test_fence_metadata_at_the_limits_is_stored(fences) -> None:
    metadata = {"k" * 64: "v" * 1024, "note": "ünïcödé " * 128}
    fence = wkt_fence("meta", SQUARE_WKT, metadata=metadata)
    await fences.CreateFence(geofence_pb2.CreateFenceRequest(fence=fence))
    got = await fences.GetFence(geofence_pb2.GetFenceRequest(fence_id="meta"))
    assert dict(got.fence.metadata) == metadata


async def test_imported_fence_metadata_has_the_same_bounds(fences) -> None:
    feature = {
        "type": "Feature",
        "id": "imported",
        "geometry": {"type": "Point", "coordinates": [2.5, 48.5]},
        "properties": {"radius_m": 100, "metadata": {"note": "x" * 1025}},
    }
    collection = {"type": "FeatureCollection", "features": [feature]}
    request = geofence_pb2.ImportFencesRequest(geojson=json.dumps(collection))
    field, reason = await refused(fences.ImportFences(request))
    assert field.endswith(".metadata")
    assert field.startswith("features[0]")
    assert "the value of key 'note' has 1025 characters; at most 1024" in reason


NAME_RULE = "a name is at most 256 printable characters"
VALUE_RULE = "a value is at most 1024 printable characters"


def feature_collection(**properties) -> str:
    feature = {
        "type": "Feature",
        "id": "imported",
        "geometry": {"type": "Point", "coordinates": [2.5, 48.5]},
        "properties": {"radius_m": 100, **properties},
    }
    return json.dumps({"type": "FeatureCollection", "features": [feature]})


# Fence settings refused alike on Create, Update and Import, as (settings,
# field on Create and Update, field in a GeoJSON Feature, words of the reason).
NAME_AND_VALUE_CASES = [
    pytest.param(
        {"name": "n" * 257},
        "fence.name",
        "features[0].properties.name",
        f"has 257 characters; {NAME_RULE}",
        id="name-of-257",
    ),
    pytest.param(
        {"name": "Dock\n4"},
        "fence.name",
        "features[0].properties.name",
        f"has U+000A, which is not printable, at character 4; {NAME_RULE}",
        id="name-with-newline",
    ),
    pytest.param(
        {"name": "a\x00b"},
        "fence.name",
        "features[0].properties.name",
        f"has U+0000, which is not printable, at character 1; {NAME_RULE}",
        id="name-with-nul",
    ),
    pytest.param(
        {"metadata": {"note": "gate\tcode"}},
        "fence.metadata",
        "features[0].properties.metadata",
        "the value of key 'note' has U+0009, which is not printable, at character "
        f"4; {VALUE_RULE}",
        id="value-with-tab",
    ),
    pytest.param(
        {"metadata": {"a": "ok", "z": "\x1b[31m"}},
        "fence.metadata",
        "features[0].properties.metadata",
        "the value of key 'z' has U+001B, which is not printable, at character 0; "
        f"{VALUE_RULE}",
        id="value-with-escape",
    ),
]


@pytest.mark.parametrize(("settings", "field", "_", "words"), NAME_AND_VALUE_CASES)
async def test_create_refuses_a_long_or_unprintable_name_or_value(
    fences, settings, field, _, words
) -> None:
    request = geofence_pb2.CreateFenceRequest(
        fence=wkt_fence("named", SQUARE_WKT, **settings)
    )
    assert await refused(fences.CreateFence(request)) == (field, words)


@pytest.mark.parametrize(("settings", "field", "_", "words"), NAME_AND_VALUE_CASES)
async def test_update_refuses_a_long_or_unprintable_name_or_value(
    fences, settings, field, _, words
) -> None:
    fence = wkt_fence("named", SQUARE_WKT, name="Depot")
    await fences.CreateFence(geofence_pb2.CreateFenceRequest(fence=fence))
    request = geofence_pb2.UpdateFenceRequest(
        fence=wkt_fence("named", SQUARE_WKT, **settings)
    )
    assert await refused(fences.UpdateFence(request)) == (field, words)
    got = await fences.GetFence(geofence_pb2.GetFenceRequest(fence_id="named"))
    assert got.fence.name == "Depot" and not got.fence.metadata


@pytest.mark.parametrize(("settings", "_", "field", "words"), NAME_AND_VALUE_CASES)
async def test_import_refuses_a_long_or_unprintable_name_or_value(
    fences, settings, _, field, words
) -> None:
    request = geofence_pb2.ImportFencesRequest(geojson=feature_collection(**settings))
    assert await refused(fences.ImportFences(request)) == (field, words)


async def test_a_name_and_values_at_the_limits_are_stored(fences) -> None:
    """256 printable characters, spaces and letters beyond ASCII among them."""
    name = "Åsa's dock " * 23 + "ö" * 3
    metadata = {"gate": "4 · ünïcödé ✓"}
    fence = wkt_fence("named", SQUARE_WKT, name=name, metadata=metadata)
    await fences.CreateFence(geofence_pb2.CreateFenceRequest(fence=fence))
    got = await fences.GetFence(geofence_pb2.GetFenceRequest(fence_id="named"))
    assert (got.fence.name, dict(got.fence.metadata)) == (name, metadata)
    request = geofence_pb2.ImportFencesRequest(
        geojson=feature_collection(name=name, metadata=metadata)
    )
    await fences.ImportFences(request)
    got = await fences.GetFence(geofence_pb2.GetFenceRequest(fence_id="imported"))
    assert (got.fence.name, dict(got.fence.metadata)) == (name, metadata)


HOUR_MS = 3_600_000


@pytest.mark.parametrize(
    ("start_ms", "end_ms", "field", "words"),
    [
        pytest.param(
            now_ms() + HOUR_MS,
            0,
            "start_ms",
            "must not lie after now when end_ms is 0 (0 means now)",
            id="start-after-now-end-0",
        ),
        pytest.param(5_000, 3_000, "end_ms", "must be after start_ms", id="inverted"),
        pytest.param(5_000, 5_000, "end_ms", "must be after start_ms", id="empty"),
    ],
)
async def test_list_events_refuses_a_range_that_ends_before_it_starts(
    fences, start_ms, end_ms, field, words
) -> None:
    """As ListStops and GetTrack do; end_ms 0 means now (documented)."""
    request = geofence_pb2.ListEventsRequest(start_ms=start_ms, end_ms=end_ms)
    assert await refused(fences.ListEvents(request)) == (field, words)


async def test_list_events_up_to_now_from_a_moment_ago_is_empty(fences) -> None:
    request = geofence_pb2.ListEventsRequest(start_ms=now_ms() - 1, end_ms=0)
    assert list((await fences.ListEvents(request)).events) == []
