"""Routes, tables and map matching on the Helsinki extract, checked independently."""

from __future__ import annotations

import numpy as np
import polyline
import pytest
from pyproj import Geod

from tests.routes import support
from tracking_grpc.errors import FailedPrecondition, InvalidArgument
from tracking_grpc.routing.engine import Router

GEOD = Geod(ellps="WGS84")
# Places on the main road network of central Helsinki (lat, lon).
RAUTATIENTORI = (60.1702, 24.9401)
SENAATINTORI = (60.1750, 24.9502)
KAMPPI = (60.1690, 24.9330)
ESPLANADI = (60.1675, 24.9460)
KRUUNUNHAKA = (60.1735, 24.9545)


def polyline_length_m(encoded: str) -> float:
    lat, lon = np.array(polyline.decode(encoded, 6)).T
    return float(GEOD.line_length(lon, lat))


@pytest.mark.parametrize(
    ("a", "b"),
    [
        pytest.param(RAUTATIENTORI, SENAATINTORI, id="station-senate"),
        pytest.param(KAMPPI, KRUUNUNHAKA, id="kamppi-kruununhaka"),
        pytest.param(ESPLANADI, RAUTATIENTORI, id="esplanadi-station"),
    ],
)
def test_route_distance_is_the_length_of_its_geometry(car, a, b) -> None:
    route = car.route(np.array([a[0], b[0]]), np.array([a[1], b[1]]))
    assert route.distance_m > 300
    assert polyline_length_m(route.encoded_polyline) == pytest.approx(
        route.distance_m, rel=0.005
    )
    assert sum(leg.distance_m for leg in route.legs) == pytest.approx(route.distance_m)


def test_matrix_agrees_with_single_routes(car) -> None:
    lat, lon = np.array([RAUTATIENTORI, SENAATINTORI, KAMPPI, ESPLANADI]).T
    matrix = car.table(lat, lon)
    for i, j in [(0, 1), (1, 0), (2, 3), (3, 2), (0, 3), (2, 1)]:
        route = car.route(lat[[i, j]], lon[[i, j]], steps=False)
        assert matrix.distance_m[i, j] == pytest.approx(route.distance_m, rel=0.01)
        assert matrix.duration_s[i, j] == pytest.approx(route.duration_s, rel=0.01)
    assert np.all(np.diag(matrix.duration_s) == 0)


def test_waypoints_split_the_route_into_legs(car) -> None:
    lat, lon = np.array([RAUTATIENTORI, ESPLANADI, SENAATINTORI]).T
    route = car.route(lat, lon)
    assert len(route.legs) == 2
    assert [s.maneuver for s in route.legs[0].steps][
        :: len(route.legs[0].steps) - 1
    ] == [
        "depart",
        "arrive",
    ]


def test_swapped_latitude_and_longitude_are_invalid(car, field_cases) -> None:
    query = field_cases["C17"]["queries"][0]
    lat = np.array([w["lat"] for w in query["waypoints"]])
    lon = np.array([w["lon"] for w in query["waypoints"]])
    with pytest.raises(InvalidArgument, match=r"121\.5") as caught:
        car.route(lat, lon)
    assert caught.value.field == "waypoints[0]"


def test_point_far_from_any_road_is_invalid_saying_how_far(car) -> None:
    with pytest.raises(InvalidArgument, match=r"\d+ m from the nearest road") as caught:
        car.route(np.array([60.1702, 60.175]), np.array([24.9401, 25.5]))
    assert caught.value.field == "waypoints[1]"
    assert "30" in caught.value.reason.split(" m ")[0]


def test_point_off_the_road_is_snapped(car) -> None:
    route = car.route(np.array([60.1712, 60.1750]), np.array([24.9445, 24.9502]))
    assert 10 < route.snaps[0].distance_m < 40
    assert (route.lat[0], route.lon[0]) == (route.snaps[0].lat, route.snaps[0].lon)


def test_without_dataset_routing_says_how_to_prepare_one() -> None:
    with pytest.raises(FailedPrecondition, match="tracking prepare-routing"):
        Router.load("").engine("car")


@pytest.mark.parametrize(
    "noise_m", [pytest.param(5.0, id="5m"), pytest.param(12.0, id="12m")]
)
def test_matching_a_noisy_drive_recovers_its_route(car, noise_m) -> None:
    lat, lon = np.array([KAMPPI, KRUUNUNHAKA]).T
    route = car.route(lat, lon, steps=False)
    points, _ = support.drive(route.lat, route.lon, 10.0)
    noisy = support.jitter(points, noise_m, seed=7)
    time_s = np.arange(len(noisy)) * 5
    match = car.match(noisy[:, 0], noisy[:, 1], time_s, np.full(len(noisy), 30.0))
    assert match.matched.mean() > 0.7 and len(match.matchings) == 1
    matched = match.matchings[0]
    assert matched.confidence > 0.5
    assert matched.distance_m == pytest.approx(route.distance_m, rel=0.05)
    assert (
        support.share_near(matched.lat, matched.lon, route.lat, route.lon, 10.0) > 0.95
    )


def test_a_track_far_from_any_road_matches_nothing(car) -> None:
    lat, lon = np.array([44.0, 44.001, 44.002]), np.array([-93.0, -93.0, -93.0])
    match = car.match(lat, lon, np.array([0, 10, 20]), np.full(3, 30.0))
    assert not match.matched.any() and match.matchings == []
    assert np.isnan(match.lat).all()
