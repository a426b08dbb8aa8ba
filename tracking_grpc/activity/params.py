"""Activity rules: defaults, per-tenant overrides and per-device values.

The rules live in one TOML file named by the ``activity_config`` setting::

    [defaults]                 # every tenant
    min_stop_s = 300

    [tenants.acme]             # one tenant
    stop_radius_m = 80
    time_zone = "Europe/Berlin"

    [tenants.acme.devices.truck-7]   # one device: speed limit and time zone only
    speed_limit_mps = 25
    time_zone = "Europe/Vienna"

>>> ActivityConfig().params("any").min_stop_s
300.0
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from tracking_grpc.errors import InvalidArgument
from tracking_grpc.timestamps import check_time_zone

DEVICE_KEYS = ("speed_limit_mps", "time_zone")


@dataclass(frozen=True, slots=True)
class ActivityParams:
    """The rules of one tenant; see docs/activity.md for what each one does."""

    max_speed_mps: float = 70.0  # a step faster than this is a jump (252 km/h)
    jump_slack_m: float = 5.0  # distance allowed on top of max_speed_mps * dt
    reanchor_fixes: int = 3  # consistent fixes after a jump that move the track
    outlier_reset_s: float = 3600.0  # after this long without fixes any jump is real
    max_accuracy_m: float = 200.0  # worse fixes are kept out of activity
    stop_radius_m: float = 50.0  # a stop stays within this radius ...
    min_stop_s: float = 300.0  # ... for at least this long
    max_gap_s: float = 900.0  # a silence this long while moving splits a trip
    min_trip_distance_m: float = 200.0  # shorter movements are not trips
    min_trip_s: float = 60.0
    motion_window_s: float = 60.0  # speed for the motion state is measured over this
    motion_min_s: float = 30.0  # a new motion state must last this long
    walking_mps: float = 0.5  # stopped below this
    cycling_mps: float = 2.5  # walking below this
    driving_mps: float = 7.0  # cycling below this, driving above
    offline_after_s: float = 600.0  # no fix for this long: offline
    speed_limit_mps: float = 0.0  # 0: no overspeed events unless a device sets one
    overspeed_min_s: float = 10.0  # above the limit at least this long
    time_zone: str = "UTC"  # IANA name for daily summaries

    def checked(self, where: str) -> ActivityParams:
        """Raise InvalidArgument for a value that cannot work."""
        for spec in fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, float) and not (np.isfinite(value) and value >= 0):
                raise InvalidArgument(f"{where}.{spec.name}", "must be >= 0")
        if self.reanchor_fixes < 1:
            raise InvalidArgument(f"{where}.reanchor_fixes", "must be >= 1")
        if not self.walking_mps <= self.cycling_mps <= self.driving_mps:
            raise InvalidArgument(where, "walking_mps <= cycling_mps <= driving_mps")
        check_time_zone(self.time_zone, f"{where}.time_zone")
        return self


def _apply(
    base: ActivityParams, values: Mapping[str, Any], where: str
) -> ActivityParams:
    known = {f.name: f for f in fields(ActivityParams)}
    changes = {}
    for name, raw in values.items():
        if name not in known:
            raise InvalidArgument(f"{where}.{name}", "unknown activity setting")
        kind = type(getattr(base, name))
        try:
            changes[name] = kind(raw)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(
                f"{where}.{name}", f"expected {kind.__name__}"
            ) from exc
    return replace(base, **changes).checked(where)


@dataclass(frozen=True)
class ActivityConfig:
    """Rules per tenant, plus a speed limit and time zone per device."""

    defaults: ActivityParams = field(default_factory=ActivityParams)
    tenants: Mapping[str, ActivityParams] = field(default_factory=dict)
    devices: Mapping[tuple[str, str], Mapping[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], where: str = "activity"
    ) -> ActivityConfig:
        defaults = _apply(
            ActivityParams(), data.get("defaults", {}), f"{where}.defaults"
        )
        tenants: dict[str, ActivityParams] = {}
        devices: dict[tuple[str, str], Mapping[str, Any]] = {}
        for tenant, table in data.get("tenants", {}).items():
            table = dict(table)
            device_tables = table.pop("devices", {})
            tenants[tenant] = _apply(defaults, table, f"{where}.tenants.{tenant}")
            for device, values in device_tables.items():
                spot = f"{where}.tenants.{tenant}.devices.{device}"
                unknown = set(values) - set(DEVICE_KEYS)
                if unknown:
                    raise InvalidArgument(spot, f"only {DEVICE_KEYS} per device")
                _apply(tenants[tenant], values, spot)
                devices[(tenant, device)] = dict(values)
        return cls(defaults, tenants, devices)

    @classmethod
    def from_file(cls, path: str | Path) -> ActivityConfig:
        if not path:
            return cls()
        with Path(path).open("rb") as handle:
            return cls.from_mapping(tomllib.load(handle), str(path))

    def params(self, tenant: str) -> ActivityParams:
        return self.tenants.get(tenant, self.defaults)

    def time_zone(self, tenant: str, device: str) -> str:
        found = self.devices.get((tenant, device), {}).get("time_zone")
        return str(found) if found else self.params(tenant).time_zone

    def speed_limits_mps(self, tenant: str, devices: Sequence[str]) -> np.ndarray:
        """Each device's speed limit (0 means none), for an array of device ids."""
        default = self.params(tenant).speed_limit_mps
        return np.array(
            [
                float(self.devices.get((tenant, d), {}).get("speed_limit_mps", default))
                for d in devices
            ],
            dtype=np.float64,
        )
