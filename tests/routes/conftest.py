"""Routing datasets prepared once per test session, and servers that load them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from tracking.v1 import route_pb2_grpc, track_pb2_grpc

from tests.conftest import NETWORK, require_shared
from tests.server_fixtures import StartServer
from tracking_grpc.routing import datasets
from tracking_grpc.routing.engine import Router, RoutingEngine
from tracking_grpc.server import TrackingServer

# The extracts are city centres whose main road network is itself small for OSRM.
SMALL_COMPONENT_SIZE = 50


def _prepare(root: Path, pbf_name: str, profiles: tuple[str, ...]) -> Path:
    pbf = require_shared(NETWORK / pbf_name)
    data_dir = root / pbf_name.split(".")[0]
    datasets.prepare(pbf, data_dir, profiles, small_component_size=SMALL_COMPONENT_SIZE)
    return data_dir


@pytest.fixture(scope="session")
def helsinki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _prepare(
        tmp_path_factory.mktemp("routing"), "helsinki.osm.pbf", datasets.PROFILES
    )


@pytest.fixture(scope="session")
def porto_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _prepare(
        tmp_path_factory.mktemp("routing"), "porto_centre.osm.pbf", ("car",)
    )


@pytest.fixture(scope="session")
def helsinki(helsinki_dir: Path) -> Router:
    return Router.load(str(helsinki_dir))


@pytest.fixture(scope="session")
def car(helsinki: Router) -> RoutingEngine:
    return helsinki.engine("car")


@pytest.fixture
async def route_server(start_server: StartServer, helsinki_dir: Path) -> TrackingServer:
    return await start_server(routing_data_dir=str(helsinki_dir))


@pytest.fixture
async def route_channel(
    route_server: TrackingServer,
) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{route_server.port}") as channel:
        yield channel


@pytest.fixture
def routes(route_channel: grpc.aio.Channel) -> route_pb2_grpc.RouteStub:
    return route_pb2_grpc.RouteStub(route_channel)


@pytest.fixture
def tracks(route_channel: grpc.aio.Channel) -> track_pb2_grpc.TrackSessionStub:
    return track_pb2_grpc.TrackSessionStub(route_channel)
