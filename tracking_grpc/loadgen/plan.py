"""What one driver process does, and what it reports back (both picklable).

Times are wall-clock seconds since the epoch so that every driver process and the
server share one clock. A device's fixes are scheduled on a fixed grid of whole
milliseconds (open loop): a slow server delays the ack, never the next send.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Window:
    """The phases of a run: ramp-up, settling, then steady state; samples count in
    steady state only."""

    start_s: float  # wall time the ramp begins
    ramp_s: float
    steady_s: float
    settle_s: float = 0.0  # after the last stream opened, before measuring
    # Device streams close this long after the window ends, not at its end: fixes
    # sent in its last milliseconds would otherwise wait for their acks behind
    # 10,000 streams closing at once (a p50 of 0.4 s, a max of 1.2 s, in a run's
    # last 100 ms).
    close_after_s: float = 2.0

    @property
    def steady_start_s(self) -> float:
        return self.start_s + self.ramp_s + self.settle_s

    @property
    def end_s(self) -> float:
        return self.steady_start_s + self.steady_s

    @property
    def close_s(self) -> float:
        """When device streams close: after the last acks of the window."""
        return self.end_s + self.close_after_s

    def counts(self, time_ms: int) -> bool:
        return self.steady_start_s * 1000 <= time_ms < self.end_s * 1000


@dataclass(frozen=True, slots=True)
class Storm:
    """Every device drops at ``drop_s`` and reconnects, jittered over ``spread_s``."""

    drop_s: float
    spread_s: float


@dataclass(frozen=True, slots=True)
class Plan:
    """The work of one driver process."""

    target: str
    window: Window
    index: int = 0  # driver number, for unique device ids and seeds
    # In every device id when set: a run against a server that holds an earlier
    # run's devices (--target) would otherwise send nothing new (their sequence
    # numbers start again at 1, below what the server holds).
    run: str = ""
    devices: int = 0  # device streams of this driver
    device_interval_s: float = 5.0
    streams_per_channel: int = 500
    gateways: int = 0
    gateway_devices: int = 10_000  # devices behind one gateway
    gateway_batch_fixes: int = 1_000
    gateway_rate_per_s: float = 0.0  # batches per second of one gateway
    gateway_max_inflight: int = 64
    watchers: int = 0
    want_events: bool = False
    storm: Storm | None = None
    center: tuple[float, float] = (51.5, -0.12)  # where the devices roam
    spread_deg: float = 0.1
    tenant_token: str = ""  # bearer token when the server requires one
    # Added to the driver process's niceness: the simulated devices stand in for
    # phones on other machines and must not take the CPU from the server they load.
    nice: int = 0
    # CPUs the driver process and its threads may run on; empty: any.
    cpus: tuple[int, ...] = ()
    # Options for node itself (V8's, such as --single-threaded-gc), node driver only.
    node_options: tuple[str, ...] = ()


@dataclass(slots=True)
class WatcherReport:
    """How available one watcher's updates were: its reconnects, and the longest
    gaps without a live update in the steady window, overall and per device."""

    reconnects: int = 0  # streams opened again after one ended
    reconnected_s: list[float] = field(default_factory=list)  # end -> snapshot done
    longest_gap_s: float = 0.0  # window time without any live update
    longest_device_gap_s: float = 0.0  # the same for its worst device
    devices_watched: int | None = None  # None: the whole tenant
    devices_updated: int = 0  # with a live update in the window
    devices_updated_on_last_stream: int = 0  # since the last reconnect


@dataclass(slots=True)
class DriverResult:
    """Samples and counts of one driver process."""

    index: int
    ack_ms: list[float] = field(default_factory=list)  # fix sent -> ack read
    ack_sched_ms: list[float] = field(default_factory=list)  # scheduled -> ack
    send_lag_ms: list[float] = field(default_factory=list)  # scheduled -> written
    watch_ms: list[float] = field(default_factory=list)  # fix time -> watcher
    batch_ms: list[float] = field(default_factory=list)  # gateway call latency
    counts: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    error_details: dict[str, str] = field(default_factory=dict)  # first of each
    started_s: float = field(default_factory=time.time)
    streams_open_max: int = 0
    # per device: (device id, fixes generated, highest seq acked)
    generated: list[tuple[str, int, int]] = field(default_factory=list)
    reconnected_s: list[float] = field(default_factory=list)  # drop -> started
    recovered_s: list[float] = field(default_factory=list)  # drop -> backlog acked
    watchers: list[WatcherReport] = field(default_factory=list)

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def error(self, name: str, n: int = 1, detail: str = "") -> None:
        self.errors[name] = self.errors.get(name, 0) + n
        if name not in self.error_details:
            at = time.time() - self.started_s
            self.error_details[name] = f"first at {at:.1f} s of the run: {detail}"
