"""Which settings ``serve --workers N`` accepts."""

from __future__ import annotations

import pytest

from tracking_grpc.config import Settings
from tracking_grpc.errors import InvalidArgument
from tracking_grpc.workers import check_workers

SHARED = {"database_url": "postgresql://127.0.0.1/x", "redis_url": "redis://127.0.0.1"}


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        pytest.param(Settings(workers=2), "workers", id="embedded-store"),
        pytest.param(
            Settings(workers=2, listen="127.0.0.1:0", **SHARED), "listen", id="port-0"
        ),
        pytest.param(Settings(workers=0), "workers", id="zero"),
    ],
)
def test_refused(settings: Settings, field: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        check_workers(settings)
    assert raised.value.field == field


def test_shared_backends_on_a_fixed_port_are_accepted() -> None:
    check_workers(Settings(workers=4, listen="127.0.0.1:50051", **SHARED))
