"""An erasure does not hold the event processors paused while a checkpoint round
is under way (seconds on a large fleet: meanwhile no processor run, and at last
every stream paused): it drops the device's activity between two runs and erases
its checkpoint once the round is over, which does not write it back. The round is
held by the test taking the activity processor's lock for it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from tracking.v1 import history_pb2, history_pb2_grpc, track_pb2_grpc

from tests.backends import unique_tenant
from tests.server_fixtures import HANG_GUARD_S, bearer, embedded_settings, fix, until
from tests.server_fixtures import track_session as send
from tracking_grpc.activity import processor as activity_processor
from tracking_grpc.storage.base import Checkpoints

SECRET = "erasure-checkpoint-round-secret-of-enough-length"


class SlowCheckpoints:
    """The server's history store, whose checkpoint writes wait until the test
    lets them go (a slow store); the devices of each write, in order."""

    def __init__(self, store) -> None:
        self._store = store
        self.go = asyncio.Event()
        self.entered = asyncio.Event()
        self.written: list[list[str]] = []

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    async def save_checkpoints(self, piece: Checkpoints) -> None:
        self.written.append(list(piece.devices))
        self.entered.set()
        await self.go.wait()
        await self._store.save_checkpoints(piece)


async def test_an_erasure_during_a_checkpoint_round_leaves_the_processors_running(
    start_server, tmp_path: Path
) -> None:
    settings = embedded_settings(
        tmp_path,
        auth_mode="jwt",
        jwt_hs256_secret=SECRET,
        activity_checkpoint_s=600,  # saved when the test says
    )
    server = await start_server(settings=settings)
    activity = server.app.activity
    tenant = unique_tenant()
    admin = bearer(SECRET, tenant, "admin")

    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        track = track_pb2_grpc.TrackSessionStub(channel)
        history = history_pb2_grpc.HistoryStub(channel)
        trace = [fix(seq, 60.17 + seq * 0.0001, 24.94, accuracy_m=5) for seq in (1, 2)]
        await send(track, "van", [trace], admin)
        await until(lambda: activity.state(tenant, "van") is not None)
        assert await activity.save_checkpoints() >= 1

        async with activity._saving:  # a checkpoint round under way
            erasing = asyncio.ensure_future(
                history.EraseDevice(
                    history_pb2.EraseDeviceRequest(device_id="van"), metadata=admin
                )
            )
            await until(lambda: activity.state(tenant, "van") is None)
            # The processors run while the round goes on.
            await send(track, "car", [[fix(1, 60.2, 24.9, accuracy_m=5)]], admin)
            await until(lambda: activity.state(tenant, "car") is not None)
            assert not erasing.done()  # its checkpoint waits for the round
        erased = await erasing

    assert erased.activity_erased
    stored = await server.app.history.load_checkpoints(tenant, ["van"])
    assert stored.devices == []


async def test_a_checkpoint_round_under_way_does_not_write_an_erased_device_back(
    start_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round of one device per write has written the car's and not yet the
    van's when the van is erased: it skips the van."""
    monkeypatch.setattr(activity_processor, "SAVE_PIECE_DEVICES", 1)
    settings = embedded_settings(
        tmp_path, auth_mode="jwt", jwt_hs256_secret=SECRET, activity_checkpoint_s=600
    )
    server = await start_server(settings=settings)
    activity = server.app.activity
    tenant = unique_tenant()
    admin = bearer(SECRET, tenant, "admin")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        track = track_pb2_grpc.TrackSessionStub(channel)
        history = history_pb2_grpc.HistoryStub(channel)
        for device in ("car", "van"):  # slots in that order
            await send(track, device, [[fix(1, 60.17, 24.94, accuracy_m=5)]], admin)
            await until(lambda d=device: activity.state(tenant, d) is not None)
        real = activity.store
        slow = activity.store = SlowCheckpoints(real)
        try:
            round_ = asyncio.ensure_future(activity.save_checkpoints())
            async with asyncio.timeout(HANG_GUARD_S):
                await slow.entered.wait()
            erasing = asyncio.ensure_future(
                history.EraseDevice(
                    history_pb2.EraseDeviceRequest(device_id="van"), metadata=admin
                )
            )
            await until(lambda: activity.state(tenant, "van") is None)
            slow.go.set()
            assert await round_ == 1
            erased = await erasing
        finally:
            activity.store = real
    assert erased.activity_erased
    assert slow.written == [["car"]]
    stored = await server.app.history.load_checkpoints(tenant, ["car", "van"])
    assert stored.devices == ["car"]
